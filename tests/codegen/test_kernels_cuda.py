"""The generated kernels compiled for the GPU of this machine against the reference ops on the CPU (marked gpu).

The interpreter tests (test_kernels.py) run the portable text; on CUDA the int4 GEMM unpacks nibbles with
inline PTX (`nibbles_x16_ptx`, `unsigned_nibbles_ptx`), kernel W dequantizes int4 with inline PTX
(`scaled_nibbles_ptx`), and Triton picks tensor-core instructions, which only a GPU can check: the same cases,
plus FLUX-width ones, with the inputs built on the CPU and moved over.
"""

import pytest
import torch
from torch.utils._pytree import tree_map

import svdq_compiler.ops  # noqa: F401  (the reference ops; before test_kernels, which imports the codegen first)
from svdq_compiler.codegen import launch
from svdq_compiler.codegen.fused_ops import reference_gemm, reference_weight_only_linear
from test_kernels import (GEMM_CASES, GROUP, QUANTIZE_CASES, WEIGHT_ONLY_CASES,  # noqa: E402, I001
                          _close, _gemm_case, _weight_only_case, int4_identity_case, kernel_a_case)

pytestmark = pytest.mark.gpu  # skipped without a CUDA device (tests/conftest.py)
ops = torch.ops.svdq


def _cuda(values):
    return tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, values)


FLUX_WIDTH_GEMMS = [
    ("int4", (2, 256), 3072, 512, 32, True, torch.bfloat16),
    ("uint4", (1, 300), 3072, 384, 32, True, torch.bfloat16),  # ragged M
    ("int4", (130,), 3072, 200, 0, False, torch.float16),  # ragged N
]


@pytest.mark.parametrize("fmt, lead, k, n, rank, bias, dtype", GEMM_CASES + FLUX_WIDTH_GEMMS)
def test_kernel_b_on_cuda_matches_the_reference(fmt, lead, k, n, rank, bias, dtype):
    spec, args = _gemm_case(fmt, lead, k, n, rank, bias, dtype, seed=k + n)
    (expected,) = reference_gemm(*args, None, None, spec)
    (y,) = launch.gemm(*_cuda(args), None, None, spec)
    assert y.is_cuda
    _close(y.cpu(), expected)


@pytest.mark.parametrize("fmt, lead, k, rank, smooth, dtype, fixed_k", QUANTIZE_CASES)
def test_kernel_a_on_cuda_writes_the_reference_codes_bit_for_bit(fmt, lead, k, rank, smooth, dtype, fixed_k):
    x, lam, lora_down, shift, spec, act_scale = kernel_a_case(fmt, lead, k, rank, smooth, dtype, fixed_k, seed=k)
    codes, scales, _ = launch.quantize_lora_down(*_cuda((x, lam, lora_down)), spec, *_cuda((act_scale,)))
    ref_codes, ref_scales = ops.quantize_act(x, lam, shift, fmt, GROUP[fmt], act_scale)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("fmt, lead, k, n, rank, bias, dtype, group", WEIGHT_ONLY_CASES)
def test_kernel_w_on_cuda_matches_the_reference(fmt, lead, k, n, rank, bias, dtype, group):
    spec, args = _weight_only_case(fmt, lead, k, n, rank, bias, dtype, group=group, seed=k + n)
    expected = reference_weight_only_linear(*args, spec)
    y = launch.weight_only_linear(*_cuda(args), spec)
    _close(y.cpu(), expected, rel=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_w_on_cuda_dequantizes_int4_bit_for_bit(dtype):
    x, codes, scales, spec, reference = int4_identity_case(dtype)
    y = launch.weight_only_linear(*_cuda((x, codes, scales)), None, None, None, [], spec)
    assert torch.equal(y.t().cpu().view(torch.int16), reference.view(torch.int16))
