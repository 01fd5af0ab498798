"""lower: replace every quantized linear with the reference `svdq` ops (docs/architecture.md, "Lowered form").

Requires: linears, quantized (QTensors in ctx.quantized, or an import's packed tensors in ctx.imported). Ensures:
- per (input, λ, shift, format) of act-quantized linears, one `svdq.quantize_act(x, λ, shift, fmt, G[, t])`
  (q/k/v share it; fmt "uint4"/"uint8" for shifted post-GELU inputs), and per linear
  `acc = svdq.gemm(codes, scales, qweight, wscales, wtscale, fmt, G, K, dtype[, t])` and
  `y = aten.add(acc, aten.linear(down, L1, bias'))` (or `acc + bias'` without a branch); the branch's
  `down = aten.linear(aten.div(x, λ), L2)` stays shared per (input, L2);
- weight-only linears become `svdq.weight_only_linear(x, qweight, wscales, bias, fmt, G)` (x/λ where AWQ
  scaled them, plus their branch `aten.linear(down, L1)` where they have one);
- quantized k×k convolutions become `svdq.conv2d(x, qweight, wscales, wtscale, bias, shift, fmt, G, kernel,
  stride, padding, dilation)` (the weight packed as its tap-major im2col matrix, svdq_compiler.conv);
- nvfp4 activations get their calibrated per-tensor scale (quant.py): a float32 buffer `<layer>.act_scale` =
  nvfp4_act_scale(max over calibration of |x/λ|, config.nvfp4_act_headroom), the last argument of the
  quantize_act, gemm and conv2d that use it (1, the one-level range, when calibration had no real data);
- packed weights (codegen.layout) are buffers `<layer>.qweight`, `<layer>.wscales`, `<layer>.wtscale`; with a
  shift the bias is `<layer>.shifted_bias` = b − shift·Σⱼ R̃[:, j]/λⱼ, so the shifted quantized path plus the
  unshifted branch equals the original layer; unquantized weights and residuals are gone;
- each layer's LinearInfo moves to its gemm / weight_only_linear node; inserted shared nodes carry a QuantOpInfo;
- `gm.meta["svdq_layers"]` holds the per-layer report (svdq_compiler.report). The graph runs on any device.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

import svdq_compiler.ops  # noqa: F401  (registers torch.ops.svdq)
from svdq_compiler.codegen.layout import pack_weight
from svdq_compiler.config import UNSIGNED_OF
from svdq_compiler.codegen.spec import ActQuant
from svdq_compiler.conv import conv_args
from svdq_compiler.errors import QuantizationError
from svdq_compiler.fx_utils import aten, drop_unused_attrs, erase_unused, get_attr_node, insert_call
from svdq_compiler.ir import (LAYERS_META, META_KEY, LinearInfo, OpTag, QuantOpInfo, annotated_linears,
                              get_attr_value, set_attr_value, set_info)
from svdq_compiler.pipeline import PassContext, PassResult, register_pass
from svdq_compiler.quant import dequantize, nvfp4_act_scale
from svdq_compiler.report import layer_report
from svdq_compiler.svdquant import branch_add, conv_geometry, layer_name, raw_input, site_name

svdq = torch.ops.svdq


def _packed(gm: torch.fx.GraphModule, store: dict, info: LinearInfo) -> tuple[str, str, str | None]:
    """Register the weight's packed buffers once; returns their targets."""
    layer = layer_name(info.weight)
    targets = (f"{layer}.qweight", f"{layer}.wscales", f"{layer}.wtscale")
    if not hasattr(gm.get_submodule(layer), "qweight"):
        if info.weight not in store:
            raise QuantizationError(f"no quantized weight for {info.name}", fix="run quantize_weights before lower")
        packed = pack_weight(store[info.weight])
        set_attr_value(gm, targets[0], packed.qweight, as_buffer=True)
        set_attr_value(gm, targets[1], packed.wscales, as_buffer=True)
        if packed.wtscale is not None:
            set_attr_value(gm, targets[2], packed.wtscale, as_buffer=True)
    has_tscale = hasattr(gm.get_submodule(layer), "wtscale")
    return targets[0], targets[1], targets[2] if has_tscale else None


def _place_imported(gm: torch.fx.GraphModule, imported: dict[str, torch.Tensor], info: LinearInfo) -> None:
    """Put the layer's packed tensors that an import read from a checkpoint (ctx.imported) on the graph, where
    _packed and _shifted_bias then find them."""
    layer = layer_name(info.weight)
    for target in (f"{layer}.qweight", f"{layer}.wscales", f"{layer}.wtscale", f"{layer}.shifted_bias"):
        if target in imported:
            set_attr_value(gm, target, imported.pop(target), as_buffer=True)


def _shifted_bias(gm: torch.fx.GraphModule, store: dict, info: LinearInfo) -> str:
    """b − shift·Σⱼ R̃[:, j]/λⱼ, registered once per weight."""
    target = f"{layer_name(info.weight)}.shifted_bias"
    if not hasattr(gm.get_submodule(layer_name(info.weight)), "shifted_bias"):
        residual = dequantize(store[info.weight], torch.float64)
        if info.smooth is not None:
            residual = residual / get_attr_value(gm, info.smooth).double()
        dtype = store[info.weight].dtype
        bias = torch.zeros(residual.shape[0], dtype=torch.float64, device=residual.device) if info.bias is None else \
            get_attr_value(gm, info.bias).double()
        set_attr_value(gm, target, (bias - info.shift * residual.sum(1)).to(dtype), as_buffer=True)
    return target


def _act_scale(gm: torch.fx.GraphModule, ctx: PassContext, node: torch.fx.Node, info: LinearInfo) -> torch.fx.Node:
    """The get_attr of the layer's calibrated nvfp4 activation scale `<layer>.act_scale` (module doc)."""
    target = f"{layer_name(info.weight)}.act_scale"
    if not hasattr(gm.get_submodule(layer_name(info.weight)), "act_scale"):
        calibration = ctx.calibration
        stats = calibration.sites.get(site_name(node, info)) if calibration is not None else None
        if stats is None or calibration.data_free:
            scale = torch.ones((), dtype=torch.float32, device=get_attr_value(gm, info.weight).device)
        else:
            absmax = stats.absmax(info.shift).float()
            if info.smooth is not None:
                absmax = absmax / get_attr_value(gm, info.smooth).float()
            scale = nvfp4_act_scale(absmax.max(), ctx.config.nvfp4_act_headroom)
        set_attr_value(gm, target, scale, as_buffer=True)
    return get_attr_node(gm, target, before=node)


LOWERED_OPS = frozenset({svdq.quantize_act.default, svdq.gemm.default, svdq.weight_only_linear.default,
                         svdq.conv2d.default})


def _no_quantized_linear_left(gm: torch.fx.GraphModule, ctx: PassContext) -> list[str]:
    problems = [f"{node.name} ({info.name}): scheme {info.scheme.describe()} but still {node.target}"
                for node, info in annotated_linears(gm) if info.scheme is not None and info.scheme.kind != "fp"
                and node.target not in LOWERED_OPS]
    problems += [f"{target}: imported, but no lowered layer took it" for target in ctx.imported]
    return problems + ([] if LAYERS_META in gm.meta else [f"gm.meta[{LAYERS_META!r}] (the layer report) is missing"])


@dataclass
class _Lowering:
    """What the lowerings of one pass share: the quantized weights and the activation quantizers made so far."""

    gm: torch.fx.GraphModule
    ctx: PassContext
    store: dict
    quantizers: dict[tuple, tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)


def _act_format(info: LinearInfo) -> str:
    """The format the layer's input is quantized in: a shifted (post-GELU/SiLU) input is unsigned."""
    return UNSIGNED_OF[info.scheme.act] if info.shift else info.scheme.act


def _lower_conv(lw: _Lowering, node: torch.fx.Node, info: LinearInfo, x: torch.fx.Node, weight_nodes: list,
                geometry) -> torch.fx.Node:
    scheme = info.scheme
    bias = conv_args(node).get("bias")
    act_scale = (_act_scale(lw.gm, lw.ctx, node, info),) if scheme.act == "nvfp4" else ()
    out = insert_call(lw.gm, svdq.conv2d.default,
                      (x, *weight_nodes, bias, info.shift, _act_format(info),
                       scheme.weight_group, list(geometry.kernel), list(geometry.stride),
                       list(geometry.padding), list(geometry.dilation), *act_scale), before=node, meta_from=node)
    node.replace_all_uses_with(out)
    return out


def _lower_weight_only(lw: _Lowering, node: torch.fx.Node, info: LinearInfo, x: torch.fx.Node, weight_nodes: list,
                       geometry) -> torch.fx.Node:
    scheme = info.scheme
    bias = node.args[2] if len(node.args) > 2 else None
    # an AWQ-scaled layer reads x/λ (its smooth_div stays a 16-bit aten.div); a branch stays beside it
    out = insert_call(lw.gm, svdq.weight_only_linear.default,
                      (node.args[0], weight_nodes[0], weight_nodes[1], bias, scheme.weight, scheme.weight_group),
                      before=node, meta_from=node)
    node.replace_all_uses_with(out)
    return out


def _lower_gemm(lw: _Lowering, node: torch.fx.Node, info: LinearInfo, x: torch.fx.Node, weight_nodes: list,
                geometry) -> torch.fx.Node:
    gm, scheme = lw.gm, info.scheme
    fmt = _act_format(info)
    key = (x, info.smooth, info.shift, fmt, scheme.act_group)
    if key not in lw.quantizers:
        smooth = get_attr_node(gm, info.smooth, before=node) if info.smooth else None
        act_scale = (_act_scale(gm, lw.ctx, node, info),) if fmt == "nvfp4" else ()
        quantize = insert_call(gm, svdq.quantize_act.default, (x, smooth, info.shift, fmt, scheme.act_group,
                                                                *act_scale), before=node, meta_from=node)
        set_info(quantize, QuantOpInfo(op=OpTag.QUANTIZE_ACT, linears=[],
                                       spec=ActQuant(fmt, scheme.act_group, info.shift, smooth=smooth is not None)))
        codes = insert_call(gm, operator.getitem, (quantize, 0), after=quantize)
        scales = insert_call(gm, operator.getitem, (quantize, 1), after=codes)
        lw.quantizers[key] = (quantize, codes, scales)
        lw.counts["quantize_act"] += 1
    quantize, codes, scales = lw.quantizers[key]
    quantize.meta[META_KEY].linears.append(info.name)
    out = insert_call(gm, svdq.gemm.default, (codes, scales, *weight_nodes, fmt, scheme.act_group,
                                               info.in_features, x.meta["val"].dtype, *quantize.args[5:]),
                      before=node, meta_from=node)
    if info.shift:
        bias = get_attr_node(gm, _shifted_bias(gm, lw.store, info), before=node)
        info.bias = bias.target
    else:
        bias = node.args[2] if len(node.args) > 2 else None
    total = branch_add(node)
    if total is not None:
        up = total.args[1]
        up.args = (up.args[0], up.args[1], bias)
        total.replace_input_with(node, out)
        set_info(total, QuantOpInfo(op=OpTag.LORA_ADD, linears=[info.name]))
    else:
        result = out if bias is None else insert_call(gm, aten.add.Tensor, (out, bias), before=node, meta_from=node)
        node.replace_all_uses_with(result)
    return out


# The lowered op of each form of quantized layer, and the function that emits it.
LOWERINGS = {"conv2d": _lower_conv, "weight_only_linear": _lower_weight_only, "gemm": _lower_gemm}


def _form(info: LinearInfo) -> str:
    return "conv2d" if info.kind == "conv" else "weight_only_linear" if info.scheme.act is None else "gemm"


@register_pass("lower", requires=("linears", "quantized"), produces=("lowered",), ops=LOWERED_OPS,
               ensures=_no_quantized_linear_left,
               summary="quantized linears are svdq.quantize_act / svdq.gemm / svdq.weight_only_linear + branch")
@torch.no_grad()
def lower(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite each quantized linear into the lowered form (module doc)."""
    lw = _Lowering(gm, ctx, ctx.quantized, counts=Counter({"quantize_act": 0, "gemm": 0, "weight_only_linear": 0,
                                                      "conv2d": 0}))
    replaced, old_attrs = [], []
    for node, info in list(annotated_linears(gm)):
        if info.scheme is None or info.scheme.kind == "fp":
            continue
        geometry = conv_geometry(gm, node, info) if info.kind == "conv" else None
        _place_imported(gm, ctx.imported, info)
        qweight, wscales, wtscale = _packed(gm, lw.store, info)
        weight_nodes = [get_attr_node(gm, t, before=node) if t else None for t in (qweight, wscales, wtscale)]
        x = raw_input(node)
        old_attrs += [info.weight] + ([info.bias] if info.bias else [])
        form = _form(info)
        out = LOWERINGS[form](lw, node, info, x, weight_nodes, geometry)
        lw.counts[form] += 1
        info.qweight, info.wscales, info.wtscale = qweight, wscales, wtscale
        set_info(out, info)
        replaced.append(node)
    erase_unused(gm, replaced)
    dropped = drop_unused_attrs(gm, old_attrs)
    gm.meta[LAYERS_META] = layer_report(gm, ctx.config)
    stats = {"lowered": len(replaced), "ops": dict(lw.counts), "dropped_attributes": len(dropped)}
    return PassResult(gm, bool(replaced), stats)
