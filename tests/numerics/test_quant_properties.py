"""Round-trip properties of the quantizers, checked with hypothesis on small random tensors."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdq_compiler.quant import dequantize, quantize_act, quantize_weight

PROFILE = settings(max_examples=40, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def tensors(draw, *, rows=(1, 4), cols=(1, 80), magnitude=1e3, nonnegative=False):
    """A [rows, cols] tensor with a mix of tiny, ordinary and large finite values, in one of the model dtypes."""
    shape = (draw(st.integers(*rows)), draw(st.integers(*cols)))
    low = 0.0 if nonnegative else -magnitude
    values = draw(arrays(np.float32, shape, elements=st.floats(low, magnitude, width=32, allow_subnormal=False)))
    scale = draw(st.sampled_from([1.0, 2.0 ** -12, 2.0 ** 6]))
    return torch.from_numpy(values * np.float32(scale)).to(draw(DTYPES))


def per_element_scale(q):
    """The effective scale of every element, [..., K] (fp32)."""
    scale = q.scales.float()
    if q.tensor_scale is not None:
        scale = scale * q.tensor_scale.float()
    return scale.repeat_interleave(q.group_size, dim=-1)[..., : q.k]


def rounding_slack(x):
    """Error allowed for rounding the dequantized value to x's dtype (half an ulp of the larger magnitude)."""
    return x.abs().float() * (torch.finfo(x.dtype).eps / 2) + torch.finfo(x.dtype).tiny


def assert_within_half_a_scale(x, q):
    error = (dequantize(q, torch.float32) - x.float()).abs()
    scale = per_element_scale(q)
    # The scale is rounded to the model dtype, so x/scale may pass qmax by a relative ulp. A subnormal scale
    # loses relative precision and bounds nothing, so the property covers normal scales (fp16 has them below
    # 6e-5).
    overshoot = x.float().abs() * torch.finfo(q.scales.dtype).eps
    normal = scale >= torch.finfo(q.scales.dtype).smallest_normal
    assert (error <= scale / 2 + overshoot + rounding_slack(x))[normal].all()


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int4", 16), ("int8", 0)])
@PROFILE
@given(x=tensors())
def test_integer_error_is_at_most_half_a_scale(fmt, group, x):
    q = quantize_weight(x, fmt, group)
    assert_within_half_a_scale(x, q)


@PROFILE
@given(x=tensors(nonnegative=True))
def test_uint4_error_is_at_most_half_a_scale(x):
    q = quantize_act(x, "int4", 64, unsigned=True)
    assert q.codes.max() <= 15
    assert_within_half_a_scale(x, q)


def e2m1_half_gap(a):
    """Half the spacing of the E2M1 grid around magnitude a ∈ [0, 6]."""
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@pytest.mark.parametrize("weight", [True, False])
@PROFILE
@given(x=tensors(magnitude=100.0))
def test_nvfp4_error_is_at_most_half_a_grid_step(weight, x):
    q = quantize_weight(x, "nvfp4", 16) if weight else quantize_act(x, "nvfp4", 16)
    scale = per_element_scale(q)
    ratio = x.float() / scale
    grid_value = dequantize(q, torch.float32) / scale
    normal = ratio.abs() <= 6
    assert ((ratio - grid_value).abs()[normal] <= e2m1_half_gap(ratio.abs())[normal] + 1e-6).all()
    # beyond ±6 (the FP8 scale was rounded down) the value saturates at ±6 with the sign of x
    assert torch.allclose(grid_value[~normal], 6 * torch.sign(ratio[~normal]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16), ("int8", 0), ("nf4", 64)])
@PROFILE
@given(x=tensors())
def test_quantizing_the_dequantized_tensor_gives_the_same_codes(fmt, group, x):
    q = quantize_weight(x, fmt, group)
    again = quantize_weight(dequantize(q), fmt, group)
    # A group whose scale is subnormal in its storage dtype (nvfp4's FP8 E4M3 below 2^-6, for a group 1/28672 of
    # the tensor's absmax) can lose its largest code to the coarse scale rounding: x = [[808], [0.00586]] stores
    # the second group as code 4.0 × 2^-8, and quantizing 4.0 × 2^-8 again picks 6.0 × 2^-9. Idempotence is a
    # property of normal scales.
    normal = (q.scales.float() >= torch.finfo(q.scales.dtype).smallest_normal).repeat_interleave(q.group_size, -1)
    normal = normal[..., : q.codes.shape[-1]].expand_as(q.codes)
    assert torch.equal(again.codes[normal], q.codes[normal])
    # absmax/qmax of a dequantized group is the scale again up to one rounding (qmax·s is rounded to the dtype)
    eps = torch.finfo(x.dtype).eps
    normal_values = normal[..., : q.k]
    torch.testing.assert_close(dequantize(again)[normal_values], dequantize(q)[normal_values], rtol=2 * eps, atol=0)


def test_nvfp4_requantization_with_a_subnormal_fp8_scale_changes_the_code():
    """The case hypothesis found; it pins why the idempotence property above is restricted to normal scales."""
    x = torch.tensor([[808.0], [0.00586]]).bfloat16()
    q = quantize_weight(x, "nvfp4", 16)
    assert float(q.scales[1].float()) < torch.finfo(torch.float8_e4m3fn).smallest_normal
    assert not torch.equal(quantize_weight(dequantize(q), "nvfp4", 16).codes, q.codes)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int8", 0)])
@PROFILE
@given(x=tensors())
def test_negation_negates_codes(fmt, group, x):
    q, negated = quantize_weight(x, fmt, group), quantize_weight(-x, fmt, group)
    assert torch.equal(negated.codes, -q.codes)
    assert torch.equal(negated.scales, q.scales)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16), ("nf4", 64), ("int8", 0)])
@PROFILE
@given(x=tensors(magnitude=10.0), power=st.integers(-4, 4))
def test_power_of_two_scaling_keeps_codes_and_scales_the_scales(fmt, group, x, power):
    factor = 2.0 ** power
    q, scaled = quantize_weight(x, fmt, group), quantize_weight(x * factor, fmt, group)
    smallest = torch.finfo(x.dtype).smallest_normal * 2 ** 12  # keep every scale a normal number
    assume(x.abs().amax() > 0 and x.abs()[x != 0].amin() * min(1.0, factor) >= smallest)
    assert torch.equal(scaled.codes, q.codes)
    if fmt == "nvfp4":  # the per-tensor scale absorbs the factor; the FP8 group scales are unchanged
        assert torch.equal(scaled.scales.float(), q.scales.float())
        assert scaled.tensor_scale.item() == q.tensor_scale.item() * factor
    else:
        changed = q.scales != 1  # zero groups keep scale 1
        assert torch.equal(scaled.scales[changed].float(), q.scales[changed].float() * factor)


@pytest.mark.parametrize("fmt,group,unsigned", [("int4", 64, False), ("int4", 64, True), ("nvfp4", 16, False),
                                                ("int8", 0, False)])
@PROFILE
@given(x=tensors(rows=(1, 3)), batch=st.integers(1, 3))
def test_activation_quantization_is_independent_per_token(fmt, group, unsigned, x, batch):
    x = x.abs() if unsigned else x
    stacked = torch.stack([x / (i + 1) for i in range(batch)])  # [batch, rows, K]
    # nvfp4's per-tensor scale is the one thing tokens share: fixed here, as a compiled graph's calibrated one
    tensor_scale = torch.tensor(0.01) if fmt == "nvfp4" else None
    q = quantize_act(stacked, fmt, group, unsigned=unsigned, tensor_scale=tensor_scale)
    for i in range(batch):
        for r in range(x.shape[0]):
            single = quantize_act(stacked[i, r : r + 1], fmt, group, unsigned=unsigned, tensor_scale=tensor_scale)
            assert torch.equal(q.codes[i, r], single.codes[0])
            assert torch.equal(q.scales[i, r].float(), single.scales[0].float())


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int4", 32), ("nvfp4", 16), ("nf4", 64)])
@PROFILE
@given(x=tensors(cols=(1, 150)))
def test_padding_equals_quantizing_explicit_zeros(fmt, group, x):
    q = quantize_weight(x, fmt, group)
    assert q.k == x.shape[1] and q.k_pad % group == 0 and q.k_pad - q.k < group
    explicit = quantize_weight(torch.nn.functional.pad(x, (0, q.k_pad - q.k)), fmt, group)
    assert torch.equal(q.codes, explicit.codes)
    assert torch.equal(q.scales.float(), explicit.scales.float())
