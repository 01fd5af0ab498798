"""Pass infrastructure: registry, ordering, requirements, statistics, dumps and IR printing."""

import io
import json

import pytest
import torch

import svdq_compiler
from svdq_compiler.errors import InputError
from svdq_compiler.ir import LinearInfo, Role, format_ir, set_info
from svdq_compiler.pipeline import (PASS_REGISTRY, SVDQUANT_STEPS, PassContext, PassResult, register_pass,
                                    run_passes, svdquant_pipeline)
from svdq_compiler.passes.verify import VerifyError, problems_in


def tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


@pytest.fixture
def captured():
    model = tiny_mlp()
    return model, svdq_compiler.capture(model, (torch.randn(4, 64),))


@pytest.fixture
def temp_passes():
    added = []

    def add(name, fn, **kwargs):
        added.append(name)
        return register_pass(name, summary="test", **kwargs)(fn)

    yield add
    for name in added:
        PASS_REGISTRY.pop(name, None)


def test_capture_runs_equal_to_eager(captured):
    model, gm = captured
    x = torch.randn(4, 64)
    torch.testing.assert_close(gm(x), model(x))
    assert sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default) == 2


def test_run_passes_records_stats_dumps_and_prints(captured, temp_passes, tmp_path):
    _, gm = captured

    def annotate_first(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
        set_info(node, LinearInfo(name="0", weight="0.weight", bias="0.bias", in_features=64, out_features=128,
                                  role=Role.MLP_UP))
        return PassResult(gm, True, {"annotated": 1})

    def no_change(gm, ctx):
        return PassResult(gm, False, {})

    first = temp_passes("t_annotate", annotate_first, produces=("linears",))
    second = temp_passes("t_noop", no_change, requires=("linears",))
    out = io.StringIO()
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"), dump_dir=tmp_path,
                      print_ir_after_change=True, verify_each=True, out=out)
    run_passes(gm, ctx, [first, second])
    assert [r["name"] for r in ctx.records] == ["t_annotate", "t_noop"]
    assert ctx.records[0]["stats"] == {"annotated": 1} and ctx.records[0]["wall_s"] >= 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_capture.py", "000_capture.stats.json", "001_t_annotate.py", "001_t_annotate.stats.json",
        "002_t_noop.py", "002_t_noop.stats.json"]
    assert "# svdq: 0 role=mlp_up" in (tmp_path / "001_t_annotate.py").read_text()
    assert json.loads((tmp_path / "001_t_annotate.stats.json").read_text())["modified"] is True
    printed = out.getvalue()
    assert "IR after t_annotate" in printed and "IR after t_noop" not in printed


def test_missing_requirement_is_a_clear_error(captured, temp_passes):
    _, gm = captured
    needy = temp_passes("t_needy", lambda gm, ctx: PassResult(gm, False), requires=("calibration",))
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"))
    with pytest.raises(InputError, match="reads \\['calibration'\\].*run calibrate(, calibrate_blocks)? first"):
        run_passes(gm, ctx, [needy])


def test_a_pass_names_only_known_data(temp_passes):
    with pytest.raises(ValueError, match="unknown data"):
        temp_passes("t_typo", lambda gm, ctx: PassResult(gm, False), requires=("calibratoin",))


def test_a_broken_contract_fails_verification_after_its_pass(captured, temp_passes):
    _, gm = captured
    broken = temp_passes("t_broken", lambda gm, ctx: PassResult(gm, False),
                         ensures=lambda gm, ctx: ["the promise is not kept"])
    ctx = PassContext(config=svdq_compiler.QuantConfig.preset("int4"), verify_each=True)
    with pytest.raises(VerifyError, match="after t_broken: the promise is not kept"):
        run_passes(gm, ctx, [broken])
    run_passes(gm, PassContext(config=svdq_compiler.QuantConfig.preset("int4")), [broken])  # only when verifying


@torch.library.custom_op("arch_test::scale", mutates_args=())
def _foreign_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_foreign_scale.register_fake
def _(x):
    return torch.empty_like(x)


def test_verify_refuses_an_op_of_a_foreign_namespace(captured):
    _, gm = captured
    assert problems_in(gm) == []
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    with gm.graph.inserting_after(linear):
        foreign = gm.graph.call_function(torch.ops.arch_test.scale.default, (linear,))
    linear.replace_all_uses_with(foreign, delete_user_cb=lambda user: user is not foreign)
    foreign.meta["val"] = linear.meta["val"]
    gm.recompile()
    assert [p for p in problems_in(gm) if "arch_test.scale" in p] == [
        f"{foreign.name}: op arch_test.scale.default is not allowed at this stage"]


def test_svdq_ops_are_allowed_only_after_the_pass_that_introduces_them():
    from svdq_compiler.passes.lower import LOWERED_OPS
    from svdq_compiler.passes.verify import op_allowed

    gemm = torch.ops.svdq.gemm.default
    assert not op_allowed(gemm, frozenset())
    assert op_allowed(gemm, LOWERED_OPS) and op_allowed(torch.ops.aten.linear.default, frozenset())
    assert not op_allowed(torch.ops.svdq.fused_gemm.default, LOWERED_OPS)


def test_every_step_of_the_pipeline_is_registered():
    assert [p.name for p in svdquant_pipeline()] == [name for name, _ in SVDQUANT_STEPS]


def test_unknown_pass_name_lists_the_valid_ones():
    with pytest.raises(InputError, match="annotate_linears"):
        svdquant_pipeline(["no_such_pass"])


def test_verify_reports_unknown_attr(captured):
    _, gm = captured
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    set_info(node, LinearInfo(name="0", weight="0.weight", bias=None, in_features=64, out_features=128,
                              qweight="does.not.exist"))
    assert any("does.not.exist" in p for p in problems_in(gm))
    with pytest.raises(VerifyError):
        PASS_REGISTRY["verify"](gm, PassContext(config=svdq_compiler.QuantConfig.preset("int4")))


def test_format_ir_comments_annotated_nodes_only(captured):
    _, gm = captured
    text = format_ir(gm)
    assert "# svdq:" not in text and "aten.linear.default" in text
