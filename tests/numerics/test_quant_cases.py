"""Exact codes and scales of the quantizers on hand-computed cases."""

import pytest
import torch

from svdq_compiler.errors import QuantizationError
from svdq_compiler.quant import (NF4_CODEBOOK, QTensor, code_values, dequantize, fake_quantize_act, nvfp4_act_scale,
                                 fake_quantize_act_values, fake_quantize_weight, quantize_act, quantize_weight,
                                 round_e4m3)

SUB = 2.0 ** -9  # the smallest FP8-E4M3 subnormal


def row(values, width, dtype=torch.float32):
    """A [1, width] tensor starting with `values`, zero elsewhere."""
    out = torch.zeros(1, width, dtype=dtype)
    out[0, : len(values)] = torch.tensor(values, dtype=dtype)
    return out


# ---- int4 / uint4 --------------------------------------------------------------------------------------------


def test_int4_rounds_half_to_even_with_scale_absmax_over_7():
    w = row([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, 0.49], 64, torch.bfloat16)
    q = quantize_weight(w, "int4", 64)
    assert q.scales.dtype == torch.bfloat16 and q.scales.tolist() == [[1.0]]
    assert q.codes.dtype == torch.int8
    assert q.codes[0, :11].tolist() == [7, 0, 2, 2, 0, -2, -2, 4, -4, 6, 0]
    assert q.codes[0, 11:].abs().sum() == 0


def test_int4_scale_is_rounded_to_the_model_dtype_before_dividing():
    # bf16(7.1) = 7.09375 and 7.09375/7 = 1.01339 → bf16 1.015625; then 7.09375/1.015625 = 6.98 → 7 and
    # bf16(3.55)/1.015625 = 3.546875/1.015625 = 3.49 → 3.
    w = row([7.1, 3.55], 64, torch.bfloat16)
    q = quantize_weight(w, "int4", 64)
    assert q.scales.item() == 1.015625
    assert q.codes[0, :2].tolist() == [7, 3]
    fp32 = quantize_weight(w.float(), "int4", 64)
    assert fp32.scales.dtype == torch.float32 and fp32.scales.item() == pytest.approx(w[0, 0].item() / 7)


def test_int4_zero_group_gets_scale_one_and_zero_codes():
    w = torch.zeros(2, 128)
    w[1, 64:] = torch.linspace(-1, 1, 64)
    q = quantize_weight(w, "int4", 64)
    assert q.scales[0].tolist() == [1.0, 1.0] and q.scales[1, 0] == 1.0
    assert q.scales[1, 1].item() == pytest.approx(1 / 7)
    assert q.codes[0].abs().sum() == 0 and q.codes[1, :64].abs().sum() == 0
    assert torch.equal(dequantize(q)[0], torch.zeros(128))


def test_int4_activations_are_per_token_and_group():
    x = torch.zeros(2, 3, 128)
    x[0, 1, :64] = 14.0
    x[1, 2, 64] = -0.7
    q = quantize_act(x, "int4", 64)
    assert q.scales.shape == (2, 3, 2)
    assert q.scales[0, 1, 0] == 2.0 and q.scales[1, 2, 1].item() == pytest.approx(0.1)
    assert (q.scales.flatten() == 1).sum() == 10  # the other groups are all zero
    assert q.codes[0, 1, :64].eq(7).all() and q.codes[1, 2, 64] == -7


def test_uint4_uses_max_over_15_and_clamps_negatives_to_zero():
    x = row([15.0, 7.5, 8.5, 0.5, 1.5, -0.2], 64, torch.float16)
    q = quantize_act(x, "int4", 64, unsigned=True)
    assert q.fmt == "uint4" and q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float16
    assert q.scales.item() == 1.0
    assert q.codes[0, :6].tolist() == [15, 8, 8, 0, 2, 0]
    assert quantize_act(x, "uint4", 64).codes.tolist() == q.codes.tolist()


def test_k_not_divisible_by_the_group_is_zero_padded():
    w = torch.arange(1.0, 101.0).reshape(1, 100)
    q = quantize_weight(w, "int4", 64)
    assert q.codes.shape == (1, 128) and q.k == 100 and q.k_pad == 128 and q.shape == (1, 100)
    assert q.codes[0, 100:].abs().sum() == 0
    assert q.scales[0, 1].item() == pytest.approx(100 / 7)  # from the 36 real values only
    padded = torch.nn.functional.pad(w, (0, 28))
    assert torch.equal(quantize_weight(padded, "int4", 64).codes, q.codes)
    assert dequantize(q).shape == (1, 100)
    assert fake_quantize_weight(w, "int4", 64).shape == (1, 100)


# ---- int8 --------------------------------------------------------------------------------------------------


def test_int8_per_channel_weights_and_per_token_activations():
    w = torch.tensor([[127.0, 63.5, -63.5, 0.5, 1.5], [0.0, 0.0, 0.0, 0.0, 0.0], [2.54, 0.0, 0.0, 0.0, 0.0]])
    q = quantize_weight(w, "int8", 0)
    assert q.group_size == 5 and q.k_pad == 5 and q.scales.shape == (3, 1) and q.scales.dtype == torch.float32
    assert q.scales[:, 0].tolist() == pytest.approx([1.0, 1.0, 0.02])
    assert q.codes.tolist() == [[127, 64, -64, 0, 2], [0] * 5, [127, 0, 0, 0, 0]]
    x = torch.tensor([[[254.0, -1.0]]], dtype=torch.bfloat16)
    qa = quantize_act(x, "int8", 0)
    assert qa.scales.dtype == torch.float32 and qa.scales.tolist() == [[[2.0]]]
    assert qa.codes.tolist() == [[[127, 0]]]  # -0.5 rounds to even


# ---- nvfp4 -------------------------------------------------------------------------------------------------


ONE = torch.tensor(1.0)  # a per-tensor scale of 1: the group scales below are the E4M3 values themselves

E2M1_TIES = [(0.25, 1, 0.5), (0.75, 2, 1.0), (1.25, 3, 1.5), (1.75, 4, 2.0), (2.5, 5, 3.0), (3.5, 6, 4.0),
             (5.0, 7, 6.0), (-0.25, 0, 0.0), (-0.75, 9, -0.5), (-1.75, 11, -1.5), (-2.5, 12, -2.0),
             (-5.0, 14, -4.0)]


@pytest.mark.parametrize("value,code,dequant", E2M1_TIES)
def test_e2m1_exact_ties_go_to_the_larger_neighbour(value, code, dequant):
    x = row([6.0, value], 16)  # absmax 6 → scale exactly 1
    q = quantize_act(x, "nvfp4", 16, tensor_scale=ONE)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.float().item() == 1.0
    assert q.codes[0, 1].item() == code
    assert dequantize(q)[0, 1].item() == dequant


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_e2m1_rounding_by_arithmetic_is_the_nearest_grid_value_on_a_dense_sweep(dtype):
    from svdq_compiler.quant import _nearest, _nearest_e2m1, _sorted_grid

    sweep = torch.linspace(-7, 7, 28001, dtype=dtype)  # step 5e-4: every tie and binade edge, and between them
    edges = torch.tensor([2.0, 4.0, 6.0, 0.25, 5.0], dtype=dtype)
    just_below = torch.nextafter(edges, torch.zeros_like(edges))
    values = torch.cat([sweep, edges, -edges, just_below, -just_below])
    expected = _sorted_grid("nvfp4", "cpu", dtype)[_nearest(values, "nvfp4")]
    assert torch.equal(_nearest_e2m1(values), expected)
    assert _nearest_e2m1(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


def test_e2m1_codes_sign_bit_and_grid():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = torch.tensor([grid + [-v for v in grid[1:]] + [0.3]])
    q = quantize_act(x, "nvfp4", 16, tensor_scale=ONE)
    assert q.codes[0].tolist() == list(range(8)) + list(range(9, 16)) + [1]
    assert dequantize(q)[0, :15].tolist() == x[0, :15].tolist()


def test_e2m1_clamps_at_six_when_the_fp8_scale_rounds_down():
    # absmax/6 = 1.05 → E4M3 1.0, so 6.3/1 saturates at code 7 (6.0)
    x = row([6.3, -6.3, 3.0], 16)
    q = quantize_act(x, "nvfp4", 16, tensor_scale=ONE)
    assert q.scales.float().item() == 1.0
    assert q.codes[0, :3].tolist() == [7, 15, 5]
    assert dequantize(q)[0, :2].tolist() == [6.0, -6.0]


def test_nvfp4_group_scale_saturates_at_448_times_the_tensor_scale():
    x = row([3000.0, 448.0], 16)
    q = quantize_act(x, "nvfp4", 16, tensor_scale=ONE)
    assert q.scales.float().item() == 448.0
    assert q.codes[0, :2].tolist() == [7, 2]
    assert dequantize(q)[0, :2].tolist() == [2688.0, 448.0]  # 6·448·t with t = 1
    q = quantize_act(x, "nvfp4", 16, tensor_scale=torch.tensor(2.0))
    assert dequantize(q)[0, 0].item() == 3072.0  # room up to 6·448·2: 500/t = 250 → E4M3 256, 6·256·2


@pytest.mark.parametrize("magnitude", [1e4, 1e9])
def test_nvfp4_activations_of_any_magnitude_are_not_clipped(magnitude):
    # the dynamic per-tensor scale t = absmax/(6·448) puts the largest group's scale at 448 exactly
    x = row([magnitude, -magnitude / 2, magnitude / 3], 16)
    q = quantize_act(x, "nvfp4", 16)
    assert q.tensor_scale.dtype == torch.float32
    assert q.tensor_scale.item() == pytest.approx(magnitude / 2688, rel=1e-6)
    assert q.scales.float().max().item() == 448.0
    values = fake_quantize_act(x, "nvfp4", 16)[0, :3]
    torch.testing.assert_close(values, torch.tensor([magnitude, -magnitude / 2, magnitude / 3]), rtol=1e-6,
                               atol=0)  # E2M1 codes 6, −3 and 2 of a group scale of magnitude/6
    assert torch.equal(dequantize(q)[0, :3], values)


def test_nvfp4_calibrated_tensor_scale_covers_its_headroom_then_saturates():
    t = nvfp4_act_scale(100.0, headroom=4.0)  # calibrated absmax 100, ×4 headroom: 6·448·t = 400
    assert t.dtype == torch.float32 and t.item() == pytest.approx(400 / 2688, rel=1e-7)
    inside, beyond = row([380.0], 16), row([1000.0], 16)
    assert fake_quantize_act(inside, "nvfp4", 16, tensor_scale=t)[0, 0].item() == pytest.approx(380.0, rel=0.1)
    assert fake_quantize_act(beyond, "nvfp4", 16, tensor_scale=t)[0, 0].item() == pytest.approx(400.0, rel=1e-6)
    assert nvfp4_act_scale(0.0).item() == 1.0  # an input that was all zeros in calibration


def test_nvfp4_weights_use_a_tensor_scale_and_fp8_group_scales():
    w = torch.zeros(2, 32, dtype=torch.bfloat16)
    w[0, 0] = 2688.0  # absmax: s0 = 2688/(6·448) = 1
    w[0, 16] = 6.0  # group scale 1
    w[1, 0] = 4.5  # group scale 0.75
    w[1, 1] = -1.5  # 1.5/0.75 = 2 → code 4 | sign
    q = quantize_weight(w, "nvfp4", 16)
    assert q.tensor_scale.dtype == torch.bfloat16 and q.tensor_scale.item() == 1.0
    assert q.scales.float().tolist() == [[448.0, 1.0], [0.75, 1.0]]
    assert q.codes[0, 0] == 7 and q.codes[0, 16] == 7 and q.codes[1, :2].tolist() == [7, 12]
    assert torch.equal(dequantize(q), w)


def test_nvfp4_weight_tensor_scale_rounding_saturates_group_scale_and_e2m1():
    # s0 = bf16(3072/2688 = 1.142857) = 1.140625 rounds down, so (3072/6)/s0 = 448.9 clamps to 448 and
    # 3072/(448·s0) = 6.01 clamps to 6: the value comes back as 6·448·s0 = 3066.
    w = row([3072.0, 511.0], 16, torch.bfloat16)
    q = quantize_weight(w, "nvfp4", 16)
    assert q.tensor_scale.item() == 1.140625
    assert q.scales.float().item() == 448.0
    assert q.codes[0, :2].tolist() == [7, 2]
    assert dequantize(q, torch.float32)[0, :2].tolist() == [3066.0, 511.0]


# ---- nf4 ---------------------------------------------------------------------------------------------------


def test_nf4_maps_codebook_values_to_their_index():
    w = torch.tensor([NF4_CODEBOOK], dtype=torch.float32)
    q = quantize_weight(w, "nf4", 16)
    assert q.codes.dtype == torch.uint8 and q.codes[0].tolist() == list(range(16))
    assert q.scales.item() == 1.0
    assert torch.allclose(dequantize(q), w)


def test_nf4_scale_is_absmax_and_midpoints_go_up():
    mid = (NF4_CODEBOOK[8] + NF4_CODEBOOK[9]) / 2
    w = row([-2.0, 2 * mid, 0.01, -0.01], 64, torch.float32)
    q = quantize_weight(w, "nf4", 64)
    assert q.scales.item() == 2.0
    assert q.codes[0, :4].tolist() == [0, 9, 7, 7]
    assert q.codes[0, 4:].eq(7).all()  # zero padding and zeros map to the exact 0 of the codebook


# ---- fake quantization equals dequantize ∘ quantize -------------------------------------------------------


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16), ("int8", 0), ("nf4", 64), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_weight_matches_dequantize(fmt, group, dtype):
    w = (torch.randn(24, 136, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    assert torch.equal(fake_quantize_weight(w, fmt, group), dequantize(quantize_weight(w, fmt, group)))


@pytest.mark.parametrize("fmt,group,unsigned", [("int4", 64, False), ("int4", 64, True), ("nvfp4", 16, False),
                                                ("int8", 0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_act_matches_dequantize(fmt, group, unsigned, dtype):
    x = (torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    if unsigned:
        x = x.abs()
    fake = fake_quantize_act(x, fmt, group, unsigned=unsigned)
    assert fake.dtype == dtype and fake.shape == x.shape
    assert torch.equal(fake, dequantize(quantize_act(x, fmt, group, unsigned=unsigned)))


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("uint4", 64), ("nvfp4", 16), ("int8", 0)])
def test_traceable_fake_quantizer_gives_code_times_scale_and_exports(fmt, group):
    x = (torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    if fmt == "uint4":
        x = x.abs()
    values = fake_quantize_act_values(x, fmt, group)
    q = quantize_act(x, fmt, group)
    assert values.dtype == torch.float32 and values.shape == (2, 5, q.k_pad)
    # code·scale in fp32, unrounded: exactly what a GEMM of the codes and scales multiplies
    scales = q.scales.float() if q.tensor_scale is None else q.scales.float() * q.tensor_scale  # nvfp4: two-level
    expected = (code_values(q.codes, fmt).unflatten(-1, (q.n_groups, -1)) * scales.unsqueeze(-1))
    assert torch.equal(values, expected.flatten(-2))
    assert torch.equal(values[..., :100].to(x.dtype), fake_quantize_act(x, fmt, group))

    class Quantize(torch.nn.Module):
        def forward(self, x):
            return fake_quantize_act_values(x, fmt, group)

    # no data-dependent check: torch.export records it with a symbolic token count
    program = torch.export.export(Quantize(), (x,), dynamic_shapes=({1: torch.export.Dim("tokens", max=64)},))
    other = (torch.randn(2, 9, 100, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16).abs()
    assert torch.equal(program.module()(other), fake_quantize_act_values(other, fmt, group))


# ---- bad input ---------------------------------------------------------------------------------------------


def test_non_finite_values_name_the_tensor():
    w = torch.ones(4, 64)
    w[2, 5] = float("nan")
    w[3, 7] = float("inf")
    with pytest.raises(QuantizationError, match=r"blocks\.0\.attn\.to_q\.weight has 2 non-finite"):
        quantize_weight(w, "int4", 64, name="blocks.0.attn.to_q.weight")
    x = torch.ones(2, 16)
    x[1, 1] = float("-inf")
    for fn in (quantize_act, fake_quantize_act):
        with pytest.raises(QuantizationError, match="ff.net.2 input"):
            fn(x, "nvfp4", 16, name="ff.net.2 input")


@pytest.mark.parametrize("make,fmt,group,message", [
    (lambda: torch.ones(4, 64, dtype=torch.int8), "int4", 64, "expected a float16, bfloat16, float32"),
    (lambda: torch.ones(4, 64).to_sparse(), "int4", 64, "dense"),
    (lambda: torch.ones(2, 4, 64), "int4", 64, "2-D weight"),
    (lambda: torch.ones(4, 64), "uint4", 64, "uint4 is for activations"),
    (lambda: torch.ones(4, 64), "int3", 64, "unknown weight format"),
    (lambda: torch.ones(4, 64), "nvfp4", 64, "groups of 16"),
    (lambda: torch.ones(4, 64), "int4", -1, "group size"),
    (lambda: torch.ones(4, 0), "int4", 64, "non-empty"),
])
def test_bad_weights_raise_clear_errors(make, fmt, group, message):
    with pytest.raises(QuantizationError, match=message):
        quantize_weight(make(), fmt, group)


def test_bad_activation_requests():
    x = torch.ones(3, 64)
    with pytest.raises(QuantizationError, match="weight-only"):
        quantize_act(x, "nf4", 64)
    with pytest.raises(QuantizationError, match="unsigned quantization exists only for int4"):
        quantize_act(x, "nvfp4", 16, unsigned=True)
    with pytest.raises(QuantizationError, match="torch.Tensor"):
        quantize_act(x.numpy(), "int4", 64)


def test_qtensor_checks_codes_and_scales():
    q = quantize_weight(torch.randn(4, 64), "int4", 64)
    with pytest.raises(QuantizationError, match="int4 codes must be torch.int8"):
        QTensor(q.codes.to(torch.uint8), q.scales, "int4", 64, 64, torch.float32)
    with pytest.raises(QuantizationError, match="scales have shape"):
        QTensor(q.codes, q.scales[:2], "int4", 64, 64, torch.float32)
    with pytest.raises(QuantizationError, match="do not fit group size"):
        QTensor(q.codes, q.scales, "int4", 48, 64, torch.float32)


# ---- GPTQ rounding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("int8", 64), ("int8", 0), ("nvfp4", 16), ("nf4", 64)])
def test_gptq_rounds_against_the_inputs_with_the_nearest_roundings_scales(fmt, group):
    """An identity Hessian (uncorrelated inputs of equal energy) leaves nothing to compensate: the codes are
    those of rounding to the nearest. Correlated inputs: the same scales, and a smaller output error on them.
    K = 200 is padded: the padding codes stand for 0."""
    torch.manual_seed(0)
    weight = torch.randn(48, 200)
    inputs = torch.randn(600, 200) @ torch.randn(200, 200) * 0.3 + torch.randn(600, 1)
    nearest = quantize_weight(weight, fmt, group)
    assert torch.equal(quantize_weight(weight, fmt, group, hessian=torch.eye(200)).codes, nearest.codes)
    gptq = quantize_weight(weight, fmt, group, hessian=inputs.T @ inputs)
    assert torch.equal(gptq.scales, nearest.scales) and gptq.codes.shape == nearest.codes.shape
    assert torch.equal(code_values(gptq.codes[:, 200:], fmt), torch.zeros(48, gptq.k_pad - 200))

    def output_error(q):
        return float(((weight - dequantize(q)) @ inputs.T).norm() / (weight @ inputs.T).norm())

    assert output_error(gptq) < 0.8 * output_error(nearest)


def test_gptq_refuses_a_hessian_damping_cannot_repair():
    with pytest.raises(QuantizationError, match="not positive definite"):
        quantize_weight(torch.randn(8, 64), "int8", 64, hessian=torch.full((64, 64), float("nan")))
