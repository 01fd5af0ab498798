"""Small helpers for reading and rewriting ATen-level FX graphs: op classes, walks, node insertion.

The passes recognise structure by op class rather than by exact overload, so `packet(node)` (the op's overload
packet, e.g. `aten.view`) is what the sets below hold.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx

from svdq_compiler.ir import get_attr_value, infer_val

aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
    return frozenset(getattr(aten, name) for name in names if hasattr(aten, name))


# Ops that only move, select or relabel data (and eval-mode identities such as dropout and clone).
VIEW_OPS = _packets("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "clone", "contiguous", "expand",
                    "alias", "squeeze", "unsqueeze", "flatten", "unflatten", "_to_copy", "to", "slice", "select", "split",
                    "split_with_sizes", "chunk", "unbind", "detach", "dropout", "native_dropout", "lift_fresh_copy",
                    "pixel_shuffle", "pixel_unshuffle")
ACTIVATION_OPS = _packets("gelu", "silu", "relu", "relu6", "hardswish", "mish", "leaky_relu", "elu", "sigmoid")
NORM_OPS = _packets("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
                    "_fused_rms_norm", "batch_norm", "_native_batch_norm_legit_no_training", "instance_norm")
# flex_attention is a higher-order operator, its own packet; its q, k and v are its first three operands, as SDPA's.
ATTENTION_OPS = _packets("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                         "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                         "_scaled_dot_product_cudnn_attention") | {torch.ops.higher_order.flex_attention}
SOFTMAX_OPS = _packets("softmax", "_softmax", "_safe_softmax")
MATMUL_OPS = _packets("matmul", "bmm", "mm")
CONV_OPS = _packets("conv1d", "conv2d", "conv3d", "convolution")
# Ops that produce no tensor anyone reads (runtime shape and metadata assertions).
NO_OUTPUT_OPS = _packets("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range",
                         "sym_constrain_range_for_size", "_assert_async")


def packet(node: torch.fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", node.target) if node.op == "call_function" else None


def is_op(node: Any, ops: frozenset) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and packet(node) in ops


def is_view(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and (is_op(node, VIEW_OPS) or node.target is operator.getitem)


def is_call(node: Any, target) -> bool:
    """A call of exactly this overload (`is_op` matches any overload of a packet)."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def is_linear(node: Any) -> bool:
    return is_call(node, aten.linear.default)


def call_args(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    values = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of `node` that read its value (runtime assertions are not readers)."""
    return [user for user in node.users if not is_op(user, NO_OUTPUT_OPS)]


def attr_target(node: Any) -> str | None:
    """The attribute path a get_attr node reads (None for anything else)."""
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def tensor_val(node: Any) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def rank_of(node: Any) -> int | None:
    val = tensor_val(node)
    return None if val is None else val.dim()


def size_hint(size: Any) -> int | None:
    """A concrete value for a (possibly symbolic) size: the example value capture traced with."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def rows_of(node: Any) -> int | None:
    """How many rows a linear reading `node` processes (every dimension but the last), at the example size."""
    val = tensor_val(node)
    if val is None:
        return None
    rows = 1
    for size in val.shape[:-1]:
        hint = size_hint(size)
        if hint is None:
            return None
        rows *= hint
    return rows


def through_views(node: Any) -> Any:
    """Walk back from `node` through view-like ops to the node that computed the data."""
    while is_view(node):
        node = node.args[0]
    return node


def param_target(gm: torch.fx.GraphModule, node: Any) -> str | None:
    """The attribute path if `node` is a get_attr of a tensor, else None."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        if isinstance(value, torch.Tensor):
            return node.target
    return None


def walk_forward(start: torch.fx.Node, visit: Callable[[torch.fx.Node, torch.fx.Node], bool],
                 max_depth: int) -> None:
    """Breadth-first over readers: `visit(reader, from_node)` returns True to continue through `reader`."""
    frontier, seen = [start], {start}
    for _ in range(max_depth):
        following = []
        for node in frontier:
            for user in readers(node):
                if user in seen:
                    continue
                seen.add(user)
                if visit(user, node):
                    following.append(user)
        if not following:
            return
        frontier = following


def ancestors(node: torch.fx.Node, stop: Callable[[torch.fx.Node], bool]) -> Iterator[torch.fx.Node]:
    """Every node `node` depends on, nearest first; `stop(n)` True yields n but does not walk past it."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        if not stop(current):
            stack.extend(current.all_input_nodes)


def insert_call(gm: torch.fx.GraphModule, target: Any, args: tuple, *, before: torch.fx.Node | None = None,
                after: torch.fx.Node | None = None, meta_from: torch.fx.Node | None = None,
                kwargs: dict | None = None) -> torch.fx.Node:
    """Insert a call_function node, copy the module stack of `meta_from`, and infer its fake value."""
    context = gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)
    with context:
        node = gm.graph.call_function(target, args, kwargs or {})
    if meta_from is not None and "nn_module_stack" in meta_from.meta:
        node.meta["nn_module_stack"] = dict(meta_from.meta["nn_module_stack"])
    infer_val(gm, node)
    return node


def get_attr_node(gm: torch.fx.GraphModule, target: str, *, before: torch.fx.Node) -> torch.fx.Node:
    """A get_attr node for `target` placed before `before` (reusing one that already dominates it)."""
    for node in gm.graph.nodes:
        if node is before:
            break
        if node.op == "get_attr" and node.target == target:
            return node
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    infer_val(gm, node)
    return node


def erase_unused(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> None:
    """Erase the given nodes once nothing reads them, then whatever they alone read. Runtime assertions on an
    erased node go with it (they would keep a replaced computation alive); impure nodes stay. Local, where a
    whole-graph dead-code sweep per rewrite would make a pass quadratic in the graph's size."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop()
        if (node in erased or node.graph is not gm.graph or readers(node) or node.op in ("placeholder", "output")
                or node.is_impure()):
            continue
        for assertion in list(node.users):
            gm.graph.erase_node(assertion)
        pending.extend(node.all_input_nodes)
        gm.graph.erase_node(node)
        erased.add(node)


def drop_unused_attrs(gm: torch.fx.GraphModule, targets: Iterable[str]) -> list[str]:
    """Delete those of `targets` (parameter or buffer paths) that no get_attr node reads any more."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    dropped = []
    for target in dict.fromkeys(targets):
        if target in used:
            continue
        *parents, leaf = target.split(".")
        owner = gm.get_submodule(".".join(parents)) if parents else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
            dropped.append(target)
    return dropped
