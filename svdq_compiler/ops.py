"""Reference runtime ops, registered as ``torch.ops.svdq.*`` (their place in the graph: docs/architecture.md, "Lowered form").

Each op is a ``torch.library.custom_op`` with a plain PyTorch implementation (the numerical ground truth the
Triton kernels are tested against) and a fake implementation that uses only shapes, so graphs with symbolic
token counts export, save and load. Inputs are ``[..., K]``; codes and scales are in the packed layout of
``svdq_compiler.codegen.layout``. A group size of 0 means one group per row (int8).

``fmt`` names the activation format; the weight format follows from it: ``int4`` (int4 × int4), ``uint4``
(uint4 activations × int4 weights, for shifted post-GELU inputs), ``nvfp4``, ``int8``.

nvfp4 activations are two-level (svdq_compiler.quant): every op that quantizes them or multiplies their codes
takes the per-tensor fp32 activation scale (``act_scale`` / ``a_tscale``, one value; the compiler calibrates
it); the other formats take None there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from svdq_compiler import quant
from svdq_compiler.codegen.layout import (PackedWeight, check_packed_act, check_packed_weight, code_columns,
                                          effective_group, pack_act, round_up, scale_dtype, scale_values,
                                          unpack_codes, unpack_weight)
from svdq_compiler.conv import ConvGeometry, padded_channels
from svdq_compiler.errors import QuantizationError

WEIGHT_ONLY_FORMATS = tuple(name for name, f in quant.FORMATS.items() if f.weight_only)
_FP32_EXACT = 2 ** 24
# Bounds the [M, N] partial products the reference GEMM keeps per chunk of groups.
_GEMM_CHUNK_ELEMENTS = 1 << 24


def _check_fmt(fmt: str, allowed: tuple[str, ...], op: str) -> None:
    if fmt not in allowed:
        raise QuantizationError(f"unknown format {fmt!r}", where=f"svdq::{op}", fix=f"use one of {allowed}")


def _check_vector(t: Optional[torch.Tensor], length, name: str, op: str) -> None:
    if t is not None and (t.dim() != 1 or t.shape[0] != length or not t.is_floating_point()):
        raise QuantizationError(f"{name} must be a float vector of length {length}, got {t.dtype} {list(t.shape)}",
                                where=f"svdq::{op}")


def _check_input(x: torch.Tensor, op: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantizationError(f"x must be float16, bfloat16 or float32, got {x.dtype}", where=f"svdq::{op}")
    if x.dim() < 1:
        raise QuantizationError("x must have a channel (last) dimension", where=f"svdq::{op}")


# ---- svdq::quantize_act ---------------------------------------------------------------------------------------


def smoothed_input(x: torch.Tensor, smooth: Optional[torch.Tensor], shift: float) -> torch.Tensor:
    """(x + shift)/λ, computed in fp32 and rounded once to x's dtype: the tensor the activation quantizer sees."""
    if smooth is None and shift == 0:
        return x
    xs = x.float() + shift if shift else x.float()
    if smooth is not None:
        xs = xs / smooth.float()
    return xs.to(x.dtype)


@torch.library.custom_op("svdq::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, smooth: Optional[torch.Tensor], shift: float, fmt: str,
                 group_size: int, act_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q((x + shift)/λ), dynamic per token and group → (packed codes, scales); nvfp4 under `act_scale`."""
    _check_quantize_act(x, smooth, fmt, act_scale, "quantize_act")
    q = quant.quantize_act(smoothed_input(x, smooth, shift), fmt, group_size, tensor_scale=act_scale,
                           name="svdq::quantize_act input")
    return pack_act(q)


def check_act_scale(act_scale: Optional[torch.Tensor], fmt: str, op: str) -> None:
    """nvfp4 needs its per-tensor activation scale (one fp32 value); the other formats have none."""
    if fmt != "nvfp4":
        if act_scale is not None:
            raise QuantizationError(f"only nvfp4 activations have a per-tensor scale, got one for {fmt}",
                                    where=f"svdq::{op}", fix="pass None")
    elif act_scale is None or act_scale.numel() != 1 or act_scale.dtype != torch.float32:
        got = "None" if act_scale is None else f"{act_scale.dtype} {list(act_scale.shape)}"
        raise QuantizationError(f"nvfp4 activations need their per-tensor scale, one float32 value; got {got}",
                                where=f"svdq::{op}", fix="pass the calibrated scale the compiler stores as "
                                                         "<layer>.act_scale")


def _check_quantize_act(x, smooth, fmt, act_scale, op) -> None:
    _check_fmt(fmt, quant.ACT_FORMATS, op)
    _check_input(x, op)
    _check_vector(smooth, x.shape[-1], "smooth", op)
    check_act_scale(act_scale, fmt, op)


@quantize_act.register_fake
def _(x, smooth, shift, fmt, group_size, act_scale=None):
    _check_quantize_act(x, smooth, fmt, act_scale, "quantize_act")
    k = x.shape[-1]
    group = effective_group(group_size, k)
    k_pad = round_up(k, group)
    codes = x.new_empty((*x.shape[:-1], code_columns(fmt, k_pad)), dtype=quant.FORMATS[fmt].packed_code_dtype)
    scales = x.new_empty((*x.shape[:-1], k_pad // group), dtype=scale_dtype(fmt, x.dtype))
    return codes, scales


# ---- svdq::gemm -----------------------------------------------------------------------------------------------


def _gemm_shapes(a_codes, a_scales, w_codes, w_scales, w_tscale, fmt, group_size, k, a_tscale) -> int:
    _check_fmt(fmt, quant.ACT_FORMATS, "gemm")
    check_act_scale(a_tscale, fmt, "gemm")
    group = check_packed_act(a_codes, a_scales, fmt, group_size, k, where="svdq::gemm activation")
    check_packed_weight(w_codes, w_scales, w_tscale, quant.weight_format_of(fmt), group_size, k,
                        where="svdq::gemm weight")
    return group


@torch.library.custom_op("svdq::gemm", mutates_args=())
def gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
         w_tscale: Optional[torch.Tensor], fmt: str, group_size: int, k: int, out_dtype: torch.dtype,
         a_tscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_g (a_g·w_gᵀ)·s_a[g]·s_w[g] (·α): each group's dot product is exact, scaled, summed in fp32; nvfp4
    multiplies by α = w_tscale·a_tscale (per output channel, fp32), the weight's and the activation's
    per-tensor scales."""
    group = _gemm_shapes(a_codes, a_scales, w_codes, w_scales, w_tscale, fmt, group_size, k, a_tscale)
    weight_fmt = quant.weight_format_of(fmt)
    # a group's integer dot product is exact in fp32 below 2^24
    exact = group * quant.FORMATS[fmt].code_bound * quant.FORMATS[weight_fmt].code_bound < _FP32_EXACT
    dot_dtype = torch.float32 if exact else torch.float64
    lead, groups = a_codes.shape[:-1], w_scales.shape[0]
    a = quant.code_values(unpack_codes(a_codes, fmt, group), fmt).reshape(-1, groups * group).to(dot_dtype)
    w = quant.code_values(unpack_codes(w_codes, weight_fmt, group), weight_fmt).to(dot_dtype)
    m, n = a.shape[0], w.shape[0]
    a_scale = scale_values(a_scales, fmt).reshape(m, groups)
    w_scale = scale_values(w_scales, weight_fmt)
    out = torch.zeros(m, n, dtype=torch.float32, device=a_codes.device)
    chunk = max(1, _GEMM_CHUNK_ELEMENTS // max(1, m * n))
    for start in range(0, groups, chunk):
        stop = min(groups, start + chunk)
        a_part = a[:, start * group: stop * group].reshape(m, stop - start, group).transpose(0, 1)
        w_part = w[:, start * group: stop * group].reshape(n, stop - start, group).permute(1, 2, 0)
        dots = torch.bmm(a_part, w_part).float()  # [groups, M, N], exact integers (or exact fp4 products)
        scales = a_scale[:, start:stop].t().unsqueeze(-1) * w_scale[start:stop].unsqueeze(1)
        out += (dots * scales).sum(0)
    if fmt == "nvfp4":  # α, as kernel B reads it
        out = out * (a_tscale.reshape(()) if w_tscale is None else w_tscale.float().reshape(-1) * a_tscale.reshape(()))
    elif w_tscale is not None:
        out = out * w_tscale.float().reshape(-1)
    return out.to(out_dtype).reshape(*lead, n)


@gemm.register_fake
def _(a_codes, a_scales, w_codes, w_scales, w_tscale, fmt, group_size, k, out_dtype, a_tscale=None):
    _gemm_shapes(a_codes, a_scales, w_codes, w_scales, w_tscale, fmt, group_size, k, a_tscale)
    return a_codes.new_empty((*a_codes.shape[:-1], w_codes.shape[0]), dtype=out_dtype)


# ---- svdq::linear ---------------------------------------------------------------------------------------------


def _check_linear(x, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, fmt, group_size,
                  act_scale) -> None:
    _check_quantize_act(x, smooth, fmt, act_scale, "linear")
    k, n = x.shape[-1], w_codes.shape[0]
    check_packed_weight(w_codes, w_scales, w_tscale, quant.weight_format_of(fmt), group_size, k,
                        where="svdq::linear weight")
    if (lora_down is None) != (lora_up is None):
        raise QuantizationError("lora_down and lora_up come together", where="svdq::linear")
    if lora_down is not None and (lora_down.dim() != 2 or lora_up.dim() != 2 or lora_down.shape[1] != k
                                  or lora_up.shape[0] != n or lora_up.shape[1] != lora_down.shape[0]
                                  or lora_down.dtype != x.dtype or lora_up.dtype != x.dtype):
        raise QuantizationError(f"the low-rank branch must be lora_down [r, {k}] and lora_up [{n}, r] in "
                                f"{x.dtype}; got {lora_down.dtype} {list(lora_down.shape)} and {lora_up.dtype} "
                                f"{list(lora_up.shape)}", where="svdq::linear")
    _check_vector(bias, n, "bias", "linear")


@torch.library.custom_op("svdq::linear", mutates_args=())
def linear(x: torch.Tensor, smooth: Optional[torch.Tensor], w_codes: torch.Tensor, w_scales: torch.Tensor,
           w_tscale: Optional[torch.Tensor], lora_down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], shift: float, fmt: str, group_size: int,
           act_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole SVDQuant linear: Q((x + shift)/λ)·Q(R)ᵀ + (x/λ)·L2ᵀ·L1ᵀ + b, as the lowered op sequence."""
    _check_linear(x, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, fmt, group_size, act_scale)
    codes, scales = quantize_act(x, smooth, shift, fmt, group_size, act_scale)
    y = gemm(codes, scales, w_codes, w_scales, w_tscale, fmt, group_size, x.shape[-1], x.dtype, act_scale)
    if lora_down is None:
        return y if bias is None else y + bias.to(x.dtype)
    branch_input = x if smooth is None else x / smooth.to(x.dtype)
    return y + F.linear(F.linear(branch_input, lora_down), lora_up, None if bias is None else bias.to(x.dtype))


@linear.register_fake
def _(x, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, shift, fmt, group_size, act_scale=None):
    _check_linear(x, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, fmt, group_size, act_scale)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


# ---- svdq::weight_only_linear ---------------------------------------------------------------------------------


def _check_weight_only(x, w_codes, w_scales, bias, fmt, group_size) -> None:
    _check_fmt(fmt, WEIGHT_ONLY_FORMATS, "weight_only_linear")
    _check_input(x, "weight_only_linear")
    check_packed_weight(w_codes, w_scales, None, fmt, group_size, x.shape[-1], where="svdq::weight_only_linear")
    _check_vector(bias, w_codes.shape[0], "bias", "weight_only_linear")


@torch.library.custom_op("svdq::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                       fmt: str, group_size: int) -> torch.Tensor:
    """W4A16 (int4 / nf4; int8 for W8A16): the weight dequantized to x's dtype, then a 16-bit linear."""
    _check_weight_only(x, w_codes, w_scales, bias, fmt, group_size)
    k = x.shape[-1]
    group = effective_group(group_size, k)
    q = unpack_weight(PackedWeight(w_codes, w_scales, None, fmt, group, k, x.dtype))
    return F.linear(x, quant.dequantize(q), None if bias is None else bias.to(x.dtype))


@weight_only_linear.register_fake
def _(x, w_codes, w_scales, bias, fmt, group_size):
    _check_weight_only(x, w_codes, w_scales, bias, fmt, group_size)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]))


# ---- svdq::conv2d ---------------------------------------------------------------------------------------------


def _check_conv2d(x, w_codes, w_scales, w_tscale, bias, fmt, group_size, kernel_size, stride, padding,
                  dilation, act_scale) -> ConvGeometry:
    _check_fmt(fmt, quant.ACT_FORMATS, "conv2d")
    check_act_scale(act_scale, fmt, "conv2d")
    _check_input(x, "conv2d")
    if x.dim() != 4:
        raise QuantizationError(f"x must be [batch, channels, height, width], got {list(x.shape)}",
                                where="svdq::conv2d")
    for name, value in dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation).items():
        if len(value) != 2:
            raise QuantizationError(f"{name} must hold 2 values, got {list(value)}", where="svdq::conv2d")
    channels = x.shape[1]
    geometry = ConvGeometry(channels, padded_channels(channels, group_size), tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    check_packed_weight(w_codes, w_scales, w_tscale, quant.weight_format_of(fmt), group_size, geometry.columns,
                        where="svdq::conv2d weight (tap-major im2col matrix)")
    _check_vector(bias, w_codes.shape[0], "bias", "conv2d")
    return geometry


@torch.library.custom_op("svdq::conv2d", mutates_args=())
def conv2d(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor, w_tscale: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], shift: float, fmt: str, group_size: int, kernel_size: list[int],
           stride: list[int], padding: list[int], dilation: list[int],
           act_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A W4A4 (or W8A8) k×k convolution: x̂ = Q(x + shift) − shift, quantized per pixel and group of input
    channels as `quantize_act` does; the weight is the tap-major im2col matrix of svdq_compiler.conv. Both are
    dequantized exactly in fp32, convolved (zero padding) in fp32 with the bias, and rounded once to x's dtype.
    Subtracting the shift from x̂ (rather than folding it into the bias, as a linear does) keeps the zero-padded
    border exact."""
    geometry = _check_conv2d(x, w_codes, w_scales, w_tscale, bias, fmt, group_size, kernel_size, stride, padding,
                             dilation, act_scale)
    pixels = smoothed_input(x.movedim(1, -1), None, shift)
    act = quant.quantize_act(pixels, fmt, group_size, tensor_scale=act_scale, name="svdq::conv2d input")
    values = quant.dequantize(act, torch.float32)
    if shift:
        values = values - shift
    group = effective_group(group_size, geometry.columns)
    matrix = quant.dequantize(unpack_weight(PackedWeight(w_codes, w_scales, w_tscale, quant.weight_format_of(fmt), group,
                                                         geometry.columns, x.dtype)), torch.float32)
    out = F.conv2d(values.movedim(-1, 1), geometry.weight(matrix), None if bias is None else bias.float(),
                   geometry.stride, geometry.padding, geometry.dilation)
    return out.to(x.dtype).contiguous()  # the channels-last input would make it channels-last


@conv2d.register_fake
def _(x, w_codes, w_scales, w_tscale, bias, shift, fmt, group_size, kernel_size, stride, padding, dilation,
      act_scale=None):
    _check_conv2d(x, w_codes, w_scales, w_tscale, bias, fmt, group_size, kernel_size, stride, padding, dilation,
                  act_scale)
    size = [(x.shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1
            for d in range(2)]
    return x.new_empty((x.shape[0], w_codes.shape[0], *size))
