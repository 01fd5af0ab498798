"""Spec → Triton source text.

`generate(spec, target)` returns the complete text of one Python module holding one `@triton.jit` kernel: a
header comment that explains the kernel's tiling, packing and numerics, then the kernel, with the format,
group size, rank, dtypes and epilogue chain written out as straight-line code (no run-time branching on the
spec). The text is what `cache.py` compiles, what `--dump-ir` writes and what `svdq-inspect --kernels` prints.

Layouts are those of `svdq_compiler.codegen.layout` (its module docstring is the specification):
- int4/uint4 codes `uint8 [rows, K_pad/2]`, split halves within each group: byte j of a group holds channel j
  (low nibble) and channel j + G/2 (high nibble), so one byte tile unpacks into two int8 tiles that are each a
  contiguous half of the group, and the GEMM issues one int8 dot per half with no shuffle;
- nvfp4 codes `uint8 [rows, K_pad/2]`, consecutive pairs (low nibble = even k), the order `tl.dot_scaled` reads;
- int8 codes `int8 [rows, K_pad]`, one per byte;
- weight scales group-major `[K_pad/G, N]`; activation scales `[M, K_pad/G]` (`[M]` for per-token int8; int8
  scales are fp32);
  nvfp4 scales are FP8-E4M3, passed to the kernels as their uint8 bit patterns.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from svdq_compiler.codegen.signature import signature_of
from svdq_compiler.codegen.spec import ActQuant, GemmSpec, KernelSpec, QuantizeSpec, WeightOnlySpec
from svdq_compiler.quant import FORMATS

_TL_DTYPE = {"bfloat16": "tl.bfloat16", "float16": "tl.float16", "float32": "tl.float32"}


@dataclass(frozen=True)
class Target:
    """Where the kernel will run: it decides the NVFP4 MMA path and nothing else in the text."""

    backend: str = "cuda"  # "cuda" | "interpreter"
    capability: tuple[int, int] = (9, 0)
    fp4_mma: bool = True  # use the native FP4 MMA where the GPU has one (off: the dequantize path)

    @property
    def native_fp4(self) -> bool:
        """Blackwell (sm_100, sm_120) multiplies E2M1 with E4M3 block scales in hardware (`tl.dot_scaled`)."""
        return self.backend == "cuda" and self.capability[0] >= 10 and self.fp4_mma

    def describe(self) -> str:
        if self.backend == "interpreter":
            return "the Triton interpreter (TRITON_INTERPRET=1)"
        return f"CUDA sm_{self.capability[0]}{self.capability[1]}"


# The device functions, read as text (importing them would decorate them in this process's Triton mode).
_KERNEL_LIB = Path(__file__).with_name("kernel_lib.py")


@functools.lru_cache(maxsize=None)
def _definitions() -> dict[str, tuple[str, frozenset[str]]]:
    """name → (source text, names it reads) for each constant and device function of kernel_lib.py."""
    text = _KERNEL_LIB.read_text()
    lines = text.splitlines()
    definitions: dict[str, tuple[str, frozenset[str]]] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Attribute) and d.attr == "jit" for d in node.decorator_list):
            start = node.decorator_list[0].lineno - 1
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            start = node.lineno - 1
            while start > 0 and lines[start - 1].startswith("#"):
                start -= 1
        else:
            continue
        name = node.name if isinstance(node, ast.FunctionDef) else node.targets[0].id
        reads = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        definitions[name] = ("\n".join(lines[start:node.end_lineno]), reads)
    return definitions


DEVICE_FUNCTIONS = tuple(name for name in _definitions() if not name.startswith("_"))


def device_source(code: str) -> str:
    """The definitions of kernel_lib.py that `code` calls (transitively), in file order, as one text block."""
    definitions = _definitions()
    needed: set[str] = set()
    pending = {name for name in DEVICE_FUNCTIONS if re.search(rf"\b{name}\(", code)}
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        pending |= {read for read in definitions[name][1] if read in definitions}
    return "\n\n\n".join(source for name, (source, _) in definitions.items() if name in needed)


class _Source:
    """Lines of Python with an indentation level."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def add(self, text: str = "") -> None:
        for line in textwrap.dedent(text).strip("\n").splitlines() or [""]:
            self.lines.append(("    " * self.level + line).rstrip())

    def line(self, text: str) -> None:
        """One line, kept exactly as written (continuation lines of a call)."""
        self.lines.append("    " * self.level + text)

    def indent(self) -> "_Source":
        self.level += 1
        return self

    def dedent(self) -> None:
        self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def generate(spec: KernelSpec, target: Target = Target()) -> str:
    """The Triton source text of the kernel `spec` describes, for `target`."""
    spec.validate()
    if isinstance(spec, QuantizeSpec):
        return _generate_quantize(spec, target)
    if isinstance(spec, WeightOnlySpec):
        return _generate_weight_only(spec, target)
    return _generate_gemm(spec, target)


def nvfp4_path(spec: GemmSpec, target: Target) -> str:
    """"dot_scaled" (native FP4 MMA) or "dequantize" (exact fp16 products, fp16 MMA) for an nvfp4 GEMM."""
    return "dot_scaled" if spec.act == "nvfp4" and target.native_fp4 else "dequantize"


# ---------------------------------------------------------------------------------------------------------
# Shared pieces


def _rank_pad(rank: int) -> int:
    """tl.arange and tl.dot need a power of two of at least 16; the extra ranks are masked to zero."""
    pad = 16
    while pad < rank:
        pad *= 2
    return pad


def _float_dot(a: str, b: str, acc: str | None, dtype: str, target: Target) -> str:
    """A 16-bit (or fp32) tl.dot with fp32 accumulation, as text.

    fp32 models ask for IEEE precision: a float32 tl.dot defaults to TF32 on tensor cores, which the reference
    does not do. The interpreter multiplies bfloat16 dots as their raw uint16 bits (Triton 3.9), so there the
    operands are widened to fp32 first: exact, since bf16·bf16 products are exact in fp32.
    """
    if dtype == "bfloat16" and target.backend == "interpreter":
        a, b = f"({a}).to(tl.float32)", f"({b}).to(tl.float32)"
    args = [a, b] + ([acc] if acc else [])
    precision = ', input_precision="ieee"' if dtype == "float32" else ""
    return f"tl.dot({', '.join(args)}{precision})"


def _module_text(spec: KernelSpec, description: str, kernel: _Source) -> str:
    """A self-contained module: docstring (the description, then the signature launch binds to), imports, the
    device functions the kernel calls, the kernel."""
    body = kernel.text()
    head = _Source()
    head.add(f'"""Generated by svdq_compiler.codegen: {spec.name}.')
    head.add("")
    head.add(textwrap.dedent(description).strip())
    head.add("")
    head.add("Signature (codegen.signature; launch binds its arguments by these names):")
    head.add(textwrap.fill(", ".join(p.text() for p in signature_of(spec).params), 110, initial_indent="  ",
                           subsequent_indent="  "))
    head.add('"""')
    head.add("")
    head.add("import triton")
    head.add("import triton.language as tl")
    helpers = device_source(body)
    return head.text() + ("\n\n" + helpers + "\n" if helpers else "") + "\n\n" + body


def _quant_description(quant: ActQuant) -> str:
    source = "(x + shift)/λ" if quant.shift else "x/λ" if quant.smooth else "x"
    if quant.per_row:
        return (f"int8 per token: s = absmax({source} over the row)/127 in fp32 (0 → 1), "
                f"q = clamp(round-half-even({source}/s), −127, 127).")
    if quant.fmt == "nvfp4":
        return (f"nvfp4, two-level: per token and group of 16, s = E4M3(absmax/6/t) (ties to the larger value, "
                f"max 448, 0 → 1) with t the fp32 per-tensor scale, q = E2M1({source}/(s·t)) (ties to the larger "
                f"value); codes in consecutive pairs.")
    lo, hi = int(FORMATS[quant.fmt].qmin), int(FORMATS[quant.fmt].qmax)
    shift = f", shift {quant.shift:g}" if quant.shift else ""
    if not quant.packed:
        return (f"{quant.fmt}: per token and group of {quant.group_size}, s = absmax/{hi} in fp32 (0 → 1), "
                f"q = clamp(round-half-even({source}/s), {lo}, {hi}); one code per byte.")
    return (f"{quant.fmt}{shift}: per token and group of {quant.group_size}, s = absmax/{hi} rounded to the "
            f"model dtype (0 → 1), q = clamp(round-half-even({source}/s), {lo}, {hi}); split-half packing.")


def _rounded(expr: str, dtype: str) -> str:
    """fp32 `expr` rounded to the nearest value of `dtype` (ties to even), still as fp32.

    bfloat16 rounds through `round_to_bf16` rather than `.to(tl.bfloat16)`: the interpreter truncates that cast
    (Triton 3.9), and the codes must match the reference bit for bit on both backends. A later `.to(dtype)` of
    the result is exact everywhere.
    """
    if dtype == "bfloat16":
        return f"round_to_bf16({expr})"
    if dtype == "float16":
        return f"({expr}).to(tl.float16).to(tl.float32)"
    return expr


def _branch_input(x: str, smooth: str, dtype: str) -> str:
    """x/λ for the low-rank branch as the lowered graph computes it: x / λ.to(x.dtype), in the model dtype."""
    smooth_model = _rounded(smooth, dtype)
    return f"{_rounded(f'{x}.to(tl.float32) / {smooth_model}', dtype)}.to({_TL_DTYPE[dtype]})"


def _code_columns(quant: ActQuant, channels: int | str) -> int | str:
    """The stored code columns (bytes) that `channels` channels (a number or an expression) take: half as many
    for 4-bit codes."""
    if not quant.packed:
        return channels
    return channels // 2 if isinstance(channels, int) else f"{channels} // 2"


def _emit_quant_input(src: _Source, quant: ActQuant, x: str, smooth: str, dtype: str, out: str) -> None:
    """`out` = (x + shift)/λ computed in fp32 and rounded once to the model dtype, as the reference op does."""
    value = f"{x}.to(tl.float32)"
    if quant.shift:
        value = f"({value} + {quant.shift!r})"
    if quant.smooth:
        value = f"{value} / {smooth}"
    src.add(f"{out} = {_rounded(value, dtype) if quant.shift or quant.smooth else value}")


def _emit_group_quantize(src: _Source, quant: ActQuant, value: str, rows: str, groups: str, dtype: str,
                         tensor_scale: str = "") -> None:
    """Quantize fp32 tile `value` [rows, groups·G] per group of G; defines `scale` [rows, groups] (stored type)
    and `packed`, the codes as stored: uint8 [rows, groups·G/2] for 4 bits, int8 [rows, groups·G] for int8.
    nvfp4 divides its E4M3 group scales by `tensor_scale` (the name of the fp32 per-tensor activation scale,
    quant.py's two-level rule). Every division is IEEE's (div_rn, quotient_rn), as in quant.py: CUDA's fp32
    `/` is up to 2 ulp off, which moves scales and codes."""
    g = quant.group_size
    src.add(f"grouped = tl.reshape({value}, ({rows}, {groups}, {g}))")
    src.add("absmax = tl.max(tl.abs(grouped), axis=2)")
    if quant.fmt == "nvfp4":
        src.add("""
            scale = round_to_e4m3(tl.div_rn(tl.div_rn(absmax, 6.0), {ts}))
            scale = tl.where(scale == 0.0, 1.0, scale)
            effective = (scale * {ts})[:, :, None]
            codes = quotient_rn(grouped, effective, reciprocal(effective))
            codes = e2m1_code(tl.minimum(tl.maximum(codes, -6.0), 6.0))
            # consecutive pairs: byte j = code[2j] | code[2j + 1] << 4
            low, high = tl.split(tl.reshape(codes, ({rows}, {groups}, {half}, 2)))
            scale = e4m3_bits(scale)""".replace("{rows}", rows).replace("{groups}", groups)
                .replace("{half}", str(g // 2)).replace("{ts}", tensor_scale))
    else:
        number = FORMATS[quant.fmt]
        qmax, qmin = number.qmax, number.qmin
        # int8 scales stay fp32 (quant.py); the 4-bit formats' are rounded to the model dtype
        quotient = f"tl.div_rn(absmax, {qmax!r})"
        scale = _rounded(quotient, dtype) if number.scale_dtype is None else quotient
        src.add(f"""
            scale = {scale}
            scale = tl.where(scale == 0.0, 1.0, scale)
            codes = quotient_rn(grouped, scale[:, :, None], reciprocal(scale)[:, :, None])
            codes = tl.minimum(tl.maximum(round_half_even(codes), {qmin!r}), {qmax!r})""")
        if not quant.packed:
            src.add(f"packed = tl.reshape(codes.to({_code_range(quant.fmt)['code_type']}), ({rows}, {groups} * {g}))"
                    "  # one code per byte")
            return
        src.add(f"""
            codes = codes.to(tl.int32)
            # split halves: byte j = code[j] | code[j + G/2] << 4
            low, high = tl.split(tl.permute(tl.reshape(codes, ({rows}, {groups}, 2, {g // 2})), (0, 1, 3, 2)))
            scale = scale.to({_TL_DTYPE[dtype]})""")
    src.add(f"packed = tl.reshape(((low & 15) | ((high & 15) << 4)).to(tl.uint8), ({rows}, {groups} * {g // 2}))")


# ---------------------------------------------------------------------------------------------------------
# Kernel A


def _generate_quantize(spec: QuantizeSpec, target: Target) -> str:
    quant, dtype, rank = spec.quant, spec.dtype, spec.rank
    g = quant.group_size
    k_text = f"K = {spec.k} (fixed)" if spec.k else "K at run time"
    description = f"""
        Kernel A for spec {spec.hash}: {spec.to_string()}

        Computes, for x [M, K] ({spec.dtype}), {k_text}:
          codes, scales = Q((x + shift)/λ)     {_quant_description(quant)}
          down          = (x/λ)·L2ᵀ            {"L2 [" + str(rank) + ", K], fp32 accumulation, stored in " + spec.dtype
                                                 if rank else "(rank 0: no low-rank branch)"}
        Tiling: a 1-D grid over row blocks; each program owns BLOCK_M rows and walks all of K in steps of
        {"GROUPS_PER_STEP·" + str(g) if g else "BLOCK_K"} channels, so every element of x is read once
        ({"twice for int8: the per-token scale needs the whole row before the first code" if quant.per_row
          else "the scales are per group, so each step quantizes what it loaded"}) and the down projection is
        accumulated in registers: no atomics, deterministic.
        Written for {target.describe()}.
    """
    src = _kernel_def(spec)
    if spec.k:
        src.add(f"K: tl.constexpr = {spec.k}")
    src.add("""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm""")
    if rank:
        src.add(f"""
            ranks = tl.arange(0, {_rank_pad(rank)})
            rank_ok = ranks < {rank}
            down = tl.zeros((BLOCK_M, {_rank_pad(rank)}), dtype=tl.float32)""")
    if quant.per_row:
        _emit_quantize_int8_body(src, spec, target, dtype)
    elif quant.fmt in ("int4", "uint4") and dtype != "float32":
        _emit_quantize_halves_body(src, spec, target, dtype)
    else:
        _emit_quantize_grouped_body(src, spec, target, dtype)
    if rank:
        src.add(f"down_ptrs = down_ptr + rows.to(tl.int64)[:, None] * {rank} + ranks[None, :]")
        src.add(f"tl.store(down_ptrs, {_rounded('down', dtype)}.to({_TL_DTYPE[dtype]}), "
                "mask=row_ok[:, None] & rank_ok[None, :])")
    src.dedent()
    return _module_text(spec, description, src)


def _emit_step_loads(src: _Source, spec: QuantizeSpec, target: Target, dtype: str, width: str,
                     with_down: bool) -> None:
    """Load one [BLOCK_M, width] step of x (and λ); accumulate the down projection when asked."""
    quant = spec.quant
    src.add(f"""
        cols = k0 + tl.arange(0, {width})
        col_ok = cols < K
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)""")
    if quant.smooth:
        src.add("smooth = tl.load(smooth_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)")
    if with_down:
        # the branch divides in the model dtype (x / λ.to(x.dtype)); the quantizer divides by λ in fp32
        smoothed = _branch_input("x", "smooth", dtype) if quant.smooth else "x"
        src.add(f"""
            # low-rank down projection on the unshifted x/λ: L2 is [rank, K], read as an L2ᵀ tile [{width}, rank]
            lora_down = tl.load(lora_down_ptr + ranks[None, :] * K + cols[:, None],
                                mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            down = {_float_dot(smoothed, "lora_down", "down", spec.dtype, target)}""")
    _emit_quant_input(src, quant, "x", "smooth", dtype, "value")
    if quant.shift:
        src.add("value = tl.where(col_ok[None, :], value, 0.0)  # the zero padding past K is not shifted")


def _emit_quantize_grouped_body(src: _Source, spec: QuantizeSpec, target: Target, dtype: str) -> None:
    quant = spec.quant
    g = quant.group_size
    if quant.fmt == "nvfp4":
        src.add("act_scale = tl.load(act_scale_ptr)  # the per-tensor activation scale (fp32)")
    src.add(f"""
        num_groups = tl.cdiv(K, {g})
        STEP: tl.constexpr = GROUPS_PER_STEP * {g}
        for k0 in range(0, num_groups * {g}, STEP):""")
    src.indent()
    _emit_step_loads(src, spec, target, dtype, "STEP", with_down=bool(spec.rank))
    _emit_group_quantize(src, quant, "value", "BLOCK_M", "GROUPS_PER_STEP", dtype, "act_scale")
    first, step, width = _code_columns(quant, "k0"), _code_columns(quant, "STEP"), _code_columns(quant, g)
    src.add(f"""
        byte_cols = {first} + tl.arange(0, {step})
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * (num_groups * {width}) + byte_cols[None, :], packed,
                 mask=row_ok[:, None] & (byte_cols < num_groups * {width})[None, :])
        group_cols = k0 // {g} + tl.arange(0, GROUPS_PER_STEP)
        tl.store(scales_ptr + rows.to(tl.int64)[:, None] * num_groups + group_cols[None, :], scale,
                 mask=row_ok[:, None] & (group_cols < num_groups)[None, :])""")
    src.dedent()


def _emit_quantize_halves_body(src: _Source, spec: QuantizeSpec, target: Target, dtype: str) -> None:
    """Kernel A for int4/uint4 codes of 16-bit models: each step is read as the two halves of its groups that
    share a byte (split-half layout), so the codes pack element-wise; divisions become multiplications by a
    reciprocal per column or group (`quotient_rn`, `nearest_code_bits`), bit for bit what dividing gives."""
    quant, rank = spec.quant, spec.rank
    g, half = quant.group_size, quant.group_size // 2
    qmax, qmin = FORMATS[quant.fmt].qmax, FORMATS[quant.fmt].qmin
    src.add(f"""
        num_groups = tl.cdiv(K, {g})
        STEP: tl.constexpr = GROUPS_PER_STEP * {g}
        # byte j of a group holds channel j (low nibble) and channel j + {half} (high nibble)
        byte_cols = tl.arange(0, STEP // 2)
        low_cols = (byte_cols // {half}) * {g} + byte_cols % {half}
        for k0 in range(0, num_groups * {g}, STEP):""")
    src.indent()

    def once(expr: str) -> str:
        return f"computed_once_ptx({expr})" if target.backend == "cuda" else expr

    for part, offset in (("low", ""), ("high", f" + {half}")):
        src.add(f"""
            cols = k0{offset} + low_cols
            col_ok = cols < K
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)""")
        if quant.smooth:
            src.add(f"""
                smooth = tl.load(smooth_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
                smooth_reciprocal = {once("reciprocal(smooth)")}""")
        if rank and quant.smooth:
            rounded_smooth = _rounded("smooth", dtype)
            src.add(f"branch_reciprocal = {once(f'reciprocal({rounded_smooth})')}")
        if rank:
            # x / λ.to(x.dtype) in fp32 is at least 2^-17 (fp16: 2^-22) of its value away from every midpoint of
            # the model dtype, so x times a reciprocal within about half an ulp rounds the same way
            smoothed = _rounded("x * branch_reciprocal", dtype) if quant.smooth else "x"
            smoothed = once(f"{smoothed}.to({_TL_DTYPE[dtype]})")
            src.add(f"""
                lora_down = tl.load(lora_down_ptr + ranks[None, :] * K + cols[:, None],
                                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
                down = {_float_dot(smoothed, "lora_down", "down", dtype, target)}""")
        value = f"(x + {quant.shift!r})" if quant.shift else "x"
        if quant.smooth:
            value = f"quotient_rn({value}, smooth, smooth_reciprocal)"
        src.add(f"{part} = {_rounded(value, dtype) if quant.shift or quant.smooth else value}")
        if quant.shift:
            src.add(f"{part} = tl.where(col_ok[None, :], {part}, 0.0)  # the zero padding past K is not shifted")
        src.add(f"{part} = tl.reshape({part}, (BLOCK_M, GROUPS_PER_STEP, {half}))")
    src.add(f"""
        absmax = tl.maximum(tl.max(tl.abs(low), axis=2), tl.max(tl.abs(high), axis=2))
        scale = {_rounded(f"tl.div_rn(absmax, {qmax!r})", dtype)}
        scale = tl.where(scale == 0.0, 1.0, scale)
        scale_reciprocal = (1.0 / scale)[:, :, None]
        low = nearest_code_bits(low, scale_reciprocal, {qmin!r}, {qmax!r})
        high = nearest_code_bits(high, scale_reciprocal, {qmin!r}, {qmax!r})
        packed = tl.reshape(((low & 15) | ((high & 15) << 4)).to(tl.uint8), (BLOCK_M, STEP // 2))
        byte_cols_out = k0 // 2 + byte_cols
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * (num_groups * {half}) + byte_cols_out[None, :], packed,
                 mask=row_ok[:, None] & (byte_cols_out < num_groups * {half})[None, :])
        group_cols = k0 // {g} + tl.arange(0, GROUPS_PER_STEP)
        tl.store(scales_ptr + rows.to(tl.int64)[:, None] * num_groups + group_cols[None, :],
                 scale.to({_TL_DTYPE[dtype]}), mask=row_ok[:, None] & (group_cols < num_groups)[None, :])""")
    src.dedent()


def _code_range(fmt: str) -> dict[str, object]:
    """The one-code-per-byte formats' code bounds and the Triton type their codes are stored in."""
    number = FORMATS[fmt]
    return dict(qmin=number.qmin, qmax=number.qmax, code_type="tl.int8" if number.signed else "tl.uint8")


def _emit_quantize_int8_body(src: _Source, spec: QuantizeSpec, target: Target, dtype: str) -> None:
    src.add("# pass 1: the row's absmax (and the down projection); pass 2 re-reads x (mostly from L2) to quantize")
    src.add("absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)")
    src.add("for k0 in range(0, K, BLOCK_K):")
    src.indent()
    _emit_step_loads(src, spec, target, dtype, "BLOCK_K", with_down=bool(spec.rank))
    src.add("absmax = tl.maximum(absmax, tl.max(tl.abs(value), axis=1))")
    src.dedent()
    src.add("""
        # IEEE divisions (div_rn, quotient_rn): CUDA's fp32 `/` is up to 2 ulp off, which moves scales and codes
        scale = tl.div_rn(absmax, {qmax!r})
        scale = tl.where(scale == 0.0, 1.0, scale)
        scale_reciprocal = reciprocal(scale)
        tl.store(scales_ptr + rows, scale, mask=row_ok)
        for k0 in range(0, K, BLOCK_K):""".format(**_code_range(spec.quant.fmt)))
    src.indent()
    _emit_step_loads(src, spec, target, dtype, "BLOCK_K", with_down=False)
    src.add("""
        codes = quotient_rn(value, scale[:, None], scale_reciprocal[:, None])
        codes = tl.minimum(tl.maximum(round_half_even(codes), {qmin!r}), {qmax!r})
        tl.store(codes_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], codes.to({code_type}),
                 mask=row_ok[:, None] & col_ok[None, :])""".format(**_code_range(spec.quant.fmt)))
    src.dedent()


# ---------------------------------------------------------------------------------------------------------
# Kernel B


_TILING = textwrap.dedent("""
    Tiling: a 1-D grid of BLOCK_M × BLOCK_N output tiles in grouped order (GROUP_M row tiles share a band
    of weight columns, so the weight tiles stay in L2); ragged M and N wrap their loads (modulo) and mask
    their stores, so the main loop has no masks.""").strip()


def _epilogue_steps(spec: GemmSpec | WeightOnlySpec) -> list[str]:
    return [f"{step.kind}({step.value!r})" if step.value is not None else step.kind for step in spec.epilogue]


def _after_loop(spec: GemmSpec | WeightOnlySpec) -> str:
    """The description of what the tiled kernels add to the accumulator after the main loop."""
    branch = (f"After the loop: + down[BLOCK_M, rank]·L1[BLOCK_N, rank]ᵀ ({spec.dtype} tl.dot, fp32 accumulation)"
              if spec.rank else "After the loop: no low-rank branch (rank 0)")
    return branch + (", + bias." if spec.bias else ".")


def _gemm_description(spec: GemmSpec, target: Target) -> str:
    g = spec.group_size
    path = nvfp4_path(spec, target)
    if spec.act in ("int4", "uint4"):
        main = f"""
            Main loop, one K group of {g} channels per iteration: the [BLOCK_M, {g // 2}] activation byte tile and
            the [BLOCK_N, {g // 2}] weight byte tile unpack in registers into two int8 tiles each (low nibbles =
            channels 0..{g // 2 - 1} of the group, high nibbles = {g // 2}..{g - 1}: the split-half layout, so no
            shuffle), {"unsigned [0, 15]" if spec.act == "uint4" else "signed"} activations × signed weights.
            Two int8 tl.dot → one int32 partial sum per group, converted exactly to fp32 (integer add + float
            subtract: the I2F instruction runs at a quarter rate) and scaled by act_scale[m, g]·w_scale[g, n]
            into the fp32 accumulator."""
    elif spec.integer_groups:  # grouped int8/uint8
        main = f"""
            Main loop, one K group of {g} channels per iteration: the [BLOCK_M, {g}] activation and [BLOCK_N, {g}]
            weight int8 code tiles go to one int8 tl.dot as loaded{_unsigned_note(spec.act)} →
            an int32 partial sum per group (|partial| < 2^22), converted exactly to fp32 (integer add + float
            subtract) and scaled by the fp32 act_scale[m, g]·w_scale[g, n] into the fp32 accumulator."""
    elif FORMATS[spec.act].integer:  # per-token int8/uint8
        main = f"""
            Main loop over K in BLOCK_K steps: int8 tl.dot{_unsigned_note(spec.act)} with
            int32 accumulation over the whole of K (per-token and per-channel scales factor out of the sum), scaled
            once by act_scale[m]·w_scale[n] at the end."""
    elif path == "dot_scaled":
        main = """
            Main loop over K in BLOCK_K steps: tl.dot_scaled on the packed E2M1 bytes with their FP8-E4M3 group
            scales (the native FP4 MMA of sm_100/sm_120), fp32 accumulation; × the per-tensor weight scale."""
    else:
        main = """
            Main loop over K in BLOCK_K steps: E2M1 codes decode to fp16 by a bit move; each value times its
            FP8-E4M3 group scale is exact in fp16 (≤ 6 significant bits, |v| ≤ 2688), so the fp16 tl.dot with
            fp32 accumulation computes the exact block-scaled product (even and odd channels as two dots, the
            consecutive-pair layout needs no shuffle); × the per-tensor weight scale at the end."""
    steps = _epilogue_steps(spec)
    if spec.quantize_next is not None:
        qn = spec.quantize_next
        parts = [_quant_description(qn.quant).rstrip(".")]
        if qn.rank:
            parts.append(f"the next down projection (y/λ′)·L2′ᵀ, rank {qn.rank}, summed over N tiles by fp32 atomics")
        parts.append("y stored too" if qn.emit_output else "y not stored")
        steps.append(f"quantize for the next layer [{'; '.join(parts)}]")
    epilogue = " → ".join(steps) if steps else "(none)"
    k_text = f"K = {spec.k}" if spec.k else "K at run time"
    n_text = f"N = {spec.n}" if spec.n else "N at run time"
    formula = (f"y[M, N] = Σ_g (a_g·w_gᵀ)·s_a·s_w{' · α (weight × activation tensor scale)' if spec.act == 'nvfp4' else ''}"
               f"{' + down·L1ᵀ' if spec.rank else ''}{' + bias' if spec.bias else ''}, then the epilogue; "
               f"{k_text}, {n_text}.")
    return "\n".join([
        f"Kernel B for spec {spec.hash}: {spec.to_string()}",
        "",
        formula,
        _TILING,
        textwrap.dedent(main).strip(),
        _after_loop(spec),
        f"Epilogue (fp32 in registers, rounded once to {spec.dtype}): {epilogue}.",
        f"Written for {target.describe()}.",
    ])


def _generate_gemm(spec: GemmSpec, target: Target) -> str:
    dtype = spec.dtype
    path = nvfp4_path(spec, target)
    src = _tiled_kernel_source(spec)
    if spec.integer_groups:
        _emit_gemm_grouped_loop(src, spec, target)
    elif FORMATS[spec.act].integer:  # per-token int8/uint8
        _emit_gemm_int8_loop(src, unsigned=not FORMATS[spec.act].signed)
    elif path == "dot_scaled":
        _emit_gemm_nvfp4_dot_scaled_loop(src)
    else:
        _emit_gemm_nvfp4_dequant_loop(src)
    _emit_branch_and_bias(src, spec, target)
    _emit_epilogue(src, spec, target, dtype)
    src.dedent()
    return _module_text(spec, _gemm_description(spec, target), src)


def _kernel_def(spec: KernelSpec) -> _Source:
    """`@triton.jit` and the `def` line of `signature_of(spec)` (six parameters a line), indented into the body."""
    params = signature_of(spec).def_params()
    src = _Source()
    src.add("@triton.jit")
    src.add(f"def {spec.name}(")
    for start in range(0, len(params), 6):
        src.line("    " + ", ".join(params[start:start + 6]) + ",")
    src.add("):")
    src.indent()
    return src


def _tiled_kernel_source(spec: GemmSpec | WeightOnlySpec) -> _Source:
    """The kernel's `def` line, the spec's static N and K, and the tile order."""
    src = _kernel_def(spec)
    if spec.n:
        src.add(f"N: tl.constexpr = {spec.n}")
    if spec.k:
        src.add(f"K: tl.constexpr = {spec.k}")
    _emit_tile_order(src)
    return src


def _emit_tile_order(src: _Source) -> None:
    """pid → (pid_m, pid_n) in grouped order, the tile's rows and cols, and their in-range load indices."""
    src.add("""
        # grouped tile order: GROUP_M row tiles walk the same band of weight columns
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        band = pid // (GROUP_M * tiles_n)
        first_m = band * GROUP_M
        band_m = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_m
        pid_n = (pid % (GROUP_M * tiles_n)) // band_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # loads use in-range indices (ragged edges wrap around); only the stores are masked
        if EVEN_M:
            rows_in = tl.max_contiguous(tl.multiple_of(rows, BLOCK_M), BLOCK_M)
        else:
            rows_in = rows % M
        if EVEN_N:
            cols_in = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        else:
            cols_in = cols % N
        rows64 = rows_in.to(tl.int64)""")


def _emit_branch_and_bias(src: _Source, spec: GemmSpec | WeightOnlySpec, target: Target) -> None:
    """acc += down·L1ᵀ (the low-rank up projection) and the bias."""
    if spec.rank:
        pad = _rank_pad(spec.rank)
        src.add(f"""
            # low-rank up projection: down [M, rank] (computed before this kernel) · L1 [N, rank]ᵀ
            ranks = tl.arange(0, {pad})
            rank_ok = ranks < {spec.rank}
            down = tl.load(down_ptr + rows64[:, None] * stride_down + ranks[None, :], mask=rank_ok[None, :], other=0.0)
            lora_up = tl.load(lora_up_ptr + cols_in[:, None] * {spec.rank} + ranks[None, :], mask=rank_ok[None, :],
                              other=0.0)
            acc = {_float_dot("down", "tl.trans(lora_up)", "acc", spec.dtype, target)}""")
    if spec.bias:
        src.add("acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]")


def _emit_gemm_grouped_loop(src: _Source, spec: GemmSpec, target: Target) -> None:
    """One K group per iteration: int8 dots into an int32 partial, scaled into the accumulator.

    4-bit codes unpack first: as 16× their value (signed nibbles; uint4 activations 1×), four bytes per 32-bit
    instruction on CUDA, and each group scales with an integer add and two FMAs (`add_scaled_partial`); with
    fp32 scales, where that is not exact, the nibbles unpack to their values and the partial is converted and
    multiplied (`small_int_to_float`). Grouped int8 codes are the dot's operands as loaded (one dot per group),
    and their fp32 scales take the converting path.
    """
    g = spec.group_size
    packed = ActQuant(spec.act, g).packed
    compiled = target.backend == "cuda"
    if spec.dtype == "float32" or not packed:
        unpack_w, undo = "unpack_int4", 1
        unpack_a = "unpack_uint4" if spec.act == "uint4" else "unpack_int4"
    else:
        unpack_w = "nibbles_x16_ptx" if compiled else "nibbles_x16"
        if spec.act == "uint4":
            unpack_a, undo = ("unsigned_nibbles_ptx" if compiled else "unpack_uint4"), 16
        else:
            unpack_a, undo = unpack_w, 256
    width, lanes = (g // 2, "half") if packed else (g, "lanes")  # code bytes per group
    src.add(f"""
        num_groups = tl.cdiv(K, {g})
        {lanes} = tl.arange(0, {width})
        a_ptrs = a_codes_ptr + rows64[:, None] * (num_groups * {width}) + {lanes}[None, :]
        w_ptrs = w_codes_ptr + cols_in.to(tl.int64)[:, None] * (num_groups * {width}) + {lanes}[None, :]
        a_scale_ptrs = a_scales_ptr + rows64 * num_groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for group in range(0, num_groups):""")
    src.indent()
    if undo != 1:
        src.add(f"""
            # the weight's codes (and signed activations') unpack as 16× their value, so the partial sum is
            # {undo}× the group's dot product: the row factor s_a/{undo} undoes it exactly (a power of two)""")
    # Every integer dot names out_dtype, accumulator or not: Triton before 3.9 takes fp32 as the default and
    # refuses an int32 accumulator that differs from it.
    if packed:
        src.add(f"""
            a_low, a_high = {unpack_a}(tl.load(a_ptrs))
            w_low, w_high = {unpack_w}(tl.load(w_ptrs))
            partial = tl.dot(a_low, tl.trans(w_low), out_dtype=tl.int32)
            partial = tl.dot(a_high, tl.trans(w_high), partial, out_dtype=tl.int32)""")
    elif not FORMATS[spec.act].signed:  # uint8
        src.add(f"""
            w = tl.load(w_ptrs)
            partial = tl.dot(as_signed_bytes(tl.load(a_ptrs)), tl.trans(w), out_dtype=tl.int32)
            {_UNSIGNED_CORRECTION.format(target="partial", sum="tl.sum(w.to(tl.int32), axis=1)")}""")
    else:
        src.add("partial = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(w_ptrs)), out_dtype=tl.int32)")
    w_scale = "tl.load(w_scales_ptr + group * N + cols_in).to(tl.float32)"
    if compiled:
        # loaded and widened once per column, then handed to the accumulator's layout through shared memory:
        # otherwise each warp loads and widens every column it holds (sm_90, 128×128 with 8 warps: 16 loads,
        # 16 PRMT and 32 IMAD per thread and group instead of 12 instructions)
        w_scale = f"computed_once_ptx({w_scale})"
    if undo != 1:
        src.add(f"""
            row_factor = tl.load(a_scale_ptrs + group).to(tl.float32) * {1 / undo!r}
            w_scale = {w_scale}
            acc = add_scaled_partial(acc, partial, row_factor, w_scale)""")
    else:
        src.add(f"""
            a_scale = tl.load(a_scale_ptrs + group).to(tl.float32)
            w_scale = {w_scale}
            acc += small_int_to_float(partial) * a_scale[:, None] * w_scale[None, :]""")
    src.add(f"""
        a_ptrs += {width}
        w_ptrs += {width}""")
    src.dedent()


def _unsigned_note(act: str) -> str:
    return "" if FORMATS[act].signed else " (uint8 activations as u − 128, plus 128 × the weight codes' sum)"


# uint8 codes u enter the int8 dot as u − 128 (their top bit flipped: `as_signed_bytes`), so the dot gives
# Σ (u − 128)·w; adding 128·Σ w, the weight codes' sum over the same channels, restores Σ u·w exactly.
_UNSIGNED_CORRECTION = "{target} += 128 * {sum}[None, :]"


def _emit_gemm_int8_loop(src: _Source, unsigned: bool) -> None:
    src.add("""
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_codes_ptr + rows64[:, None] * K + ks[None, :]
        w_ptrs = w_codes_ptr + cols_in.to(tl.int64)[:, None] * K + ks[None, :]
        acc_int = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)""")
    if unsigned:
        src.add("w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)")
    src.add("for k0 in range(0, K, BLOCK_K):")
    src.indent()
    src.add(f"""
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks)[None, :] < K, other=0)
            w = tl.load(w_ptrs, mask=(k0 + ks)[None, :] < K, other=0)
        acc_int = tl.dot({"as_signed_bytes(a)" if unsigned else "a"}, tl.trans(w), acc_int, out_dtype=tl.int32)""")
    if unsigned:
        src.add("w_sum += tl.sum(w.to(tl.int32), axis=1)")
    src.add("""
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K""")
    src.dedent()
    if unsigned:
        src.add(_UNSIGNED_CORRECTION.format(target="acc_int", sum="w_sum"))
    src.add("""
        # |acc_int| can exceed 2^22 here, so this is a real conversion (once per tile)
        a_scale = tl.load(a_scales_ptr + rows_in)
        w_scale = tl.load(w_scales_ptr + cols_in)
        acc = acc_int.to(tl.float32) * a_scale[:, None] * w_scale[None, :]""")


def _emit_nvfp4_k_setup(src: _Source) -> None:
    src.add("""
        k_pad = tl.cdiv(K, 16) * 16
        kb = tl.arange(0, BLOCK_K // 2)
        kg = tl.arange(0, BLOCK_K // 16)
        a_ptrs = a_codes_ptr + rows64[:, None] * (k_pad // 2) + kb[None, :]
        w_ptrs = w_codes_ptr + cols_in.to(tl.int64)[:, None] * (k_pad // 2) + kb[None, :]
        a_scale_ptrs = a_scales_ptr + rows64[:, None] * (k_pad // 16) + kg[None, :]
        w_scale_ptrs = w_scales_ptr + kg[:, None] * N + cols_in[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_pad, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
                a_scale = tl.load(a_scale_ptrs)
                w_scale = tl.load(w_scale_ptrs)
            else:
                byte_ok = (k0 // 2 + kb) < k_pad // 2
                group_ok = (k0 // 16 + kg) < k_pad // 16
                a = tl.load(a_ptrs, mask=byte_ok[None, :], other=0)
                w = tl.load(w_ptrs, mask=byte_ok[None, :], other=0)
                a_scale = tl.load(a_scale_ptrs, mask=group_ok[None, :], other=0)
                w_scale = tl.load(w_scale_ptrs, mask=group_ok[:, None], other=0)""")


def _emit_nvfp4_k_advance(src: _Source) -> None:
    src.add("""
            a_ptrs += BLOCK_K // 2
            w_ptrs += BLOCK_K // 2
            a_scale_ptrs += BLOCK_K // 16
            w_scale_ptrs += (BLOCK_K // 16) * N
        # α per output channel: the weight's tensor (or channel) scale × the activation's tensor scale
        acc = acc * tl.load(w_tscale_ptr + cols_in)[None, :]""")


def _emit_gemm_nvfp4_dequant_loop(src: _Source) -> None:
    _emit_nvfp4_k_setup(src)
    src.indent()
    src.add("""
        # value·scale is exact in fp16; the byte at j holds channels 2j and 2j + 1, both in group j // 8
        a_scale = e4m3_value(a_scale)[:, :, None]
        w_scale = tl.trans(e4m3_value(w_scale))[:, :, None]
        a_even = tl.reshape(tl.reshape(e2m1_to_f16(a & 15).to(tl.float32), (BLOCK_M, BLOCK_K // 16, 8)) * a_scale,
                            (BLOCK_M, BLOCK_K // 2)).to(tl.float16)
        a_odd = tl.reshape(tl.reshape(e2m1_to_f16(a >> 4).to(tl.float32), (BLOCK_M, BLOCK_K // 16, 8)) * a_scale,
                           (BLOCK_M, BLOCK_K // 2)).to(tl.float16)
        w_even = tl.reshape(tl.reshape(e2m1_to_f16(w & 15).to(tl.float32), (BLOCK_N, BLOCK_K // 16, 8)) * w_scale,
                            (BLOCK_N, BLOCK_K // 2)).to(tl.float16)
        w_odd = tl.reshape(tl.reshape(e2m1_to_f16(w >> 4).to(tl.float32), (BLOCK_N, BLOCK_K // 16, 8)) * w_scale,
                           (BLOCK_N, BLOCK_K // 2)).to(tl.float16)
        acc = tl.dot(a_even, tl.trans(w_even), acc)
        acc = tl.dot(a_odd, tl.trans(w_odd), acc)""")
    src.dedent()
    _emit_nvfp4_k_advance(src)


def _emit_gemm_nvfp4_dot_scaled_loop(src: _Source) -> None:
    _emit_nvfp4_k_setup(src)
    src.indent()
    src.add("""
        # native block-scaled FP4 MMA: E2M1 pairs along K, one E4M3 scale per 16 channels
        acc = tl.dot_scaled(a, a_scale.to(tl.float8e4nv, bitcast=True), "e2m1",
                            tl.trans(w), tl.trans(w_scale).to(tl.float8e4nv, bitcast=True), "e2m1", acc)""")
    src.dedent()
    _emit_nvfp4_k_advance(src)


def _emit_epilogue(src: _Source, spec: GemmSpec, target: Target, dtype: str) -> None:
    operand = 0
    for step in spec.epilogue:
        if step.kind in ("gelu_tanh", "gelu_erf", "silu"):
            src.add(f"acc = {step.kind}(acc)")
        elif step.kind in ("mul_scalar", "add_scalar"):
            src.add(f"acc = acc {'*' if step.kind == 'mul_scalar' else '+'} {step.value!r}")
        else:
            src.add(f"""
                # epilogue operand {operand}: row m sits at (m // inner)·stride_outer + (m % inner)·stride_inner
                op{operand} = tl.load(op{operand}_ptr + (rows64 // op{operand}_inner)[:, None] * op{operand}_stride_outer
                              + (rows64 % op{operand}_inner)[:, None] * op{operand}_stride_inner
                              + cols_in[None, :] * op{operand}_stride_n).to(tl.float32)
                acc = acc {'*' if step.kind == 'mul' else '+'} op{operand}""")
            operand += 1
    src.add(f"""
        y = {_rounded("acc", dtype)}
        store_ok = (rows < M)[:, None] & (cols < N)[None, :]""")
    if spec.emits_output:
        src.add(f"tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to({_TL_DTYPE[dtype]}), "
                "mask=store_ok)")
    qn = spec.quantize_next
    if qn is None:
        return
    quant, g = qn.quant, qn.quant.group_size
    src.add(f"""
        # quantize y for the next layer (K' = N): BLOCK_N holds whole groups of {g}; columns past N are zero
        col_ok = cols < N""")
    if quant.smooth:
        src.add("next_smooth = tl.load(next_smooth_ptr + cols_in).to(tl.float32)[None, :]")
    _emit_quant_input(src, quant, "y", "next_smooth", dtype, "value")
    src.add("value = tl.where(col_ok[None, :], value, 0.0)")
    if quant.fmt == "nvfp4":
        src.add("next_act_scale = tl.load(next_act_scale_ptr)  # the next layer's per-tensor activation scale")
    _emit_group_quantize(src, quant, "value", "BLOCK_M", f"(BLOCK_N // {g})", dtype, "next_act_scale")
    tile, width = _code_columns(quant, "BLOCK_N"), _code_columns(quant, g)
    src.add(f"""
        next_groups = tl.cdiv(N, {g})
        byte_cols = pid_n * ({tile}) + tl.arange(0, {tile})
        tl.store(next_codes_ptr + rows.to(tl.int64)[:, None] * (next_groups * {width}) + byte_cols[None, :], packed,
                 mask=(rows < M)[:, None] & (byte_cols < next_groups * {width})[None, :])
        group_cols = pid_n * (BLOCK_N // {g}) + tl.arange(0, BLOCK_N // {g})
        tl.store(next_scales_ptr + rows.to(tl.int64)[:, None] * next_groups + group_cols[None, :], scale,
                 mask=(rows < M)[:, None] & (group_cols < next_groups)[None, :])""")
    if qn.rank:
        pad = _rank_pad(qn.rank)
        smoothed = _branch_input("y", "next_smooth", dtype) if quant.smooth else "y"
        src.add(f"""
            # the next layer's down projection (y/λ′)·L2′ᵀ: this tile's share, summed over the N tiles by atomics
            next_ranks = tl.arange(0, {pad})
            next_lora_down = tl.load(next_lora_down_ptr + next_ranks[None, :] * N + cols_in[:, None],
                                     mask=col_ok[:, None] & (next_ranks < {qn.rank})[None, :], other=0.0)
            next_down = {_float_dot(smoothed, "next_lora_down", None, spec.dtype, target)}
            tl.atomic_add(next_down_ptr + rows.to(tl.int64)[:, None] * {qn.rank} + next_ranks[None, :], next_down,
                          mask=(rows < M)[:, None] & (next_ranks < {qn.rank})[None, :])""")


# ---------------------------------------------------------------------------------------------------------
# Kernel W (W4A16)


def _as_model_dtype(expr: str, dtype: str, target: Target) -> str:
    """fp32 `expr` rounded to `dtype` (ties to even) and cast to it: a single conversion on CUDA, where it
    rounds to nearest even; through `round_to_bf16` under the interpreter, whose bf16 cast truncates."""
    if dtype == "bfloat16" and target.backend == "interpreter":
        return f"round_to_bf16({expr}).to(tl.bfloat16)"
    return f"({expr}).to({_TL_DTYPE[dtype]})" if dtype != "float32" else expr


def _weight_only_description(spec: WeightOnlySpec, target: Target) -> str:
    g, half = spec.group_size, spec.group_size // 2
    if spec.weight == "nf4":
        table = ("in registers, byte permutes over the codebook's four byte planes (a gather per weight cost more "
                 "than the whole int4 path)" if target.backend == "cuda" else "with a load from the codebook table")
        value = (f"its NormalFloat value from the 16-entry fp32 codebook, looked up {table}, times its group's "
                 "scale in fp32,")
    elif spec.dtype == "float32":
        value = ("its signed integer (−8…7), converted exactly to fp32 with an integer add and a float subtract "
                 "(the I2F instruction runs at a quarter rate), times its group's scale in fp32,")
    else:
        offset = 1032 if spec.dtype == "float16" else 136
        value = (f"its signed integer (−8…7) times its group's scale, two weights per 32-bit register: the nibble "
                 f"with its sign bit flipped becomes the low mantissa bits of the {spec.dtype} {offset} + code "
                 f"(one logic instruction), a packed FMA subtracts {offset} exactly and a packed FMA multiplies by the "
                 f"scale,")
    k_text = f"K = {spec.k}" if spec.k else "K at run time"
    k_text = f"K = {spec.k}" if spec.k else "K at run time"
    n_text = f"N = {spec.n}" if spec.n else "N at run time"
    main = f"""
        Main loop, GROUPS_PER_STEP groups of {g} channels per iteration: the [BLOCK_N, GROUPS_PER_STEP·{half}]
        weight byte tile unpacks in registers into two tiles (low nibbles = channels 0..{half - 1} of each group,
        high nibbles = {half}..{g - 1}: the split-half layout, so no shuffle), and x is read as the two matching
        [BLOCK_M, GROUPS_PER_STEP·{half}] tiles. Each nibble becomes {value} rounded once to {spec.dtype} (what the reference dequantization computes); two {spec.dtype} tl.dot per
        step accumulate in fp32. Small M (modulation layers read one row per sample) is served by 16-row tiles
        and narrow BLOCK_N, so a wide N still spreads over every SM; no split-K, so the epilogue sees whole sums."""
    epilogue = " → ".join(_epilogue_steps(spec)) or "(none)"
    return "\n".join([
        f"Kernel W (W4A16) for spec {spec.hash}: {spec.to_string()}",
        "",
        textwrap.fill(f"y[M, N] = x·Wᵀ{' + down·L1ᵀ' if spec.rank else ''}{' + bias' if spec.bias else ''}, then "
                      f"the epilogue; x [M, K] in {spec.dtype}, W {spec.weight} codes × {spec.dtype} scales per "
                      f"group of {g}; {k_text}, {n_text}.", 110),
        _TILING,
        textwrap.fill(" ".join(main.split()), 110),
        _after_loop(spec),
        f"Epilogue (fp32 in registers, rounded once to {spec.dtype}): {epilogue}.",
        f"Written for {target.describe()}.",
    ])


def _scale_load(dtype: str, masked: bool) -> str:
    """This step's [BLOCK_N, GROUPS_PER_STEP] scales (0 for groups past K_pad), as text indented for the loop.

    Triton copies a load asynchronously (pipelined with the weights) only where each thread reads 4 bytes or
    more: a tall tile with 128 scales a step or fewer has fewer of them than threads, and its synchronous scale
    load waited a memory latency every step. Over whole column tiles (EVEN_N: N is even) such tiles read two
    columns to an int32.
    """
    plain = "w_scale = tl.load(w_scales_ptr + groups[None, :] * N + cols_in[:, None]" + (
        ",\n                  mask=(groups < num_groups)[None, :], other=0.0)" if masked else ")")
    if dtype == "float32":
        return plain.replace("\n", "\n" + " " * 16)
    mask = ", mask=(groups < num_groups)[:, None], other=0" if masked else ""
    text = f"""if BLOCK_M >= 64 and BLOCK_N * GROUPS_PER_STEP <= 128 and EVEN_N:
    pair_ptrs = (w_scales_ptr.to(tl.pointer_type(tl.int32)) + groups[:, None] * (N // 2)
                 + pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)[None, :])
    pairs = tl.load(pair_ptrs{mask})
    # the lower address holds the even column, in the low half
    w_scale = tl.trans(tl.interleave((pairs & 0xFFFF).to(tl.int16), (pairs >> 16).to(tl.int16)))
    w_scale = w_scale.to(w_scales_ptr.dtype.element_ty, bitcast=True)
else:
    {plain.replace(chr(10), chr(10) + "    ")}"""
    return text.replace("\n", "\n" + " " * 16)


def _generate_weight_only(spec: WeightOnlySpec, target: Target) -> str:
    g, half, dtype = spec.group_size, spec.group_size // 2, spec.dtype
    src = _tiled_kernel_source(spec)
    src.add(f"""
        num_groups = tl.cdiv(K, {g})
        # byte j of a group holds channel j (low nibble) and channel j + {half} (high nibble)
        STEP_BYTES: tl.constexpr = GROUPS_PER_STEP * {half}
        byte_cols = tl.arange(0, STEP_BYTES)
        low_cols = (byte_cols // {half}) * {g} + byte_cols % {half}
        step_groups = tl.arange(0, GROUPS_PER_STEP)
        x_rows = x_ptr + rows64[:, None] * stride_xm
        w_rows = w_codes_ptr + cols_in.to(tl.int64)[:, None] * (num_groups * {half})
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for first_group in range(0, num_groups, GROUPS_PER_STEP):
            k0 = first_group * {g}
            groups = first_group + step_groups
            if EVEN_K:
                packed = tl.load(w_rows + first_group * {half} + byte_cols[None, :])
                {_scale_load(dtype, False)}
                x_low = tl.load(x_rows + (k0 + low_cols)[None, :])
                x_high = tl.load(x_rows + (k0 + {half} + low_cols)[None, :])
            else:
                # the last step holds groups past K_pad (no bytes, scale 0) or channels past K (x is 0 there)
                packed = tl.load(w_rows + first_group * {half} + byte_cols[None, :],
                                 mask=(first_group * {half} + byte_cols < num_groups * {half})[None, :], other=0)
                {_scale_load(dtype, True)}
                x_low = tl.load(x_rows + (k0 + low_cols)[None, :], mask=(k0 + low_cols < K)[None, :], other=0.0)
                x_high = tl.load(x_rows + (k0 + {half} + low_cols)[None, :],
                                 mask=(k0 + {half} + low_cols < K)[None, :], other=0.0)""")
    src.indent()
    if spec.weight == "int4" and dtype != "float32":
        # every byte's group scale beside it, so that the dequantization works on 32-bit words
        src.add(f"""
            w_scale = tl.reshape(tl.broadcast_to(w_scale[:, :, None], (BLOCK_N, GROUPS_PER_STEP, {half})),
                                 (BLOCK_N, STEP_BYTES))""")
        if target.backend == "cuda":
            src.add("w_low, w_high = scaled_nibbles_ptx(packed, w_scale)")
        else:
            src.add(f"""
                w_low, w_high = scaled_nibbles(packed, w_scale.to(tl.float32), FP16={dtype == "float16"})
                w_low = {_as_model_dtype("w_low", dtype, target)}
                w_high = {_as_model_dtype("w_high", dtype, target)}""")
    else:
        if spec.weight == "nf4" and target.backend == "cuda":
            src.add("w_low, w_high = nf4_values_ptx(packed)")
        elif spec.weight == "nf4":
            src.add("""
                w_low = tl.load(codebook_ptr + (packed & 15))
                w_high = tl.load(codebook_ptr + (packed >> 4))""")
        else:
            src.add("""
                w_low, w_high = unpack_int4(packed)
                w_low = small_int_to_float(w_low.to(tl.int32))
                w_high = small_int_to_float(w_high.to(tl.int32))""")
        src.add(f"""
            # value × group scale in fp32, rounded once to {dtype}
            w_scale = w_scale.to(tl.float32)[:, :, None]
            w_low = tl.reshape(tl.reshape(w_low, (BLOCK_N, GROUPS_PER_STEP, {half})) * w_scale, (BLOCK_N, STEP_BYTES))
            w_high = tl.reshape(tl.reshape(w_high, (BLOCK_N, GROUPS_PER_STEP, {half})) * w_scale, (BLOCK_N, STEP_BYTES))
            w_low = {_as_model_dtype("w_low", dtype, target)}
            w_high = {_as_model_dtype("w_high", dtype, target)}""")
    src.add(f"""
        acc = {_float_dot("x_low", "tl.trans(w_low)", "acc", dtype, target)}
        acc = {_float_dot("x_high", "tl.trans(w_high)", "acc", dtype, target)}""")
    src.dedent()
    _emit_branch_and_bias(src, spec, target)
    _emit_epilogue(src, spec, target, dtype)
    src.dedent()
    return _module_text(spec, _weight_only_description(spec, target),
                        src)
