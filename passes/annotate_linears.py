"""annotate_linears: find every linear, give it a role from the graph's structure, a smoothing group and a scheme.

Requires: a captured ATen graph (parameters as get_attr nodes).

Ensures:
- every `aten.linear` whose weight is a parameter carries a `LinearInfo` (role, role reason, smoothing group,
  scheme, skip reason, shift, K padding); every k×k convolution carries one too: 16-bit, or the main formats
  without smoothing or branch for resnet convs (input is SiLU output, not feeding a graph output) under
  `conv_kxk="w4a4"` and for every 2-D groups=1 conv under "w4a4-all"; its own group, the SiLU shift on a
  SiLU input (int4: unsigned), every kernel tap's channels padded to the group size (svdq_compiler.conv);
- linears have one canonical form `aten.linear(x, W, b)`: `mm`/`addmm`/`matmul` with a parameter weight are
  rewritten to it, and so are 1×1 convolutions (`conv1x1_as_linear`), between two permutes that move the
  channels last and back;
- a linear that reads a concatenation of differently produced tensors (FLUX single blocks: attention output ‖
  GELU output) is split into one linear per part plus adds (`split_concat_linears`), so each part gets the
  role, smoothing and shift its own input needs;
- the graph computes exactly what it computed before.

Roles (first rule that matches): user skip patterns and adapter hints aside,
0. qkv / cross_kv: the output reaches the query, key or value of an attention (through views, norms, RoPE,
   concatenation); key/value linears whose input-sharing siblings feed no query of that attention read
   another stream: cross_kv;
1. embed: the input is computed from graph inputs through no layer (no linear, conv, norm or attention), or
   through one such embedder only (the second linear of an embedding MLP);
2. final: the output reaches a graph output through views and parameter-only elementwise ops;
3. on the conditioning path (input of lower rank and fewer rows than the token stream): adaln if the output modulates the
   token stream (broadcast multiply/add), final if what it modulates feeds only final linears, else embed;
4. out: the input is an attention output; 5. mlp_down: the input is an activation (plain GELU: shifted
   unsigned under INT4; gated products: signed); 6. mlp_up: the output feeds an activation; 7. other.
Linears that read the same tensor, or share one weight, form one smoothing group.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx

from svdq_compiler.config import FP_SCHEME, QuantConfig, Scheme
from svdq_compiler.conv import ConvGeometry, conv_args
from svdq_compiler.fx_utils import (ACTIVATION_OPS, ATTENTION_OPS, CONV_OPS, MATMUL_OPS, NORM_OPS, SOFTMAX_OPS,
                                    aten, ancestors, drop_unused_attrs, erase_unused, insert_call, is_linear,
                                    is_op, is_view, packet, param_target, rank_of, readers, rows_of, tensor_val,
                                    through_views, walk_forward)
from svdq_compiler.ir import (MODEL_BYTES_META, LinearInfo, Role, annotated_linears, get_attr_value, infer_val,
                              set_attr_value, set_info)
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler import parameter_bytes
from svdq_compiler.report import tensor_bytes
from svdq_compiler.svdquant import layer_name

_WALK_DEPTH = 48  # q/k/v reach attention through views, norms, RoPE and concatenation: a few dozen nodes at most
_SAFETY = {"fp": 0, "weight_only": 1, "w4a4": 2, "w8a8": 2}


def _is_layer(node: torch.fx.Node) -> bool:
    return is_linear(node) or is_op(node, CONV_OPS | ATTENTION_OPS | MATMUL_OPS | SOFTMAX_OPS | NORM_OPS)


# ---- canonical form ---------------------------------------------------------------------------------------


def _transposed_param(gm: torch.fx.GraphModule, node) -> str | None:
    """The 2-D parameter behind `t(W)`, `transpose(W, 0, 1)` or `permute(W, [1, 0])`."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if packet(node) is aten.t or (packet(node) is aten.transpose and sorted(node.args[1:3]) in ([0, 1], [-2, -1],
                                                                                                [-1, 0], [-2, 1])):
        target = param_target(gm, node.args[0])
    elif packet(node) is aten.permute and list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        target = param_target(gm, node.args[0])
    else:
        return None
    return target if target is not None and get_attr_value(gm, target).dim() == 2 else None


def _replace(gm: torch.fx.GraphModule, old: torch.fx.Node, new: torch.fx.Node) -> None:
    old.replace_all_uses_with(new)
    erase_unused(gm, [old])


def _canonicalize_matmuls(gm: torch.fx.GraphModule) -> int:
    """mm / addmm / matmul with a (transposed) parameter weight → aten.linear."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.matmul.default,
                                                              aten.addmm.default):
            continue
        bias = None
        if node.target == aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, weight_arg = node.args[:3]
            if param_target(gm, bias) is None or get_attr_value(gm, bias.target).dim() != 1:
                continue
        else:
            x, weight_arg = node.args[:2]
        weight_target = _transposed_param(gm, weight_arg)
        if weight_target is None:
            continue
        weight_node = weight_arg.args[0]
        linear = insert_call(gm, aten.linear.default, (x, weight_node, bias), before=node, meta_from=node)
        _replace(gm, node, linear)
        rewritten += 1
    return rewritten


def _is_pointwise_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if param_target(gm, node.args[1]) is None:
        return False
    args = conv_args(node)
    weight = get_attr_value(gm, args["weight"].target)
    ones = lambda v, n: v is None or (list(v) if isinstance(v, (list, tuple)) else [v]) in ([1] * n, [1])  # noqa
    zeros = lambda v, n: v is None or (list(v) if isinstance(v, (list, tuple)) else [v]) in ([0] * n, [0])  # noqa
    spatial = weight.dim() - 2
    return (math.prod(weight.shape[2:]) == 1 and args.get("groups", 1) == 1 and not args.get("transposed", False)
            and ones(args.get("stride"), spatial) and zeros(args.get("padding"), spatial))


def _canonicalize_pointwise_convs(gm: torch.fx.GraphModule) -> set[str]:
    """1×1 convolutions → permute(channels last) · linear · permute(back). Returns the converted weights."""
    converted: set[str] = set()
    for node in list(gm.graph.nodes):
        if not is_op(node, CONV_OPS) or not _is_pointwise_conv(gm, node):
            continue
        args = conv_args(node)
        weight_target = args["weight"].target
        if any(not is_op(user, CONV_OPS) for user in args["weight"].users):
            continue
        x, bias = args["input"], args.get("bias")
        rank = rank_of(x)
        if rank is None or rank < 3:
            continue
        if weight_target not in converted:
            weight = get_attr_value(gm, weight_target)
            set_attr_value(gm, weight_target, weight.reshape(weight.shape[0], weight.shape[1]).contiguous())
            converted.add(weight_target)
            infer_val(gm, args["weight"])
        channels_last = [0, *range(2, rank), 1]
        channels_first = [0, rank - 1, *range(1, rank - 1)]
        moved = insert_call(gm, aten.permute.default, (x, channels_last), before=node, meta_from=node)
        linear = insert_call(gm, aten.linear.default, (moved, args["weight"], bias), before=node, meta_from=node)
        back = insert_call(gm, aten.permute.default, (linear, channels_first), before=node, meta_from=node)
        _replace(gm, node, back)
    return converted


@dataclass
class _Attention:
    """Where attentions read their operands and which nodes are their outputs."""

    operands: dict[tuple[torch.fx.Node, int], tuple[str, str]] = field(default_factory=dict)  # (op, arg) → (site, q|k|v)
    outputs: set[torch.fx.Node] = field(default_factory=set)


def _find_attention(gm: torch.fx.GraphModule) -> _Attention:
    found = _Attention()
    for node in gm.graph.nodes:
        if is_op(node, ATTENTION_OPS):
            for index, role in enumerate("qkv"):
                found.operands[(node, index)] = (node.name, role)
            found.outputs.add(node)
        elif is_op(node, SOFTMAX_OPS):
            # Decomposed attention: softmax(f(q·kᵀ)) · v.
            score = next((n for n, _ in zip(ancestors(node, _is_layer), range(8)) if is_op(n, MATMUL_OPS)), None)
            value = None
            frontier = [node]
            for _ in range(6):
                following = []
                for current in frontier:
                    for user in readers(current):
                        if is_op(user, MATMUL_OPS) and user.args[0] is current:
                            value = user
                        elif is_view(user) or packet(user) in (aten._to_copy, aten.clone):
                            following.append(user)
                frontier = following
                if value is not None or not frontier:
                    break
            if score is not None and value is not None:
                found.operands[(score, 0)] = (node.name, "q")
                found.operands[(score, 1)] = (node.name, "k")
                found.operands[(value, 1)] = (node.name, "v")
                found.outputs.add(value)
    return found


def _attention_hits(linear: torch.fx.Node, attention: _Attention) -> set[tuple[str, str]]:
    hits: set[tuple[str, str]] = set()

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        for index, arg in enumerate(user.args[:3]):
            if arg is source and (user, index) in attention.operands:
                hits.add(attention.operands[(user, index)])
        # q/k normalization sits between the projections and attention: walk through norms, not other layers.
        return not (_is_layer(user) and not is_op(user, NORM_OPS))

    walk_forward(linear, visit, _WALK_DEPTH)
    return hits


def _source_kind(node, attention: _Attention) -> str:
    source = through_views(node)
    if source in attention.outputs:
        return "attention"
    if is_op(source, ACTIVATION_OPS):
        return f"activation:{packet(source).__name__}"
    return "other"


def _split_concat_linears(gm: torch.fx.GraphModule, attention: _Attention) -> dict[torch.fx.Node, str]:
    """linear(cat([a, b], -1), W, bias) → linear(a, W[:, :Ka]) + linear(b, W[:, Ka:], bias) where a and b differ
    in kind. Returns the new linear nodes with the reason."""
    split: dict[torch.fx.Node, str] = {}
    for node in list(gm.graph.nodes):
        if not is_linear(node) or param_target(gm, node.args[1]) is None or len(node.args[1].users) != 1:
            continue
        cat = node.args[0]
        if not is_op(cat, frozenset({aten.cat})) or len(cat.args[0]) < 2:
            continue
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim not in (-1, rank_of(cat) - 1):
            continue
        parts = list(cat.args[0])
        kinds = [_source_kind(part, attention) for part in parts]
        if len(set(kinds)) < 2:
            continue
        weight_target = node.args[1].target
        base = layer_name(weight_target)
        weight = get_attr_value(gm, weight_target)
        bias_node = node.args[2] if len(node.args) > 2 else None
        offset, total = 0, None
        for index, part in enumerate(parts):
            width = tensor_val(part).shape[-1]
            part_target = f"{base}.part{index}.weight"
            set_attr_value(gm, part_target, weight[:, offset:offset + width].contiguous())
            offset += width
            with gm.graph.inserting_before(node):
                part_weight = gm.graph.get_attr(part_target)
            part_bias = bias_node if index == len(parts) - 1 else None
            linear = insert_call(gm, aten.linear.default, (part, part_weight, part_bias), before=node,
                                 meta_from=node)
            split[linear] = f"split from {base}: its input concatenates {', '.join(kinds)}"
            total = linear if total is None else insert_call(gm, aten.add.Tensor, (total, linear), before=node,
                                                             meta_from=node)
        _replace(gm, node, total)
        drop_unused_attrs(gm, [weight_target])
    return split


# ---- roles ------------------------------------------------------------------------------------------------


def _graph_inputs_feeding(x: torch.fx.Node, embedders: set[torch.fx.Node]) -> list[str] | None:
    """What `x` is computed from when no layer other than `embedders` lies in between, else None: the graph
    inputs it reads, or the embedders (an embedding MLP's second linear reads its first one)."""
    if _is_layer(x) and x not in embedders:
        return None
    def label(node: torch.fx.Node) -> str:
        return layer_name(node.args[1].target) if node in embedders else node.name

    sources = [label(x)] if x.op == "placeholder" or x in embedders else []
    for node in ancestors(x, lambda n: _is_layer(n) or n in embedders):
        if node in embedders:
            sources.append(label(node))
        elif _is_layer(node):
            return None
        elif node.op == "placeholder":
            sources.append(node.name)
    return sources or None


def _feeds_output(linear: torch.fx.Node) -> bool:
    found = False

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        nonlocal found
        if user.op == "output":
            found = True
            return False
        if _is_layer(user) or user.op != "call_function":
            return False
        others = [n for n in user.all_input_nodes if n is not source]
        return is_view(user) or all(n.op == "get_attr" for n in others)

    walk_forward(linear, visit, _WALK_DEPTH)
    return found


def _modulated(linear: torch.fx.Node) -> list[torch.fx.Node]:
    """The elementwise nodes where this (conditioning-path) linear's output is broadcast over the token stream."""
    hits: list[torch.fx.Node] = []

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_view(user):
            return True
        if user.op != "call_function" or _is_layer(user) or is_op(user, ACTIVATION_OPS):
            return False
        out, src = tensor_val(user), tensor_val(source)
        if out is None or src is None:
            return False
        if len(user.all_input_nodes) > 1 and out.numel() > src.numel():
            hits.append(user)
            return False
        return True

    walk_forward(linear, visit, 16)
    return hits


def _first_linears_after(nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_linear(user):
            found.add(user)
            return False
        return user.op == "call_function" and not _is_layer(user)

    for node in nodes:
        walk_forward(node, visit, 16)
    return found


def _gated_activation(source: torch.fx.Node) -> str | None:
    if packet(source) is not aten.mul:
        return None
    for operand in source.all_input_nodes:
        inner = through_views(operand)
        if is_op(inner, ACTIVATION_OPS):
            return packet(inner).__name__
    return None


def _feeds_activation(linear: torch.fx.Node) -> str | None:
    found: list[str] = []

    def visit(user: torch.fx.Node, source: torch.fx.Node) -> bool:
        if is_op(user, ACTIVATION_OPS):
            found.append(packet(user).__name__)
            return False
        return is_view(user)

    walk_forward(linear, visit, 8)
    return found[0] if found else None


def _assign_roles(gm: torch.fx.GraphModule, linears: list[torch.fx.Node], attention: _Attention
                  ) -> dict[torch.fx.Node, tuple[Role, str, bool]]:
    """role, reason and whether the input is plain-GELU output (shifted unsigned under INT4), per linear."""
    main_rank = max((rank_of(n.args[0]) or 0) for n in linears) if linears else 0
    main_rows = max((rows_of(n.args[0]) or 0) for n in linears) if linears else 0
    hits = {node: _attention_hits(node, attention) for node in linears}
    query_sites: dict[torch.fx.Node, set[str]] = defaultdict(set)
    for node in linears:
        query_sites[node.args[0]] |= {site for site, kind in hits[node] if kind == "q"}

    roles: dict[torch.fx.Node, tuple[Role, str, bool]] = {}
    final: set[torch.fx.Node] = set()
    first_embedders = {n for n in linears if not hits[n] and _graph_inputs_feeding(n.args[0], set())}
    for node in linears:
        x = node.args[0]
        if hits[node]:
            kinds = sorted({kind for _, kind in hits[node]})
            reaches_query = "q" in kinds or any(site in query_sites[x] for site, _ in hits[node])
            sites = ", ".join(sorted({site for site, _ in hits[node]}))
            if reaches_query:
                roles[node] = (Role.QKV, f"feeds {'/'.join(kinds)} of {sites}", False)
            else:
                roles[node] = (Role.CROSS_KV, f"feeds {'/'.join(kinds)} of {sites}; its input-sharing siblings "
                                              f"feed no query there (another stream)", False)
            continue
        sources = _graph_inputs_feeding(x, first_embedders if node not in first_embedders else set())
        if sources:
            roles[node] = (Role.EMBED, f"reads {', '.join(sources)} through no other layer", False)
        elif _feeds_output(node):
            roles[node] = (Role.FINAL, "feeds a graph output through views and parameter-only ops", False)
            final.add(node)

    for node in linears:
        if node in roles:
            continue
        x = node.args[0]
        source = through_views(x)
        rows = rows_of(x)
        if (rank_of(x) or 0) < main_rank and rows is not None and rows < main_rows:
            modulated = _modulated(node)
            if modulated:
                targets = _first_linears_after(modulated)
                if targets and targets <= final:
                    roles[node] = (Role.FINAL, "modulates the input of the final projection", False)
                else:
                    roles[node] = (Role.ADALN, "conditioning-path input; output modulates the token stream", False)
            else:
                roles[node] = (Role.EMBED, f"conditioning-path embedding (input rank {rank_of(x)} < token "
                                           f"stream rank {main_rank})", False)
        elif source in attention.outputs:
            roles[node] = (Role.OUT, f"reads the output of attention {source.name}", False)
        elif is_op(source, ACTIVATION_OPS):
            name = packet(source).__name__
            roles[node] = (Role.MLP_DOWN, f"input is {name} output", name == "gelu")
        elif _gated_activation(source):
            roles[node] = (Role.MLP_DOWN, f"input is a {_gated_activation(source)}-gated product", False)
        elif _feeds_activation(node):
            roles[node] = (Role.MLP_UP, f"output feeds {_feeds_activation(node)}", False)
        else:
            roles[node] = (Role.OTHER, "no structural rule matched", False)
    return roles


# ---- schemes and groups -----------------------------------------------------------------------------------


def _hints(ctx: PassContext) -> dict[str, str]:
    if ctx.adapter is None or not hasattr(ctx.adapter, "role_hints"):
        return {}
    return dict(ctx.adapter.role_hints(ctx.model) or {})


def _skip_pattern(config: QuantConfig, name: str) -> str | None:
    return next((pattern for pattern in config.skip if re.search(pattern, name)), None)


def _scheme_for(config: QuantConfig, info: LinearInfo, unsigned: bool) -> tuple[Scheme, str | None, int]:
    """The scheme, the reason it is 16-bit (if it is), and the K padding."""
    skipped = _skip_pattern(config, info.name)
    if skipped:
        return FP_SCHEME, f"matches skip pattern {skipped!r}", 0
    scheme_name = config.role_schemes.get(str(info.role), "w4a4")
    scheme = config.scheme(scheme_name, unsigned_input=unsigned)
    if scheme.kind == "fp":
        return scheme, f"role {info.role} is kept 16-bit (role_schemes)", 0
    groups = {g for g in (scheme.weight_group, scheme.act_group) if g}
    group = max(groups) if groups else 0
    if group and info.in_features % group:
        if not config.pad_k:
            return FP_SCHEME, f"K={info.in_features} is not a multiple of the group size {group} (pad_k=False)", 0
        return scheme, None, math.ceil(info.in_features / group) * group - info.in_features
    return scheme, None, 0


def _conv_scheme_for(gm: torch.fx.GraphModule, config: QuantConfig, node: torch.fx.Node, info: LinearInfo
                     ) -> tuple[Scheme, str | None, int]:
    """A k×k convolution's scheme (`conv_kxk`), the reason it stays 16-bit, and its K padding (every tap's
    channels are padded to the group size: svdq_compiler.conv)."""
    skipped = _skip_pattern(config, info.name)
    if skipped:
        return FP_SCHEME, f"matches skip pattern {skipped!r}", 0
    if config.conv_kxk == "keep":
        return FP_SCHEME, "k×k convolution kept 16-bit (conv_kxk='keep')", 0
    args = conv_args(node)
    weight = get_attr_value(gm, info.weight)
    if weight.dim() != 4 or args.get("groups", 1) != 1 or args.get("transposed", False):
        return FP_SCHEME, ("only 2-D convolutions with groups=1 are quantized (this one: "
                           f"{weight.dim() - 2}-D, groups={args.get('groups', 1)}, "
                           f"transposed={bool(args.get('transposed', False))})"), 0
    silu = packet(through_views(args["input"])) is aten.silu
    if config.conv_kxk == "w4a4":
        # the reference quantizes only resnet convs (conv1/conv2): embedders, samplers and shortcuts stay 16-bit
        if _graph_inputs_feeding(args["input"], set()):
            return FP_SCHEME, "k×k convolution reading a graph input (embedder) stays 16-bit (conv_kxk='w4a4')", 0
        if _feeds_output(node):
            return FP_SCHEME, "k×k convolution feeding a graph output stays 16-bit (conv_kxk='w4a4')", 0
        if not silu:
            return FP_SCHEME, ("k×k convolution whose input is not SiLU output (not a resnet conv: a sampler or "
                               "shortcut) stays 16-bit (conv_kxk='w4a4'; 'w4a4-all' quantizes it)"), 0
    scheme = config.conv_scheme(silu_input=silu)
    if scheme.kind == "fp":
        return scheme, f"conv_kxk='w4a4' needs activation quantization; preset {config.preset_name} has none", 0
    geometry = ConvGeometry.of(node, weight.shape, scheme.weight_group)
    if geometry.pad_columns and not config.pad_k:
        return FP_SCHEME, (f"C={geometry.channels} is not a multiple of the group size {scheme.weight_group} "
                           "(pad_k=False)"), 0
    return scheme, None, geometry.pad_columns


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, item):
        self.parent.setdefault(item, item)
        while self.parent[item] is not item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a, b):
        root_a, root_b = self.find(a), self.find(b)
        if root_a is not root_b:
            self.parent[root_b] = root_a


def _every_linear_has_a_scheme(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    return [f"{info.name}: no scheme" for _, info in annotated_linears(gm) if info.scheme is None]


@register_pass("annotate_linears", produces=("linears",), ensures=_every_linear_has_a_scheme,
               summary="every linear carries a LinearInfo: role, smoothing group, scheme")
def annotate_linears(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Canonicalize linears, then give each a structural role, a smoothing group and a scheme (module doc)."""
    config = ctx.config
    gm.meta.setdefault(MODEL_BYTES_META, parameter_bytes(gm))
    matmuls = _canonicalize_matmuls(gm)
    pointwise = _canonicalize_pointwise_convs(gm) if config.conv1x1_as_linear else set()
    attention = _find_attention(gm)
    split = _split_concat_linears(gm, attention) if config.split_concat_linears else {}

    linears = [n for n in gm.graph.nodes if is_linear(n) and param_target(gm, n.args[1]) is not None]
    convs = [n for n in gm.graph.nodes if is_op(n, CONV_OPS) and param_target(gm, n.args[1]) is not None]
    roles = _assign_roles(gm, linears, attention)
    hints = _hints(ctx)

    infos: dict[torch.fx.Node, LinearInfo] = {}
    site_count: Counter = Counter()
    for node in linears + convs:
        weight_target = node.args[1].target
        weight = get_attr_value(gm, weight_target)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        site_count[weight_target] += 1
        name = layer_name(weight_target)
        if site_count[weight_target] > 1:
            name += f"@{site_count[weight_target]}"
        if node in roles:
            role, reason, unsigned = roles[node]
            kind = "conv1x1" if weight_target in pointwise else "linear"
            in_features = weight.shape[1]
        else:
            role, reason, unsigned = Role.CONV, "k×k convolution", False
            kind, in_features = "conv", math.prod(weight.shape[1:])
        if node in split:
            reason = f"{reason}; {split[node]}"
        for pattern, hinted in hints.items():
            if re.search(pattern, name):
                role, reason = Role(hinted), f"adapter hint {pattern!r} (structure said {role}: {reason})"
                break
        info = LinearInfo(name=name, weight=weight_target, bias=param_target(gm, bias), in_features=in_features,
                          out_features=weight.shape[0], kind=kind, role=role, role_reason=reason)
        if site_count[weight_target] == 1:
            info.bytes_before = tensor_bytes(weight) + (tensor_bytes(get_attr_value(gm, info.bias))
                                                        if info.bias else 0)
        info.scheme, info.skip_reason, info.pad_k = (_conv_scheme_for(gm, config, node, info) if kind == "conv"
                                                     else _scheme_for(config, info, unsigned))
        info.shift = info.scheme.shift
        infos[node] = info

    # One weight is quantized once: every call site takes the most conservative scheme among them.
    by_weight: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node, info in infos.items():
        by_weight[info.weight].append(node)
    for nodes in by_weight.values():
        safest = min(nodes, key=lambda n: _SAFETY[infos[n].scheme.kind])
        for node in nodes:
            if infos[node].scheme != infos[safest].scheme:
                infos[node].scheme, infos[node].shift, infos[node].pad_k = (
                    infos[safest].scheme, infos[safest].shift, infos[safest].pad_k)
                infos[node].skip_reason = f"shares its weight with {infos[safest].name}"

    groups = _UnionFind()
    first_reader: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in linears:
        groups.find(node)
        x = node.args[0]
        if x in first_reader:
            groups.union(first_reader[x], node)
        else:
            first_reader[x] = node
    for nodes in by_weight.values():
        for other in nodes[1:]:
            if other in infos and is_linear(other):
                groups.union(nodes[0], other)
    for node, info in infos.items():
        # a convolution is never smoothed: it is its own group (quantize_weights measures each group)
        info.group = infos[groups.find(node)].name if node in roles else \
            info.name if info.scheme.kind != "fp" else None
        set_info(node, info)

    skipped = [f"{info.name}: {info.skip_reason}" for info in infos.values() if info.skip_reason]
    stats = {
        "linears_annotated": len(infos),
        "roles": dict(Counter(str(i.role) for i in infos.values())),
        "schemes": dict(Counter(i.scheme.describe() for i in infos.values())),
        "smoothing_groups": len({i.group for i in infos.values() if i.group}),
        "shared_weights": sum(1 for nodes in by_weight.values() if len(nodes) > 1),
        "canonicalized": {"matmul_to_linear": matmuls, "conv1x1_to_linear": len(pointwise),
                          "concat_linears_split": len({r for r in split.values()})},
        "padded_k": [f"{i.name}: K={i.in_features} +{i.pad_k}" for i in infos.values() if i.pad_k],
        "kept_16bit": skipped,
    }
    modified = bool(infos) or matmuls > 0 or bool(pointwise) or bool(split)
    return PassResult(gm, modified, stats)
