"""Triton device functions the generated kernels call: rounding, code packing, scale encoding, activations.

Everything here is written with plain arithmetic and bit casts (no libdevice, no fp8 register types), so the
same functions run compiled on Ampere, Ada and Hopper and under TRITON_INTERPRET=1 on the CPU, and produce the
same bits as the reference quantizers in `svdq_compiler.quant`.

This file is the single source of these functions, but generated kernels do not import it: `triton.jit` fixes
compiled-or-interpreted when it decorates, and one process can hold both kinds of kernel. The generator copies
the text of the functions a kernel calls (`generate.device_source`) into each kernel module, so every module is
self-contained and readable on its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 1.5·2^23: adding it to an fp32 |x| < 2^22 leaves round-half-to-even(x) in the low mantissa bits.
_RNE_MAGIC = tl.constexpr(12582912.0)
# The same number as an int32 bit pattern (small_int_to_float).
_RNE_MAGIC_BITS = tl.constexpr(0x4B400000)


@triton.jit
def round_half_even(x):
    """Round fp32 values (|x| < 2^22) to the nearest integer, ties to even: two adds, full rate everywhere."""
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def small_int_to_float(i):
    """int32 (|i| < 2^22) → fp32 with an integer add and a float subtract.

    The conversion instruction (I2F) runs at a quarter of the FMA rate; one per accumulator element per K group
    would otherwise cost more than the int8 dot it converts.
    """
    return (i + _RNE_MAGIC_BITS).to(tl.float32, bitcast=True) - _RNE_MAGIC


@triton.jit
def add_scaled_partial(acc, partial, row_factor, col_scale):
    """acc + partial·row_factor·col_scale for an int32 tile |partial| < 2^22, in two FMAs per element.

    The partial's bits plus those of 1.5·2^23, read as fp32, are 1.5·2^23 + partial exactly; an FMA with the
    row's −1.5·2^23·factor leaves partial·factor rounded once (what a conversion and a multiply give) without a
    separate float subtract. Exact only when 3·factor fits fp32's mantissa: bf16 and fp16 scales (times a power
    of two), not fp32 ones.
    """
    magic = (partial + _RNE_MAGIC_BITS).to(tl.float32, bitcast=True)
    scaled = tl.fma(magic, row_factor[:, None], (row_factor * -_RNE_MAGIC)[:, None])
    return tl.fma(scaled, col_scale[None, :], acc)


# 1.5·2^9: adding it to an fp32 |q| < 2^8 rounds q to a multiple of 2^-14 (nearest_code_bits).
_SNAP_MAGIC = tl.constexpr(768.0)


@triton.jit
def refine_reciprocal(d, y):
    """One Newton step from y, a few fp32 ulp off 1/d, to within about half an ulp: the reciprocal CUDA's
    correctly rounded division starts from."""
    return tl.fma(tl.fma(-d, y, 1.0), y, y)


@triton.jit
def reciprocal(d):
    """1/d within about half an fp32 ulp, from Triton's `/` (div.full on CUDA, up to 2 ulp off)."""
    return refine_reciprocal(d, 1.0 / d)


@triton.jit
def quotient_rn(x, d, d_reciprocal):
    """x / d correctly rounded, as IEEE fp32 division gives it, from d_reciprocal = `reciprocal(d)`: the product
    and two FMA corrections (each remainder x − q·d is exact in fp32, and q + remainder/d moves q onto the
    correctly rounded quotient; Markstein), the steps of CUDA's div.rn after its reciprocal. Four FMAs and a
    multiply per element where the reciprocal is shared (one per column), against a reciprocal per element for
    a division; Triton's fp32 `/` on CUDA (div.full) is off by up to 2 ulp instead. For quotients and
    remainders in fp32's normal range."""
    q = x * d_reciprocal
    q = tl.fma(tl.fma(-q, d, x), d_reciprocal, q)
    return tl.fma(tl.fma(-q, d, x), d_reciprocal, q)


@triton.jit
def nearest_code_bits(v, reciprocal, lo, hi):
    """round-half-even(v/s) clamped to [lo, hi], returned as the bits of 1.5·2^23 + code (int32: the code's
    low bits are the code in two's complement), for v and s values of a 16-bit float type and reciprocal within
    a few fp32 ulp of 1/s.

    A quotient of two such values is either a half-integer exactly or at least 2^-12 from every half-integer
    (2v − (2h + 1)s is a multiple of ulp(s)), so v·reciprocal rounded to a multiple of 2^-14 is that
    half-integer, or lies on the same side of it as v/s: rounding it to an integer gives what dividing exactly
    and rounding gives, without a division per element."""
    q = (v * reciprocal + _SNAP_MAGIC) - _SNAP_MAGIC
    q = tl.minimum(tl.maximum(q, lo), hi)
    return (q + _RNE_MAGIC).to(tl.int32, bitcast=True)


@triton.jit
def round_to_bf16(x):
    """fp32 → the nearest bfloat16 value (ties to even), returned as fp32: add half an ulp of the kept bits
    (minus one when the kept bits are even), then clear the 16 dropped bits."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def pow2(exponent):
    """2^exponent as fp32 for int32 exponents in the normal range [−126, 127]."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def float_exponent(x):
    """floor(log2(x)) for positive normal fp32 x (−127 for zero)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def round_to_e4m3(s):
    """Round non-negative fp32 values to the FP8-E4M3 grid (max 448), exact ties to the larger neighbour."""
    s = tl.minimum(s, 448.0)
    # Spacing of the grid around s: 2^(e−3) in the binade [2^e, 2^(e+1)), 2^−9 among the subnormals.
    ulp = pow2(tl.maximum(float_exponent(s), -6) - 3)
    return tl.minimum(tl.floor(s / ulp + 0.5) * ulp, 448.0)


@triton.jit
def e4m3_bits(s):
    """The FP8-E4M3 bit pattern (uint8) of non-negative fp32 values that lie on the E4M3 grid."""
    exponent = tl.maximum(float_exponent(s), -6)
    normal = s >= 0.015625  # 2^−6, the smallest normal E4M3 value
    mantissa = tl.where(normal, s / pow2(exponent) * 8.0 - 8.0, s * 512.0)
    biased = tl.where(normal, exponent + 7, 0)
    return ((biased << 3) | mantissa.to(tl.int32)).to(tl.uint8)


@triton.jit
def e4m3_value(bits):
    """fp32 value of FP8-E4M3 bit patterns (uint8)."""
    b = bits.to(tl.int32)
    exponent = (b >> 3) & 15
    mantissa = (b & 7).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125, (mantissa + 8.0) * pow2(exponent - 10))
    return tl.where((b & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def e2m1_code(v):
    """E2M1 code (int32, bit 3 = sign) of fp32 values clamped to [−6, 6], exact ties to the larger neighbour.

    The magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} have midpoints {.25, .75, 1.25, 1.75, 2.5, 3.5, 5}. "Larger" is
    towards +∞, so a positive tie rounds away from zero and a negative tie towards zero.
    """
    a = tl.abs(v)
    pos = v >= 0
    index = ((tl.where(pos, a >= 0.25, a > 0.25)).to(tl.int32) + (tl.where(pos, a >= 0.75, a > 0.75)).to(tl.int32)
             + (tl.where(pos, a >= 1.25, a > 1.25)).to(tl.int32) + (tl.where(pos, a >= 1.75, a > 1.75)).to(tl.int32)
             + (tl.where(pos, a >= 2.5, a > 2.5)).to(tl.int32) + (tl.where(pos, a >= 3.5, a > 3.5)).to(tl.int32)
             + (tl.where(pos, a >= 5.0, a > 5.0)).to(tl.int32))
    return tl.where((v < 0) & (index > 0), index | 8, index)


@triton.jit
def e2m1_to_f16(codes):
    """fp16 value of E2M1 codes (uint8, low nibble): the 3 magnitude bits land in fp16's exponent/mantissa
    boundary, so the fp16 (sub)normal encodes value·2^−14; one multiply by 2^14 restores it exactly."""
    c = codes.to(tl.int16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.float16, bitcast=True) * 16384.0


@triton.jit
def unpack_int4(packed):
    """Signed nibbles of uint8 bytes → (low, high) int8 tiles in [−8, 7] (shift left, arithmetic shift right)."""
    b = packed.to(tl.int8, bitcast=True)
    return (b << 4) >> 4, b >> 4


@triton.jit
def unpack_uint4(packed):
    """Unsigned nibbles of uint8 bytes → (low, high) int8 tiles in [0, 15]."""
    return (packed & 15).to(tl.int8), (packed >> 4).to(tl.int8)


@triton.jit
def as_signed_bytes(codes):
    """uint8 codes u → int8 u − 128 (the top bit flipped, the byte reinterpreted): an int8 dot's operand."""
    return (codes ^ 128).to(tl.int8, bitcast=True)


@triton.jit
def nibbles_x16(packed):
    """Signed nibbles of uint8 bytes → (low, high) int8 tiles holding 16× each nibble (−128…112): the low
    nibble shifted into the high half of its byte, and the high nibble masked in place. No sign extension, so
    the compiled form (`nibbles_x16_ptx`) works on four bytes per 32-bit instruction."""
    b = packed.to(tl.int8, bitcast=True)
    return b << 4, b & -16


@triton.jit
def nibbles_x16_ptx(packed):
    """`nibbles_x16` as two 32-bit logic instructions per four bytes (inline PTX; CUDA only): element-wise
    int8 shifts and masks would be split into bytes, sign-extended and re-packed with PRMT, a dozen
    instructions per byte."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
        "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


@triton.jit
def unsigned_nibbles_ptx(packed):
    """`unpack_uint4` as 32-bit logic instructions on four bytes at a time (inline PTX; CUDA only)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; and.b32 $0, $2, 0x0F0F0F0F; shr.b32 t, $2, 4; and.b32 $1, t, 0x0F0F0F0F; }",
        "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)


# Signed nibbles times a 16-bit scale, two weights per 32-bit register (kernel W's dequantization). The nibble
# with its sign bit flipped (code + 8, in [0, 15]) becomes the low mantissa bits of a 16-bit float whose unit
# in the last place is 1: bf16 0x4300 is 128, fp16 0x6400 is 1024, so the float is 136 + code (1032 + code);
# one packed FMA subtracts the offset exactly and one packed FMA multiplies by the scale, rounding once (code
# times scale has at most 12 significant bits, so that is the reference's fp32 product rounded to the dtype).
# $4 holds four bytes, $5/$6 the scales of bytes 0-1/2-3; $0/$1 the low nibbles of bytes 0-1/2-3, $2/$3 the
# high ones (Triton packs elements 0-1 and 2-3 of each four into one 32-bit register each). PRMT spreads
# bytes 0-1 (2-3) into the low bytes of the two 16-bit lanes; one LOP3 per register masks the nibble, flips
# its sign bit and sets the exponent; -0 as the addend keeps the sign of a zero product.
_SCALED_NIBBLES_PTX = (
    "{{ .reg .b32 t, u, magic, one, offset, zero; mov.b32 magic, {magic}; mov.b32 one, {one}; "
    "mov.b32 offset, {offset}; mov.b32 zero, 0x80008000; "
    "prmt.b32 t, $4, 0, 0x4140; prmt.b32 u, $4, 0, 0x4342; "
    "lop3.b32 $0, t, 0x000F000F, magic, 0x6A; lop3.b32 $1, u, 0x000F000F, magic, 0x6A; "
    "shr.b32 t, t, 4; shr.b32 u, u, 4; "
    "lop3.b32 $2, t, 0x000F000F, magic, 0x6A; lop3.b32 $3, u, 0x000F000F, magic, 0x6A; "
    "fma.rn.{kind} $0, $0, one, offset; fma.rn.{kind} $1, $1, one, offset; "
    "fma.rn.{kind} $2, $2, one, offset; fma.rn.{kind} $3, $3, one, offset; "
    "fma.rn.{kind} $0, $0, $5, zero; fma.rn.{kind} $1, $1, $6, zero; "
    "fma.rn.{kind} $2, $2, $5, zero; fma.rn.{kind} $3, $3, $6, zero; }}")
_SCALED_NIBBLES_BF16_PTX = tl.constexpr(_SCALED_NIBBLES_PTX.format(
    kind="bf16x2", magic="0x43084308", one="0x3F803F80", offset="0xC308C308"))
_SCALED_NIBBLES_F16_PTX = tl.constexpr(_SCALED_NIBBLES_PTX.format(
    kind="f16x2", magic="0x64086408", one="0x3C003C00", offset="0xE408E408"))


@triton.jit
def scaled_nibbles(packed, scale, FP16: tl.constexpr):
    """Signed nibbles of uint8 bytes times `scale` (fp32, of the bytes' shape) → (low, high) fp32 tiles, exact;
    the caller rounds them to the model dtype. The interpreter's form of `scaled_nibbles_ptx`, built the same
    way (the 16-bit float 136 + code, or 1032 + code for fp16, minus the offset)."""
    b = packed.to(tl.int32)
    if FP16:
        low = ((b & 15) ^ 0x6408).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1032.0
        high = ((b >> 4) ^ 0x6408).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1032.0
    else:
        low = (((b & 15) ^ 0x4308) << 16).to(tl.float32, bitcast=True) - 136.0
        high = (((b >> 4) ^ 0x4308) << 16).to(tl.float32, bitcast=True) - 136.0
    return low * scale, high * scale


@triton.jit
def scaled_nibbles_ptx(packed, scale):
    """Signed nibbles of uint8 bytes times `scale` (bf16 or fp16, of the bytes' shape) → (low, high) tiles of
    the scale's dtype, rounded once: about two instructions per weight (inline PTX; CUDA only), where
    unpacking, converting, scaling and rounding element by element took five or more."""
    # one return: Triton 3.6 type-checks a return after a compile-time `if` that returned, even when unreached
    if scale.dtype == tl.float16:
        low, high = tl.inline_asm_elementwise(_SCALED_NIBBLES_F16_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                              dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        low, high = tl.inline_asm_elementwise(_SCALED_NIBBLES_BF16_PTX, "=r,=r,=r,=r,r,r,r", [packed, scale],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return low, high


# kernel W's NF4 codebook lookup in registers. The 16 fp32 values (quant.NF4_CODEBOOK; tests/codegen/
# test_kernel_lib.py rebuilds these words from it) as four byte planes: word 4p + j holds byte p of entries
# 4j..4j+3, entry 4j + e in byte e. One PRMT picks byte p of four weights at once from entries 0-7 (words
# 4p, 4p + 1), one from entries 8-15, and a LOP3 keeps the second where the index has bit 3 set (a byte mask
# that PRMT's sign-replicating mode spreads from that bit); eight PRMTs transpose the four planes into the four
# weights' fp32 words. About 26 instructions per four weights, against a gather per weight.
_NF4_PLANE_WORDS = (0xA030B100, 0x00713F4D, 0x3ADDE3FF, 0x00B3ABB8, 0x326B3900, 0x007835A2, 0x0304CAFA,
                    0x001307A4, 0xCA063280, 0x00BA3D91, 0xAD7C24A2, 0x803910E1, 0xBEBFBFBF, 0x00BDBEBE,
                    0x3E3E3E3D, 0x3F3F3F3E)
# From the indices' low three bits, one per byte of `a`: the selector of four nibbles (bytes 0 and 2 of
# a | a >> 4); `m` is the mask; then the four planes, and their transpose into outputs $first..$first+3.
_NF4_PLANES_PTX = ("shr.b32 b, a, 4; or.b32 a, a, b; prmt.b32 s, a, 0, 0x4420; "
                   + "".join(f"prmt.b32 x0, c{4 * p}, c{4 * p + 1}, s; prmt.b32 x1, c{4 * p + 2}, c{4 * p + 3}, s; "
                             f"lop3.b32 v{p}, x0, x1, m, 0xD8; " for p in range(4))
                   + "prmt.b32 x0, v0, v1, 0x5140; prmt.b32 x1, v0, v1, 0x7362; prmt.b32 x2, v2, v3, 0x5140; "
                   "prmt.b32 x3, v2, v3, 0x7362; prmt.b32 ${0}, x0, x2, 0x5410; prmt.b32 ${1}, x0, x2, 0x7632; "
                   "prmt.b32 ${2}, x1, x3, 0x5410; prmt.b32 ${3}, x1, x3, 0x7632; ")
# $8 holds four bytes; $0-$3 the values of their low nibbles, $4-$7 of their high ones. For the low nibbles
# bit 3 reaches bit 7 of its byte by a shift left; for the high ones it is there already.
_NF4_VALUES_PTX = tl.constexpr(
    "{ .reg .b32 c<16>, v<4>, x<4>, a, b, s, m; "
    + "".join(f"mov.b32 c{i}, {word:#010x}; " for i, word in enumerate(_NF4_PLANE_WORDS))
    + "and.b32 a, $8, 0x07070707; shl.b32 m, $8, 4; prmt.b32 m, m, 0, 0xBA98; " + _NF4_PLANES_PTX.format(0, 1, 2, 3)
    + "shr.b32 a, $8, 4; and.b32 a, a, 0x07070707; prmt.b32 m, $8, 0, 0xBA98; " + _NF4_PLANES_PTX.format(4, 5, 6, 7)
    + "}")


@triton.jit
def nf4_values_ptx(packed):
    """NF4 codebook values (fp32) of the low and high nibbles of uint8 bytes, looked up in registers with byte
    permutes over the codebook's byte planes (inline PTX; CUDA only): a gather per weight from a codebook in
    global memory became a 4-byte asynchronous copy per weight through shared memory."""
    return tl.inline_asm_elementwise(_NF4_VALUES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def computed_once_ptx(x):
    """x, as an identity Triton may not duplicate (inline PTX with side effects; CUDA only, 16- or 32-bit x).
    Element-wise work is otherwise recomputed in the layout of each use: by every warp that reads a tl.dot
    operand (four times for kernel A's branch input), by every thread row that reads a per-column vector. With
    this, it is computed once in its own layout and then converted."""
    if x.dtype.primitive_bitwidth == 16:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=2)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)


@triton.jit
def gelu_tanh(x):
    # 0.5·(1 + tanh(u)) = sigmoid(2u), u = √(2/π)·(x + 0.044715·x³)
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)

