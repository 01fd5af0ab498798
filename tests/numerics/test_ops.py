"""Reference runtime ops torch.ops.svdq.*: numerics against the quantizers (conv2d against F.conv2d of the
dequantized operands), opcheck, export with symbolic tokens."""

import pytest
import torch
import torch.nn.functional as F

import svdq_compiler.ops  # noqa: F401  (registers torch.ops.svdq; the package itself loads nothing)
from svdq_compiler.codegen.layout import pack_act, pack_weight, unpack_act, unpack_weight
from svdq_compiler.conv import ConvGeometry
from svdq_compiler.errors import QuantizationError
from svdq_compiler.quant import QTensor, act_tensor_scale, dequantize, quantize_act, quantize_weight

svdq = torch.ops.svdq
BF16 = torch.bfloat16
FORMATS = [("int4", 64), ("uint4", 64), ("nvfp4", 16), ("int8", 0)]


def weight_format(fmt):
    return "int4" if fmt == "uint4" else fmt


def tensors(seed, *shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def activations(fmt, seed, *shape):
    x = tensors(seed, *shape)
    return x.abs() if fmt == "uint4" else x


# ---- svdq::quantize_act ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_quantize_act_divides_by_smooth_after_the_shift(fmt, group):
    x, k = activations(fmt, 1, 2, 5, 72), 72
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.5).to(BF16)
    shift = 0.171875 if fmt == "uint4" else 0.0
    scale = act_tensor_scale(x, fmt)
    codes, scales = svdq.quantize_act(x, smooth, shift, fmt, group, scale)
    expected = quantize_act(((x.float() + shift) / smooth.float()).to(BF16), fmt, group, tensor_scale=scale)
    got = unpack_act(codes, scales, fmt, group, k, BF16, scale)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(dequantize(got), dequantize(expected))
    assert codes.shape[:-1] == x.shape[:-1]


def test_quantize_act_names_non_finite_input():
    x = torch.ones(3, 64, dtype=BF16)
    x[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match="svdq::quantize_act input has 1 non-finite"):
        svdq.quantize_act(x, None, 0.0, "int4", 64)


# ---- svdq::gemm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("k", [64, 100, 272])
def test_gemm_equals_matmul_of_dequantized_operands(fmt, group, k):
    x, w = activations(fmt, k, 3, 4, k), tensors(k + 1, 24, k)
    scale = act_tensor_scale(x, fmt)
    codes, scales = svdq.quantize_act(x, None, 0.0, fmt, group, scale)
    packed = pack_weight(quantize_weight(w, weight_format(fmt), group))
    y = svdq.gemm(codes, scales, packed.qweight, packed.wscales, packed.wtscale, fmt, group, k, torch.float32, scale)
    a = dequantize(unpack_act(codes, scales, fmt, group, k, BF16, scale), torch.float64)
    b = dequantize(unpack_weight(packed), torch.float64)
    expected = a @ b.T
    assert y.shape == (3, 4, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_gemm_accumulates_each_group_exactly_before_scaling():
    # One group whose integer dot product is 7·7·64 = 3136 and another that cancels: exact in fp32.
    k = 128
    codes = torch.full((1, k), 7, dtype=torch.int8)
    codes[0, 64::2] = -7
    a = QTensor(codes, torch.tensor([[0.5, 1000.0]], dtype=BF16), "int4", 64, k, BF16)
    w = QTensor(torch.full((1, k), 7, dtype=torch.int8), torch.tensor([[2.0, 3.0]], dtype=BF16), "int4", 64, k, BF16)
    a_codes, a_scales = pack_act(a)
    pw = pack_weight(w)
    y = svdq.gemm(a_codes, a_scales, pw.qweight, pw.wscales, None, "int4", 64, k, torch.float32)
    assert y.item() == 3136 * 0.5 * 2.0


def test_gemm_applies_per_tensor_and_per_channel_tensor_scales():
    k, n = 32, 6
    x, w = tensors(5, 4, k), tensors(6, n, k)
    act_scale = torch.tensor(0.75)
    codes, scales = svdq.quantize_act(x, None, 0.0, "nvfp4", 16, act_scale)
    q = quantize_weight(w, "nvfp4", 16)
    packed = pack_weight(q)
    base = svdq.gemm(codes, scales, packed.qweight, packed.wscales, None, "nvfp4", 16, k, torch.float32, act_scale)
    per_tensor = svdq.gemm(codes, scales, packed.qweight, packed.wscales, packed.wtscale, "nvfp4", 16, k,
                           torch.float32, act_scale)
    torch.testing.assert_close(per_tensor, base * packed.wtscale, rtol=1e-6, atol=0)
    channel = torch.linspace(0.5, 2.0, n)
    per_channel = svdq.gemm(codes, scales, packed.qweight, packed.wscales, channel, "nvfp4", 16, k, torch.float32,
                            act_scale)
    torch.testing.assert_close(per_channel, base * channel, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad,message", [
    (dict(fmt="int3"), "unknown format 'int3'"),
    (dict(k=80), r"activation codes must be torch.uint8 \[\.\.\., 64\] for K=80"),
    (dict(w_scales="transposed"), r"group-major"),
    (dict(a_codes="int8"), "activation codes must be torch.uint8"),
])
def test_gemm_rejects_mismatched_operands(bad, message):
    k = 64
    codes, scales = svdq.quantize_act(tensors(1, 2, k), None, 0.0, "int4", 64)
    packed = pack_weight(quantize_weight(tensors(2, 8, k), "int4", 64))
    args = dict(a_codes=codes, a_scales=scales, w_codes=packed.qweight, w_scales=packed.wscales, w_tscale=None,
                fmt="int4", group_size=64, k=k, out_dtype=BF16)
    args.update(bad)
    if args["w_scales"] == "transposed":
        args["w_scales"] = packed.wscales.t()
    if isinstance(args["a_codes"], str):
        args["a_codes"] = codes.view(torch.int8)
    with pytest.raises(QuantizationError, match=message):
        svdq.gemm(**args)


# ---- svdq::linear ---------------------------------------------------------------------------------------------


def linear_case(fmt, group, seed=0, *, rank=8, k=96, n=40, with_smooth=True, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = activations(fmt, seed, 2, 7, k)
    smooth = (torch.rand(k, generator=gen) + 0.5).to(BF16) if with_smooth else None
    packed = pack_weight(quantize_weight(tensors(seed + 1, n, k), weight_format(fmt), group))
    lora_down = tensors(seed + 2, rank, k, scale=0.1) if rank else None
    lora_up = tensors(seed + 3, n, rank, scale=0.1) if rank else None
    bias = tensors(seed + 4, n) if with_bias else None
    shift = 0.171875 if fmt == "uint4" else 0.0
    return (x, smooth, packed.qweight, packed.wscales, packed.wtscale, lora_down, lora_up, bias, shift, fmt, group,
            act_tensor_scale(x, fmt))


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("rank,with_smooth,with_bias", [(8, True, True), (0, False, True), (16, False, False)])
def test_linear_equals_the_lowered_composition(fmt, group, rank, with_smooth, with_bias):
    args = linear_case(fmt, group, rank=rank, with_smooth=with_smooth, with_bias=with_bias)
    x, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, shift, _, _, act_scale = args
    codes, scales = svdq.quantize_act(x, smooth, shift, fmt, group, act_scale)
    acc = svdq.gemm(codes, scales, w_codes, w_scales, w_tscale, fmt, group, x.shape[-1], x.dtype, act_scale)
    if rank:
        down = F.linear(x / smooth if smooth is not None else x, lora_down)
        expected = acc + F.linear(down, lora_up, bias)
    else:
        expected = acc + bias if bias is not None else acc
    assert torch.equal(svdq.linear(*args), expected)


def test_shifted_linear_with_compensated_bias_reproduces_the_layer():
    # The contract of §7: with R̃ the dequantized residual and b' = b − shift·Σ_j R̃[:, j]/λ_j, the shifted
    # quantized path plus the unshifted branch computes the layer x/λ·(R̃ + L1·L2)ᵀ + b, up to the quantization
    # error of the (shifted, unsigned) activations.
    k, n, rank, shift = 128, 32, 8, 0.171875
    x = torch.nn.functional.gelu(tensors(10, 64, k, dtype=torch.float32)).to(BF16)
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(11)) + 0.5).to(BF16)
    q = quantize_weight(tensors(12, n, k), "int4", 64)
    r_tilde = dequantize(q, torch.float64)
    lora_down, lora_up, bias = tensors(13, rank, k, scale=0.1), tensors(14, n, rank, scale=0.1), tensors(15, n)
    compensated = (bias.double() - shift * (r_tilde / smooth.double()).sum(1)).to(BF16)
    packed = pack_weight(q)
    y = svdq.linear(x, smooth, packed.qweight, packed.wscales, None, lora_down, lora_up, compensated, shift,
                    "uint4", 64)
    xs = x.double() / smooth.double()
    branch = xs @ lora_down.double().T @ lora_up.double().T
    shifted = dequantize(quantize_act(((x.float() + shift) / smooth.float()).to(BF16), "int4", 64, unsigned=True),
                         torch.float64)
    as_documented = shifted @ r_tilde.T + branch + compensated.double()
    torch.testing.assert_close(y.double(), as_documented, rtol=2 ** -7, atol=2 ** -7 * as_documented.abs().max())
    layer = xs @ r_tilde.T + branch + bias.double()
    unshifted = svdq.linear(x, smooth, packed.qweight, packed.wscales, None, lora_down, lora_up, bias, 0.0, "int4",
                            64)
    error_uint4 = (y.double() - layer).norm() / layer.norm()
    error_int4 = (unshifted.double() - layer).norm() / layer.norm()
    assert error_uint4 < 0.1 and error_uint4 < 0.8 * error_int4  # the shift recovers GELU's wasted sign bit


def test_linear_rejects_a_mismatched_branch():
    args = list(linear_case("int4", 64))
    args[5] = args[5][:, :50]
    with pytest.raises(QuantizationError, match=r"lora_down \[r, 96\]"):
        svdq.linear(*args)


# ---- svdq::weight_only_linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nf4", 64), ("int8", 0), ("int4", 32)])
def test_weight_only_linear_is_a_linear_with_the_dequantized_weight(fmt, group):
    x, w, bias = tensors(1, 3, 5, 100), tensors(2, 20, 100), tensors(3, 20)
    q = quantize_weight(w, fmt, group)
    packed = pack_weight(q)
    y = svdq.weight_only_linear(x, packed.qweight, packed.wscales, bias, fmt, group)
    assert torch.equal(y, F.linear(x, dequantize(q), bias))
    assert (y.float() - F.linear(x, w, bias).float()).norm() / y.float().norm() < 0.2


# ---- svdq::conv2d ---------------------------------------------------------------------------------------------


def conv_case(fmt, group, seed, channels=20, stride=(1, 1)):
    """x [2, C, 6, 7] and a packed 3×3 weight in the tap-major im2col layout (svdq_compiler.conv)."""
    shift = 0.2734375 if fmt == "uint4" else 0.0
    x = tensors(seed, 2, channels, 6, 7)
    x = F.silu(x.float()).to(BF16) if shift else x
    padded = -(-channels // group) * group if group else channels
    geometry = ConvGeometry(channels, padded, (3, 3), stride, (1, 1), (1, 1))
    q = quantize_weight(geometry.matrix(tensors(seed + 1, 8, channels, 3, 3)), weight_format(fmt), group)
    packed = pack_weight(q)
    args = (x, packed.qweight, packed.wscales, packed.wtscale, tensors(seed + 2, 8), shift, fmt, group, [3, 3],
            list(stride), [1, 1], [1, 1], act_tensor_scale(x, fmt))
    return args, q, geometry


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_conv2d_is_the_conv_of_dequantized_operands(fmt, group):
    args, q, geometry = conv_case(fmt, group, seed=11, stride=(2, 1))
    x, shift, bias = args[0], args[5], args[4]
    pixels = quantize_act((x.float() + shift).to(BF16).movedim(1, -1), fmt, group, tensor_scale=args[12])
    values = dequantize(pixels, torch.float32) - shift
    weight = geometry.weight(dequantize(q, torch.float32))
    expected = F.conv2d(values.movedim(-1, 1), weight, bias.float(), (2, 1), (1, 1)).to(BF16)
    got = svdq.conv2d(*args)
    assert got.shape == (2, 8, 3, 7) and got.dtype == BF16
    assert torch.equal(got, expected)  # F.conv2d pads the shifted-back values with 0: the border is exact


def test_conv2d_refuses_a_weight_of_the_wrong_layout():
    args, _, _ = conv_case("int4", 64, seed=12)
    with pytest.raises(QuantizationError, match="svdq::conv2d weight"):
        svdq.conv2d(torch.cat([args[0]] * 4, dim=1), *args[1:])  # 80 channels: 9·128 columns, not 9·64


# ---- opcheck and export -------------------------------------------------------------------------------------


def opcheck_cases():
    for fmt, group in FORMATS:
        args = linear_case(fmt, group, seed=3, k=80, n=16)
        x, smooth, w_codes, w_scales, w_tscale, *_, act_scale = args
        codes, scales = svdq.quantize_act(x, smooth, args[8], fmt, group, act_scale)
        yield pytest.param(svdq.quantize_act.default, (x, smooth, args[8], fmt, group, act_scale),
                           id=f"quantize_act-{fmt}")
        yield pytest.param(svdq.gemm.default,
                           (codes, scales, w_codes, w_scales, w_tscale, fmt, group, 80, BF16, act_scale),
                           id=f"gemm-{fmt}")
        yield pytest.param(svdq.linear.default, args, id=f"linear-{fmt}")
    for fmt, group in FORMATS:
        yield pytest.param(svdq.conv2d.default, conv_case(fmt, group, seed=13)[0], id=f"conv2d-{fmt}")
    for fmt in ("int4", "nf4"):
        packed = pack_weight(quantize_weight(tensors(4, 16, 80), fmt, 64))
        yield pytest.param(svdq.weight_only_linear.default,
                           (tensors(5, 2, 3, 80), packed.qweight, packed.wscales, tensors(6, 16), fmt, 64),
                           id=f"weight_only_linear-{fmt}")


@pytest.mark.parametrize("op,args", list(opcheck_cases()))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


class QuantLinear(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        (_, smooth, w_codes, w_scales, w_tscale, lora_down, lora_up, bias, self.shift, self.fmt, self.group,
         act_scale) = args
        for name, value in dict(smooth=smooth, w_codes=w_codes, w_scales=w_scales, w_tscale=w_tscale,
                                lora_down=lora_down, lora_up=lora_up, bias=bias, act_scale=act_scale).items():
            self.register_buffer(name, value)

    def forward(self, x):
        y = svdq.linear(x, self.smooth, self.w_codes, self.w_scales, self.w_tscale, self.lora_down, self.lora_up,
                        self.bias, self.shift, self.fmt, self.group, self.act_scale)
        return torch.nn.functional.gelu(y)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16)])
def test_export_with_symbolic_token_count(fmt, group):
    args = linear_case(fmt, group, seed=8)
    module = QuantLinear(args)
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    ep = torch.export.export(module, (args[0],), dynamic_shapes=({1: tokens},), strict=False)
    (node,) = [n for n in ep.graph.nodes if n.target is svdq.linear.default]
    x_node = [n for n in ep.graph.nodes if n.op == "placeholder"][-1]
    assert isinstance(node.meta["val"].shape[1], torch.SymInt)
    assert str(node.meta["val"].shape[1]) == str(x_node.meta["val"].shape[1])
    other = activations(fmt, 9, 2, 33, 96)
    assert torch.equal(ep.module()(other), module(other))
