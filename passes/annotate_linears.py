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

The rewrites are this pass's own; what it decides comes from library modules, one concern each: roles from
`svdq_compiler.roles` (the structural rules), schemes from `svdq_compiler.scheme_policy`, smoothing groups
from `svdq_compiler.grouping`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch
import torch.fx

from svdq_compiler import parameter_bytes
from svdq_compiler.conv import conv_args
from svdq_compiler.fx_utils import (CONV_OPS, aten, drop_unused_attrs, erase_unused, insert_call, is_linear, is_op,
                                    packet, param_target, rank_of, tensor_val)
from svdq_compiler.grouping import smoothing_groups
from svdq_compiler.ir import (MODEL_BYTES_META, LinearInfo, Role, annotated_linears, get_attr_value, infer_val,
                              set_attr_value, set_info)
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.report import tensor_bytes
from svdq_compiler.roles import Attention, adapter_hints, assign_roles, find_attention, hinted_role, source_kind
from svdq_compiler.scheme_policy import conv_scheme_for, scheme_for, share_safest_scheme
from svdq_compiler.svdquant import layer_name


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


def _split_concat_linears(gm: torch.fx.GraphModule, attention: Attention) -> dict[torch.fx.Node, str]:
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
        kinds = [source_kind(part, attention) for part in parts]
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
    attention = find_attention(gm)
    split = _split_concat_linears(gm, attention) if config.split_concat_linears else {}

    linears = [n for n in gm.graph.nodes if is_linear(n) and param_target(gm, n.args[1]) is not None]
    convs = [n for n in gm.graph.nodes if is_op(n, CONV_OPS) and param_target(gm, n.args[1]) is not None]
    roles = assign_roles(linears, attention)
    hints = adapter_hints(ctx.adapter, ctx.model)

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
        role, reason = hinted_role(hints, name, role, reason)
        info = LinearInfo(name=name, weight=weight_target, bias=param_target(gm, bias), in_features=in_features,
                          out_features=weight.shape[0], kind=kind, role=role, role_reason=reason)
        if site_count[weight_target] == 1:
            info.bytes_before = tensor_bytes(weight) + (tensor_bytes(get_attr_value(gm, info.bias))
                                                        if info.bias else 0)
        info.scheme, info.skip_reason, info.pad_k = (conv_scheme_for(gm, config, node, info) if kind == "conv"
                                                     else scheme_for(config, info, unsigned))
        info.shift = info.scheme.shift
        infos[node] = info

    by_weight: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node, info in infos.items():
        by_weight[info.weight].append(node)
    for nodes in by_weight.values():
        share_safest_scheme([infos[node] for node in nodes])
    representative = smoothing_groups(linears, by_weight.values())
    for node, info in infos.items():
        # a convolution is never smoothed: it is its own group (quantize_weights measures each group)
        info.group = infos[representative[node]].name if node in roles else \
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
