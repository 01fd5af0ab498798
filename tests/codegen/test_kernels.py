"""Every generated kernel against its reference op, under the Triton interpreter (TRITON_INTERPRET semantics
on the CPU): codes and scales bit for bit, 16-bit outputs within rounding, for every format and epilogue, with
ragged M (token counts that are not a multiple of the tile), ragged N and K that needs padding.

The cases parametrized by `device` also run compiled on a GPU (`-m gpu`): there the int4 GEMM and kernel W
unpack nibbles with inline PTX and Triton picks tensor-core instructions, which only a GPU can check. One test
body serves both, so the GPU run cannot drift from the cases CI keeps running.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import svdq_compiler.ops  # noqa: F401  (the reference ops)
from svdq_compiler import quant
from svdq_compiler.codegen import launch
from svdq_compiler.codegen.fused_ops import apply_epilogue, reference_gemm, reference_weight_only_linear
from svdq_compiler.codegen.layout import pack_weight, unpack_act, unpack_weight
from svdq_compiler.codegen.spec import ActQuant, Epilogue, GemmSpec, QuantizeNext, QuantizeSpec, WeightOnlySpec
from torch.utils._pytree import tree_map

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy sigmoid of -inf-ish
ops = torch.ops.svdq
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _on(device, values):
    """`values` (tensors, or tuples and lists of them) moved to `device`."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, values)
GROUP = {"int4": 64, "uint4": 64, "nvfp4": 16, "int8": 0, "uint8": 0}
SHIFT = {"uint4": 0.171875, "uint8": 0.171875}
SIGNED_WEIGHT = {"uint4": "int4", "uint8": "int8"}


def _format(label):
    """A case's format and group: "int8/g64" names a group, a bare format its default (GROUP)."""
    fmt, _, group = label.partition("/g")
    return fmt, int(group) if group else GROUP[fmt]


def _x(shape, fmt, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * 2
    if fmt in SHIFT:  # post-GELU inputs, as the shifted unsigned formats expect
        x = F.gelu(x, approximate="tanh")
    x[..., 3] = 0.0  # an exactly-zero channel, and one all-zero row below: the scale-1 rule
    if x.numel() >= 2 * shape[-1]:
        x.view(-1, shape[-1])[1] = 0.0
    return x.to(dtype)


def _smooth(k, dtype, seed):
    return (torch.rand(k, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(dtype)


def _weight(label, n, k, dtype, seed):
    fmt, group = _format(label)
    gen = torch.Generator().manual_seed(seed + 2)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    return pack_weight(quant.quantize_weight(weight, SIGNED_WEIGHT.get(fmt, fmt), group))


def _close(actual, expected, rel=4e-3):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    assert error < rel, f"relative error {error:.2e}"
    scale = expected.float().abs().max().clamp_min(1e-6)
    assert (actual.float() - expected.float()).abs().max() <= 0.03 * scale


# ---- kernel A ----------------------------------------------------------------------------------------------

QUANTIZE_CASES = [
    # fmt, lead dims, K, rank, smooth, dtype, K fixed in the spec
    ("int4", (3, 11), 128, 32, True, torch.bfloat16, True),
    ("int4", (33,), 100, 16, True, torch.float16, False),  # K padded to 128, fp16, rank < 16 padded lanes
    ("uint4", (2, 17), 100, 32, True, torch.bfloat16, True),  # shift must not leak into the padding
    ("uint4", (5,), 64, 0, True, torch.float16, False),
    ("nvfp4", (3, 11), 80, 32, True, torch.bfloat16, True),
    ("nvfp4", (33,), 40, 0, False, torch.float32, False),
    ("int8", (3, 11), 100, 32, True, torch.bfloat16, True),
    ("int8", (20,), 72, 8, False, torch.float16, False),
    ("int8/g64", (3, 11), 100, 32, True, torch.bfloat16, True),  # K padded to 128
    ("int8/g32", (33,), 96, 0, False, torch.float32, False),
    ("uint8", (3, 11), 100, 32, True, torch.bfloat16, True),
    ("uint8/g64", (2, 17), 100, 16, True, torch.bfloat16, False),  # K padded: the shift stays out of the padding
]


def kernel_a_case(label, lead, k, rank, smooth, dtype, fixed_k, seed):
    """One kernel A case's operands: input, smoothing, down projection, spec and nvfp4's tensor scale."""
    fmt, group = _format(label)
    x = _x((*lead, k), fmt, dtype, seed)
    lam = _smooth(k, dtype, seed) if smooth else None
    lora_down = (torch.randn(rank, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5).to(dtype) \
        if rank else None
    shift = SHIFT.get(fmt, 0.0)
    spec = QuantizeSpec(ActQuant(fmt, group, shift, smooth=smooth), rank, str(dtype).split(".")[1],
                        k=k if fixed_k else None)
    return x, lam, lora_down, shift, spec, quant.act_tensor_scale(x, fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, lead, k, rank, smooth, dtype, fixed_k", QUANTIZE_CASES)
def test_kernel_a_matches_quantize_act_and_the_down_projection(fmt, lead, k, rank, smooth, dtype, fixed_k, device):
    x, lam, lora_down, shift, spec, act_scale = kernel_a_case(fmt, lead, k, rank, smooth, dtype, fixed_k,
                                                              hash((fmt, k, rank)) % 1000)
    codes, scales, down = _on("cpu", launch.quantize_lora_down(*_on(device, (x, lam, lora_down)), spec,
                                                               _on(device, act_scale)))
    ref_codes, ref_scales = ops.quantize_act(x, lam, shift, spec.quant.fmt, spec.quant.group_size, act_scale)
    assert torch.equal(codes, ref_codes)
    assert scales.dtype == ref_scales.dtype and torch.equal(scales, ref_scales)
    assert down.shape == (*lead, rank)
    if rank:
        branch_input = x if lam is None else x / lam.to(dtype)
        _close(down, F.linear(branch_input, lora_down), rel=2e-3)


# ---- kernel B ----------------------------------------------------------------------------------------------


def _branch_bias_and_epilogue_operands(lead, n, rank, bias, dtype, epilogue, gen):
    """The low-rank down output and up weight, the bias and the epilogue's operands of a fused GEMM case."""
    down = torch.randn((*lead, rank), generator=gen).to(dtype) if rank else None
    lora_up = (torch.randn(n, rank, generator=gen) / 8).to(dtype) if rank else None
    bias_t = torch.randn(n, generator=gen).to(dtype) if bias else None
    operands = []
    for step in epilogue:
        if step.kind == "mul":  # a per-sample gate broadcast over the tokens
            operands.append(torch.randn((lead[0], *([1] * (len(lead) - 1)), n), generator=gen).to(dtype))
        elif step.kind == "add":  # a full residual
            operands.append(torch.randn((*lead, n), generator=gen).to(dtype))
    return down, lora_up, bias_t, operands


def _gemm_case(label, lead, k, n, rank, bias, dtype, epilogue=(), seed=0, magnitude=1.0):
    """spec, the op's arguments up to the epilogue operands, and nvfp4's per-tensor activation scale."""
    fmt, group = _format(label)
    x = _x((*lead, k), fmt, dtype, seed) * magnitude
    lam = _smooth(k, dtype, seed)
    shift = SHIFT.get(fmt, 0.0)
    act_scale = quant.act_tensor_scale(x, fmt)
    codes, scales = ops.quantize_act(x, lam, shift, fmt, group, act_scale)
    weight = _weight(label, n, k, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    down, lora_up, bias_t, operands = _branch_bias_and_epilogue_operands(lead, n, rank, bias, dtype, epilogue, gen)
    spec = GemmSpec(fmt, group, rank, bias, str(dtype).split(".")[1], k=k, n=n, epilogue=tuple(epilogue))
    args = (codes, scales, weight.qweight, weight.wscales, weight.wtscale, down, lora_up, bias_t, operands)
    return spec, args, act_scale


GEMM_CASES = [
    # fmt, lead, K, N, rank, bias, dtype
    ("int4", (3, 11), 128, 64, 32, True, torch.bfloat16),
    ("int4", (33,), 100, 40, 16, False, torch.float16),  # ragged M, N and padded K
    ("uint4", (2, 17), 192, 48, 32, True, torch.bfloat16),
    ("nvfp4", (3, 11), 80, 64, 32, True, torch.bfloat16),
    ("nvfp4", (33,), 48, 24, 0, True, torch.float16),
    ("int8", (3, 11), 100, 40, 32, True, torch.bfloat16),
    ("int8", (33,), 64, 64, 0, False, torch.float32),
    ("int8/g64", (3, 11), 100, 40, 32, True, torch.bfloat16),  # K padded to 128
    ("int8/g128", (33,), 256, 64, 0, False, torch.float32),
    ("int8/g32", (2, 17), 96, 48, 16, True, torch.float16),
    ("uint8", (3, 11), 100, 40, 32, True, torch.bfloat16),
    ("uint8/g64", (3, 11), 100, 40, 32, True, torch.bfloat16),
    ("uint8/g128", (33,), 256, 64, 0, False, torch.float32),  # the largest partial: 255·128·128 < 2^22
]


FLUX_WIDTH_GEMMS = [  # compiled only: too slow for the interpreter
    pytest.param("int4", (2, 256), 3072, 512, 32, True, torch.bfloat16, "cuda", marks=pytest.mark.gpu),
    pytest.param("uint4", (1, 300), 3072, 384, 32, True, torch.bfloat16, "cuda", marks=pytest.mark.gpu),  # ragged M
    pytest.param("int4", (130,), 3072, 200, 0, False, torch.float16, "cuda", marks=pytest.mark.gpu),  # ragged N
]


@pytest.mark.parametrize("fmt, lead, k, n, rank, bias, dtype, device",
                         [pytest.param(*case, "cpu") for case in GEMM_CASES]
                         + [pytest.param(*case, "cuda", marks=pytest.mark.gpu) for case in GEMM_CASES]
                         + FLUX_WIDTH_GEMMS)
def test_kernel_b_matches_the_lowered_gemm_branch_and_bias(fmt, lead, k, n, rank, bias, dtype, device):
    spec, args, act_scale = _gemm_case(fmt, lead, k, n, rank, bias, dtype, seed=k + n)
    (y,) = _on("cpu", launch.gemm(*_on(device, (*args, None, None)), spec, _on(device, act_scale)))
    (expected,) = reference_gemm(*args, None, None, spec, act_scale)
    _close(y, expected)


@pytest.mark.parametrize("magnitude", [1e4, 1e9])
def test_nvfp4_kernels_keep_large_activations_under_their_tensor_scale(magnitude):
    """Activations of 1e4 and 1e9 (fp32 model): kernel A's codes and scales equal the reference op's bit for bit
    under the per-tensor scale, kernel B equals the reference GEMM, and nothing saturates at 6·448 = 2688."""
    k, n = 48, 32
    x = _x((2, 9, k), "nvfp4", torch.float32, seed=3) * magnitude
    spec = QuantizeSpec(ActQuant("nvfp4", 16, smooth=False), 0, "float32", k=k)
    act_scale = quant.act_tensor_scale(x, "nvfp4")
    codes, scales, _ = launch.quantize_lora_down(x, None, None, spec, act_scale)
    ref_codes, ref_scales = ops.quantize_act(x, None, 0.0, "nvfp4", 16, act_scale)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    values = quant.dequantize(unpack_act(codes, scales, "nvfp4", 16, k, torch.float32, act_scale))
    # the largest value lands on the top grid point 6·448·t (the old one-level scale capped it at 2688)
    assert values.abs().max().item() == pytest.approx(x.abs().max().item(), rel=1e-6)
    assert (values - x).norm() / x.norm() < 0.1  # E2M1's rounding, no clipping

    weight = _weight("nvfp4", n, k, torch.float32, seed=3)
    gemm = GemmSpec("nvfp4", 16, 0, False, "float32", k=k, n=n)
    args = (codes, scales, weight.qweight, weight.wscales, weight.wtscale, None, None, None, [])
    (y,) = launch.gemm(*args, None, None, gemm, act_scale)
    (expected,) = reference_gemm(*args, None, None, gemm, act_scale)
    _close(y, expected)
    exact = x @ quant.dequantize(unpack_weight(weight)).T
    assert (y - exact).norm() / exact.norm() < 0.2


EPILOGUES = [
    (Epilogue("gelu_tanh"),),
    (Epilogue("gelu_erf"),),
    (Epilogue("silu"), Epilogue("mul")),
    (Epilogue("mul"), Epilogue("add")),  # FLUX: residual + gate ⊙ attention output
    (Epilogue("mul_scalar", 0.5), Epilogue("add_scalar", 1.0), Epilogue("gelu_tanh")),
]


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(s.kind for s in e))
def test_every_epilogue_matches_the_aten_chain(epilogue):
    spec, args, _ = _gemm_case("int4", (2, 17), 128, 40, 32, True, torch.bfloat16, epilogue, seed=len(epilogue))
    (y,) = launch.gemm(*args, None, None, spec)
    (expected,) = reference_gemm(*args, None, None, spec)
    _close(y, expected)


def test_epilogue_operands_with_any_broadcast_and_strides():
    spec, args, _ = _gemm_case("int4", (2, 3, 5), 64, 32, 0, False, torch.bfloat16,
                            (Epilogue("mul"), Epilogue("add"), Epilogue("mul")), seed=7)
    gen = torch.Generator().manual_seed(11)
    gate = torch.randn(2, 1, 1, 32, generator=gen).to(torch.bfloat16)  # broadcast over two row levels
    residual = torch.randn(32, 5, 3, 2, generator=gen).to(torch.bfloat16).permute(3, 2, 1, 0)  # strided
    per_token = torch.randn(3, 5, 1, generator=gen).to(torch.bfloat16)  # one value per token, three row levels
    args = (*args[:-1], [gate, residual, per_token])
    (y,) = launch.gemm(*args, None, None, spec)
    (expected,) = reference_gemm(*args, None, None, spec)
    _close(y, expected)


@pytest.mark.parametrize("next_label", ["uint4", "int4", "nvfp4", "int8/g64", "uint8/g64"])
@pytest.mark.parametrize("emit", [False, True])
def test_quantize_next_epilogue_codes_equal_quantize_act_of_the_output(next_label, emit):
    next_fmt, next_group = _format(next_label)
    n, next_rank = 100, 16  # the next layer's K = 100 pads to a whole group
    spec, args, _ = _gemm_case("int4", (33,), 64, n, 32, True, torch.bfloat16, (Epilogue("gelu_tanh"),), seed=5)
    next_smooth = _smooth(n, torch.bfloat16, 9)
    next_down = (torch.randn(next_rank, n, generator=torch.Generator().manual_seed(4)) / 10).to(torch.bfloat16)
    shift = SHIFT.get(next_fmt, 0.0)
    fused = GemmSpec(**{**spec.__dict__, "quantize_next": QuantizeNext(ActQuant(next_fmt, next_group, shift),
                                                                          rank=next_rank, emit_output=emit)})
    next_scale = quant.nvfp4_act_scale(7.0) if next_fmt == "nvfp4" else None  # a calibrated scale
    outputs = launch.gemm(*args, next_smooth, next_down, fused, None, next_scale)
    (y,) = launch.gemm(*args, None, None, spec)  # the same kernel without the quantize epilogue
    assert len(outputs) == 3 + emit
    if emit:
        assert torch.equal(outputs[0], y)
    codes, scales, down = outputs[emit:]
    ref_codes, ref_scales = ops.quantize_act(y, next_smooth, shift, next_fmt, next_group, next_scale)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    _close(down, F.linear(y / next_smooth, next_down), rel=2e-3)
    # and the whole fused op stays close to the reference composition
    expected = reference_gemm(*args, next_smooth, next_down, fused, None, next_scale)
    _close(outputs[-1], expected[-1], rel=2e-2)


def test_zero_rows_produce_empty_outputs():
    spec, args, _ = _gemm_case("int4", (0,), 64, 32, 16, True, torch.bfloat16)
    (y,) = launch.gemm(*args, None, None, spec)
    assert y.shape == (0, 32)


def test_mismatched_operands_are_clear_errors():
    spec, args, _ = _gemm_case("int4", (4,), 64, 32, 16, True, torch.bfloat16)
    with pytest.raises(launch.KernelInputError, match=r"bias has shape \(31,\), expected \(32,\)"):
        launch.gemm(*args[:7], args[7][:31], args[8], None, None, spec)
    with pytest.raises(launch.KernelInputError, match="down is required by this spec"):
        launch.gemm(*args[:5], None, *args[6:], None, None, spec)
    with pytest.raises(launch.KernelInputError, match="the spec has no use for it"):
        launch.gemm(*args, torch.ones(32, dtype=torch.bfloat16), None, spec)
    quantize = QuantizeSpec(ActQuant("int4", 64), 0, "bfloat16", k=128)
    with pytest.raises(launch.KernelInputError, match="generated for K = 128"):
        launch.quantize_lora_down(torch.zeros(4, 64, dtype=torch.bfloat16), torch.ones(64), None, quantize)
    with pytest.raises(launch.KernelInputError, match="dtype torch.float16, expected torch.bfloat16"):
        launch.quantize_lora_down(torch.zeros(4, 128, dtype=torch.float16), torch.ones(128), None, quantize)


# ---- kernel W (W4A16) --------------------------------------------------------------------------------------


def _weight_only_case(fmt, lead, k, n, rank, bias, dtype, epilogue=(), group=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn((*lead, k), generator=gen) * 2).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    weight[:, :group] = 0.0  # an all-zero group: scale 1, codes 0
    packed = pack_weight(quant.quantize_weight(weight, fmt, group))
    down, lora_up, bias_t, operands = _branch_bias_and_epilogue_operands(lead, n, rank, bias, dtype, epilogue, gen)
    spec = WeightOnlySpec(fmt, group, rank, bias, str(dtype).split(".")[1], k=k, n=n, epilogue=tuple(epilogue))
    return spec, (x, packed.qweight, packed.wscales, down, lora_up, bias_t, operands)


WEIGHT_ONLY_CASES = [
    # fmt, lead, K, N, rank, bias, dtype, group
    ("nf4", (3, 11), 128, 64, 0, True, torch.bfloat16, 64),
    ("nf4", (33,), 100, 40, 16, False, torch.float16, 64),  # ragged M and N, K padded to 128
    ("int4", (2, 17), 192, 48, 0, True, torch.bfloat16, 64),  # three groups: a step holds one past the end
    ("int4", (5,), 256, 72, 32, True, torch.float32, 128),
    ("int4", (4,), 128, 40, 16, True, torch.float16, 64),  # fp16's exponent construction, ragged N
    ("nf4", (1,), 320, 96, 0, True, torch.bfloat16, 32),  # one row, as a modulation layer at batch 1
    # 64-row tiles over whole 64-column tiles: the scales of two columns are loaded as one int32
    ("int4", (80,), 192, 64, 0, True, torch.bfloat16, 64),
    ("nf4", (70,), 128, 128, 16, False, torch.float16, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, lead, k, n, rank, bias, dtype, group", WEIGHT_ONLY_CASES)
def test_kernel_w_matches_the_weight_only_reference(fmt, lead, k, n, rank, bias, dtype, group, device):
    spec, args = _weight_only_case(fmt, lead, k, n, rank, bias, dtype, group=group, seed=k + n)
    y = _on("cpu", launch.weight_only_linear(*_on(device, args), spec))
    _close(y, reference_weight_only_linear(*args, spec), rel=2e-3)
    if not rank:  # the dequantized weight path alone: the reference op itself
        x, codes, scales, _, _, bias_t, _ = args
        _close(y, ops.weight_only_linear(x, codes, scales, bias_t, fmt, group), rel=2e-3)


def int4_identity_case(dtype, n=48):
    """x = I and int4 weights holding every code, with products code × scale that need rounding: y = x·Wᵀ is then
    kernel W's dequantized weight (each output is one weight times 1, the sums add zeros), which must equal the
    reference dequantization bit for bit. Returns x, packed codes, scales, spec and that reference [N, K]."""
    k = 128
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(n, k, generator=gen) * torch.exp2(torch.randint(-12, 8, (n, 1), generator=gen).float())
    q = quant.quantize_weight(weight.to(dtype), "int4", 64)
    codes = q.codes.clone()
    codes[:, 5] = -8  # the quantizer stops at -7; imported checkpoints may hold -8
    q = dataclasses.replace(q, codes=codes)
    assert set(q.codes.unique().tolist()) == set(range(-8, 8))
    reference = quant.dequantize(q)
    exact = q.codes.float().unflatten(-1, (2, 64)) * q.scales.float().unsqueeze(-1)
    assert not torch.equal(exact.flatten(-2), reference.float())  # some products round
    packed = pack_weight(q)
    spec = WeightOnlySpec("int4", 64, 0, False, str(dtype).split(".")[1], k=k, n=n)
    return torch.eye(k, dtype=dtype), packed.qweight, packed.wscales, spec, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [48, 64])  # 64: whole column tiles, the scales loaded two columns to an int32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_w_int4_dequantizes_bit_for_bit(dtype, n, device):
    """The 16-bit path (`scaled_nibbles`: the exponent construction the compiled PTX also uses)."""
    x, codes, scales, spec, reference = int4_identity_case(dtype, n)
    y = _on("cpu", launch.weight_only_linear(*_on(device, (x, codes, scales)), None, None, None, [], spec))
    assert torch.equal(y.t().view(torch.int16), reference.view(torch.int16))


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(s.kind for s in e))
def test_kernel_w_epilogues_match_the_aten_chain(epilogue):
    spec, args = _weight_only_case("nf4", (2, 17), 128, 40, 16, True, torch.bfloat16, epilogue,
                                   seed=len(epilogue))
    y = launch.weight_only_linear(*args, spec)
    reference = reference_weight_only_linear(*args, spec)
    _close(y, reference, rel=1e-2)
    # the reference rounds to bf16 after every step, the kernel once: it must be the closer of the two to the
    # exact (fp64) composition of the same dequantized weight
    x, codes, scales, down, lora_up, bias, operands = args
    weight = ops.weight_only_linear(torch.eye(128, dtype=torch.float64).to(x.dtype), codes, scales, None, "nf4", 64)
    exact = F.linear(x.double(), weight.double().t(), bias.double()) + F.linear(down.double(), lora_up.double())
    exact = apply_epilogue(exact, spec.epilogue, [t.double() for t in operands])
    assert (y.double() - exact).norm() <= (reference.double() - exact).norm()


def test_kernel_w_zero_rows_and_clear_errors():
    spec, args = _weight_only_case("int4", (0,), 64, 32, 0, True, torch.bfloat16)
    assert launch.weight_only_linear(*args, spec).shape == (0, 32)
    spec, args = _weight_only_case("int4", (4,), 64, 32, 0, True, torch.bfloat16)
    x, codes, scales, down, lora_up, bias, operands = args
    with pytest.raises(launch.KernelInputError, match=r"w_scales has shape \(1, 31\), expected \(1, 32\)"):
        launch.weight_only_linear(x, codes, scales[:, :31], down, lora_up, bias, operands, spec)
    with pytest.raises(launch.KernelInputError, match="dtype torch.float16, expected torch.bfloat16"):
        launch.weight_only_linear(x.half(), codes, scales, down, lora_up, bias, operands, spec)
    with pytest.raises(launch.KernelInputError, match="down was given, but the spec has no use for it"):
        launch.weight_only_linear(x, codes, scales, x[:, :4], None, bias, operands, spec)
