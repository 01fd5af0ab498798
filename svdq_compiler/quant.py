"""Quantizers: the numerical definition of every format the compiler uses (pure torch, any device).

Formats (the formulas of deepcompressor's SVDQuant recipe; the properties every module reads are the FORMATS
table below):

- ``int4``  symmetric, scale = absmax/7 per group, codes round-half-to-even, clamped to [−7, 7].
- ``uint4`` (activations only, ``quantize_act(..., unsigned=True)``; for shifted post-GELU inputs):
  scale = absmax/15, codes clamped to [0, 15].
- ``nvfp4`` E2M1 values ±{0, .5, 1, 1.5, 2, 3, 4, 6} with one FP8-E4M3 scale per 16 channels under a
  per-tensor scale t (two-level): the FP8 scale of a group is E4M3((absmax_g/6)/t) and its values are
  E2M1(x/(E4M3·t)). Weights use t = s0 = absmax/(6·448) in the model dtype. Activations use an fp32 t: the
  `tensor_scale` passed in (compiled graphs pass a calibrated one, see below), else the dynamic t =
  absmax/(6·448) of this call, so no finite value saturates. Without t the FP8 scale would cap every group at
  6·448 = 2688 and flush groups below 6·2⁻¹⁰ to zero. Rounding to the E2M1 and E4M3 grids goes to the nearest
  grid value, and an exact tie goes to the larger neighbour (towards +∞, for negative values too).

  Compiled graphs use a *calibrated* activation scale, t = headroom·A/(6·448) with A the largest |x/λ| seen in
  calibration and headroom `QuantConfig.nvfp4_act_headroom` (default 16: values 16× beyond calibration still
  do not saturate, and groups down to A/1792 keep normal, full-precision FP8 scales; t = 1 when calibration
  had no real data). A constant t is a kernel argument, so kernel A, the quantize-for-next-layer epilogue of kernel B (which sees
  one output tile, never the whole tensor) and Nunchaku's layout (t folds into smooth_factor and wtscale) can
  all use it; a dynamic t would need a whole-tensor reduction before the first code. Measured
  (tools/bench_nvfp4_act_scale.py → bench/results/nvfp4-act-scale.json; tiny-flux, random flux/sd3/unet,
  held-out inputs and inputs ×8): the output error is the same for dynamic and every headroom (tiny-flux
  0.0160 dynamic, 0.0162 at 16, 0.0158 one-level); headroom 1 saturates 0.05–0.3% of the values in
  distribution and 11% on the U-Net's ×8 inputs (error 0.031 against 0.0064), headroom 4 still 0.4% there,
  16 none anywhere, and no group scale underflowed at any headroom.
- ``int8``  symmetric, scale = absmax/127 in fp32, codes round-half-to-even in [−127, 127]; a group size of 0
  means one group per row (per output channel for weights, per token for activations).
- ``uint8`` (activations only, ``quantize_act(..., unsigned=True)`` on int8; for shifted post-GELU inputs):
  scale = absmax/255 in fp32, codes in [0, 255]. Measured on all-MiniLM-L6-v2's six FFN down projections
  (post-GELU inputs + 0.171875): 0.56–0.62× the layer output error of signed int8 at groups of 32 and 64.
- ``nf4``   (weights only) scale = absmax per group in the model dtype, codes index the 16-value NormalFloat
  codebook (nearest value, ties to the larger one).

Shared rules:
- Groups run along the last dimension (K). K not divisible by the group size is zero-padded to
  K_pad = ceil(K/G)·G: codes have K_pad columns and the original K is kept in ``QTensor.k``. Group size 0 means a
  single group spanning the row (no padding).
- Absmax and the division run in fp32 (fp64 for fp64 inputs). Scales of int4/uint4/nf4 and the per-tensor
  nvfp4 scale are rounded to the dtype of the tensor being quantized (the model dtype). A scale that is 0 (an
  all-zero group, or one whose FP8 scale underflows) is replaced by 1, so its codes are 0 and it dequantizes to 0.
- Dequantized values are computed in fp32 and rounded once to the requested dtype.

A non-finite value in the input raises ``QuantizationError`` naming the tensor (pass ``name=``); so do a
non-float dtype, a sparse layout, a weight that is not 2-D, and an unknown format or group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svdq_compiler.config import UNSIGNED_OF
from svdq_compiler.errors import QuantizationError



@dataclass(frozen=True)
class Format:
    """One number format: the single table every module reads (quantizers, config checks, reference ops, kernel
    specs, packing, the report, the kernel generator)."""

    name: str
    bits: int  # 4: two codes per byte when packed; 8: one
    signed: bool
    kind: str  # "integer" (codes are the values), "float" (E2M1 grid) or "codebook" (NF4 indices)
    qmin: float  # lowest grid value before scaling
    qmax: float  # highest grid value before scaling; an integer or float format's scale is group absmax / qmax
    code_bound: int  # largest |code value| a stored tensor may hold (an imported int4 nibble can be −8)
    code_dtype: torch.dtype  # of unpacked codes (QTensor.codes)
    scale_dtype: torch.dtype | None  # of the group scales; None: the model dtype
    default_group: int  # channels per scale (0: one per row); nvfp4 allows no other
    weight: bool  # a weight can have it
    act: bool  # an activation can have it
    # a QuantConfig may name it (uint4/uint8 are derived: int4/int8 with a shift, chosen by the compiler)
    configurable: bool
    weight_only: bool  # the reference weight-only op reads it
    gemm_weight: str | None  # as an activation format: the weight format the GEMM pairs with it
    packing: str  # "bytes" (8-bit), "pairs" (consecutive codes share a byte) or "halves" (split halves per group)

    @property
    def integer(self) -> bool:
        return self.kind == "integer"

    @property
    def four_bit(self) -> bool:
        return self.bits == 4

    @property
    def packed_code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.four_bit or not self.signed else torch.int8


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int4", 4, True, "integer", -7.0, 7.0, 8, torch.int8, None, 64, weight=True, act=True,
           configurable=True, weight_only=True, gemm_weight="int4", packing="halves"),
    Format("uint4", 4, False, "integer", 0.0, 15.0, 15, torch.uint8, None, 64, weight=False, act=True,
           configurable=False, weight_only=False, gemm_weight="int4", packing="halves"),
    Format("nvfp4", 4, True, "float", -6.0, 6.0, 6, torch.uint8, torch.float8_e4m3fn, 16, weight=True, act=True,
           configurable=True, weight_only=False, gemm_weight="nvfp4", packing="pairs"),
    Format("uint8", 8, False, "integer", 0.0, 255.0, 255, torch.uint8, torch.float32, 0, weight=False, act=True,
           configurable=False, weight_only=False, gemm_weight="int8", packing="bytes"),
    Format("int8", 8, True, "integer", -127.0, 127.0, 128, torch.int8, torch.float32, 0, weight=True, act=True,
           configurable=True, weight_only=True, gemm_weight="int8", packing="bytes"),
    Format("nf4", 4, True, "codebook", -1.0, 1.0, 1, torch.uint8, None, 64, weight=True, act=False,
           configurable=True, weight_only=True, gemm_weight=None, packing="halves"),
)}
WEIGHT_FORMATS = tuple(name for name, f in FORMATS.items() if f.weight)
ACT_FORMATS = tuple(name for name, f in FORMATS.items() if f.act)
INTEGER_FORMATS = tuple(name for name, f in FORMATS.items() if f.integer)
FOUR_BIT_FORMATS = tuple(name for name, f in FORMATS.items() if f.four_bit)
# The weight-only formats of 4 bits: kernel W's and a W4A16 layer's (`weight_only_format`).
WEIGHT_ONLY_4BIT_FORMATS = tuple(name for name, f in FORMATS.items() if f.weight_only and f.four_bit)
CODE_DTYPES = {name: f.code_dtype for name, f in FORMATS.items()}


def weight_format_of(act_format: str) -> str:
    """The weight format the GEMM pairs with an activation format (uint4 activations meet int4 weights, uint8
    int8 ones)."""
    return FORMATS[act_format].gemm_weight


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

NVFP4_GROUP = FORMATS["nvfp4"].default_group
E2M1_MAX = FORMATS["nvfp4"].qmax
E4M3_MAX = 448.0
# E2M1 magnitudes, indexed by bits 0–2 of a code; bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# The NormalFloat-4 codebook (QLoRA): quantiles of N(0, 1) rescaled to [−1, 1], with an exact 0.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass
class QTensor:
    """A quantized tensor with unpacked codes (one code per element; `codegen.layout` packs them).

    codes:        [..., K_pad] int8 (int4, int8) or uint8 (uint4 codes 0–15, uint8 0–255, nvfp4 E2M1 codes, nf4
                  indices)
    scales:       [..., K_pad/G] model dtype (int4, uint4, nf4), float8_e4m3fn (nvfp4), float32 (int8, uint8)
    fmt:          a name in FORMATS
    group_size:   G, the channels per scale (K_pad for a per-row scale)
    k:            K before zero padding
    dtype:        the dtype of the tensor that was quantized (what `dequantize` returns by default)
    tensor_scale: nvfp4 only: the per-tensor scale t. Weights: s0, a 0-d tensor in the model dtype; [N] (one per
                  output row) when weights with different s0 were concatenated, as in a Nunchaku fused q/k/v.
                  Activations: a 0-d fp32 tensor (fp64 for fp64 inputs).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str
    group_size: int
    k: int
    dtype: torch.dtype
    tensor_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        where = f"QTensor({self.fmt})"
        if self.fmt not in FORMATS:
            raise QuantizationError(f"unknown format {self.fmt!r}", where=where, fix=f"use one of {tuple(FORMATS)}")
        expected = CODE_DTYPES[self.fmt]
        if self.codes.dtype != expected:
            raise QuantizationError(f"{self.fmt} codes must be {expected}, got {self.codes.dtype}", where=where)
        k_pad = self.codes.shape[-1]
        if self.group_size <= 0 or k_pad % self.group_size or not 0 < self.k <= k_pad:
            raise QuantizationError(
                f"codes with {k_pad} columns do not fit group size {self.group_size} and K={self.k}", where=where,
                fix="the code columns must be K rounded up to a multiple of the group size")
        expected_scales = (*self.codes.shape[:-1], k_pad // self.group_size)
        if tuple(self.scales.shape) != expected_scales:
            raise QuantizationError(f"scales have shape {tuple(self.scales.shape)}, expected {expected_scales}",
                                    where=where, fix="scales are [..., K_pad/group_size]")
        if self.fmt == "nvfp4" and self.scales.dtype != torch.float8_e4m3fn:
            raise QuantizationError(f"nvfp4 scales must be float8_e4m3fn, got {self.scales.dtype}", where=where)
        if self.tensor_scale is not None and (
                self.fmt != "nvfp4" or tuple(self.tensor_scale.shape) not in ((), tuple(self.codes.shape[:1]))):
            raise QuantizationError(f"only nvfp4 tensors carry a tensor scale, 0-d or one per row; got shape "
                                    f"{tuple(self.tensor_scale.shape)} for codes {tuple(self.codes.shape)}",
                                    where=where)

    @property
    def k_pad(self) -> int:
        return self.codes.shape[-1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor that was quantized."""
        return (*self.codes.shape[:-1], self.k)

    def to(self, device: torch.device | str) -> "QTensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QTensor(move(self.codes), move(self.scales), self.fmt, self.group_size, self.k, self.dtype,
                       move(self.tensor_scale))


# ---- public API ---------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int, *, name: str | None = None,
                    hessian: torch.Tensor | None = None) -> QTensor:
    """Quantize a weight [N, K] (static, per output row and group of `group_size` input channels).

    With `hessian` (XᵀX [K, K] of the layer's inputs X) the codes are chosen by GPTQ instead of rounded to the
    nearest: the same scales, but each column's rounding error is compensated in the columns not yet rounded,
    so that ‖(W − Ŵ)·Xᵀ‖ rather than ‖W − Ŵ‖ is made small (`_gptq_values`)."""
    fmt, group = _check(w, fmt, group_size, name, weight=True, unsigned=False)
    q = _quantize(w, fmt, group, name, weight=True)
    if hessian is None:
        return q
    scales = _element_scales(q)
    levels = F.pad(_gptq_values(w, hessian, scales, fmt) / scales, (0, q.k_pad - q.k))  # padding: the value 0
    if FORMATS[fmt].integer:
        codes = levels.round_().to(CODE_DTYPES[fmt])
    elif fmt == "nvfp4":
        codes = _e2m1_codes(_nearest_e2m1(levels))
    else:
        codes = _sorted_grid_codes(fmt, w.device)[_nearest(levels, fmt)]
    return QTensor(codes, q.scales, fmt, q.group_size, q.k, q.dtype, q.tensor_scale)


def quantize_act(x: torch.Tensor, fmt: str, group_size: int, *, unsigned: bool = False,
                 tensor_scale: torch.Tensor | None = None, name: str | None = None) -> QTensor:
    """Quantize activations [..., K] dynamically, per token (row) and group; `unsigned` turns int4 into uint4 and
    int8 into uint8.

    nvfp4 only: `tensor_scale` is the per-tensor scale t (one value); None uses this call's absmax/(6·448)."""
    fmt, group = _check(x, fmt, group_size, name, weight=False, unsigned=unsigned, tensor_scale=tensor_scale)
    return _quantize(x, fmt, group, name, weight=False, tensor_scale=tensor_scale)


def fake_quantize_weight(w: torch.Tensor, fmt: str, group_size: int, *, name: str | None = None) -> torch.Tensor:
    """dequantize(quantize_weight(w, …)), in w's dtype and shape, without materializing codes."""
    fmt, group = _check(w, fmt, group_size, name, weight=True, unsigned=False)
    return _fake_quantize(w, fmt, group, name, weight=True)


def fake_quantize_act(x: torch.Tensor, fmt: str, group_size: int, *, unsigned: bool = False,
                      tensor_scale: torch.Tensor | None = None, name: str | None = None) -> torch.Tensor:
    """dequantize(quantize_act(x, …)), in x's dtype and shape, without materializing codes."""
    fmt, group = _check(x, fmt, group_size, name, weight=False, unsigned=unsigned, tensor_scale=tensor_scale)
    return _fake_quantize(x, fmt, group, name, weight=False, tensor_scale=tensor_scale)


def fake_quantize_act_values(x: torch.Tensor, fmt: str, group_size: int, *, unsigned: bool = False,
                             tensor_scale: torch.Tensor | None = None, name: str | None = None) -> torch.Tensor:
    """The values quantize_act(x, …) stands for, traceable: no data-dependent control flow, so torch.export and
    the ONNX exporter record it as plain tensor ops.

    Returned in the compute dtype (fp32; fp64 for fp64 x) over the zero-padded K_pad channels, before the final
    rounding to x's dtype that `fake_quantize_act` adds: code·scale, which is what a GEMM of codes and scales
    multiplies (svdq.gemm is exact in fp32). The same rounding code as every other quantizer here; the one
    difference is that a non-finite input is not reported (that check needs the data) but propagates.
    """
    fmt, group = _check(x, fmt, group_size, name, weight=False, unsigned=unsigned, tensor_scale=tensor_scale)
    xg = _grouped(x, group)
    return _grid_values(xg, fmt, x.dtype, xg.abs().amax(-1), weight=False, tensor_scale=tensor_scale).flatten(-2)


def nvfp4_act_scale(amax: torch.Tensor | float, headroom: float = 1.0) -> torch.Tensor:
    """The per-tensor scale t (0-d fp32) of nvfp4 activations whose largest magnitude is `amax`: values up to
    headroom·amax quantize without saturating. 1 when amax is 0."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return _nonzero(amax * headroom / (E2M1_MAX * E4M3_MAX))


def act_tensor_scale(x: torch.Tensor, fmt: str) -> torch.Tensor | None:
    """The dynamic per-tensor scale of activations `x` in `fmt` (nvfp4_act_scale of x's absmax), None for the
    formats without one: what the ops take as `act_scale` when no calibrated scale is at hand."""
    return nvfp4_act_scale(x.detach().abs().amax().float()) if fmt == "nvfp4" else None


def _element_scales(q: QTensor) -> torch.Tensor:
    """The scale each of a weight's K elements is a multiple of (its group's, times t for nvfp4), fp64 [N, K]."""
    scale = q.scales.to(torch.float64)
    if q.tensor_scale is not None:
        scale = scale * q.tensor_scale.to(torch.float64).reshape(-1, 1)
    return scale.repeat_interleave(q.group_size, -1)[..., : q.k]


# GPTQ (Frantar et al. 2022) as the reference recipe runs it on the residual (deepcompressor's gptq add-on):
# static scales, columns in decreasing order of their input energy, 1% damping, blocks of 128 columns.
GPTQ_DAMPING = 0.01
GPTQ_BLOCK = 128


def _gptq_values(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """W's values on its format's grid [N, K] (fp64), chosen column by column: each column rounds to the nearest
    grid value of its fixed scale, and its error, weighted by the inverse Hessian's Cholesky factor, is taken
    out of the later columns. A column no input reaches (zero Hessian diagonal) rounds to the nearest."""
    weight = w.to(torch.float64).clone()
    hessian = hessian.to(torch.float64).clone()
    k = weight.shape[1]
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    weight, hessian, scales = weight[:, order], hessian[order][:, order], scales[:, order]
    hessian.diagonal().add_(GPTQ_DAMPING * hessian.diagonal().mean())
    factor = _inverse_cholesky(hessian)
    spec = FORMATS[fmt]
    grid = _sorted_grid(fmt, w.device, torch.float64) if fmt == "nf4" else None

    def nearest(column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if spec.integer:
            return (column / scale).round_().clamp_(spec.qmin, spec.qmax) * scale
        if fmt == "nvfp4":
            return _nearest_e2m1(column / scale) * scale
        return grid[_nearest(column / scale, fmt)] * scale

    chosen = torch.empty_like(weight)
    for start in range(0, k, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, k)
        block, block_factor = weight[:, start:end], factor[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = block[:, i]
            chosen[:, start + i] = nearest(column, scales[:, start + i])
            errors[:, i] = (column - chosen[:, start + i]) / block_factor[i, i]
            block[:, i:].addr_(errors[:, i], block_factor[i, i:], alpha=-1)
        weight[:, end:].addmm_(errors, factor[start:end, end:], alpha=-1)
    return chosen[:, torch.argsort(order)]


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹; a Hessian that is not positive definite gets more damping until it is
    (as the reference does, 0.1% of its mean diagonal at a time)."""
    step = 0.001 * hessian.diagonal().mean()
    for _ in range(250):
        lower, info = torch.linalg.cholesky_ex(hessian)
        if not info:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        hessian.diagonal().add_(step)
    raise QuantizationError("the layer's input Hessian is not positive definite even after damping",
                            fix="calibrate on inputs with finite values")


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The real values [..., K] that `q` stands for (padding removed), in `dtype` (default: q.dtype)."""
    compute = _compute_dtype(q.dtype)
    values = code_values(q.codes, q.fmt).to(compute)
    scale = q.scales.to(compute)
    if q.tensor_scale is not None:
        tensor_scale = q.tensor_scale.to(compute)
        scale = scale * (tensor_scale.unsqueeze(-1) if tensor_scale.dim() else tensor_scale)
    grouped = values.unflatten(-1, (q.n_groups, q.group_size)) * scale.unsqueeze(-1)
    return grouped.flatten(-2)[..., : q.k].to(dtype or q.dtype)


def code_values(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The grid value (before scaling) of each code, as fp32: the integer itself, an E2M1 value or an NF4 value."""
    if FORMATS[fmt].integer:
        return codes.to(torch.float32)
    table = code_table(fmt, codes.device)
    return table[codes.long()]


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 values in [0, 448] to the FP8-E4M3 grid (subnormals included), ties upwards."""
    _, exponent = torch.frexp(v)  # v = m·2^exponent with m in [0.5, 1)
    binade = (exponent - 1).clamp(min=-6)  # below 2^-6 the grid is the subnormal one, spaced 2^-9
    ulp = torch.exp2((binade - 3).to(v.dtype))  # 3 mantissa bits
    return torch.floor(v / ulp + 0.5) * ulp


# ---- implementation -----------------------------------------------------------------------------------------


def _check(x, fmt: str, group_size: int, name: str | None, *, weight: bool, unsigned: bool,
           tensor_scale: torch.Tensor | None = None) -> tuple[str, int]:
    """Validate the request; returns the format actually used (int4/int8 + unsigned → uint4/uint8) and the group
    size."""
    what = name or ("weight" if weight else "activation")
    if tensor_scale is not None and (fmt != "nvfp4" or not isinstance(tensor_scale, torch.Tensor)
                                     or tensor_scale.numel() != 1 or not tensor_scale.is_floating_point()):
        raise QuantizationError(f"a tensor scale is one float value for nvfp4 activations; got "
                                f"{type(tensor_scale).__name__} for {fmt}", where=what)
    if not isinstance(x, torch.Tensor):
        raise QuantizationError(f"expected a torch.Tensor, got {type(x).__name__}", where=what)
    if x.layout != torch.strided:
        raise QuantizationError(f"expected a dense (strided) tensor, got layout {x.layout}", where=what,
                                fix="call .to_dense() first")
    if x.dtype not in FLOAT_DTYPES:
        raise QuantizationError(f"expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}",
                                where=what, fix="quantize the floating-point tensor, not its codes")
    if weight and x.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(x.shape)}",
                                where=what, fix="reshape a 1×1 convolution weight to 2-D first")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise QuantizationError(f"expected a tensor with a non-empty last (channel) dimension, got shape "
                                f"{tuple(x.shape)}", where=what)
    allowed = WEIGHT_FORMATS if weight else ACT_FORMATS
    if fmt not in allowed:
        hint = " (nf4 is a weight-only format)" if fmt == "nf4" else f" ({fmt} is for activations)" \
            if fmt in UNSIGNED_OF.values() else ""
        raise QuantizationError(f"unknown {'weight' if weight else 'activation'} format {fmt!r}{hint}",
                                where=what, fix=f"use one of {allowed}")
    if unsigned:
        if fmt not in UNSIGNED_OF:
            raise QuantizationError(f"unsigned quantization exists only for {', '.join(UNSIGNED_OF)}, not {fmt}",
                                    where=what)
        fmt = UNSIGNED_OF[fmt]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise QuantizationError(f"group size must be an int >= 0 (0 = one group per row), got {group_size!r}",
                                where=what)
    if fmt == "nvfp4" and group_size != NVFP4_GROUP:
        raise QuantizationError(f"nvfp4 uses groups of {NVFP4_GROUP} channels, got group size {group_size}",
                                where=what, fix=f"pass group_size={NVFP4_GROUP}")
    return fmt, group_size or x.shape[-1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x in the compute dtype, zero-padded to a multiple of `group` along K, viewed as [..., K_pad/group, group]."""
    xc = x.to(_compute_dtype(x.dtype))
    pad = -x.shape[-1] % group
    if pad:
        xc = F.pad(xc, (0, pad))
    return xc.unflatten(-1, (xc.shape[-1] // group, group))


def _group_absmax(xg: torch.Tensor, name: str | None, what: str) -> torch.Tensor:
    # max(amax, −amin): no |x| temporary, and 5× faster on CPU than vector_norm(inf); NaN propagates through both
    absmax = torch.maximum(xg.amax(-1), xg.amin(-1).neg_())
    # NaN and ±Inf survive amax, so checking the (much smaller) group maxima finds every non-finite input.
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(xg)).sum())
        raise QuantizationError(f"{name or what} has {bad} non-finite value(s) (NaN or Inf); cannot quantize it",
                                where=name or what,
                                fix="find where the values overflow (fp16 range?) or fix the input data")
    return absmax


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return scale.masked_fill(scale == 0, 1)


def _levels(xg: torch.Tensor, fmt: str, dtype: torch.dtype, absmax: torch.Tensor, weight: bool,
            tensor_scale: torch.Tensor | None = None):
    """Round the grouped values (with their group absmax) to the format's grid.

    Returns (levels, scales, tensor_scale): levels are integer codes (as floats) for the integer formats, E2M1
    values for nvfp4 and indices into the sorted codebook (int64) for nf4; scales are in their stored dtype.
    `tensor_scale`: an nvfp4 activation's given per-tensor scale (None: dynamic).
    """
    compute = xg.dtype
    spec = FORMATS[fmt]
    if spec.integer:
        scales = _nonzero((absmax / spec.qmax).to(spec.scale_dtype or dtype))
        levels = (xg / scales.to(compute).unsqueeze(-1)).round_().clamp_(spec.qmin, spec.qmax)
        return levels, scales, None
    if fmt == "nf4":
        scales = _nonzero(absmax.to(dtype))
        return _nearest(xg / scales.to(compute).unsqueeze(-1), "nf4"), scales, None
    # nvfp4
    raw = absmax / E2M1_MAX
    if weight:
        tensor_scale = _nonzero((raw.amax() / E4M3_MAX).to(dtype))
    elif tensor_scale is None:  # dynamic: nvfp4_act_scale of this call's absmax
        tensor_scale = _nonzero(absmax.amax() / (E2M1_MAX * E4M3_MAX))
    else:
        tensor_scale = tensor_scale.to(compute).reshape(())
    raw = raw / tensor_scale.to(compute)
    micro = _nonzero(round_e4m3(raw.clamp(max=E4M3_MAX).float())).to(compute)
    effective = micro * tensor_scale.to(compute)
    levels = _nearest_e2m1(xg / effective.unsqueeze(-1))
    return levels, micro.to(torch.float8_e4m3fn), tensor_scale


def _checked_absmax(xg: torch.Tensor, name: str | None, weight: bool) -> torch.Tensor:
    return _group_absmax(xg, name, "weight" if weight else "activation")


def _quantize(x: torch.Tensor, fmt: str, group: int, name: str | None, *, weight: bool,
              tensor_scale: torch.Tensor | None = None) -> QTensor:
    xg = _grouped(x, group)
    levels, scales, tensor_scale = _levels(xg, fmt, x.dtype, _checked_absmax(xg, name, weight), weight,
                                           tensor_scale)
    if FORMATS[fmt].integer:
        codes = levels.to(CODE_DTYPES[fmt])
    elif fmt == "nvfp4":
        codes = _e2m1_codes(levels)
    else:
        codes = _sorted_grid_codes(fmt, x.device)[levels]
    return QTensor(codes.flatten(-2), scales, fmt, group, x.shape[-1], x.dtype, tensor_scale)


def _fake_quantize(x: torch.Tensor, fmt: str, group: int, name: str | None, *, weight: bool,
                   tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    xg = _grouped(x, group)
    values = _grid_values(xg, fmt, x.dtype, _checked_absmax(xg, name, weight), weight, tensor_scale)
    return values.flatten(-2)[..., : x.shape[-1]].to(x.dtype)


def _grid_values(xg: torch.Tensor, fmt: str, dtype: torch.dtype, absmax: torch.Tensor,
                 weight: bool, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """code value × scale per element of the grouped values, in their compute dtype."""
    levels, scales, tensor_scale = _levels(xg, fmt, dtype, absmax, weight, tensor_scale)
    if fmt == "nf4":
        levels = _sorted_grid(fmt, xg.device, xg.dtype)[levels]
    scale = scales.to(xg.dtype)
    if tensor_scale is not None:
        scale = scale * tensor_scale.to(xg.dtype)
    return levels.mul_(scale.unsqueeze(-1))


# The float grids, sorted ascending, with the code of each grid point and the midpoints between neighbours.
_GRID_CACHE: dict[tuple, torch.Tensor] = {}


def _grid_definition(fmt: str) -> tuple[list[float], list[int]]:
    if fmt == "nf4":
        return list(NF4_CODEBOOK), list(range(16))
    negatives = [(-m, 8 + i) for i, m in enumerate(E2M1_MAGNITUDES) if m > 0]
    points = sorted(negatives + [(m, i) for i, m in enumerate(E2M1_MAGNITUDES)])
    return [v for v, _ in points], [c for _, c in points]


def _cached(key: tuple, build) -> torch.Tensor:
    tensor = _GRID_CACHE.get(key)
    if tensor is None:
        tensor = _GRID_CACHE[key] = build()
    return tensor


def _sorted_grid(fmt: str, device, dtype) -> torch.Tensor:
    return _cached(("grid", fmt, str(device), dtype),
                   lambda: torch.tensor(_grid_definition(fmt)[0], dtype=dtype, device=device))


def _sorted_grid_codes(fmt: str, device) -> torch.Tensor:
    return _cached(("codes", fmt, str(device)),
                   lambda: torch.tensor(_grid_definition(fmt)[1], dtype=torch.uint8, device=device))


def code_table(fmt: str, device) -> torch.Tensor:
    """Value of each code 0–15 (fp32) on `device`, built once per device (kernel W reads it as the nf4 codebook)."""
    def build():
        values, codes = _grid_definition(fmt)
        table = torch.zeros(16, dtype=torch.float32)
        table[torch.tensor(codes)] = torch.tensor(values, dtype=torch.float32)
        return table.to(device)  # nvfp4 code 8 (−0) keeps the value 0

    return _cached(("table", fmt, str(device)), build)


E2M1_DOUBLED_OFFSET = 12  # 2·v + 12 maps the E2M1 values −6…6 to 0…24


def _nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """The E2M1 value nearest to each element (ties to the larger one, beyond ±6 clamped): `_nearest`'s answer,
    by arithmetic. Each binade of the grid is evenly spaced (0.5 below 2, 1 below 4, 2 above), so a value rounds
    to a multiple of its binade's step; 1.7× faster than torch.bucketize, which was a third of a MiniLM nvfp4
    compile's CPU time. A NaN stays NaN."""
    magnitude = v.abs()
    # 1/step = 2^((|v| < 4) + (|v| < 2) − 1), by comparisons and exp2 in place: twice as fast as nested torch.where
    # (which built a full tensor per branch), and a power of two, so scaling by it and back is exact
    inverse_step = (magnitude < 4).to(v.dtype).add_((magnitude < 2).to(v.dtype)).exp2_().mul_(0.5)
    steps = v * inverse_step
    whole = steps.floor()
    # `steps − whole` is exact (Sterbenz), where `floor(steps + 0.5)` would round just-below-half values up
    whole += (steps - whole) >= 0.5
    return whole.div_(inverse_step).clamp_(-E2M1_MAX, E2M1_MAX)


def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The E2M1 code (uint8) of each E2M1 value, through a table indexed by 2·v + E2M1_DOUBLED_OFFSET."""
    def build():
        table = torch.zeros(2 * E2M1_DOUBLED_OFFSET + 1, dtype=torch.uint8)
        for value, code in zip(*_grid_definition("nvfp4")):
            table[int(value * 2) + E2M1_DOUBLED_OFFSET] = code
        return table.to(values.device)

    return _cached(("e2m1 codes", str(values.device)), build)[(values * 2).long() + E2M1_DOUBLED_OFFSET]


def _nearest(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Index of the nearest grid value; an exact midpoint goes to the larger neighbour (values outside clamp).
    nvfp4's even binades round by arithmetic instead (`_nearest_e2m1`); this serves the nf4 codebook."""
    grid = _sorted_grid(fmt, v.device, v.dtype)
    midpoints = _cached(("mid", fmt, str(v.device), v.dtype), lambda: (grid[1:] + grid[:-1]) / 2)
    # right=True puts a value equal to a boundary in the upper bucket: ties go to the larger grid value.
    return torch.bucketize(v, midpoints, right=True)
