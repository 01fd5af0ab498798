"""Where each linear of a compiled graph keeps its tensors, read from the graph alone.

Node annotations do not survive saving, so LoRA application and checkpoint export find the layers of a graph —
compiled in memory or loaded from graph.pt, lowered or fused — from its ops and attribute names:

- a quantized linear is an `svdq.gemm` (lowered) or `svdq.fused_gemm` (fused) reading `<layer>.qweight`,
  `<layer>.wscales` (and `<layer>.wtscale` for nvfp4), with its bias (`<layer>.bias`, or `<layer>.shifted_bias`
  for a shifted post-GELU input);
- its low-rank branch is `<layer>.lora_up` (L1) applied to a down projection: the output of kernel A
  (`svdq.fused_quantize_lora_down`, reading λ and L2), of the previous layer's kernel B when fuse moved the
  quantization into its epilogue, or of `aten.linear(aten.div(x, λ), L2)` in the lowered form; one L2 may be the
  concatenation of several down projections (fuse's `_fused_cat`), each cut out by an `aten.slice`;
- a weight-only linear is an `svdq.weight_only_linear` (lowered) or `svdq.fused_weight_only_linear` (fused);
  its branch, where it has one, is found like a quantized linear's (kernel W applies L1 to its down projection
  `aten.linear([aten.div(x, λ)], L2)`); a 16-bit linear is an `aten.linear` of `<layer>.weight`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from svdq_compiler.codegen.layout import PackedWeight
from svdq_compiler.errors import CheckpointError
from svdq_compiler.fx_utils import attr_target, is_call
from svdq_compiler.ir import get_attr_value
from svdq_compiler.quant import weight_format_of

aten = torch.ops.aten


def _svdq_op(name: str):
    return getattr(torch.ops.svdq, name).default if hasattr(torch.ops.svdq, name) else None


def _layer_of(target: str | None, suffix: str) -> str | None:
    return target[: -len(suffix)] if target and target.endswith(suffix) else None


@dataclass
class QuantizedWeight:
    """A quantized linear's packed weight and bias, and the op that reads them."""

    node: torch.fx.Node  # svdq.fused_gemm, svdq.gemm, svdq.weight_only_linear or svdq.fused_weight_only_linear
    qweight: str
    wscales: str
    wtscale: str | None
    bias: str | None
    fmt: str  # weight format
    group_size: int
    k: int

    def packed(self, gm: torch.fx.GraphModule) -> PackedWeight:
        wtscale = get_attr_value(gm, self.wtscale) if self.wtscale else None
        wscales = get_attr_value(gm, self.wscales)
        dtype = wscales.dtype if wscales.is_floating_point() else get_attr_value(gm, self.bias).dtype
        return PackedWeight(get_attr_value(gm, self.qweight), wscales, wtscale, self.fmt, self.group_size, self.k,
                            dtype)


@dataclass
class Consumer:
    """A linear that reads a branch: its L1 and the node that applies it."""

    layer: str
    up: str  # L1 attribute [N, r]
    node: torch.fx.Node  # svdq.fused_gemm, svdq.fused_weight_only_linear, or aten.linear(down, L1[, bias]) lowered


@dataclass
class Segment:
    """Rows [start, stop) of a down projection that a set of linears reads (q/k/v share one)."""

    start: int
    stop: int
    slices: list[torch.fx.Node]  # aten.slice nodes that cut it out of a concatenated projection
    consumers: list[Consumer] = field(default_factory=list)


@dataclass
class Branch:
    """One down-projection attribute L2, the λ its input is divided by, and everyone who reads it."""

    down: str
    smooth: str | None
    segments: list[Segment] = field(default_factory=list)
    rank_nodes: list[torch.fx.Node] = field(default_factory=list)  # fused ops whose spec holds L2's row count


@dataclass
class Layers:
    """The graph's linears by module name."""

    branched: dict[str, tuple[Branch, Segment, Consumer]] = field(default_factory=dict)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # W4A4 / W8A8, with or without branch
    weight_only: dict[str, QuantizedWeight] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)  # module name → weight attribute

    def names(self) -> set[str]:
        return set(self.quantized) | set(self.weight_only) | set(self.dense)

    def unbranched(self) -> set[str]:
        return set(self.quantized) - set(self.branched)


def find_layers(gm: torch.fx.GraphModule) -> Layers:
    """The linears of a compiled graph (module doc)."""
    fused_gemm, fused_weight_only = _svdq_op("fused_gemm"), _svdq_op("fused_weight_only_linear")
    layers = Layers()
    branches: dict[str, Branch] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if fused_gemm is not None and node.target == fused_gemm:
            from svdq_compiler.codegen.spec import parse_spec

            spec = parse_spec(node.args[-1])
            qweight = attr_target(node.args[2])
            layer = _layer_of(qweight, ".qweight")
            layers.quantized[layer] = QuantizedWeight(node, qweight, attr_target(node.args[3]),
                                                      attr_target(node.args[4]), attr_target(node.args[7]),
                                                      weight_format_of(spec.act), spec.group_size, spec.k)
            if attr_target(node.args[6]) is not None:
                _add_consumer(gm, branches, layers, layer, attr_target(node.args[6]), node.args[5], node)
        elif is_call(node, torch.ops.svdq.gemm.default):
            qweight = attr_target(node.args[2])
            layer = _layer_of(qweight, ".qweight")
            layers.quantized[layer] = QuantizedWeight(node, qweight, attr_target(node.args[3]),
                                                      attr_target(node.args[4]), _lowered_bias(node),
                                                      weight_format_of(node.args[5]), node.args[6], node.args[7])
        elif is_call(node, aten.linear.default) and _layer_of(attr_target(node.args[1]), ".lora_up"):
            up = attr_target(node.args[1])
            _add_consumer(gm, branches, layers, _layer_of(up, ".lora_up"), up, node.args[0], node)
        elif fused_weight_only is not None and node.target == fused_weight_only:
            from svdq_compiler.codegen.spec import parse_spec

            spec = parse_spec(node.args[-1])
            qweight = attr_target(node.args[1])
            layer = _layer_of(qweight, ".qweight")
            layers.weight_only[layer] = QuantizedWeight(
                node, qweight, attr_target(node.args[2]), None, attr_target(node.args[5]), spec.weight,
                spec.group_size, spec.k or _channels(node.args[0]))
            if attr_target(node.args[4]) is not None:  # its branch's up projection, applied inside kernel W
                _add_consumer(gm, branches, layers, layer, attr_target(node.args[4]), node.args[3], node)
        elif is_call(node, torch.ops.svdq.weight_only_linear.default):
            qweight = attr_target(node.args[1])
            layers.weight_only[_layer_of(qweight, ".qweight")] = QuantizedWeight(
                node, qweight, attr_target(node.args[2]), None, attr_target(node.args[3]), node.args[4], node.args[5],
                _channels(node.args[0]))
        elif is_call(node, aten.linear.default) and _layer_of(attr_target(node.args[1]), ".weight"):
            layers.dense[_layer_of(attr_target(node.args[1]), ".weight")] = attr_target(node.args[1])
    for branch in branches.values():
        branch.segments.sort(key=lambda s: s.start)
    return layers


def _channels(x: torch.fx.Node) -> int:
    """The input channels (K) of a weight-only linear reading `x` (-1 when x carries no value)."""
    return x.meta["val"].shape[-1] if "val" in x.meta else -1


def _lowered_bias(gemm: torch.fx.Node) -> str | None:
    """The bias of a lowered quantized linear: on its branch's up projection, or added to the GEMM."""
    for user in gemm.users:
        if is_call(user, aten.add.Tensor):
            other = user.args[1] if user.args[0] is gemm else user.args[0]
            if attr_target(other):
                return attr_target(other)
            if is_call(other, aten.linear.default) and len(other.args) > 2:
                return attr_target(other.args[2])
    return None


def _add_consumer(gm, branches: dict[str, Branch], layers: Layers, layer: str, up: str, down: torch.fx.Node,
                  node: torch.fx.Node) -> None:
    source, start, stop, cut = _resolve_down(down)
    l2, smooth, rank_node = _down_source(source)
    branch = branches.setdefault(l2, Branch(l2, smooth))
    if rank_node is not None and rank_node not in branch.rank_nodes:
        branch.rank_nodes.append(rank_node)
    if start is None:
        start, stop = 0, get_attr_value(gm, l2).shape[0]
    segment = next((s for s in branch.segments if (s.start, s.stop) == (start, stop)), None)
    if segment is None:
        segment = Segment(start, stop, [])
        branch.segments.append(segment)
    if cut is not None and cut not in segment.slices:
        segment.slices.append(cut)
    consumer = Consumer(layer, up, node)
    segment.consumers.append(consumer)
    layers.branched[layer] = (branch, segment, consumer)


def _resolve_down(down: torch.fx.Node) -> tuple[torch.fx.Node, int | None, int | None, torch.fx.Node | None]:
    """A consumer's down input → (the projection's producer, row range or None, the slice node or None)."""
    if is_call(down, aten.slice.Tensor):
        return down.args[0], int(down.args[2]), int(down.args[3]), down
    return down, None, None, None


def _down_source(source: torch.fx.Node) -> tuple[str, str | None, torch.fx.Node | None]:
    """(L2 attribute, λ attribute, the fused node whose spec holds L2's row count) behind a down projection."""
    if is_call(source, operator.getitem):
        producer = source.args[0]
        if is_call(producer, _svdq_op("fused_quantize_lora_down")):
            return attr_target(producer.args[2]), attr_target(producer.args[1]), producer
        if is_call(producer, _svdq_op("fused_gemm")):  # the previous layer computed it in its epilogue
            return attr_target(producer.args[10]), attr_target(producer.args[9]), producer
    if is_call(source, aten.linear.default) and attr_target(source.args[1]):
        xs = source.args[0]
        smooth = attr_target(xs.args[1]) if is_call(xs, aten.div.Tensor) else None
        return attr_target(source.args[1]), smooth, None
    raise CheckpointError(f"cannot trace the low-rank branch through node {source.name} ({source.target})",
                          fix="use graphs made by svdq_compiler.compile (lowered or fused)")


def branch_of(layers: Layers, down: str) -> Branch:
    return next(b for b, _, _ in layers.branched.values() if b.down == down)


def segment_rows(gm: torch.fx.GraphModule, layers: Layers, layer: str) -> torch.Tensor:
    """L2 of a branched layer: its segment's rows of the (possibly concatenated) down projection."""
    branch, segment, _ = layers.branched[layer]
    return get_attr_value(gm, branch.down)[segment.start:segment.stop]
