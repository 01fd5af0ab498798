"""The fused runtime ops `svdq::fused_quantize_lora_down` (kernel A), `svdq::fused_gemm` (kernel B) and
`svdq::fused_weight_only_linear` (kernel W, W4A16).

Both take their kernel spec as a string argument (`spec.to_string()`), so a saved graph carries everything
needed to regenerate its kernels on load. They are registered with `torch.library.custom_op` plus a fake
(meta) implementation, so export, save, load and symbolic shapes work.

Dispatch, per call:
- the backend forced by `kernel_backend("triton" | "reference")` or `$SVDQ_KERNELS`, when set;
- else CUDA tensors → the generated Triton kernels;
- else CPU tensors → the generated kernels under the Triton interpreter when `TRITON_INTERPRET=1`, otherwise the
  reference: the same computation composed from the reference ops of `svdq_compiler.ops` and ATen, i.e. exactly
  what the unfused (lowered) graph computes.

`fused_weight_only_linear(x, w_codes, w_scales, down?, lora_up?, bias?, operands, spec)` returns y [..., N]:
`svdq.weight_only_linear` (+ down·L1ᵀ, a LoRA beside the layer), then the epilogue chain.

nvfp4 activations are two-level: `act_scale` (kernel A), `a_tscale` and `next_act_scale` (kernel B) are their
per-tensor fp32 scales (None for the other formats); the Python-level `reference_*` and `launch.*` functions
take them as trailing arguments after the parsed spec, the ops just before the spec string (which stays last).

Outputs of `fused_gemm`, in order: y [..., N] (unless the quantize-for-next-layer epilogue does not emit it),
then with that epilogue the next layer's codes and scales, then its down projection [..., rank′].
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from svdq_compiler.codegen.shapes import model_dtype, packed_act
from svdq_compiler.codegen.spec import (ActQuant, Epilogue, GemmSpec, QuantizeSpec, SpecError, WeightOnlySpec,
                                        parse_spec)
from svdq_compiler.errors import InputError
from svdq_compiler.quant import FORMATS

BACKENDS = ("triton", "reference")
BACKEND_ENV = "SVDQ_KERNELS"

_forced = threading.local()


@contextmanager
def kernel_backend(name: str | None) -> Iterator[None]:
    """Run the fused ops on `name` ("triton" or "reference") inside the block; None restores automatic choice."""
    if name is not None and name not in BACKENDS:
        raise InputError(f"unknown kernel backend {name!r}", fix=f"use one of {', '.join(BACKENDS)}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def resolve_backend(device: torch.device) -> str:
    forced = getattr(_forced, "name", None) or os.environ.get(BACKEND_ENV) or None
    if forced is not None:
        if forced not in BACKENDS:
            raise InputError(f"${BACKEND_ENV}={forced!r} is not a kernel backend",
                             fix=f"set it to one of {', '.join(BACKENDS)} or unset it")
        return forced
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


@functools.lru_cache(maxsize=4096)
def _parse(text: str, kind: type):
    spec = parse_spec(text)
    if not isinstance(spec, kind):
        raise SpecError(f"expected a {kind.kind} spec, got a {spec.kind} spec", where=f"spec text {text[:80]!r}")
    return spec


def quantize_spec(text: str) -> QuantizeSpec:
    return _parse(text, QuantizeSpec)


def gemm_spec(text: str) -> GemmSpec:
    return _parse(text, GemmSpec)


def weight_only_spec(text: str) -> WeightOnlySpec:
    return _parse(text, WeightOnlySpec)


# ---------------------------------------------------------------------------------------------------------
# Reference implementations: the lowered graph's computation, op for op


def reference_quantize_act(x: torch.Tensor, smooth: torch.Tensor | None, quant: ActQuant,
                           act_scale: torch.Tensor | None = None):
    """codes, scales of Q((x + shift)/λ) (nvfp4 under its per-tensor scale), from the reference op."""
    return torch.ops.svdq.quantize_act(x, smooth, quant.shift, quant.fmt, quant.group_size, act_scale)


def _reference_down(x: torch.Tensor, smooth: torch.Tensor | None, lora_down: torch.Tensor) -> torch.Tensor:
    return F.linear(x if smooth is None else x / smooth.to(x.dtype), lora_down)


def apply_epilogue(y: torch.Tensor, steps: Sequence[Epilogue], operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """The epilogue chain in ATen ops, in y's dtype (what the unfused graph did)."""
    remaining = iter(operands)
    for step in steps:
        if step.kind == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        elif step.kind == "gelu_erf":
            y = F.gelu(y)
        elif step.kind == "silu":
            y = F.silu(y)
        elif step.kind == "mul":
            y = y * next(remaining)
        elif step.kind == "add":
            y = y + next(remaining)
        elif step.kind == "mul_scalar":
            y = y * step.value
        elif step.kind == "add_scalar":
            y = y + step.value
    return y


def reference_quantize_lora_down(x, smooth, lora_down, spec: QuantizeSpec, act_scale=None):
    codes, scales = reference_quantize_act(x, smooth, spec.quant, act_scale)
    down = _reference_down(x, smooth, lora_down) if spec.rank else x.new_empty((*x.shape[:-1], 0))
    return codes, scales, down


def reference_gemm(a_codes, a_scales, w_codes, w_scales, w_tscale, down, lora_up, bias, operands, next_smooth,
                   next_lora_down, spec: GemmSpec, a_tscale=None, next_act_scale=None) -> list[torch.Tensor]:
    dtype = model_dtype(spec.dtype)
    k = spec.k if spec.k is not None else a_codes.shape[-1] * (2 if FORMATS[spec.act].four_bit else 1)
    y = torch.ops.svdq.gemm(a_codes, a_scales, w_codes, w_scales, w_tscale, spec.act, spec.group_size, k, dtype,
                            a_tscale)
    if spec.rank:
        # a slice of a concatenated down projection is strided; the lowered graph's was contiguous, and BLAS
        # may sum in another order for strided inputs
        y = y + F.linear(down.contiguous(), lora_up, bias)
    elif bias is not None:
        y = y + bias.to(y.dtype)
    y = apply_epilogue(y, spec.epilogue, operands)
    qn = spec.quantize_next
    if qn is None:
        return [y]
    codes, scales = reference_quantize_act(y, next_smooth, qn.quant, next_act_scale)
    outputs = ([y] if qn.emit_output else []) + [codes, scales]
    if qn.rank:
        outputs.append(_reference_down(y, next_smooth, next_lora_down))
    return outputs


def reference_weight_only_linear(x, w_codes, w_scales, down, lora_up, bias, operands,
                                 spec: WeightOnlySpec) -> torch.Tensor:
    y = torch.ops.svdq.weight_only_linear(x, w_codes, w_scales, bias, spec.weight, spec.group_size)
    if spec.rank:
        y = y + F.linear(down.contiguous(), lora_up)
    return apply_epilogue(y, spec.epilogue, operands)


# ---------------------------------------------------------------------------------------------------------
# The custom ops


@torch.library.custom_op("svdq::fused_quantize_lora_down", mutates_args=())
def fused_quantize_lora_down(x: torch.Tensor, smooth: Optional[torch.Tensor], lora_down: Optional[torch.Tensor],
                             act_scale: Optional[torch.Tensor], spec: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel A: (codes, scales, down) = Q((x + shift)/λ), (x/λ)·L2ᵀ; down is [..., 0] for rank 0; nvfp4
    quantizes under the per-tensor activation scale `act_scale`."""
    parsed = quantize_spec(spec)
    if resolve_backend(x.device) == "triton":
        from svdq_compiler.codegen import launch

        return launch.quantize_lora_down(x, smooth, lora_down, parsed, act_scale)
    return reference_quantize_lora_down(x, smooth, lora_down, parsed, act_scale)


@fused_quantize_lora_down.register_fake
def _fused_quantize_lora_down_fake(x, smooth, lora_down, act_scale, spec):
    parsed = quantize_spec(spec)
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    dtype = model_dtype(parsed.dtype)
    packed = packed_act(parsed.quant, lead, k, dtype)
    return (x.new_empty(packed.codes_shape, dtype=packed.codes_dtype),
            x.new_empty(packed.scales_shape, dtype=packed.scales_dtype),
            x.new_empty((*lead, parsed.rank), dtype=dtype))


@torch.library.custom_op("svdq::fused_gemm", mutates_args=())
def fused_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
               w_tscale: Optional[torch.Tensor], down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], operands: list[torch.Tensor], next_smooth: Optional[torch.Tensor],
               next_lora_down: Optional[torch.Tensor], a_tscale: Optional[torch.Tensor],
               next_act_scale: Optional[torch.Tensor], spec: str) -> list[torch.Tensor]:
    """Kernel B: the 4-bit (or W8A8) GEMM, + down·L1ᵀ + bias, the epilogue chain, and optionally the
    quantization of the result for the next layer. See the module docstring for the outputs. nvfp4: `a_tscale`
    is the activation's per-tensor scale, `next_act_scale` the next layer's."""
    parsed = gemm_spec(spec)
    if resolve_backend(a_codes.device) == "triton":
        from svdq_compiler.codegen import launch

        return launch.gemm(a_codes, a_scales, w_codes, w_scales, w_tscale, down, lora_up, bias, operands,
                           next_smooth, next_lora_down, parsed, a_tscale, next_act_scale)
    return reference_gemm(a_codes, a_scales, w_codes, w_scales, w_tscale, down, lora_up, bias, operands,
                          next_smooth, next_lora_down, parsed, a_tscale, next_act_scale)


@fused_gemm.register_fake
def _fused_gemm_fake(a_codes, a_scales, w_codes, w_scales, w_tscale, down, lora_up, bias, operands, next_smooth,
                     next_lora_down, a_tscale, next_act_scale, spec):
    parsed = gemm_spec(spec)
    lead, n = tuple(a_codes.shape[:-1]), w_codes.shape[0]
    dtype = model_dtype(parsed.dtype)
    outputs = []
    if parsed.emits_output:
        outputs.append(a_codes.new_empty((*lead, n), dtype=dtype))
    qn = parsed.quantize_next
    if qn is not None:
        packed = packed_act(qn.quant, lead, n, dtype)
        outputs.append(a_codes.new_empty(packed.codes_shape, dtype=packed.codes_dtype))
        outputs.append(a_codes.new_empty(packed.scales_shape, dtype=packed.scales_dtype))
        if qn.rank:
            outputs.append(a_codes.new_empty((*lead, qn.rank), dtype=dtype))
    return outputs


@torch.library.custom_op("svdq::fused_weight_only_linear", mutates_args=())
def fused_weight_only_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scales: torch.Tensor,
                             down: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], operands: list[torch.Tensor], spec: str) -> torch.Tensor:
    """Kernel W: x·dequantize(W)ᵀ (int4 / nf4 groups, 16-bit x) + down·L1ᵀ + bias, then the epilogue chain."""
    parsed = weight_only_spec(spec)
    if resolve_backend(x.device) == "triton":
        from svdq_compiler.codegen import launch

        return launch.weight_only_linear(x, w_codes, w_scales, down, lora_up, bias, operands, parsed)
    return reference_weight_only_linear(x, w_codes, w_scales, down, lora_up, bias, operands, parsed)


@fused_weight_only_linear.register_fake
def _fused_weight_only_linear_fake(x, w_codes, w_scales, down, lora_up, bias, operands, spec):
    parsed = weight_only_spec(spec)
    return x.new_empty((*x.shape[:-1], w_codes.shape[0]), dtype=model_dtype(parsed.dtype))
