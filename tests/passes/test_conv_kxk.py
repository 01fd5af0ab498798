"""k×k convolutions under `conv_kxk` through annotate_linears → calibrate → quantize_weights → lower → fuse:
a tiny resnet-like conv net, Before → passes → Expected structure, plus numbers (the im2col simulation the
passes measure with equals the svdq.conv2d op the graph runs)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import by_name, prepared
from torch import nn

import svdq_compiler
from svdq_compiler import QuantConfig
from svdq_compiler.config import SILU_SHIFT
from svdq_compiler.conv import ConvGeometry
from svdq_compiler.errors import InputError
from svdq_compiler.fx_utils import CONV_OPS, is_op
from svdq_compiler.ir import Role
from svdq_compiler.quant import dequantize, fake_quantize_act

svdq = torch.ops.svdq
PASSES = ("annotate_linears", "calibrate", "smooth", "lowrank", "quantize_weights", "lower")


class ResNetish(nn.Module):
    """A stem conv on the input, a resnet block (GroupNorm → SiLU → conv 3×3, twice), a strided resnet conv, a
    depthwise conv (a sampler-like conv reading no SiLU) and a 1×1 head. C = 24 is no multiple of any group."""

    def __init__(self, channels=24):
        super().__init__()
        self.stem = nn.Conv2d(4, channels, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(4, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(4, channels), nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.sampler = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.depthwise = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.head = nn.Conv2d(2 * channels, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.conv1(F.silu(self.norm1(h)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.head(self.depthwise(self.sampler(h)))


def model_and_data():
    torch.manual_seed(0)
    model = ResNetish().eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 4, 10, 10, generator=generator),) for _ in range(3)]
    return model, calib


@pytest.mark.parametrize("conv_kxk,quantized", [("keep", set()), ("w4a4", {"conv1", "conv2"}),
                                                ("w4a4-all", {"stem", "conv1", "conv2", "sampler"})])
def test_annotation_of_convs_by_option(conv_kxk, quantized):
    model, calib = model_and_data()
    gm, _, results = prepared(model, calib[0], calib, passes=("annotate_linears",), conv_kxk=conv_kxk)
    infos = by_name(gm)
    convs = {"stem", "conv1", "conv2", "sampler", "depthwise"}
    assert {name for name in convs if infos[name].scheme.kind == "w4a4"} == quantized
    for name in convs:
        info = infos[name]
        assert info.kind == "conv" and info.role == Role.CONV
        assert info.in_features == 9 * model.get_submodule(name).weight.shape[1]
        if name in quantized:
            scheme = info.scheme
            assert (scheme.weight, scheme.act, scheme.weight_group, scheme.smooth, scheme.rank) == \
                ("int4", "int4", 64, False, 0)
            assert info.group == name and info.skip_reason is None
            # SiLU inputs: shifted, unsigned; every tap's channels padded to 64
            assert info.shift == (SILU_SHIFT if name in ("conv1", "conv2") else 0.0)
            assert info.pad_k == 9 * (64 - model.get_submodule(name).in_channels % 64)
        else:
            assert info.scheme.kind == "fp" and info.skip_reason and info.group is None
    if conv_kxk == "keep":
        assert all(infos[name].skip_reason == "k×k convolution kept 16-bit (conv_kxk='keep')" for name in convs)
    else:
        assert "groups=48" in infos["depthwise"].skip_reason
    if conv_kxk == "w4a4":
        assert "graph input" in infos["stem"].skip_reason and "not SiLU output" in infos["sampler"].skip_reason
    assert infos["head"].kind == "conv1x1"
    assert results["annotate_linears"].stats["schemes"].get("W:int4/g64 A:uint4/g64", 0) == \
        len(quantized & {"conv1", "conv2"})


def test_role_schemes_conv_is_refused_with_the_field_to_use():
    with pytest.raises(InputError, match="conv_kxk"):
        QuantConfig.preset("int4", role_schemes={"conv": "w4a4"})
    with pytest.raises(InputError, match="conv_kxk must be one of"):
        QuantConfig.preset("int4", conv_kxk="w4")


def test_unpadded_channels_are_skipped_and_reported():
    model, calib = model_and_data()
    gm, _, _ = prepared(model, calib[0], calib, passes=("annotate_linears",), conv_kxk="w4a4", pad_k=False)
    infos = by_name(gm)
    assert infos["conv1"].scheme.kind == "fp" and "C=24 is not a multiple of the group size 64" in \
        infos["conv1"].skip_reason


def test_no_w4a4_formats_keeps_convs_16bit():
    model, calib = model_and_data()
    gm, _, _ = prepared(model, calib[0], calib, "w4a16-nf4", passes=("annotate_linears",), conv_kxk="w4a4")
    assert "needs activation quantization" in by_name(gm)["conv1"].skip_reason


def test_calibration_keeps_tap_major_patches_per_conv():
    model, calib = model_and_data()
    gm, ctx, results = prepared(model, calib[0], calib, conv_kxk="w4a4", calib_rows=1000)
    calibration = ctx.calibration
    site = next(s for s in calibration.sites.values() if s.readers == ["conv1"])
    assert site.node.endswith(">conv1") and site.rows.shape == (600, 9 * 64)  # 3 inputs × 2 × 10·10 pixels
    # padding channels hold −shift (0 once shifted); out-of-image taps are 0
    taps = site.rows.view(-1, 9, 64)
    assert torch.all(taps[..., 24:] == -SILU_SHIFT)
    assert torch.all(taps[..., :24] >= -0.2785)  # SiLU output


@pytest.mark.parametrize("preset", ["int4", "nvfp4", "w8a8"])
def test_lowered_conv_matches_the_simulation(preset):
    model, calib = model_and_data()
    gm, ctx, results = prepared(model, calib[0], calib, preset, passes=PASSES, conv_kxk="w4a4")
    convs = {n.meta["svdq"].name: n for n in gm.graph.nodes if n.target == svdq.conv2d.default}
    assert set(convs) == {"conv1", "conv2"}
    assert results["lower"].stats["ops"]["conv2d"] == 2
    assert sum(1 for n in gm.graph.nodes if is_op(n, CONV_OPS)) == 3  # stem, sampler, depthwise stay ATen
    node = convs["conv2"]
    x, qweight, wscales, wtscale, bias, shift, fmt, group, kernel, stride, padding, dilation, *act_scale = node.args
    assert len(act_scale) == (preset == "nvfp4")  # nvfp4's calibrated per-tensor activation scale
    expected_fmt = {"int4": "uint4", "nvfp4": "nvfp4", "w8a8": "int8"}[preset]
    assert (fmt, kernel, stride, padding, dilation) == (expected_fmt, [3, 3], [2, 2], [1, 1], [1, 1])
    assert shift == (SILU_SHIFT if preset == "int4" else 0.0) and bias.target == "conv2.bias"
    assert not hasattr(gm.conv2, "weight")
    info = node.meta["svdq"]
    assert info.qweight == "conv2.qweight" and info.errors["output_rel"] < 0.25

    # Numbers: the op on a fresh input equals the passes' im2col simulation of the same layer.
    scheme = info.scheme
    padded = -(-24 // scheme.weight_group) * scheme.weight_group if scheme.weight_group else 24
    geometry = ConvGeometry(24, padded, (3, 3), (2, 2), (1, 1), (1, 1))
    silu_in = F.silu(torch.randn(2, 24, 10, 10, generator=torch.Generator().manual_seed(5)))
    packed = [None if t is None else gm.get_buffer(t.target) for t in (qweight, wscales, wtscale)]
    act_scale = [gm.get_buffer(t.target) for t in act_scale]
    got = svdq.conv2d(silu_in, *packed, None, shift, fmt, group, kernel, stride, padding, dilation, *act_scale)
    weight = dequantize(ctx.quantized["conv2.weight"], torch.float32)
    rows = geometry.patches(silu_in, -shift) + shift
    act_group = scheme.act_group or geometry.padded_channels
    simulated = fake_quantize_act(rows, scheme.act, act_group, unsigned=shift > 0,
                                  tensor_scale=act_scale[0] if act_scale else None) - shift
    expected = (simulated @ weight.T).view(2, 5, 5, 48).permute(0, 3, 1, 2)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_report_fuse_and_fallback():
    model, calib = model_and_data()
    gm, ctx, results = prepared(model, calib[0], calib, passes=PASSES + ("fuse",), conv_kxk="w4a4")
    report = {layer["name"]: layer for layer in gm.meta["svdq_layers"]["layers"]}
    assert report["conv1"]["scheme"] == "W:int4/g64 A:uint4/g64" and report["conv1"]["pad_k"] == 360
    assert report["conv1"]["bytes_after"] < report["conv1"]["bytes_before"]
    assert 0 < report["conv1"]["output_rel_error"] < 0.25 and report["stem"]["output_rel_error"] is None
    fallbacks = {f["linear"]: f["reason"] for f in results["fuse"].stats["fallbacks"]}
    assert fallbacks == {"conv1": "conv: no generated kernel", "conv2": "conv: no generated kernel"}
    assert sum(1 for n in gm.graph.nodes if n.target == svdq.conv2d.default) == 2
    eager = model(calib[1][0])
    assert (gm(calib[1][0]) - eager).norm() / eager.norm() < 0.2

    # A bound no conv meets: straight to 16-bit (there is no weight-only conv), and the graph is the FP conv.
    gm, ctx, results = prepared(model, calib[0], calib, passes=PASSES, conv_kxk="w4a4", fallback_error=1e-4)
    infos = by_name(gm)
    assert infos["conv1"].scheme.kind == "fp" and infos["conv1"].fallback.endswith("→ 16-bit")
    assert not any(n.target == svdq.conv2d.default for n in gm.graph.nodes)
    assert torch.allclose(gm(calib[1][0]), eager, atol=1e-5)


def test_compiled_conv_graph_saves_loads_and_refuses_onnx(tmp_path):
    model, calib = model_and_data()
    config = QuantConfig.preset("int4", conv_kxk="w4a4", smooth_grid=4)
    gm = svdq_compiler.compile(model, calib[0], config, calib_inputs=calib, verify=True)
    path = tmp_path / "graph.pt"
    svdq_compiler.save(gm, path)
    loaded = svdq_compiler.load(path)
    assert sum(1 for n in loaded.graph.nodes if n.target == svdq.conv2d.default) == 2
    assert torch.equal(loaded(calib[2][0]), gm(calib[2][0]))
    with pytest.raises(InputError, match="conv_kxk='keep'"):
        svdq_compiler.export_onnx(gm, tmp_path / "model.onnx", form="custom")
    assert not (tmp_path / "model.onnx").exists()
