"""Packed layouts of quantized tensors — the one place they are defined — and converters to and from the
Nunchaku checkpoint layouts.

Our layout (what the passes store, the runtime ops read and the Triton kernels load)
-----------------------------------------------------------------------------------
K is zero-padded to K_pad = ceil(K/G)·G (svdq_compiler.quant); G is the group size, K_pad for a per-row scale.

* 4-bit codes, weights ``[N, K_pad/2]`` and activations ``[..., K_pad/2]``, uint8:
  - int4 / uint4 / nf4, "split halves": within each group of G channels (G even), byte j < G/2 of the group
    holds channel j in its low nibble and channel j + G/2 in its high nibble. A kernel unpacks a byte tile
    into two int8 tiles (low and high halves of the group) and issues two dots, without interleaving.
    int4 nibbles are two's complement (−7…7; −8 decodes too), uint4 nibbles 0…15, nf4 nibbles index the
    NormalFloat codebook.
  - nvfp4, consecutive pairs (what ``tl.dot_scaled`` reads): byte j holds channel 2j in its low nibble and
    2j+1 in its high nibble. A nibble is an E2M1 code: bit 3 = sign, bits 0–2 index {0, .5, 1, 1.5, 2, 3, 4, 6}.
* int8 codes: int8 ``[N, K]`` / ``[..., K]``, one per byte (int8 uses one group per row, so K_pad = K).
* Weight scales, group-major ``[K_pad/G, N]`` (a GEMM's per-group scale load across N is contiguous):
  the model dtype for int4 / nf4, E4M3 bytes for nvfp4, float32 ``[1, N]`` for int8.
* nvfp4 weights also have ``wtscale``: float32, 0-d (the per-tensor scale s0) or ``[N]`` (one per output channel,
  for weights with different s0 concatenated along N, as a Nunchaku fused q/k/v); it multiplies the output.
* Activation scales, token-major ``[..., K_pad/G]``: the model dtype for int4 / uint4, E4M3 bytes for nvfp4,
  float32 ``[..., 1]`` for int8.
* nvfp4 scales are stored as their FP8-E4M3 bit patterns in uint8 (``.view(torch.float8_e4m3fn)`` gives the
  values): many torch CPU ops, opcheck and ONNX do not handle float8 tensors, and kernels load bytes anyway.

Nunchaku SVDQuant W4A4 linear (nunchaku_engine.md §3.2–3.3)
-----------------------------------------------------------
N and K are padded to multiples of 128 (codes with 0; scales, bias and smooth with 1), the rank to a multiple
of 16 (with 0). With n = nt·128 + np·16 + ns·8 + nl and k = kt·64 + kp·32 + kl·8 + r:

* ``qweight`` int8 ``[N, K/2]``: the bytes of little-endian int32 words; element (n, k) is nibble r of word
  (((((nt·K/64 + kt)·8 + np)·8 + nl)·4 + kl)·2 + ns)·2 + kp. int4 codes are two's complement, nvfp4 codes as ours.
* ``wscales`` ``[K/64, N]`` in the model dtype (int4, G = 64), element (n, g) at flat offset
  (nt·K/64 + g)·128 + ((n%128)//16)·16 + ((n%8)//2)·4 + ((n%16)//8)·2 + n%2; ``bias``, ``smooth``,
  ``smooth_orig`` and (nvfp4) ``wcscales`` are ``[N]`` vectors with the same formula at g = 0, K/64 = 1.
* nvfp4 ``wscales`` float8_e4m3fn ``[K/16, N]``, element (n, k) at
  ((((nt·K/64 + k//64)·8 + n%8)·4 + (n%32)//8)·4 + (n%128)//32)·4 + (k%64)//16; ``wtscale`` ``[1]`` (model
  dtype) for a per-tensor scale, or ``wcscales`` for a per-channel one.
* ``lora_up`` ``[N, r]``, element (c, q) at
  ((((((c//16)·r/16 + q//16)·8 + c%8)·4 + (q%8)//2)·2 + (c%16)//8)·2 + (q%16)//8)·2 + q%2;
  ``lora_down`` ``[K, r]`` holds the down projection A ``[r, K]``, element (q, c) at
  ((((((c//16)·r/16 + q//16)·8 + q%8)·4 + (c%8)//2)·2 + (q%16)//8)·2 + (c%16)//8)·2 + c%2.
* Semantics. Nunchaku's branch reads the raw input x, so ``lora_down`` = L2/λ (L2 ``[r, K]`` is our down
  projection, applied to x/λ); ``lora_up`` = L1. Its bias needs no change: our bias is already compensated for
  a shift applied only to the quantized path (svdq_compiler/ops.py), which is also what Nunchaku computes.
  ``smooth`` is the λ the runtime divides by (all ones when the smoothing was fused into the previous layer);
  ``smooth_orig`` is informational. v2 names: ``smooth_factor``, ``smooth_factor_orig``, ``proj_down``, ``proj_up``.

Nunchaku AWQ W4A16 linear (AdaLN modulation; nunchaku_engine.md §3.4)
-------------------------------------------------------------------
Codes are unsigned u = q + 7 with w = u·s + z, z = −7·s. ``qweight`` int32 ``[N/4, K/2]``: element (n, k) is
nibble (k%32)//8 of the little-endian int16 at position
(((n//4)·K/64 + k//64)·4 + n%4)·16 + ((k//32)%2)·8 + k%8. ``wscales`` and ``wzeros`` ``[G_pad, N]`` (model dtype)
with the group count padded with zeros to a multiple of 8·{4 (G=32), 2 (G=64), 1 (G≥128)}. For AdaLN layers
with S modulation chunks (6 in FLUX double blocks, 3 in single blocks) output row c·S + j holds chunk j's
channel c, and the bias of the scale chunks (1 and S−2) carries the +1 of (1 + scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from svdq_compiler.errors import CheckpointError, QuantizationError
from svdq_compiler.quant import ACT_FORMATS, CODE_DTYPES, FORMATS, FOUR_BIT_FORMATS, WEIGHT_FORMATS, QTensor

SPLIT_HALVES_FORMATS = tuple(name for name, f in FORMATS.items() if f.packing == "halves")
NUNCHAKU_TILE = 128  # Nunchaku pads N and K to multiples of this
NUNCHAKU_RANK_MULTIPLE = 16
NUNCHAKU_GROUPS = {fmt: FORMATS[fmt].default_group for fmt in ("int4", "nvfp4")}  # its W4A4 formats
MODEL_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def effective_group(group_size: int, k: int) -> int:
    """The channels per scale: `group_size`, or K for 0 (one group per row)."""
    return group_size or k


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def code_columns(fmt: str, k_pad: int) -> int:
    """Columns of packed codes for K_pad channels."""
    return k_pad // 2 if fmt in FOUR_BIT_FORMATS else k_pad


def packed_code_dtype(fmt: str) -> torch.dtype:
    return FORMATS[fmt].packed_code_dtype


def scale_dtype(fmt: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype packed scales of `fmt` are stored in."""
    stored = FORMATS[fmt].scale_dtype or model_dtype
    return torch.uint8 if stored == torch.float8_e4m3fn else stored  # E4M3 scales are kept as their bytes


def scale_values(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Packed scales as fp32 values."""
    return (scales.view(torch.float8_e4m3fn) if fmt == "nvfp4" else scales).float()


def _scales_to_packed(scales: torch.Tensor) -> torch.Tensor:
    return scales.view(torch.uint8) if scales.dtype == torch.float8_e4m3fn else scales


def _scales_from_packed(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    return scales.view(torch.float8_e4m3fn) if fmt == "nvfp4" else scales


# ---- codes ----------------------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Unpacked codes [..., K_pad] (a QTensor's) → packed codes [..., K_pad/2] uint8 (int8 codes: unchanged)."""
    if fmt not in FOUR_BIT_FORMATS:
        return codes
    k_pad = codes.shape[-1]
    _check_four_bit_group(fmt, group_size, k_pad)
    nibbles = codes.view(torch.uint8) & 0xF if codes.dtype == torch.int8 else codes & 0xF
    if fmt == "nvfp4":
        low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    else:
        grouped = nibbles.unflatten(-1, (k_pad // group_size, group_size))
        low, high = (half.flatten(-2) for half in grouped.split(group_size // 2, dim=-1))
    return low | (high << 4)


def unpack_codes(packed: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Packed codes → unpacked codes [..., K_pad] in the QTensor dtype (int4 sign-extended to int8)."""
    if fmt not in FOUR_BIT_FORMATS:
        return packed
    k_pad = packed.shape[-1] * 2
    _check_four_bit_group(fmt, group_size, k_pad)
    low, high = packed & 0xF, packed >> 4
    if fmt == "nvfp4":
        nibbles = torch.stack((low, high), dim=-1).flatten(-2)
    else:
        half = group_size // 2
        nibbles = torch.cat((low.unflatten(-1, (-1, half)), high.unflatten(-1, (-1, half))), dim=-1).flatten(-2)
    if fmt == "int4":
        return ((nibbles.to(torch.int8) ^ 8) - 8).to(torch.int8)
    return nibbles


def _check_four_bit_group(fmt: str, group_size: int, k_pad: int) -> None:
    if fmt in SPLIT_HALVES_FORMATS and (group_size <= 0 or group_size % 2 or k_pad % group_size):
        raise QuantizationError(f"{fmt} codes pack in split halves of each group, which needs an even group size "
                                f"dividing K_pad={k_pad}; got group size {group_size}")
    if k_pad % 2:
        raise QuantizationError(f"4-bit codes pack two per byte, so K_pad must be even; got {k_pad}")


# ---- packed weights and activations ---------------------------------------------------------------------------


def check_packed_weight(qweight: torch.Tensor, wscales: torch.Tensor, wtscale: torch.Tensor | None, fmt: str,
                        group_size: int, k: int, *, where: str = "packed weight") -> int:
    """Validate a packed weight's tensors (metadata only, so fake tensors work); returns the effective group."""
    if fmt not in WEIGHT_FORMATS:
        raise QuantizationError(f"unknown weight format {fmt!r}", where=where,
                                fix=f"use one of {WEIGHT_FORMATS}")
    group = effective_group(group_size, k)
    k_pad = round_up(k, group)
    expected_dtype = packed_code_dtype(fmt)
    if qweight.dtype != expected_dtype or qweight.dim() != 2 or qweight.shape[1] != code_columns(fmt, k_pad):
        raise QuantizationError(
            f"{fmt} weight codes must be {expected_dtype} [N, {code_columns(fmt, k_pad)}] for K={k}, group {group}; "
            f"got {qweight.dtype} {list(qweight.shape)}", where=where, fix="pack them with codegen.layout.pack_weight")
    n = qweight.shape[0]
    expected_scales = None if FORMATS[fmt].scale_dtype is None else scale_dtype(fmt, torch.float32)
    dtype_ok = wscales.dtype == expected_scales if expected_scales else wscales.dtype in MODEL_SCALE_DTYPES
    if not dtype_ok or list(wscales.shape) != [k_pad // group, n]:
        wanted = expected_scales or "the model dtype"
        raise QuantizationError(f"{fmt} weight scales must be {wanted} [{k_pad // group}, {n}] (group-major); got "
                                f"{wscales.dtype} {list(wscales.shape)}", where=where)
    if wtscale is not None and (fmt != "nvfp4" or wtscale.dtype != torch.float32
                                or list(wtscale.shape) not in ([], [1], [n])):
        raise QuantizationError(f"wtscale must be an nvfp4 weight's float32 scale of shape [], [1] or [{n}]; got "
                                f"{wtscale.dtype} {list(wtscale.shape)} for {fmt}", where=where)
    return group


def check_packed_act(codes: torch.Tensor, scales: torch.Tensor, fmt: str, group_size: int, k: int, *,
                     where: str = "packed activation") -> int:
    """Validate packed activation codes and scales (metadata only); returns the effective group."""
    if fmt not in ACT_FORMATS:
        raise QuantizationError(f"unknown activation format {fmt!r}", where=where, fix=f"use one of {ACT_FORMATS}")
    group = effective_group(group_size, k)
    k_pad = round_up(k, group)
    expected_dtype = packed_code_dtype(fmt)
    if codes.dtype != expected_dtype or codes.dim() < 1 or codes.shape[-1] != code_columns(fmt, k_pad):
        raise QuantizationError(f"{fmt} activation codes must be {expected_dtype} [..., {code_columns(fmt, k_pad)}] "
                                f"for K={k}, group {group}; got {codes.dtype} {list(codes.shape)}", where=where)
    expected_scales = (*codes.shape[:-1], k_pad // group)
    wanted = scale_dtype(fmt, scales.dtype)
    if scales.dtype != wanted or (FORMATS[fmt].scale_dtype is None and scales.dtype not in MODEL_SCALE_DTYPES) \
            or tuple(scales.shape) != expected_scales:
        raise QuantizationError(f"{fmt} activation scales must be [..., {k_pad // group}] matching the codes "
                                f"({list(expected_scales)}); got {scales.dtype} {list(scales.shape)}", where=where)
    return group


@dataclass
class PackedWeight:
    """A weight in our packed layout: the tensors the passes store and `svdq.gemm` reads."""

    qweight: torch.Tensor  # uint8 [N, K_pad/2] (4-bit) or int8 [N, K]
    wscales: torch.Tensor  # [K_pad/G, N]
    wtscale: torch.Tensor | None  # nvfp4: float32 [] or [N]; else None
    fmt: str
    group_size: int  # G (K for one group per row)
    k: int
    dtype: torch.dtype  # the model dtype the weight came from

    def __post_init__(self) -> None:
        self.group_size = check_packed_weight(self.qweight, self.wscales, self.wtscale, self.fmt, self.group_size,
                                              self.k)

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def k_pad(self) -> int:
        return self.wscales.shape[0] * self.group_size


def pack_weight(q: QTensor) -> PackedWeight:
    if q.codes.dim() != 2 or q.fmt not in WEIGHT_FORMATS:
        raise QuantizationError(f"pack_weight takes a 2-D weight QTensor, got {q.fmt} codes {list(q.codes.shape)}")
    wtscale = None if q.tensor_scale is None else q.tensor_scale.to(torch.float32)
    return PackedWeight(pack_codes(q.codes, q.fmt, q.group_size), _scales_to_packed(q.scales.t().contiguous()),
                        wtscale, q.fmt, q.group_size, q.k, q.dtype)


def unpack_weight(weight: PackedWeight) -> QTensor:
    tensor_scale = None
    if weight.wtscale is not None:
        tensor_scale = weight.wtscale.to(weight.dtype)
        tensor_scale = tensor_scale.reshape(()) if tensor_scale.numel() == 1 else tensor_scale
    codes = unpack_codes(weight.qweight, weight.fmt, weight.group_size)
    scales = _scales_from_packed(weight.wscales, weight.fmt).t().contiguous()
    return QTensor(codes, scales, weight.fmt, weight.group_size, weight.k, weight.dtype, tensor_scale)


def pack_act(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation QTensor → (codes [..., K_pad/2 or K], scales [..., K_pad/G]) as `svdq.quantize_act` returns."""
    return pack_codes(q.codes, q.fmt, q.group_size), _scales_to_packed(q.scales)


def unpack_act(codes: torch.Tensor, scales: torch.Tensor, fmt: str, group_size: int, k: int,
               dtype: torch.dtype, tensor_scale: torch.Tensor | None = None) -> QTensor:
    """The QTensor that packed activations stand for; nvfp4's per-tensor scale travels beside the packed pair
    (pack_act drops it), so pass it back here."""
    group = check_packed_act(codes, scales, fmt, group_size, k)
    return QTensor(unpack_codes(codes, fmt, group), _scales_from_packed(scales, fmt), fmt, group, k, dtype,
                   tensor_scale)


# ---- Nunchaku SVDQuant W4A4 -----------------------------------------------------------------------------------

_V2_NAMES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
             "lora_up": "proj_up"}


def _padded(t: torch.Tensor, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, extent) for extent in t.shape)] = t
    return out


def _qweight_word(n: torch.Tensor, k: torch.Tensor, k_total: int) -> torch.Tensor:
    """Nunchaku qweight: int32 word of element (n, k); the formula is a sum of a row part and a column part."""
    row = ((n // 128) * (k_total // 64) * 8 * 8 * 4 * 2 * 2 + ((n % 128) // 16) * (8 * 4 * 2 * 2)
           + (n % 8) * (4 * 2 * 2) + ((n % 16) // 8) * 2)
    col = (k // 64) * (8 * 8 * 4 * 2 * 2) + ((k % 32) // 8) * (2 * 2) + (k % 64) // 32
    return row[:, None] + col[None, :]


def _vector_offsets(n: torch.Tensor, groups: int) -> torch.Tensor:
    """Nunchaku group scales / vectors: flat offset of element (n, g), [N, groups]."""
    inner = ((n % 128) // 16) * 16 + ((n % 8) // 2) * 4 + ((n % 16) // 8) * 2 + n % 2
    g = torch.arange(groups, device=n.device)
    return ((n // 128) * groups * 128 + inner)[:, None] + (g * 128)[None, :]


def _micro_scale_offsets(n: torch.Tensor, k_total: int) -> torch.Tensor:
    """Nunchaku nvfp4 FP8 scales: flat offset of element (n, group of 16 channels), [N, K/16]."""
    kt_count = k_total // 64
    s = torch.arange(k_total // 16, device=n.device)
    row = (n // 128) * kt_count * 512 + (n % 8) * 64 + ((n % 32) // 8) * 16 + ((n % 128) // 32) * 4
    col = (s // 4) * 512 + s % 4
    return row[:, None] + col[None, :]


def _lowrank_offsets(rows: int, rank: int, device, *, down: bool) -> torch.Tensor:
    """Nunchaku low-rank factors: flat offset of element (c, q), c a channel (K for down, N for up), q a rank,
    [rows, rank]. Both factors are tiled in 16×16 blocks; they differ in which index walks the fragment lanes."""
    c = torch.arange(rows, device=device)[:, None]
    q = torch.arange(rank, device=device)[None, :]
    tile = ((c // 16) * (rank // 16) + q // 16) * 256
    lane_index, pair_index = (q, c) if down else (c, q)
    return (tile + (lane_index % 8) * 32 + ((pair_index % 8) // 2) * 8 + ((lane_index % 16) // 8) * 4
            + ((pair_index % 16) // 8) * 2 + pair_index % 2)


def _scatter(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(values.numel(), dtype=values.dtype, device=values.device)
    flat[offsets.flatten()] = values.flatten()
    return flat


def _pack_nibbles_nunchaku(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes [N, K] (N, K multiples of 128) → Nunchaku qweight bytes int8 [N, K/2]."""
    n_total, k_total = codes.shape
    nibbles = codes.view(torch.uint8) & 0xF if codes.dtype == torch.int8 else codes & 0xF
    n = torch.arange(n_total, device=codes.device)
    even_k = torch.arange(0, k_total, 2, device=codes.device)
    byte = _qweight_word(n, even_k, k_total) * 4 + (even_k % 8)[None, :] // 2
    values = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return _scatter(values, byte).view(n_total, k_total // 2).view(torch.int8)


def _unpack_nibbles_nunchaku(qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    n_total, k_total = qweight.shape[0], qweight.shape[1] * 2
    n = torch.arange(n_total, device=qweight.device)
    even_k = torch.arange(0, k_total, 2, device=qweight.device)
    byte = _qweight_word(n, even_k, k_total) * 4 + (even_k % 8)[None, :] // 2
    values = qweight.reshape(-1).view(torch.uint8)[byte]
    nibbles = torch.stack((values & 0xF, values >> 4), dim=-1).flatten(-2)
    return ((nibbles.to(torch.int8) ^ 8) - 8).to(torch.int8) if fmt == "int4" else nibbles


def _pack_vector(values: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """[N, groups] (or [N]) → Nunchaku's permuted flat order; N a multiple of 128."""
    values = values.reshape(values.shape[0], groups)
    n = torch.arange(values.shape[0], device=values.device)
    return _scatter(values, _vector_offsets(n, groups))


def _unpack_vector(flat: torch.Tensor, n_total: int, groups: int = 1) -> torch.Tensor:
    """Inverse of _pack_vector: [N, groups], or [N] for one group."""
    n = torch.arange(n_total, device=flat.device)
    values = flat.reshape(-1)[_vector_offsets(n, groups)]
    return values.squeeze(-1) if groups == 1 else values


@dataclass
class NunchakuLinear:
    """The parts of an SVDQuant linear, in our layout, read from or written to a Nunchaku checkpoint."""

    weight: PackedWeight
    bias: torch.Tensor | None = None  # [N], model dtype
    smooth: torch.Tensor | None = None  # λ [K], the divisor of the quantized path's input
    lora_down: torch.Tensor | None = None  # L2 [r, K], applied to x/λ
    lora_up: torch.Tensor | None = None  # L1 [N, r]
    smooth_orig: torch.Tensor | None = None  # Nunchaku's informational λ (≠ smooth when it was fused upstream)
    # nvfp4: our per-tensor activation scale t (fp32, one value). Nunchaku has none (its E4M3 block scale is
    # min(amax/6, 448) of x/smooth_factor), so to_nunchaku folds t into the quantized path only:
    # smooth_factor = λ·t and wtscale (or wcscales) × t, while the branch keeps L2/λ. What Nunchaku computes is
    # then exactly ours, up to rounding λ·t to the model dtype. from_nunchaku reads none (t = 1).
    act_scale: torch.Tensor | None = None


def to_nunchaku(linear: NunchakuLinear, *, naming: str = "v1") -> dict[str, torch.Tensor]:
    """Our SVDQuant linear → the tensors of a Nunchaku W4A4 linear (keys without the layer prefix)."""
    w = linear.weight
    if w.fmt not in NUNCHAKU_GROUPS or w.group_size != NUNCHAKU_GROUPS[w.fmt]:
        raise QuantizationError(f"Nunchaku's W4A4 layout holds int4 with group 64 or nvfp4 with group 16, not "
                                f"{w.fmt} with group {w.group_size}", where="to_nunchaku")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise QuantizationError(f"Nunchaku checkpoints hold float16 or bfloat16 layers, not {w.dtype}",
                                where="to_nunchaku", fix="quantize the model in its 16-bit dtype")
    names, dtype = _names(naming), w.dtype
    n_pad, k_pad = round_up(w.n, NUNCHAKU_TILE), round_up(w.k, NUNCHAKU_TILE)
    codes = unpack_codes(w.qweight, w.fmt, w.group_size)[:, : w.k]
    out = {"qweight": _pack_nibbles_nunchaku(_padded(codes, (n_pad, k_pad), 0))}
    scales = w.wscales.t()  # [N, ceil(K/G)]
    if w.fmt == "int4":
        scales = _padded(scales, (n_pad, k_pad // 64), 1)
        out["wscales"] = _pack_vector(scales, k_pad // 64).view(k_pad // 64, n_pad)
    else:
        one = torch.ones((), dtype=torch.float8_e4m3fn).view(torch.uint8).item()
        scales = _padded(scales, (n_pad, k_pad // 16), one)
        offsets = _micro_scale_offsets(torch.arange(n_pad, device=scales.device), k_pad)
        # Nunchaku pads K to 128 and its kernel reads scales for all of it, so the scales cover K_pad/16 groups
        # (deepcompressor pads them only to 64 channels, which no Nunchaku build can load when K % 128 != 0).
        out["wscales"] = _scatter(scales, offsets).view(torch.float8_e4m3fn).view(k_pad // 16, n_pad)
        wtscale = w.wtscale
        if linear.act_scale is not None:
            wtscale = (torch.ones((), dtype=torch.float32) if wtscale is None else wtscale.float()) * \
                linear.act_scale.float().reshape(())
        if wtscale is not None and wtscale.numel() == w.n and w.n > 1:
            out["wcscales"] = _pack_vector(_padded(wtscale.to(dtype), (n_pad,), 1))
        elif wtscale is not None:
            out["wtscale"] = wtscale.reshape(1).to(dtype)
    bias = linear.bias if linear.bias is not None else torch.zeros(w.n, dtype=dtype, device=w.qweight.device)
    out["bias"] = _pack_vector(_padded(bias.to(dtype), (n_pad,), 1))
    smooth = linear.smooth if linear.smooth is not None else torch.ones(w.k, dtype=dtype, device=bias.device)
    smooth_orig = linear.smooth_orig if linear.smooth_orig is not None else smooth
    quantized_smooth = smooth if linear.act_scale is None or w.fmt != "nvfp4" else \
        smooth.float() * linear.act_scale.float().reshape(())  # t folded in (the act_scale field's comment)
    out[names["smooth"]] = _pack_vector(_padded(quantized_smooth.to(dtype), (k_pad,), 1))
    out[names["smooth_orig"]] = _pack_vector(_padded(smooth_orig.to(dtype), (k_pad,), 1))
    if (linear.lora_down is None) != (linear.lora_up is None):
        raise QuantizationError("lora_down and lora_up come together", where="to_nunchaku")
    if linear.lora_down is not None:
        rank = linear.lora_down.shape[0]
        r_pad = round_up(rank, NUNCHAKU_RANK_MULTIPLE)
        # Nunchaku's branch reads x, not x/λ: fold 1/λ into the down projection (in fp64, as the reference does).
        down = (linear.lora_down.double() / smooth.double()[None, :]).to(dtype)
        down = _padded(down.t(), (k_pad, r_pad), 0)  # [K, r]: the layout is indexed by (channel, rank)
        out[names["lora_down"]] = _scatter(down, _lowrank_offsets(k_pad, r_pad, down.device, down=True)).view(
            k_pad, r_pad)
        up = _padded(linear.lora_up.to(dtype), (n_pad, r_pad), 0)
        out[names["lora_up"]] = _scatter(up, _lowrank_offsets(n_pad, r_pad, up.device, down=False)).view(
            n_pad, r_pad)
    return out


def from_nunchaku(tensors: Mapping[str, torch.Tensor], fmt: str, *, in_features: int, out_features: int,
                  rank: int | None = None, where: str = "Nunchaku linear") -> NunchakuLinear:
    """The tensors of one Nunchaku W4A4 linear (v1 or v2 names) → our layout. Padding is dropped; `rank`
    (default: the stored, 16-padded rank) trims the low-rank factors."""
    if fmt not in NUNCHAKU_GROUPS:
        raise CheckpointError(f"Nunchaku W4A4 weights are int4 or nvfp4, not {fmt!r}", where=where)
    names = _names("v2" if "proj_down" in tensors or "smooth_factor" in tensors else "v1")
    n, k = out_features, in_features
    n_pad, k_pad = round_up(n, NUNCHAKU_TILE), round_up(k, NUNCHAKU_TILE)
    group = NUNCHAKU_GROUPS[fmt]

    def get(key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor | None:
        """The tensor at `key` (None if absent), checked against its padded size and dtypes."""
        t = tensors.get(key)
        if t is None:
            return None
        if t.numel() != math.prod(shape) or t.dtype not in dtypes:
            wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise CheckpointError(f"{key} has {t.dtype} {list(t.shape)}, expected {wanted} {list(shape)} "
                                  f"for in_features={k}, out_features={n}", where=where,
                                  fix="check in_features/out_features and the format (int4 vs nvfp4)")
        return t

    halves = (torch.float16, torch.bfloat16)
    qweight = get("qweight", (n_pad, k_pad // 2), (torch.int8, torch.uint8))
    bias = get("bias", (n_pad,), halves)
    if qweight is None or bias is None:
        raise CheckpointError(f"missing {'qweight' if qweight is None else 'bias'}", where=where,
                              fix="pass the tensors of one W4A4 linear, without the layer prefix")
    dtype = bias.dtype
    codes = _unpack_nibbles_nunchaku(qweight.reshape(n_pad, k_pad // 2), fmt)[:n]
    k_ours = round_up(k, group)
    codes = _padded(codes[:, :k], (n, k_ours), 0).to(CODE_DTYPES[fmt])
    wtscale = None
    flat = get("wscales", (k_pad // group, n_pad), halves if fmt == "int4" else (torch.float8_e4m3fn,))
    if flat is None:
        raise CheckpointError("missing wscales", where=where)
    if fmt == "int4":
        scales = _unpack_vector(flat, n_pad, k_pad // 64)[:n, : k_ours // group]
    else:
        offsets = _micro_scale_offsets(torch.arange(n_pad, device=flat.device), k_pad)
        scales = flat.reshape(-1).view(torch.uint8)[offsets][:n, : k_ours // group]
        tensor_scale = get("wtscale", (1,), halves + (torch.float32,))
        channel_scale = get("wcscales", (n_pad,), halves + (torch.float32,))
        if channel_scale is not None:
            wtscale = _unpack_vector(channel_scale, n_pad)[:n].to(torch.float32)
        if tensor_scale is not None:
            wtscale = tensor_scale.reshape(()).to(torch.float32) * (1 if wtscale is None else wtscale)
    packed = PackedWeight(pack_codes(codes, fmt, group), scales.t().contiguous(), wtscale, fmt, group, k, dtype)
    smooth_flat = get(names["smooth"], (k_pad,), halves)
    smooth = None if smooth_flat is None else _unpack_vector(smooth_flat, k_pad)[:k]
    orig_flat = get(names["smooth_orig"], (k_pad,), halves)
    smooth_orig = None if orig_flat is None else _unpack_vector(orig_flat, k_pad)[:k]
    down, up = tensors.get(names["lora_down"]), tensors.get(names["lora_up"])
    lora_down = lora_up = None
    if down is not None and up is not None and down.numel() and up.numel():
        r_pad = down.shape[-1]
        get(names["lora_down"], (k_pad, r_pad), halves)
        get(names["lora_up"], (n_pad, r_pad), halves)
        r = r_pad if rank is None else rank
        a = down.reshape(-1)[_lowrank_offsets(k_pad, r_pad, down.device, down=True)][:k, :r].t()
        # undo the 1/λ fold: our down projection reads x/λ
        lora_down = a if smooth is None else (a.double() * smooth.double()[None, :]).to(dtype)
        lora_up = up.reshape(-1)[_lowrank_offsets(n_pad, r_pad, up.device, down=False)][:n, :r]
    return NunchakuLinear(packed, bias=_unpack_vector(bias, n_pad)[:n], smooth=smooth, lora_down=lora_down,
                          lora_up=lora_up, smooth_orig=smooth_orig)


def _names(naming: str) -> dict[str, str]:
    if naming not in ("v1", "v2"):
        raise QuantizationError(f"naming must be 'v1' or 'v2', got {naming!r}")
    return {key: (_V2_NAMES[key] if naming == "v2" else key) for key in _V2_NAMES}




# ---- Nunchaku AWQ W4A16 ---------------------------------------------------------------------------------------

AWQ_ZERO_POINT = 7


def _awq_group_count(groups: int, group_size: int) -> int:
    """Scale rows the W4A16 kernel reads: packs of 8 groups, a multiple of 4/2/1 packs for G = 32/64/≥128."""
    if group_size < 32 or group_size & (group_size - 1):
        raise QuantizationError(f"Nunchaku's W4A16 layout takes group sizes 32, 64, 128, …; got {group_size}")
    packs_multiple = max(1, 128 // group_size)
    packs = round_up(-(-groups // 8), packs_multiple)
    return packs * 8


def _awq_bytes(n_total: int, k_total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte offsets [N, K/2], column of the low-nibble element of each) for AWQ qweight.

    Element (n, k) is nibble a = (k%32)//8 of int16 P(n, k) (formula in the module docstring), so elements k and
    k + 8 with (k//8) even share a byte: k in the low nibble."""
    k_low = torch.arange(k_total, device=device).view(-1, 2, 8)[:, 0].flatten()  # (k//8) even
    n = torch.arange(n_total, device=device)[:, None]
    k = k_low[None, :]
    int16 = (((n // 4) * (k_total // 64) + k // 64) * 4 + n % 4) * 16 + ((k // 32) % 2) * 8 + k % 8
    return int16 * 2 + ((k % 32) // 8) // 2, k_low


def _interleave_rows(t: torch.Tensor, splits: int, *, inverse: bool = False) -> torch.Tensor:
    """Module order (row j·N/S + c) ↔ Nunchaku AdaLN order (row c·S + j) along dim 0."""
    if splits == 1:
        return t
    chunk_major = (splits, t.shape[0] // splits) if not inverse else (t.shape[0] // splits, splits)
    return t.reshape(*chunk_major, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _adanorm_bias_delta(n: int, splits: int, like: torch.Tensor) -> torch.Tensor:
    """+1 on the bias of the (1 + scale) chunks, 1 and S−2, in module order."""
    delta = torch.zeros(splits, n // splits, dtype=like.dtype, device=like.device)
    if splits > 1:
        delta[[1, splits - 2]] = 1
    return delta.reshape(n)


def to_nunchaku_awq(weight: PackedWeight, bias: torch.Tensor | None = None, *,
                    adanorm_splits: int = 1) -> dict[str, torch.Tensor]:
    """Our int4 W4A16 weight → Nunchaku's AWQ layer tensors (qweight, wscales, wzeros, bias).

    `adanorm_splits` S > 1 interleaves the S modulation chunks and folds the +1 of (1 + scale) into the bias,
    as Nunchaku's AdaLN layers expect."""
    w = weight
    if w.fmt != "int4":
        raise QuantizationError(f"Nunchaku's W4A16 layout holds int4 codes, not {w.fmt}", where="to_nunchaku_awq")
    if w.k_pad % 64 or w.n % 4 or w.n % adanorm_splits:
        raise QuantizationError(f"Nunchaku's W4A16 layout needs K_pad % 64 == 0, N % 4 == 0 and N % splits == 0; got "
                                f"K_pad={w.k_pad}, N={w.n}, splits={adanorm_splits}", where="to_nunchaku_awq")
    codes = _interleave_rows(unpack_codes(w.qweight, "int4", w.group_size), adanorm_splits)
    nibbles = (codes + AWQ_ZERO_POINT).to(torch.uint8)
    offsets, k_low = _awq_bytes(w.n, w.k_pad, codes.device)
    packed = _scatter(nibbles[:, k_low] | (nibbles[:, k_low + 8] << 4), offsets)
    scales = _interleave_rows(w.wscales.t(), adanorm_splits).t()  # [groups, N]
    groups = _awq_group_count(scales.shape[0], w.group_size)
    padded_scales = _padded(scales, (groups, w.n), 0)
    zeros = _padded((-(scales.float() * AWQ_ZERO_POINT)).to(scales.dtype), (groups, w.n), 0)
    bias = torch.zeros(w.n, dtype=scales.dtype, device=codes.device) if bias is None else bias.to(scales.dtype)
    bias = _interleave_rows(bias + _adanorm_bias_delta(w.n, adanorm_splits, bias), adanorm_splits)
    return {"qweight": packed.view(torch.int32).view(w.n // 4, w.k_pad // 2), "wscales": padded_scales,
            "wzeros": zeros, "bias": bias}


def from_nunchaku_awq(tensors: Mapping[str, torch.Tensor], *, in_features: int, out_features: int,
                      group_size: int = 64, adanorm_splits: int = 1,
                      where: str = "Nunchaku W4A16 linear") -> tuple[PackedWeight, torch.Tensor]:
    """Nunchaku's AWQ layer tensors → (our int4 PackedWeight, bias in module order without the +1 fold)."""
    n, k = out_features, in_features
    missing = [key for key in ("qweight", "wscales", "wzeros", "bias") if key not in tensors]
    if missing:
        raise CheckpointError(f"missing {missing}", where=where, fix="pass the tensors of one W4A16 linear")
    qweight, scales, zeros, bias = (tensors[key] for key in ("qweight", "wscales", "wzeros", "bias"))
    groups = k // group_size
    if k % 64 or n % 4 or n % adanorm_splits or qweight.numel() * qweight.element_size() != n * k // 2 \
            or scales.shape != zeros.shape or scales.dim() != 2 or scales.shape[1] != n \
            or scales.shape[0] < groups or bias.numel() != n:
        raise CheckpointError(f"tensors do not fit in_features={k}, out_features={n}, group {group_size}: qweight "
                              f"{list(qweight.shape)}, wscales {list(scales.shape)}, wzeros {list(zeros.shape)}, "
                              f"bias {list(bias.shape)}", where=where)
    scales, zeros = scales[:groups], zeros[:groups]
    expected_zeros = (-(scales.float() * AWQ_ZERO_POINT)).to(scales.dtype)
    if not torch.equal(zeros, expected_zeros):
        raise CheckpointError("wzeros is not −7·wscales: the weight is not symmetric int4, which our int4 format "
                              "needs", where=where)
    offsets, k_low = _awq_bytes(n, k, qweight.device)
    values = qweight.reshape(-1).view(torch.uint8)[offsets]
    nibbles = torch.empty(n, k, dtype=torch.uint8, device=qweight.device)
    nibbles[:, k_low], nibbles[:, k_low + 8] = values & 0xF, values >> 4
    codes = _interleave_rows(nibbles.to(torch.int8) - AWQ_ZERO_POINT, adanorm_splits, inverse=True)
    scales = _interleave_rows(scales.t(), adanorm_splits, inverse=True).t().contiguous()
    bias = _interleave_rows(bias.reshape(n), adanorm_splits, inverse=True)
    bias = bias - _adanorm_bias_delta(n, adanorm_splits, bias)
    weight = PackedWeight(pack_codes(codes.to(torch.int8), "int4", group_size), scales, None, "int4", group_size, k,
                          scales.dtype)
    return weight, bias
