"""Fused-kernel specs: what one generated kernel computes, as a frozen value with a stable text form and hash.

A spec travels inside the graph as the string argument of `svdq.fused_quantize_lora_down` / `svdq.fused_gemm`,
so a saved graph regenerates exactly the same kernels on load. `spec.to_string()` is canonical JSON (sorted keys,
no whitespace); `parse_spec(text)` inverts it and validates; `spec.hash` is derived from the text plus the
generator version, so a change to the generator invalidates the on-disk kernel cache.

Three kernel kinds:
- `QuantizeSpec` (kernel A): x/λ (+shift), dynamic activation quantization, and the low-rank down projection
  (x/λ)·L2ᵀ, in one read of x.
- `GemmSpec` (kernel B): the 4-bit (or W8A8) GEMM with per-group scales, the low-rank up projection and bias,
  then the epilogue chain taken from the FX pointwise nodes that followed the linear, optionally ending in the
  quantization of the result for the next layer (`QuantizeNext`).
- `WeightOnlySpec` (kernel W, W4A16): 16-bit activations times an int4 or nf4 weight dequantized in registers,
  the low-rank up projection (a LoRA beside a weight-only layer) and bias, then the same epilogue chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Union

from svdq_compiler.errors import SvdqError
from svdq_compiler.quant import ACT_FORMATS, FORMATS, WEIGHT_ONLY_4BIT_FORMATS, weight_format_of

# Bumped whenever generate.py changes the text it produces for an unchanged spec.
GENERATOR_VERSION = 3
# The group sizes of grouped int8 kernels: a dot needs 32 int8 channels, and a group's int32 dot product
# (≤ 127·128·G; uint8 activations: 255·128·G) must stay below 2^22 for the exact integer-to-float conversion of
# kernel_lib.
INT8_GROUPS = (32, 256)
UINT8_GROUPS = (32, 128)

# Formats come from quant.FORMATS: a kernel produces or consumes its ACT_FORMATS ("uint4" and "uint8" are the
# shifted post-GELU inputs), pairs them with weight_format_of(act) weights, and kernel W reads WEIGHT_ONLY_4BIT_FORMATS.
DTYPES = ("bfloat16", "float16", "float32")
UNARY_EPILOGUES = ("gelu_tanh", "gelu_erf", "silu")
TENSOR_EPILOGUES = ("mul", "add")  # y ∘ t with t broadcastable to y (gate multiply, residual add)
SCALAR_EPILOGUES = ("mul_scalar", "add_scalar")
EPILOGUE_KINDS = UNARY_EPILOGUES + TENSOR_EPILOGUES + SCALAR_EPILOGUES


class SpecError(SvdqError):
    """A fused-kernel spec string is malformed or asks for something the generator cannot build."""


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class ActQuant:
    """Dynamic activation quantization: Q((x + shift)/λ) per token and group of `group_size` channels.

    int4: signed, scale = absmax/7, codes in [−7, 7]; uint4: scale = absmax/15, codes in [0, 15]; uint8: scale =
    absmax/255 in fp32, codes in [0, 255], per token or per token and group like int8;
    nvfp4: E2M1 codes with one FP8-E4M3 scale per 16 channels under a calibrated fp32 per-tensor scale (a
    kernel argument, see quant.py); int8: one fp32 scale per token (group 0) or per token and group (a power of
    two from 32 to 256: the GEMM's per-group int32 dot stays below 2^22, which it converts exactly).
    """

    fmt: str
    group_size: int
    shift: float = 0.0
    smooth: bool = True  # divide by λ (a [K] vector) before quantizing

    def validate(self, where: str) -> None:
        if self.fmt not in ACT_FORMATS:
            raise SpecError(f"unknown activation format {self.fmt!r}", where=where,
                            fix=f"use one of {', '.join(ACT_FORMATS)}")
        if self.fmt == "nvfp4" and self.group_size != 16:
            raise SpecError(f"nvfp4 needs group_size 16, got {self.group_size}", where=where)
        byte_groups = {"int8": INT8_GROUPS, "uint8": UINT8_GROUPS}.get(self.fmt)
        if byte_groups and self.group_size and not (
                _power_of_two(self.group_size) and byte_groups[0] <= self.group_size <= byte_groups[1]):
            raise SpecError(f"{self.fmt} kernels need group_size 0 (per token) or a power of two from "
                            f"{byte_groups[0]} to {byte_groups[1]}, got {self.group_size}", where=where,
                            fix="use group_size 0 or 64, or keep the layer on the reference ops")
        if self.packed and FORMATS[self.fmt].integer and not (_power_of_two(self.group_size) and self.group_size >= 32):
            raise SpecError(f"{self.fmt} kernels need a power-of-two group size of at least 32, got "
                            f"{self.group_size}", where=where,
                            fix="use group_size 64 (the default) or keep the layer on the reference ops")
        if self.shift and FORMATS[self.fmt].signed:
            raise SpecError(f"a shift of {self.shift} is only meaningful for unsigned (uint4, uint8) activations",
                            where=where)

    @property
    def packed(self) -> bool:
        """Two 4-bit codes per byte (int8 codes are one per byte)."""
        return FORMATS[self.fmt].four_bit

    @property
    def per_row(self) -> bool:
        """One scale per token (int8 group 0): quantizing needs the whole row before the first code."""
        return self.group_size == 0

    @property
    def integer_groups(self) -> bool:
        """Integer codes with one scale per group of K channels (int4, uint4, grouped int8/uint8): the GEMM takes each
        group's int32 dot product and scales it."""
        return FORMATS[self.fmt].integer and not self.per_row


@dataclass(frozen=True)
class Epilogue:
    """One pointwise step applied to the GEMM's output tile: `kind` from EPILOGUE_KINDS.

    Tensor steps read the next entry of the op's `operands` list; scalar steps use `value`.
    """

    kind: str
    value: float | None = None

    def validate(self, where: str) -> None:
        if self.kind not in EPILOGUE_KINDS:
            raise SpecError(f"unknown epilogue {self.kind!r}", where=where,
                            fix=f"use one of {', '.join(EPILOGUE_KINDS)}")
        if (self.kind in SCALAR_EPILOGUES) != (self.value is not None):
            raise SpecError(f"epilogue {self.kind!r} {'needs' if self.kind in SCALAR_EPILOGUES else 'takes no'} "
                            f"a scalar value", where=where)

    @property
    def takes_operand(self) -> bool:
        return self.kind in TENSOR_EPILOGUES


@dataclass(frozen=True)
class QuantizeNext:
    """The epilogue's last step: quantize the result for the next layer (its kernel A becomes unnecessary).

    The next layer's low-rank down projection (y/λ')·L2'ᵀ is accumulated here too when `rank` > 0 (fp32 atomics
    across the N tiles). `emit_output` also stores the 16-bit result, for consumers other than the next layer.
    """

    quant: ActQuant
    rank: int = 0
    emit_output: bool = False


class _SpecText:
    """The canonical text and hash every kernel spec has."""

    def to_string(self) -> str:
        return _canonical(self)

    @property
    def hash(self) -> str:
        return _hash(self)


class _EpilogueSpec(_SpecText):
    """A kernel that ends in an epilogue chain (`self.epilogue`) whose tensor steps read the op's operands."""

    @property
    def operand_count(self) -> int:
        return sum(1 for step in self.epilogue if step.takes_operand)


@dataclass(frozen=True)
class QuantizeSpec(_SpecText):
    """Kernel A: x [M, K] → codes, scales (+ (x/λ)·L2ᵀ [M, rank] when rank > 0)."""

    quant: ActQuant
    rank: int
    dtype: str  # of x, λ, L2 and the down projection
    k: int | None = None  # None: K is a runtime argument

    kind = "quantize_lora_down"

    def validate(self) -> None:
        where = "quantize_lora_down spec"
        self.quant.validate(where)
        _check_common(self.dtype, self.rank, self.k, where)

    @property
    def name(self) -> str:
        return f"svdq_quantize_{self.quant.fmt}_r{self.rank}_{self.hash[:10]}"


@dataclass(frozen=True)
class GemmSpec(_EpilogueSpec):
    """Kernel B: Σ_g (a_g·w_gᵀ)·s_a·s_w (·tscale) + down·L1ᵀ + bias, then `epilogue`, then `quantize_next`."""

    act: str  # activation format of the codes it reads (int4, uint4, nvfp4, int8, uint8)
    group_size: int
    rank: int
    bias: bool
    dtype: str  # output dtype (the model dtype: scales, L1, bias, epilogue operands)
    k: int | None = None  # original (unpadded) K; None: runtime
    n: int | None = None
    epilogue: tuple[Epilogue, ...] = ()
    quantize_next: QuantizeNext | None = None

    kind = "gemm"

    @property
    def weight(self) -> str:
        return weight_format_of(self.act)

    @property
    def emits_output(self) -> bool:
        return self.quantize_next is None or self.quantize_next.emit_output

    @property
    def integer_groups(self) -> bool:
        """The main loop takes one K group per iteration (int4, uint4, grouped int8/uint8); otherwise it walks K in
        BLOCK_K steps (per-token int8/uint8, nvfp4)."""
        return ActQuant(self.act, self.group_size).integer_groups

    def validate(self) -> None:
        where = "fused_gemm spec"
        ActQuant(self.act, self.group_size, shift=0.0).validate(where)
        _check_common(self.dtype, self.rank, self.k, where)
        if self.n is not None and self.n <= 0:
            raise SpecError(f"n must be positive, got {self.n}", where=where)
        for step in self.epilogue:
            step.validate(where)
        if self.quantize_next is not None:
            self.quantize_next.quant.validate(where + " (quantize_next)")
            if self.quantize_next.rank < 0:
                raise SpecError("quantize_next.rank must be >= 0", where=where)
            if self.quantize_next.quant.per_row:
                raise SpecError("per-token int8 quantization needs the whole row and cannot be an epilogue",
                                where=where, fix="leave the next layer's quantize_act unfused")

    @property
    def name(self) -> str:
        return f"svdq_gemm_{self.act}_r{self.rank}_{self.hash[:10]}"


@dataclass(frozen=True)
class WeightOnlySpec(_EpilogueSpec):
    """Kernel W: y = x·dequantize(W)ᵀ + down·L1ᵀ + bias, then `epilogue`; x, L1, bias and y in `dtype`."""

    weight: str  # int4 (symmetric, codes −7…7) or nf4 (NormalFloat codebook indices)
    group_size: int
    rank: int
    bias: bool
    dtype: str
    k: int | None = None  # original (unpadded) K; None: runtime
    n: int | None = None
    epilogue: tuple[Epilogue, ...] = ()

    kind = "weight_only_gemm"
    quantize_next = None  # the output stays 16-bit: the readers of a weight-only layer quantize nothing
    emits_output = True

    def validate(self) -> None:
        where = "fused_weight_only_linear spec"
        if self.weight not in WEIGHT_ONLY_4BIT_FORMATS:
            raise SpecError(f"weight-only kernels take {' or '.join(WEIGHT_ONLY_4BIT_FORMATS)} weights, got "
                            f"{self.weight!r}", where=where, fix="keep the layer on svdq.weight_only_linear")
        # each group's two halves are separate dots, and a dot needs at least 16 channels
        if not (_power_of_two(self.group_size) and self.group_size >= 32):
            raise SpecError(f"weight-only kernels need a power-of-two group size of at least 32, got "
                            f"{self.group_size}", where=where,
                            fix="use group_size 64 (the default) or keep the layer on svdq.weight_only_linear")
        _check_common(self.dtype, self.rank, self.k, where)
        if self.n is not None and self.n <= 0:
            raise SpecError(f"n must be positive, got {self.n}", where=where)
        for step in self.epilogue:
            step.validate(where)

    @property
    def name(self) -> str:
        return f"svdq_w4a16_{self.weight}_r{self.rank}_{self.hash[:10]}"


KernelSpec = Union[QuantizeSpec, GemmSpec, WeightOnlySpec]


def _check_common(dtype: str, rank: int, k: int | None, where: str) -> None:
    if dtype not in DTYPES:
        raise SpecError(f"unknown dtype {dtype!r}", where=where, fix=f"use one of {', '.join(DTYPES)}")
    if rank < 0:
        raise SpecError(f"rank must be >= 0, got {rank}", where=where)
    if k is not None and k <= 0:
        raise SpecError(f"k must be positive, got {k}", where=where)


def _as_dict(spec: KernelSpec) -> dict[str, Any]:
    return {"kind": spec.kind, **dataclasses.asdict(spec)}


def _canonical(spec: KernelSpec) -> str:
    return json.dumps(_as_dict(spec), sort_keys=True, separators=(",", ":"))


def _hash(spec: KernelSpec) -> str:
    text = f"v{GENERATOR_VERSION}:{_canonical(spec)}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _build(cls, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SpecError(f"unknown field(s) {unknown} in {cls.__name__}", where=where)
    try:
        return cls(**values)
    except TypeError as exc:
        raise SpecError(f"incomplete {cls.__name__}: {exc}", where=where) from exc


def parse_spec(text: str) -> KernelSpec:
    """The spec a `to_string()` text describes, validated."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec is not valid JSON: {exc.msg}", where=f"spec text {text[:80]!r}") from exc
    if not isinstance(values, dict):
        raise SpecError("spec must be a JSON object", where=f"spec text {text[:80]!r}")
    values = dict(values)
    kind = values.pop("kind", None)
    where = f"spec text {text[:80]!r}"
    if kind == QuantizeSpec.kind:
        values["quant"] = _build(ActQuant, values.get("quant") or {}, where)
        spec: KernelSpec = _build(QuantizeSpec, values, where)
    elif kind == GemmSpec.kind:
        values["epilogue"] = tuple(_build(Epilogue, step, where) for step in values.get("epilogue", ()))
        quantize_next = values.get("quantize_next")
        if quantize_next is not None:
            quantize_next = dict(quantize_next)
            quantize_next["quant"] = _build(ActQuant, quantize_next.get("quant") or {}, where)
            values["quantize_next"] = _build(QuantizeNext, quantize_next, where)
        spec = _build(GemmSpec, values, where)
    elif kind == WeightOnlySpec.kind:
        values["epilogue"] = tuple(_build(Epilogue, step, where) for step in values.get("epilogue", ()))
        spec = _build(WeightOnlySpec, values, where)
    else:
        raise SpecError(f"unknown spec kind {kind!r}", where=where,
                        fix=f"expected {QuantizeSpec.kind!r}, {GemmSpec.kind!r} or {WeightOnlySpec.kind!r}")
    spec.validate()
    return spec
