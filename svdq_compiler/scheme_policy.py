"""Scheme policy: which scheme each annotated linear or k×k convolution gets, and why it stays 16-bit when it
does. The preset's `role_schemes` map a role to a scheme; user skip patterns, group-size divisibility (`pad_k`)
and the `conv_kxk` setting can keep a layer 16-bit, and the reason is recorded for the report. One weight is
quantized once, so the call sites of a shared weight take the most conservative scheme among them.
"""

from __future__ import annotations

import math
import re

import torch
import torch.fx

from svdq_compiler.config import FP_SCHEME, QuantConfig, Scheme
from svdq_compiler.conv import ConvGeometry, conv_args
from svdq_compiler.fx_utils import aten, packet, through_views
from svdq_compiler.ir import LinearInfo, get_attr_value
from svdq_compiler.roles import feeds_output, graph_inputs_feeding

_SAFETY = {"fp": 0, "weight_only": 1, "w4a4": 2, "w8a8": 2}  # lower is more conservative


def skip_pattern(config: QuantConfig, name: str) -> str | None:
    return next((pattern for pattern in config.skip if re.search(pattern, name)), None)


def scheme_for(config: QuantConfig, info: LinearInfo, unsigned: bool) -> tuple[Scheme, str | None, int]:
    """The scheme, the reason it is 16-bit (if it is), and the K padding."""
    skipped = skip_pattern(config, info.name)
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


def conv_scheme_for(gm: torch.fx.GraphModule, config: QuantConfig, node: torch.fx.Node, info: LinearInfo
                     ) -> tuple[Scheme, str | None, int]:
    """A k×k convolution's scheme (`conv_kxk`), the reason it stays 16-bit, and its K padding (every tap's
    channels are padded to the group size: svdq_compiler.conv)."""
    skipped = skip_pattern(config, info.name)
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
        if graph_inputs_feeding(args["input"], set()):
            return FP_SCHEME, "k×k convolution reading a graph input (embedder) stays 16-bit (conv_kxk='w4a4')", 0
        if feeds_output(node):
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


def share_safest_scheme(infos: list[LinearInfo]) -> None:
    """The call sites of one weight all take the most conservative scheme among them (the first, on a tie)."""
    safest = min(infos, key=lambda info: _SAFETY[info.scheme.kind])
    for info in infos:
        if info.scheme != safest.scheme:
            info.scheme, info.shift, info.pad_k = safest.scheme, safest.shift, safest.pad_k
            info.skip_reason = f"shares its weight with {safest.name}"
