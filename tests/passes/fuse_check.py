"""Run fused graphs through the generated kernels while checking every fused op against its reference on the
very same inputs (a whole-graph comparison mostly measures how a rounding difference flips 4-bit codes later)."""

from collections import Counter
from contextlib import contextmanager

import torch

from svdq_compiler.codegen import fused_ops, launch


def _compare(name, outputs, references):
    for got, want in zip(outputs, references):
        if got.is_floating_point():
            error = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
            assert error < 1e-2, f"{name}: relative error {error:.2e}"
        elif name == "fused_quantize_lora_down":
            assert torch.equal(got, want), f"{name}: codes or scales differ on the same input"
        else:  # codes of a GEMM output that differs from the reference by rounding: rare boundary flips
            assert (got != want).float().mean() < 0.02, f"{name}: too many codes differ"


@contextmanager
def checking_kernels():
    """Inside, the fused ops run the kernels and each call is checked; yields the count of checked calls."""
    checked: Counter = Counter()
    real_quantize, real_gemm = launch.quantize_lora_down, launch.gemm

    def quantize(*args):
        out = real_quantize(*args)
        _compare("fused_quantize_lora_down", out, fused_ops.reference_quantize_lora_down(*args))
        checked["fused_quantize_lora_down"] += 1
        return out

    def gemm(*args):
        out = real_gemm(*args)
        _compare("fused_gemm", out, fused_ops.reference_gemm(*args))
        checked["fused_gemm"] += 1
        return out

    def weight_only(*args):
        out = real_weight_only(*args)
        _compare("fused_weight_only_linear", [out], [fused_ops.reference_weight_only_linear(*args)])
        checked["fused_weight_only_linear"] += 1
        return out

    real_weight_only = launch.weight_only_linear
    launch.quantize_lora_down, launch.gemm, launch.weight_only_linear = quantize, gemm, weight_only
    try:
        with fused_ops.kernel_backend("triton"):
            yield checked
    finally:
        launch.quantize_lora_down, launch.gemm, launch.weight_only_linear = real_quantize, real_gemm, real_weight_only
