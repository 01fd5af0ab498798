"""fuse: replace the lowered SVDQuant op chains with the two generated kernels per linear.

Requires: lower (the lowered form of docs/architecture.md). Per smoothing group reading x:
    codes, scales = svdq.quantize_act(x, λ, shift, fmt, G[, act_scale])
    down          = aten.linear(aten.div(x, λ), L2)            (or aten.linear(x, L2) without smoothing)
    per linear:  acc = svdq.gemm(codes, scales, Wq, Ws, tscale, fmt, G, K, dtype[, act_scale])
                 y   = aten.add(acc, aten.linear(down, L1, bias))   (or aten.add(acc, bias), or acc alone)

Ensures:
- each gemm chain becomes one `svdq.fused_gemm` (kernel B): the gemm, the low-rank up projection and bias, and
  the pointwise nodes that follow with a single reader (GELU tanh/erf, SiLU, multiply by a gate, add a residual,
  scalar multiply/add) as its epilogue. When the result then feeds another group's `quantize_act` (and its
  down projection), that quantization moves into the epilogue too ("quantize for the next layer"): the 16-bit
  result is only stored if something else reads it, and that group needs no kernel A.
- each `svdq.weight_only_linear` (W4A16: AdaLN under int4, every linear under w4a16-nf4) becomes one
  `svdq.fused_weight_only_linear` (kernel W: the weight dequantized in registers), with a LoRA branch added
  beside it (`+ aten.linear(down, L1)`) and the same single-reader pointwise successors as its epilogue.
- each remaining quantize_act, with the group's down projections, becomes one `svdq.fused_quantize_lora_down`
  (kernel A). Groups whose linears have different L2 (FLUX single blocks: q/k/v and the MLP share λ) get one
  kernel A over the concatenated L2, so x is still read once.
- every fused node carries its spec string (so a loaded graph regenerates its kernels) and `meta["val"]`; a
  fused_gemm keeps its linear's `LinearInfo` (the per-layer report reads it), a kernel A gets a `QuantOpInfo`;
  the graph computes what the lowered graph computed (the reference path of the fused ops is op
  for op the lowered chain; the kernels match it within rounding).
- statistics: linears fused, kernel A count, quantizations absorbed, W4A16 layers fused and those kept as
  `svdq.weight_only_linear`, epilogues absorbed by kind, and every fallback (a chain left unfused) with its reason;
  quantized k×k convolutions stay `svdq.conv2d` (reference op), listed as "conv: no generated kernel".
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

import svdq_compiler.codegen.fused_ops  # noqa: F401  (registers torch.ops.svdq.fused_*)
from svdq_compiler.codegen.spec import (ActQuant, Epilogue, GemmSpec, QuantizeNext, QuantizeSpec, SpecError,
                                        WeightOnlySpec)
from svdq_compiler.ir import (LinearInfo, OpTag, QuantOpInfo, annotated_linears, get_attr_value, info, infer_val,
                              set_attr_value, set_info)
from svdq_compiler.fx_utils import (attr_target, call_args, drop_unused_attrs, erase_unused, is_call, readers,
                                    tensor_val)
from svdq_compiler.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _static_int(size: Any) -> int | None:
    return size if isinstance(size, int) else None


def _linears_of(node: torch.fx.Node) -> list[str]:
    meta = info(node)
    if isinstance(meta, LinearInfo):
        return [meta.name]
    return list(meta.linears) if isinstance(meta, QuantOpInfo) and meta.linears else [node.name]


# ---------------------------------------------------------------------------------------------------------
# Matching


@dataclass
class _Down:
    """A low-rank down projection of a group: linear(div(x, λ), L2) or linear(x, L2)."""

    node: torch.fx.Node  # the linear
    div: torch.fx.Node | None
    weight: str  # L2 attribute


@dataclass
class _Chain:
    gemm: torch.fx.Node
    args: dict[str, Any]
    down: torch.fx.Node | None = None  # the down projection's value the up projection reads
    lora_up: str | None = None
    bias: str | None = None
    nodes: list[torch.fx.Node] = field(default_factory=list)  # gemm … end, in order
    epilogue: list[Epilogue] = field(default_factory=list)
    operands: list[torch.fx.Node] = field(default_factory=list)

    @property
    def end(self) -> torch.fx.Node:
        return self.nodes[-1]


def _broadcasts_into(operand: torch.fx.Node, value: torch.fx.Node) -> bool:
    """operand broadcasts to value's shape without enlarging it, with the same dtype (sizes compared as
    written, so symbolic token counts need no guards)."""
    o, v = tensor_val(operand), tensor_val(value)
    if o is None or v is None or o.dtype != v.dtype or o.dim() > v.dim():
        return False
    for o_size, v_size in zip(reversed(o.shape), reversed(v.shape)):
        if not (isinstance(o_size, int) and o_size == 1) and str(o_size) != str(v_size):
            return False
    return True


def _match_branch(chain: _Chain, with_bias: bool = True) -> None:
    """acc + linear(down, L1, bias) or acc + bias, absorbed into the chain (without a bias: acc + linear(down, L1)
    only, for a weight-only linear, whose bias is its own argument)."""
    acc = chain.gemm
    users = readers(acc)
    if len(users) != 1 or not is_call(users[0], aten.add.Tensor) or users[0].kwargs.get("alpha", 1) != 1:
        return
    add = users[0]
    other = add.args[1] if add.args[0] is acc else add.args[0]
    if is_call(other, aten.linear.default) and len(readers(other)) == 1:
        down, weight = other.args[0], attr_target(other.args[1])
        has_bias = len(other.args) > 2 and other.args[2] is not None
        bias = attr_target(other.args[2]) if has_bias else None
        if weight is None or (has_bias and (bias is None or not with_bias)):
            return
        chain.down, chain.lora_up, chain.bias = down, weight, bias
        chain.nodes += [other, add]
    elif with_bias and attr_target(other) is not None and tensor_val(other) is not None and tensor_val(other).dim() == 1:
        chain.bias = attr_target(other)
        chain.nodes.append(add)


def _match_pointwise(chain: _Chain, dtype: torch.dtype) -> None:
    """Follow single-reader pointwise successors whose other operand is a scalar or broadcasts into the value."""
    while True:
        value = chain.end
        users = readers(value)
        if len(users) != 1:
            return
        node = users[0]
        out = tensor_val(node)
        if out is None or out.dtype != dtype or tensor_val(value) is None or out.shape != tensor_val(value).shape:
            return
        if is_call(node, aten.gelu.default) and node.args[0] is value:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            chain.epilogue.append(Epilogue("gelu_tanh" if approximate == "tanh" else "gelu_erf"))
        elif is_call(node, aten.silu.default) and node.args[0] is value:
            chain.epilogue.append(Epilogue("silu"))
        elif (is_call(node, aten.mul.Tensor) or is_call(node, aten.add.Tensor)) and node.kwargs.get("alpha", 1) == 1 \
                and value in node.args[:2] and node.args[0] is not node.args[1]:
            other = node.args[1] if node.args[0] is value else node.args[0]
            kind = "mul" if is_call(node, aten.mul.Tensor) else "add"
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                chain.epilogue.append(Epilogue(f"{kind}_scalar", float(other)))
            elif isinstance(other, torch.fx.Node) and _broadcasts_into(other, value):
                chain.epilogue.append(Epilogue(kind))
                chain.operands.append(other)
            else:
                return
        elif (is_call(node, aten.mul.Scalar) or is_call(node, aten.add.Scalar)) and node.args[0] is value \
                and node.kwargs.get("alpha", 1) == 1:
            kind = "mul" if is_call(node, aten.mul.Scalar) else "add"
            chain.epilogue.append(Epilogue(f"{kind}_scalar", float(node.args[1])))
        else:
            return
        chain.nodes.append(node)


def _downs_of(x: torch.fx.Node, smooth: torch.fx.Node | None) -> list[_Down]:
    """The down projections reading x (through div(x, λ) with the same λ attribute, when smoothed)."""
    smooth_attr = attr_target(smooth)
    downs = []
    sources = [x] if smooth is None else [
        u for u in readers(x)
        if is_call(u, aten.div.Tensor) and u.args[0] is x and attr_target(u.args[1]) == smooth_attr]
    for source in sources:
        for user in readers(source):
            if is_call(user, aten.linear.default) and user.args[0] is source and attr_target(user.args[1]) is not None \
                    and (len(user.args) < 3 or user.args[2] is None):
                downs.append(_Down(user, source if smooth is not None else None, attr_target(user.args[1])))
    return downs


@dataclass
class _Group:
    """One quantize_act with its getitem outputs and the down projections of the same input."""

    node: torch.fx.Node
    args: dict[str, Any]
    codes: torch.fx.Node | None
    scales: torch.fx.Node | None
    downs: list[_Down]

    @property
    def x(self) -> torch.fx.Node:
        return self.args["x"]


def _group(node: torch.fx.Node) -> _Group | None:
    args = call_args(node)
    outputs: dict[int, torch.fx.Node] = {}
    for user in readers(node):
        if user.target is not operator.getitem:
            return None
        outputs[user.args[1]] = user
    return _Group(node, args, outputs.get(0), outputs.get(1), _downs_of(args["x"], args.get("smooth")))


def _act_quant(group: _Group) -> ActQuant:
    fmt = group.args["fmt"]
    shift = float(group.args.get("shift") or 0.0)
    return ActQuant(fmt, int(group.args["group_size"]), shift, smooth=group.args.get("smooth") is not None)


# ---------------------------------------------------------------------------------------------------------
# Rewriting


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.stats: dict[str, Any] = {"linears_fused": 0, "kernel_a": 0, "quantize_absorbed": 0,
                                      "weight_only_fused": 0, "lora_down_concatenated": 0, "fallen_back": 0}
        self.epilogues: Counter = Counter()
        self.fallbacks: list[dict[str, str]] = []
        self.concatenated: dict[str, str] = {}  # original L2 attribute → the concatenated buffer holding it

    def fallback(self, linears: list[str], reason: str) -> None:
        for name in linears:
            self.fallbacks.append({"linear": name, "reason": reason})

    def get_attr(self, target: str) -> torch.fx.Node:
        node = self.graph.get_attr(target)
        infer_val(self.gm, node)
        return node

    def call(self, target, args: tuple, meta: QuantOpInfo | None = None) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        infer_val(self.gm, node)
        if meta is not None:
            set_info(node, meta)
        return node

    def outputs(self, node: torch.fx.Node, count: int) -> list[torch.fx.Node]:
        return [self.call(operator.getitem, (node, index)) for index in range(count)]

    def lora_down_weight(self, downs: list[_Down]) -> tuple[str, list[int]]:
        """The L2 attribute for the distinct downs (concatenated when more than one) and each one's rank."""
        weights = list(dict.fromkeys(d.weight for d in downs))
        ranks = [get_attr_value(self.gm, w).shape[0] for w in weights]
        if len(weights) == 1:
            return weights[0], ranks
        target = weights[0] + "_fused_cat"
        set_attr_value(self.gm, target, torch.cat([get_attr_value(self.gm, w) for w in weights], dim=0),
                       as_buffer=True)
        self.concatenated.update((w, target) for w in weights)
        self.stats["lora_down_concatenated"] += 1
        return target, ranks

    def replace_downs(self, downs: list[_Down], down_value: torch.fx.Node, ranks: list[int]) -> None:
        """Route each down projection's readers to its slice of the (possibly concatenated) output."""
        weights = list(dict.fromkeys(d.weight for d in downs))
        offsets = dict(zip(weights, [sum(ranks[:i]) for i in range(len(ranks))]))
        sizes = dict(zip(weights, ranks))
        for down in downs:
            value = down_value
            if len(weights) > 1:
                start = offsets[down.weight]
                with self.graph.inserting_after(down_value):
                    value = self.call(aten.slice.Tensor, (down_value, -1, start, start + sizes[down.weight]))
            down.node.replace_all_uses_with(value)


def _kernel_b(rw: _Rewriter, chain: _Chain, quantize_next: tuple[_Group, QuantizeNext] | None) -> None:
    gm, graph = rw.gm, rw.graph
    args = chain.args
    fmt, group_size, k = args["fmt"], int(args["group_size"]), int(args["k"])
    dtype = args["out_dtype"]
    w_codes = args["w_codes"]
    n = _static_int(tensor_val(w_codes).shape[0]) if tensor_val(w_codes) is not None else None
    rank = get_attr_value(gm, chain.lora_up).shape[1] if chain.lora_up else 0
    qn = quantize_next[1] if quantize_next else None
    spec = GemmSpec(act=fmt, group_size=group_size, rank=rank, bias=chain.bias is not None,
                    dtype=_DTYPE_NAMES[dtype], k=k, n=n, epilogue=tuple(chain.epilogue), quantize_next=qn)
    spec.validate()
    end = chain.end
    linears = _linears_of(chain.gemm)
    with graph.inserting_before(end):
        attr = lambda target: rw.get_attr(target) if target else None  # noqa: E731
        next_group = quantize_next[0] if quantize_next else None
        next_smooth = next_lora_down = None
        next_ranks: list[int] = []
        if next_group is not None:
            next_smooth = attr(attr_target(next_group.args.get("smooth")))
            if qn.rank:
                weight, next_ranks = rw.lora_down_weight(next_group.downs)
                next_lora_down = attr(weight)
        fused = rw.call(torch.ops.svdq.fused_gemm.default, (
            args["a_codes"], args["a_scales"], attr(attr_target(w_codes)), attr(attr_target(args["w_scales"])),
            attr(attr_target(args.get("w_tscale"))), chain.down, attr(chain.lora_up), attr(chain.bias),
            list(chain.operands), next_smooth, next_lora_down, attr(attr_target(args.get("a_tscale"))),
            attr(attr_target(next_group.args.get("act_scale"))) if next_group is not None else None,
            spec.to_string()),
            # the fused node implements the gemm's linear: its LinearInfo (from lower) moves along
            info(chain.gemm) if isinstance(info(chain.gemm), LinearInfo)
            else QuantOpInfo(OpTag.FUSED_GEMM, linears, spec))
        count = (1 if spec.emits_output else 0) + (2 + (1 if qn.rank else 0) if qn else 0)
        outputs = rw.outputs(fused, count)
    position = 0
    if spec.emits_output:
        end.replace_all_uses_with(outputs[0])
        position = 1
    if next_group is not None:
        for index, old in ((0, next_group.codes), (1, next_group.scales)):
            if old is not None:
                old.replace_all_uses_with(outputs[position + index])
        if qn.rank:
            rw.replace_downs(next_group.downs, outputs[position + 2], next_ranks)
        rw.stats["quantize_absorbed"] += 1
    rw.stats["linears_fused"] += len(linears)
    rw.epilogues.update(step.kind for step in chain.epilogue)
    if qn is not None:
        rw.epilogues["quantize_next"] += 1


def _kernel_w(rw: _Rewriter, chain: _Chain) -> None:
    """Replace a weight-only chain (weight_only_linear [+ linear(down, L1)] [+ epilogue]) by kernel W."""
    gm, graph = rw.gm, rw.graph
    args = chain.args
    x, w_codes = args["x"], args["w_codes"]
    x_val = tensor_val(x)
    n = _static_int(tensor_val(w_codes).shape[0]) if tensor_val(w_codes) is not None else None
    rank = get_attr_value(gm, chain.lora_up).shape[1] if chain.lora_up else 0
    spec = WeightOnlySpec(args["fmt"], int(args["group_size"]), rank, args.get("bias") is not None,
                          _DTYPE_NAMES[x_val.dtype], k=_static_int(x_val.shape[-1]), n=n,
                          epilogue=tuple(chain.epilogue))
    spec.validate()
    end = chain.end
    linears = _linears_of(chain.gemm)
    with graph.inserting_before(end):
        attr = lambda target: rw.get_attr(target) if target else None  # noqa: E731
        fused = rw.call(torch.ops.svdq.fused_weight_only_linear.default, (
            x, attr(attr_target(w_codes)), attr(attr_target(args["w_scales"])), chain.down, attr(chain.lora_up),
            attr(attr_target(args.get("bias"))), list(chain.operands), spec.to_string()),
            info(chain.gemm) if isinstance(info(chain.gemm), LinearInfo)
            else QuantOpInfo(OpTag.FUSED_WEIGHT_ONLY_LINEAR, linears, spec))
    end.replace_all_uses_with(fused)
    rw.stats["weight_only_fused"] += len(linears)
    rw.epilogues.update(step.kind for step in chain.epilogue)


def _fuse_weight_only(rw: _Rewriter, node: torch.fx.Node) -> None:
    args = call_args(node)
    chain = _Chain(node, args, nodes=[node])
    linears = _linears_of(node)
    x_val = tensor_val(args["x"])
    dtype = x_val.dtype if x_val is not None else None
    bias = args.get("bias")
    if dtype not in _DTYPE_NAMES or attr_target(args["w_codes"]) is None or attr_target(args["w_scales"]) is None \
            or (bias is not None and attr_target(bias) is None):
        rw.fallback(linears, f"weight-only operands are not plain weights, or input dtype {dtype} has no kernel")
        return
    _match_branch(chain, with_bias=False)
    _match_pointwise(chain, dtype)
    try:
        _kernel_w(rw, chain)
    except SpecError as exc:
        rw.fallback(linears, f"kernel W: {exc.what}")
        return
    erase_unused(rw.gm, chain.nodes)


def _kernel_a(rw: _Rewriter, group: _Group) -> None:
    graph = rw.graph
    quant = _act_quant(group)
    x = group.x
    x_val = tensor_val(x)
    dtype = _DTYPE_NAMES.get(x_val.dtype) if x_val is not None else None
    if dtype is None:
        raise SpecError(f"activations of dtype {None if x_val is None else x_val.dtype} have no kernel")
    downs = group.downs
    rank = 0
    weight = None
    ranks: list[int] = []
    if downs:
        weight, ranks = rw.lora_down_weight(downs)
        rank = sum(ranks)
    spec = QuantizeSpec(quant, rank, dtype, k=_static_int(x_val.shape[-1]))
    spec.validate()
    order = {node: index for index, node in enumerate(graph.nodes)}
    first = min([group.node] + [d.node for d in downs] + [d.div for d in downs if d.div is not None],
                key=order.__getitem__)
    with graph.inserting_before(first):
        smooth = rw.get_attr(attr_target(group.args["smooth"])) if quant.smooth else None
        fused = rw.call(torch.ops.svdq.fused_quantize_lora_down.default,
                        (x, smooth, rw.get_attr(weight) if weight else None,
                         rw.get_attr(attr_target(group.args.get("act_scale"))) if quant.fmt == "nvfp4" else None,
                         spec.to_string()),
                        QuantOpInfo(OpTag.FUSED_QUANTIZE_LORA_DOWN, _group_linears(group), spec))
        codes, scales, down = rw.outputs(fused, 3)
    for old, new in ((group.codes, codes), (group.scales, scales)):
        if old is not None:
            old.replace_all_uses_with(new)
    if downs:
        rw.replace_downs(downs, down, ranks)
    rw.stats["kernel_a"] += 1


def _group_linears(group: _Group) -> list[str]:
    """The linears that read this group's codes."""
    users = list(group.codes.users) if group.codes is not None else []
    return [name for user in users for name in _linears_of(user)] or [group.node.name]


def _quantize_next_candidate(chain: _Chain, groups: dict[torch.fx.Node, _Group]) -> tuple[_Group, bool] | None:
    """The group whose quantize_act reads the chain's result (with its downs), and whether other readers remain."""
    end = chain.end
    quantizers = [u for u in readers(end) if u in groups and groups[u].x is end]
    if len(quantizers) != 1:
        return None
    group = groups[quantizers[0]]
    absorbed = {group.node} | {d.node for d in group.downs} | {d.div for d in group.downs if d.div is not None}
    # a div may also feed linears that are not downs of this group: then it stays, and y must be stored
    others = [u for u in readers(end) if u not in absorbed]
    for down in group.downs:
        if down.div is not None and any(u not in absorbed for u in readers(down.div)):
            others.append(down.div)
    return group, bool(others)


FUSED_OPS = frozenset({torch.ops.svdq.fused_quantize_lora_down.default, torch.ops.svdq.fused_gemm.default,
                       torch.ops.svdq.fused_weight_only_linear.default})


def _every_kernel_annotated(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return [f"{node.name}: {node.target} carries no annotation" for node in gm.graph.nodes
            if node.target in FUSED_OPS and info(node) is None]


@register_pass("fuse", requires=("lowered",), produces=("fused",), ops=FUSED_OPS, ensures=_every_kernel_annotated,
               summary="lowered chains run as generated kernels A (quantize + down) and B (GEMM + up + epilogue)")
def fuse(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace lowered SVDQuant chains with `svdq.fused_quantize_lora_down` and `svdq.fused_gemm`."""
    quantize_op, gemm_op = torch.ops.svdq.quantize_act.default, torch.ops.svdq.gemm.default
    weight_only_op = torch.ops.svdq.weight_only_linear.default
    groups = {node: g for node in gm.graph.nodes if is_call(node, quantize_op) and (g := _group(node)) is not None}
    rw = _Rewriter(gm)
    weights_before = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    absorbed_groups: set[torch.fx.Node] = set()
    for gemm in [node for node in gm.graph.nodes if is_call(node, gemm_op) or is_call(node, weight_only_op)]:
        if is_call(gemm, weight_only_op):
            _fuse_weight_only(rw, gemm)
            continue
        args = call_args(gemm)
        chain = _Chain(gemm, args, nodes=[gemm])
        linears = _linears_of(gemm)
        dtype = args["out_dtype"]
        if dtype not in _DTYPE_NAMES or attr_target(args["w_codes"]) is None or attr_target(args["w_scales"]) is None:
            rw.fallback(linears, f"gemm operands are not plain weights, or out dtype {dtype} has no kernel")
            continue
        _match_branch(chain)
        _match_pointwise(chain, dtype)
        quantize_next = None
        candidate = _quantize_next_candidate(chain, groups)
        if candidate is not None and candidate[0].node not in absorbed_groups:
            group, others = candidate
            quant = _act_quant(group)
            if not quant.per_row:
                ranks = [get_attr_value(gm, w).shape[0] for w in dict.fromkeys(d.weight for d in group.downs)]
                quantize_next = (group, QuantizeNext(quant, rank=sum(ranks), emit_output=others))
        try:
            _kernel_b(rw, chain, quantize_next)
        except SpecError as exc:
            rw.fallback(linears, f"kernel B: {exc.what}")
            continue
        absorbed = list(chain.nodes)
        if quantize_next is not None:
            group = quantize_next[0]
            absorbed_groups.add(group.node)
            absorbed += [group.node] + [n for n in (group.codes, group.scales) if n is not None]
            absorbed += [d.node for d in group.downs] + [d.div for d in group.downs if d.div is not None]
        erase_unused(gm, absorbed)
    for node, group in groups.items():
        if node in absorbed_groups:
            continue
        try:
            _kernel_a(rw, _group(node) or group)
        except SpecError as exc:
            rw.fallback(_group_linears(group), f"kernel A: {exc.what}")
    # dead nodes first, then the weights nobody reads; either makes the pass modify (the code is regenerated)
    removed = gm.graph.eliminate_dead_code()
    removed = bool(drop_unused_attrs(gm, weights_before)) or removed
    for _, linear in annotated_linears(gm):  # a linear's L2 now lives in the concatenated buffer
        linear.lora_down = rw.concatenated.get(linear.lora_down, linear.lora_down)
    rw.stats["weight_only_kept"] = sum(1 for node in gm.graph.nodes if is_call(node, weight_only_op))
    for node in gm.graph.nodes:  # quantized k×k convolutions run the reference svdq.conv2d
        if is_call(node, torch.ops.svdq.conv2d.default):
            rw.fallback(_linears_of(node), "conv: no generated kernel")
    gm.graph.lint()
    stats = dict(rw.stats)
    stats["epilogues"] = dict(sorted(rw.epilogues.items()))
    stats["fallen_back"] = len(rw.fallbacks)
    stats["fallbacks"] = rw.fallbacks
    modified = bool(stats["linears_fused"] or stats["kernel_a"] or stats["weight_only_fused"] or removed)
    return PassResult(gm, modified, stats)
