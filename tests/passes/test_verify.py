"""verify: Before (a hand-built graph, sound or broken in one way) → verify → Expected: the graph unchanged, or
a VerifyError naming the node and the invariant."""

import pytest
import torch
from hand_built import W4A4, SharedInput, before, context, run_one
from torch.testing import FileCheck

from svdq_compiler.fx_utils import insert_call, is_linear
from svdq_compiler.ir import format_ir
from svdq_compiler.passes.verify import VerifyError


def sound():
    torch.manual_seed(0)
    return before(SharedInput(), torch.randn(4, 64), {"a": W4A4})


def test_a_sound_graph_passes_unchanged():
    gm = sound()
    text = format_ir(gm)
    ctx = context()
    gm = run_one(gm, ctx, "verify")
    assert format_ir(gm) == text and ctx.records[-1]["stats"]["problems"] == 0


def _quantize_before_lower(gm):
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    insert_call(gm, torch.ops.svdq.quantize_act.default, (x, None, 0.0, "int4", 64), after=x)
    return "op svdq.quantize_act.default is not allowed at this stage"


@torch.library.custom_op("svdq_verify_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def _foreign_op(gm):
    """An op of a namespace no pass introduces (a library registered outside torch and svdq)."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    insert_call(gm, torch.ops.svdq_verify_test.twice.default, (x,), after=x)
    return "op svdq_verify_test.twice.default is not allowed at this stage"


def _lost_fake_value(gm):
    linear = next(n for n in gm.graph.nodes if is_linear(n))
    del linear.meta["val"]
    return f"{linear.name}: no fake value"


def _missing_attribute(gm):
    linear = next(n for n in gm.graph.nodes if is_linear(n))
    linear.meta["svdq"].smooth = "a.smooth"
    return "smooth 'a.smooth' does not exist"


def _unused_parameter(gm):
    gm.register_parameter("stray", torch.nn.Parameter(torch.ones(3)))
    return "parameter/buffer 'stray' is not used"


@pytest.mark.parametrize("breakage", [_quantize_before_lower, _foreign_op, _lost_fake_value, _missing_attribute,
                                      _unused_parameter])
def test_each_broken_invariant_is_named(breakage):
    gm = sound()
    expected = breakage(gm)
    gm.recompile()
    with pytest.raises(VerifyError) as raised:
        run_one(gm, context(), "verify")
    FileCheck().check("IR verification failed").check(expected).run(str(raised.value))
