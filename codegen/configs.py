"""Tile configurations per GPU architecture, and the small-tile configuration of the interpreter.

Kernel B (the GEMM) is compute-bound at FLUX sizes, so its candidates are large tiles that give each int8
tensor-core instruction enough work per loaded byte: on Hopper 8 warps (two warpgroups issuing wgmma) over
128×128 tiles with 3–4 pipeline stages; on Ada and sm_86 (about 100 KB of shared memory per SM) smaller stage
counts; on A100 (164 KB) more stages. The int4 GEMM holds an int32 partial and an fp32 accumulator per output
element, so tiles over 64 elements per thread spill: every list here is held by the AOT gate
(tests/codegen/test_aot.py, codegen/aot.py) to no spills, the arch's shared memory and its tensor-core
instruction. The packed operands are read in 32-byte rows per K group, so the loads stay coalesced for any
tile. Kernel A is memory-bound: a few rows per program, several groups per step, so many programs stream x at
once.

Kernel W (W4A16) has two regimes. Modulation layers read one row per sample (M ≤ 32), so they stream the weight
once: 16-row tiles (the smallest tl.dot), narrow BLOCK_N so FLUX's N = 3072…18432 makes hundreds of programs, and
256-channel K steps so each program keeps several weight loads in flight. Token-stream layers (every linear under
`w4a16-nf4`) are compute-bound: tall tiles amortise each dequantized weight tile over many rows. Split-K is not
used: the epilogue (SiLU, GELU, gates) needs whole sums, and the narrow tiles already fill the GPU.

The launcher times the candidates once per (kernel, device, N, K, M bucket) on CUDA and keeps the fastest.
Under the interpreter every program runs serially in Python and costs tens of milliseconds whatever its size,
so there is one configuration per size class: tiles of 16 rows for small token counts, so that tests with
ragged M (M ≤ 64) cover several row tiles and a partial one, and 64-row tiles beyond (a whole model's forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from svdq_compiler.codegen.generate import Target
from svdq_compiler.codegen.layout import round_up
from svdq_compiler.codegen.spec import GemmSpec, QuantizeSpec, WeightOnlySpec


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # per-token int8 / nvfp4 K step; the grouped integer kernels step by one group
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class WeightOnlyConfig:
    block_m: int
    block_n: int
    groups_per_step: int  # K groups dequantized per iteration
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class QuantizeConfig:
    block_m: int
    step: int  # channels per K step (a multiple of the group size; BLOCK_K for per-token int8)
    num_warps: int
    num_stages: int


# (block_m, block_n, num_warps, num_stages) for the int4/uint4 and grouped int8 GEMMs. The AOT gate
# (tests/codegen/test_aot.py) holds every entry to no spills: the int32 partial and the fp32 accumulator each take
# a register per element, so tiles over 64 elements per thread (128×256 and 256×128 with 8 warps, 128×128 and
# 64×256 with 4) spill.
_INT4_TILES = {
    "hopper": [(128, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)],
    "ada": [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)],
    "ampere": [(128, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)],
}
# (block_m, block_n, block_k, num_warps, num_stages) for the per-token int8 and nvfp4 GEMMs.
_KSTEP_TILES = {
    "hopper": [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 64, 4, 4),
               (64, 128, 128, 4, 4), (64, 64, 128, 4, 4)],
    "ada": [(128, 128, 64, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 64, 4, 4)],
    "ampere": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 128, 4, 4),
               (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
}
# nvfp4 below sm_100 dequantizes both operands to fp16 tiles in registers before the MMA: only these tiles stay
# free of spills (AOT gate); sm_120 multiplies natively and takes the Hopper list.
_NVFP4_DEQUANTIZE_TILES = {
    "hopper": [(128, 128, 128, 8, 4), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4)],
    "ada": [(64, 64, 64, 4, 4)],
    "ampere": [(64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
}
# (block_m, block_n, channels per K step, num_warps, num_stages) for the W4A16 GEMM.
# The first two serve M = 1: a program's [BLOCK_N, groups] scale tile must give each thread two adjacent scales
# (4 bytes, the smallest asynchronous copy), else Triton's pipeliner leaves that load synchronous and every K step
# waits a memory latency for it (the 4-warp 16×32 tile: 1.1× bf16 at FLUX's modulation shapes on the H200, in
# two waves of four programs an SM); 1 and 2 warps with 25-31 KB of shared memory also fit every program of
# N = 18432 / 32 in one wave.
_WEIGHT_ONLY_SMALL_M = {
    # Hopper's 2-warp tile with 3 stages spills 4 registers with int4 fp16 under Triton 3.7 (not 3.9): 2 stages
    "hopper": [(16, 32, 256, 2, 2), (16, 16, 256, 1, 4), (16, 32, 256, 4, 4), (16, 64, 256, 4, 3),
               (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4)],
    "ada": [(16, 32, 256, 2, 3), (16, 16, 256, 1, 4), (16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 128, 128, 4, 2),
            (32, 64, 128, 4, 3)],
    "ampere": [(16, 32, 256, 2, 3), (16, 16, 256, 1, 4), (16, 32, 256, 4, 4), (16, 64, 128, 4, 4),
               (16, 128, 128, 4, 3), (32, 64, 128, 4, 4)],
}
_WEIGHT_ONLY_LARGE_M = {
    # 128×256 and 256×128 (8 warps) spill with a rank-32 branch and epilogue, and Ampere's 128×64×128 with 4
    # warps (AOT gate)
    "hopper": [(128, 128, 64, 8, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)],
    "ada": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 128, 4, 3)],
    "ampere": [(128, 128, 64, 8, 3), (64, 128, 128, 4, 4), (128, 64, 64, 4, 3)],
}
# nf4's register lookup (kernel_lib.nf4_values_ptx) holds the codebook's 16 words beside each thread's dot operand
# tiles: with mma.sync operands in registers, these tiles spill on sm_80/86/89 (5-215 local stores, AOT gate);
# Ampere's 128×64×64 stays (255 registers, no spill) as nf4's tall tile there
_NF4_SPILLING = {"ampere": {(128, 128, 64), (64, 128, 128)}, "ada": {(128, 128, 64), (64, 64, 128)}, "hopper": set()}
_WEIGHT_ONLY_SMALL_BUCKET = 32  # up to this many rows (bucketed), the small-M tiles
# (block_m, num_warps, num_stages) for kernel A. The AOT gate found 64-row and 8-warp tiles spilling on some arch
# (the rank-32 down projection's accumulator sits beside the quantizer's tiles), and nvfp4's 16-row tile on
# sm_100 and its 256-channel steps on several: those are not offered.
_QUANTIZE_TILES = [(16, 4, 2), (32, 4, 2)]
_INT8_GROUPED_STEP_VALUES = 4096
_QUANTIZE_NVFP4_TILES = [(32, 4, 2)]
# nvfp4 on sm_100: tcgen05's block-scaled MMA needs 128-row tiles (64-row ones fall back to a dequantizing
# fp16 MMA), and the wider or 4-warp 128-row tiles spill.
_NATIVE_FP4_SM100_TILES = [(128, 128, 128, 8, 4)]

INTERPRETER_GEMM = GemmConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=1, num_stages=1)
INTERPRETER_LARGE_GEMM = GemmConfig(block_m=64, block_n=64, block_k=64, group_m=2, num_warps=1, num_stages=1)
INTERPRETER_SMALL_M = 64  # up to this many rows, the small tiles


def _interpreter_rows(m: int) -> int:
    return INTERPRETER_GEMM.block_m if m <= INTERPRETER_SMALL_M else INTERPRETER_LARGE_GEMM.block_m


def arch_family(target: Target) -> str:
    major, minor = target.capability
    if major >= 9:
        return "hopper"  # sm_90 and newer (Blackwell tiles start from Hopper's)
    if (major, minor) in ((8, 6), (8, 7), (8, 9)):
        return "ada"  # sm_86/87 share Ada's ~100 KB of shared memory per SM
    return "ampere"


def m_bucket(m: int) -> int:
    """M rounded up to a power of two in [16, 8192]: the autotuning key, so token counts share tunings."""
    bucket = 16
    while bucket < m and bucket < 8192:
        bucket *= 2
    return bucket


def _min_block_n(spec: GemmSpec) -> int:
    """The quantize-for-next-layer epilogue needs whole groups of the next layer inside one tile."""
    if spec.quantize_next is None:
        return 16
    return max(32, spec.quantize_next.quant.group_size)


def gemm_configs(spec: GemmSpec, target: Target, m: int) -> list[GemmConfig]:
    """Candidate configurations of kernel B for M rows, best guesses first."""
    min_n = _min_block_n(spec)
    if target.backend == "interpreter":
        base = INTERPRETER_GEMM if m <= INTERPRETER_SMALL_M else INTERPRETER_LARGE_GEMM
        block_k = 64 if spec.act == "nvfp4" else base.block_k
        return [GemmConfig(base.block_m, max(base.block_n, min_n), block_k, base.group_m, 1, 1)]
    family = arch_family(target)
    bucket = m_bucket(m)
    configs = []
    if spec.integer_groups:
        for block_m, block_n, warps, stages in _INT4_TILES[family]:
            # two tensor operands in the epilogue (FLUX's residual + gate) spill the 8-warp 128×128 tile on
            # Hopper by a register or two
            if family == "hopper" and spec.operand_count >= 2 and (block_m, block_n, warps) == (128, 128, 8):
                continue
            configs.append(GemmConfig(block_m, max(block_n, min_n), 0, 8, warps, stages))
    else:
        native_sm100 = spec.act == "nvfp4" and target.native_fp4 and target.capability[0] == 10
        if spec.act == "nvfp4" and target.native_fp4:
            tiles = _NATIVE_FP4_SM100_TILES if native_sm100 else _KSTEP_TILES[family]
        else:
            tiles = _NVFP4_DEQUANTIZE_TILES[family] if spec.act == "nvfp4" else _KSTEP_TILES[family]
        if spec.quantize_next is not None and spec.quantize_next.quant.fmt == "nvfp4" and not native_sm100:
            # the nvfp4 quantization epilogue (E2M1 rounding by comparisons, E4M3 scales) holds its tiles beside
            # the accumulator: tiles over 64×64 spill (AOT gate: 1–776 spill stores on sm_80/90/120)
            tiles = [tile for tile in tiles if tile[0] <= 64 and tile[1] <= 64]
        for block_m, block_n, block_k, warps, stages in tiles:
            configs.append(GemmConfig(block_m, max(block_n, min_n), block_k, 8, warps, stages))
    # Tiles taller than the (bucketed) token count only waste work; keep at least one candidate.
    fitting = [c for c in configs if c.block_m <= max(bucket, 64)]
    return list(dict.fromkeys(fitting or configs[-1:]))


def quantize_configs(spec: QuantizeSpec, target: Target, m: int) -> list[QuantizeConfig]:
    """Candidate configurations of kernel A for M rows."""
    group = spec.quant.group_size
    if target.backend == "interpreter":
        step = 64 if spec.quant.fmt == "nvfp4" or spec.quant.per_row else group
        return [QuantizeConfig(_interpreter_rows(m), step, 1, 1)]
    fmt = spec.quant.fmt
    steps = [128, 256] if spec.quant.per_row else [128] if fmt == "nvfp4" else \
        sorted({max(group, 128), max(group, 256)})
    bucket = m_bucket(m)
    configs = [QuantizeConfig(block_m, step, warps, stages)
               for block_m, warps, stages in (_QUANTIZE_NVFP4_TILES if fmt == "nvfp4" else _QUANTIZE_TILES)
               for step in steps]
    if spec.quant.integer_groups and not spec.quant.packed:
        # grouped int8 keeps a code byte per channel (not per two) beside the step's fp32 values: 32 rows × 256
        # channels spill on sm_90 (AOT gate), so a program quantizes at most 4096 values per step
        configs = [c for c in configs if c.block_m * c.step <= _INT8_GROUPED_STEP_VALUES] or configs[:1]
    # tiles taller than the (bucketed) token count only waste work; keep at least one candidate
    return [c for c in configs if c.block_m <= max(bucket, 16)] or configs[:1]


def weight_only_configs(spec: WeightOnlySpec, target: Target, m: int) -> list[WeightOnlyConfig]:
    """Candidate configurations of kernel W for M rows, best guesses first."""
    if target.backend == "interpreter":
        base = INTERPRETER_GEMM if m <= INTERPRETER_SMALL_M else INTERPRETER_LARGE_GEMM
        # two groups per step, so the tests cover steps that hold a group past the end of K
        return [WeightOnlyConfig(base.block_m, base.block_n, 2, base.group_m, 1, 1)]
    family = arch_family(target)
    bucket = m_bucket(m)
    tiles = _WEIGHT_ONLY_SMALL_M[family] if bucket <= _WEIGHT_ONLY_SMALL_BUCKET else \
        _WEIGHT_ONLY_SMALL_M[family][-2:] + _WEIGHT_ONLY_LARGE_M[family]
    if family == "ada" and spec.weight == "int4" and spec.dtype == "float16":
        # 16×128 with 2 stages spills one register with the fp16 dequantization on sm_86/sm_89 (AOT gate, full
        # matrix, Triton 3.9); the bf16 one fits
        tiles = [tile for tile in tiles if tile[:2] != (16, 128)]
    configs = [WeightOnlyConfig(block_m, block_n, max(1, step // spec.group_size), 1 if block_m <= 32 else 8,
                                warps, stages)
               for block_m, block_n, step, warps, stages in tiles if block_m <= max(bucket, 64)
               and not (spec.weight == "nf4" and (block_m, block_n, step) in _NF4_SPILLING[family])]
    return list(dict.fromkeys(configs))


def tile_constexprs(spec: GemmSpec | WeightOnlySpec | QuantizeSpec, config, m: int, n: int, k: int) -> dict:
    """The compile-time arguments a configuration sets for M × N × K (the signature's constexprs)."""
    if isinstance(spec, QuantizeSpec):
        if spec.quant.per_row:
            return {"BLOCK_M": config.block_m, "BLOCK_K": config.step}
        return {"BLOCK_M": config.block_m, "GROUPS_PER_STEP": config.step // spec.quant.group_size}
    tile = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n}
    if isinstance(spec, WeightOnlySpec):
        return tile | {"GROUPS_PER_STEP": config.groups_per_step, "GROUP_M": config.group_m,
                       "EVEN_M": m % config.block_m == 0, "EVEN_N": n % config.block_n == 0,
                       "EVEN_K": k % (config.groups_per_step * spec.group_size) == 0}
    tile |= {"GROUP_M": config.group_m, "EVEN_M": m % config.block_m == 0, "EVEN_N": n % config.block_n == 0}
    if not spec.integer_groups:
        k_extent = round_up(k, 16) if spec.act == "nvfp4" else k
        tile |= {"BLOCK_K": config.block_k, "EVEN_K": k_extent % config.block_k == 0}
    return tile
