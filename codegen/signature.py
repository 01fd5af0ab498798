"""The parameter list of a generated kernel, derived once from its spec.

`signature_of(spec, target)` is the single source of a kernel's parameters: `generate` writes the `def` line
from it (and prints it in the module's docstring), `launch` binds its arguments to it by name
(`Signature.bind`), and the ahead-of-time compiler (`codegen.aot`) reads the pointer dtypes from it. A launcher
that passes a name the signature lacks, or misses one it has, fails with a `SignatureError` naming the
parameter, instead of shifting every later argument by one.

Parameter kinds:
- "pointer": a tensor; `dtype` is the element type the kernel is compiled for (a torch dtype name);
- "int": a runtime int32 scalar (a size or a stride);
- "constexpr": a compile-time value filled from the tile configuration (BLOCK_M, EVEN_K, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from svdq_compiler.codegen.layout import packed_code_dtype, scale_dtype
from svdq_compiler.codegen.spec import GemmSpec, KernelSpec, QuantizeSpec, WeightOnlySpec
from svdq_compiler.errors import SvdqError

_TRITON_POINTER = {"uint8": "*u8", "int8": "*i8", "float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


class SignatureError(SvdqError):
    """A kernel launch's arguments do not match the generated kernel's signature."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "pointer" | "int" | "constexpr"
    dtype: str | None = None  # pointers only: the element type

    def text(self) -> str:
        if self.kind == "pointer":
            return f"{self.name}: *{self.dtype}"
        return f"{self.name}: {'i32' if self.kind == 'int' else 'constexpr'}"

    @property
    def triton_type(self) -> str:
        """The type string of `triton.compile`'s signature."""
        if self.kind == "pointer":
            return _TRITON_POINTER[self.dtype]
        return "i32" if self.kind == "int" else "constexpr"


@dataclass(frozen=True)
class Signature:
    kernel: str
    params: tuple[Param, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def constexprs(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.kind == "constexpr")

    def def_params(self) -> list[str]:
        """The parameters as the kernel's `def` line writes them."""
        return [f"{p.name}: tl.constexpr" if p.kind == "constexpr" else p.name for p in self.params]

    def text(self) -> str:
        return f"{self.kernel}(" + ", ".join(p.text() for p in self.params) + ")"

    def bind(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional argument list for `values` (name → value); every parameter exactly once."""
        missing = [name for name in self.names if name not in values]
        unknown = sorted(set(values) - set(self.names))
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else [])
            raise SignatureError(f"arguments do not match the signature of {self.kernel}: {'; '.join(parts)}",
                                 where=self.text(), fix="this is a launcher bug: launch and generate disagree")
        return [values[name] for name in self.names]


def _ptr(name: str, dtype: str) -> Param:
    return Param(name, "pointer", dtype)


def _ints(*names: str) -> list[Param]:
    return [Param(name, "int") for name in names]


def _constexprs(*names: str) -> list[Param]:
    return [Param(name, "constexpr") for name in names]


def _codes_dtype(fmt: str) -> str:
    return _dtype_name(packed_code_dtype(fmt))


def _scales_dtype(fmt: str, dtype: str) -> str:
    return _dtype_name(scale_dtype(fmt, getattr(torch, dtype)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sizes(spec: GemmSpec | WeightOnlySpec) -> list[Param]:
    """M always; N and K when the spec leaves them to run time."""
    return _ints(*["M"] + ([] if spec.n else ["N"]) + ([] if spec.k else ["K"]))


def _branch_epilogue(spec: GemmSpec | WeightOnlySpec) -> list[Param]:
    """The low-rank up projection's, the bias's and the epilogue operands' parameters."""
    params = [_ptr("down_ptr", spec.dtype), Param("stride_down", "int"), _ptr("lora_up_ptr", spec.dtype)] \
        if spec.rank else []
    params += [_ptr("bias_ptr", spec.dtype)] if spec.bias else []
    for index in range(spec.operand_count):
        params += [_ptr(f"op{index}_ptr", spec.dtype)]
        params += _ints(f"op{index}_inner", f"op{index}_stride_outer", f"op{index}_stride_inner",
                        f"op{index}_stride_n")
    return params


def _quantize_signature(spec: QuantizeSpec) -> list[Param]:
    quant, dtype = spec.quant, spec.dtype
    params = [_ptr("x_ptr", dtype)] + ([_ptr("smooth_ptr", "float32")] if quant.smooth else [])
    params += [_ptr("lora_down_ptr", dtype)] if spec.rank else []
    params += [_ptr("act_scale_ptr", "float32")] if quant.fmt == "nvfp4" else []
    params += [_ptr("codes_ptr", _codes_dtype(quant.fmt)), _ptr("scales_ptr", _scales_dtype(quant.fmt, dtype))]
    params += [_ptr("down_ptr", dtype)] if spec.rank else []
    params += _ints(*["M"] + ([] if spec.k else ["K"]), "stride_xm") + _constexprs("BLOCK_M")
    params += _constexprs("BLOCK_K" if quant.per_row else "GROUPS_PER_STEP")
    return params


_TILE = ("BLOCK_M", "BLOCK_N", "GROUP_M", "EVEN_M", "EVEN_N")


def _gemm_signature(spec: GemmSpec) -> list[Param]:
    act, dtype = spec.act, spec.dtype
    params = [_ptr("a_codes_ptr", _codes_dtype(act)), _ptr("a_scales_ptr", _scales_dtype(act, dtype)),
              _ptr("w_codes_ptr", _codes_dtype(spec.weight)), _ptr("w_scales_ptr", _scales_dtype(spec.weight, dtype))]
    params += [_ptr("w_tscale_ptr", "float32")] if act == "nvfp4" else []  # α = weight × activation scale
    params += _branch_epilogue(spec)
    params += [_ptr("out_ptr", dtype)] if spec.emits_output else []
    qn = spec.quantize_next
    if qn is not None:
        params += [_ptr("next_smooth_ptr", "float32")] if qn.quant.smooth else []
        params += [_ptr("next_act_scale_ptr", "float32")] if qn.quant.fmt == "nvfp4" else []
        params += [_ptr("next_codes_ptr", _codes_dtype(qn.quant.fmt)),
                   _ptr("next_scales_ptr", _scales_dtype(qn.quant.fmt, dtype))]
        params += [_ptr("next_lora_down_ptr", dtype), _ptr("next_down_ptr", "float32")] if qn.rank else []
    params += _sizes(spec) + _constexprs(*_TILE)
    params += [] if spec.integer_groups else _constexprs("BLOCK_K", "EVEN_K")
    return params


def _weight_only_signature(spec: WeightOnlySpec) -> list[Param]:
    params = [_ptr("x_ptr", spec.dtype), Param("stride_xm", "int"), _ptr("w_codes_ptr", "uint8"),
              _ptr("w_scales_ptr", spec.dtype)]
    params += [_ptr("codebook_ptr", "float32")] if spec.weight == "nf4" else []
    params += _branch_epilogue(spec) + [_ptr("out_ptr", spec.dtype)] + _sizes(spec)
    params += _constexprs("BLOCK_M", "BLOCK_N", "GROUPS_PER_STEP", "GROUP_M", "EVEN_M", "EVEN_N", "EVEN_K")
    return params


def signature_of(spec: KernelSpec) -> Signature:
    """The kernel's parameters, in the order of its `def` line."""
    if isinstance(spec, QuantizeSpec):
        params = _quantize_signature(spec)
    elif isinstance(spec, WeightOnlySpec):
        params = _weight_only_signature(spec)
    else:
        params = _gemm_signature(spec)
    return Signature(spec.name, tuple(params))
