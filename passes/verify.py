"""verify: check the IR's invariants between passes.

Requires: nothing. Ensures: nothing changes; raises VerifyError listing every broken invariant:
- every call_function node has a fake value (meta["val"]) so shapes stay known;
- every get_attr target exists, and no parameter or buffer is left without a user;
- every op is allowed at this stage (in the style of tinygrad's spec): ATen ops, Python getitem/symbolic-size
  helpers and assertions always; an `svdq` op only once a pass that introduces it (its `ops`) has run, so the
  reference ops appear with `lower` and the fused kernels with `fuse`; an op of any other namespace never;
- every quantized linear's annotation points at attributes that exist;
- after a pass, that pass's own contract (`Pass.ensures`) finds no problem (run_passes checks it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from svdq_compiler.errors import SvdqError
from svdq_compiler.ir import LinearInfo, get_attr_value, info
from svdq_compiler.pipeline import PASS_REGISTRY, PassContext, PassResult, register_pass


class VerifyError(SvdqError):
    """The IR broke an invariant; this is a compiler bug, reported with the nodes involved."""


# Python operators on symbolic sizes (e.g. a position embedding computed from the token grid).
_PY_OPS = {operator.getitem, operator.add, operator.mul, operator.sub, operator.floordiv, operator.truediv,
           operator.mod, operator.neg, operator.pow, operator.eq, operator.ge, operator.gt, operator.le, operator.lt,
           operator.ne, torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not, torch._assert}
# Namespaces of operator overloads allowed at every stage; an svdq op needs the pass that introduces it.
_ALWAYS_NAMESPACES = ("aten", "higher_order")


def op_allowed(target, stage_ops) -> bool:
    """Whether `target` may appear once passes that introduce `stage_ops` have run."""
    if target in _PY_OPS or target in stage_ops:
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return target.namespace in _ALWAYS_NAMESPACES
    # sym_size / sym_numel helpers that torch.export emits as plain functions
    return (getattr(target, "__module__", "") or "").startswith("torch.fx.experimental.symbolic_shapes")


def _returns_value(target) -> bool:
    """Assertion ops (aten._assert_tensor_metadata, _assert_scalar) return nothing, so they carry no value."""
    schema = getattr(target, "_schema", None)
    return schema is None or len(schema.returns) > 0


def _attr_exists(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        get_attr_value(gm, target)
    except AttributeError:
        return False
    return True


def problems_in(gm: torch.fx.GraphModule, stage_ops=None) -> list[str]:
    """The broken invariants of `gm`; `stage_ops` are the svdq ops allowed (None: any that a pass introduces)."""
    if stage_ops is None:
        stage_ops = frozenset().union(*(p.ops for p in PASS_REGISTRY.values()))
    problems: list[str] = []
    used_attrs: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            used_attrs.add(node.target)
            if not _attr_exists(gm, node.target):
                problems.append(f"{node.name}: get_attr target {node.target!r} does not exist")
        elif node.op == "call_function":
            if "val" not in node.meta and _returns_value(node.target):
                problems.append(f"{node.name}: no fake value (meta['val']) for {node.target}")
            if not op_allowed(node.target, stage_ops):
                problems.append(f"{node.name}: op {node.target} is not allowed at this stage")
        meta = info(node)
        if isinstance(meta, LinearInfo):
            for field_name in ("smooth", "lora_down", "lora_up", "qweight", "wscales", "wtscale"):
                target = getattr(meta, field_name)
                if target is not None and not _attr_exists(gm, target):
                    problems.append(f"{node.name} ({meta.name}): {field_name} {target!r} does not exist")
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used_attrs:
            problems.append(f"parameter/buffer {name!r} is not used by any node")
    return problems


def check(gm: torch.fx.GraphModule, stage_ops, contract_problems: list[str], *, stage: str) -> None:
    """Raise VerifyError listing the IR's problems and the pass contract's."""
    problems = problems_in(gm, stage_ops) + list(contract_problems)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more" if len(problems) > 10 else "")
        raise VerifyError(f"IR verification failed {stage}: {shown}",
                          fix="this is a compiler bug: rerun with --dump-ir to see the pass that broke it")


@register_pass("verify", summary="the IR's invariants hold (raises VerifyError otherwise)")
def verify(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Check the IR's invariants; never modifies the graph."""
    check(gm, ctx.stage_ops, [], stage="at the verify pass")
    nodes = sum(1 for _ in gm.graph.nodes)
    return PassResult(gm, False, {"nodes": nodes, "problems": 0})
