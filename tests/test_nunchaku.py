"""Nunchaku FLUX checkpoints: import a synthetic checkpoint written to the documented layout and check the graph
against a module-by-module evaluation of the checkpoint; export a compiled FLUX and round-trip it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch import nn

import svdq_compiler
from svdq_compiler.codegen.layout import (NunchakuLinear, from_nunchaku, from_nunchaku_awq, pack_weight, to_nunchaku,
                                          to_nunchaku_awq)
from svdq_compiler.errors import CheckpointError
from svdq_compiler.interop.nunchaku import (DOUBLE, DOUBLE_AWQ, DOUBLE_NORMS, GELU_SHIFT_INT4, NUNCHAKU_COMPATIBLE,
                                            SINGLE, SINGLE_AWQ, SINGLE_NORMS, export_nunchaku, import_nunchaku, read_checkpoint,
                                            write_checkpoint)
from svdq_compiler.layers import find_layers, segment_rows
from svdq_compiler.ir import get_attr_value
from svdq_compiler.models import adapter_for, load_model
from svdq_compiler.codegen.layout import unpack_weight
from svdq_compiler.quant import dequantize, nvfp4_act_scale, quantize_weight

CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
              num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=[8, 12, 12])
RANK = 16
DTYPE = torch.bfloat16


def meta_flux() -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel(**CONFIG).to(DTYPE)


def random_linear(generator, n: int, k: int, fmt: str, smooth: torch.Tensor | None = None) -> NunchakuLinear:
    """A W4A4 linear with random codes, scales, λ (unless given), branch and bias, in our layout."""
    group = 64 if fmt == "int4" else 16
    weight = pack_weight(quantize_weight((torch.randn(n, k, generator=generator) / k ** 0.5).to(DTYPE), fmt, group))
    if smooth is None:
        smooth = (0.5 + torch.rand(k, generator=generator)).to(DTYPE)
    down = (torch.randn(RANK, k, generator=generator) / k ** 0.5).to(DTYPE)
    up = (0.1 * torch.randn(n, RANK, generator=generator)).to(DTYPE)
    bias = (0.05 * torch.randn(n, generator=generator)).to(DTYPE)
    return NunchakuLinear(weight, bias=bias, smooth=smooth, lora_down=down, lora_up=up)


def synthetic_checkpoint(path, fmt: str, naming: str = "v1", seed: int = 0) -> None:
    """A Nunchaku FLUX checkpoint of CONFIG with random layers, written with the layout's converters."""
    generator = torch.Generator().manual_seed(seed)
    model = meta_flux()
    named = dict(model.named_modules())
    tensors = {}
    blocks = [(f"transformer_blocks.{i}", DOUBLE, DOUBLE_AWQ, DOUBLE_NORMS) for i in range(CONFIG["num_layers"])]
    blocks += [(f"single_transformer_blocks.{i}", SINGLE, SINGLE_AWQ, SINGLE_NORMS)
               for i in range(CONFIG["num_single_layers"])]
    for prefix, modules, awq, norms in blocks:
        block_smooth = None  # a single block's qkv_proj and mlp_fc1 read one input: one λ (as deepcompressor)
        for fused in modules:
            parts = [named[f"{prefix}.{p}".replace(".part0", "").replace(".part1", "")] for p in fused.parts]
            n = sum(p.out_features for p in parts)
            k = parts[0].in_features if not fused.parts[0].startswith("proj_out") else (
                CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"] * (1 if fused.v1 == "out_proj" else 4))
            name = fused.v2 if naming == "v2" else fused.v1
            shared = block_smooth if prefix.startswith("single") and fused.v1 == "mlp_fc1" else None
            linear = random_linear(generator, n, k, fmt, shared)
            if fused.v1 == "qkv_proj":
                block_smooth = linear.smooth
            for key, value in to_nunchaku(linear, naming=naming).items():
                tensors[f"{prefix}.{name}.{key}"] = value
        for local, splits in awq.items():
            linear = named[f"{prefix}.{local}"]
            weight = pack_weight(quantize_weight(
                (torch.randn(linear.out_features, linear.in_features, generator=generator) * 0.1).to(DTYPE),
                "int4", 64))
            bias = (0.1 * torch.randn(linear.out_features, generator=generator)).to(DTYPE)
            for key, value in to_nunchaku_awq(weight, bias, adanorm_splits=splits).items():
                tensors[f"{prefix}.{local}.{key}"] = value
        for v1, ours in norms.items():
            tensors[f"{prefix}.{ours if naming == 'v2' else v1}.weight"] = (
                1 + 0.1 * torch.randn(CONFIG["attention_head_dim"], generator=generator)).to(DTYPE)
    for key, value in model.state_dict().items():
        if not key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            scale = value.shape[-1] ** -0.5 if value.dim() == 2 else 0.05
            tensors[key] = (scale * torch.randn(value.shape, generator=generator)).to(DTYPE)
    write_checkpoint(tensors, path, CONFIG, fmt, RANK)


class CheckpointLinear(nn.Module):
    """Rows `rows` of a Nunchaku W4A4 module, computed from its tensors with the reference svdq::linear op
    (shift and unsigned activations for the post-GELU layers of an int4 checkpoint)."""

    def __init__(self, linear: NunchakuLinear, rows: slice, fmt: str, post_gelu: bool, with_bias: bool = True):
        super().__init__()
        w = linear.weight
        self.w = (w.qweight[rows], w.wscales[:, rows].contiguous(),
                  w.wtscale if w.wtscale is None or w.wtscale.dim() == 0 else w.wtscale[rows])
        self.smooth, self.down, self.up = linear.smooth, linear.lora_down, linear.lora_up[rows]
        self.bias = linear.bias[rows] if with_bias else None
        self.shift = GELU_SHIFT_INT4 if post_gelu and fmt == "int4" else 0.0
        self.fmt = "uint4" if self.shift else fmt
        self.group = w.group_size

    def forward(self, x):
        # Nunchaku's nvfp4 activations have no per-tensor scale: ours is 1 there
        act_scale = torch.ones(()) if self.fmt == "nvfp4" else None
        return torch.ops.svdq.linear(x, self.smooth, *self.w, self.down, self.up, self.bias, self.shift, self.fmt,
                                     self.group, act_scale)


class SplitProjOut(nn.Module):
    def __init__(self, attention: nn.Module, mlp: nn.Module, width: int):
        super().__init__()
        self.attention, self.mlp, self.width = attention, mlp, width

    def forward(self, x):
        return self.attention(x[..., : self.width]) + self.mlp(x[..., self.width:])


class CheckpointWeightOnly(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return torch.ops.svdq.weight_only_linear(x, self.weight.qweight, self.weight.wscales, self.bias, "int4", 64)


def reference_model(path, fmt: str) -> FluxTransformer2DModel:
    """diffusers FLUX whose quantized linears evaluate the checkpoint module by module."""
    tensors, config, _ = read_checkpoint(path)
    model = FluxTransformer2DModel(**config).to(DTYPE).eval()
    named = dict(model.named_modules())
    dense = {k: v for k, v in tensors.items() if not k.startswith(("transformer_blocks.", "single_transformer"))}
    model.load_state_dict(dense, strict=False)

    def module_tensors(prefix):
        return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    def replace(name, module):
        parent, leaf = name.rsplit(".", 1)
        setattr(named[parent], leaf, module)

    blocks = [(f"transformer_blocks.{i}", DOUBLE, DOUBLE_AWQ, DOUBLE_NORMS) for i in range(config["num_layers"])]
    blocks += [(f"single_transformer_blocks.{i}", SINGLE, SINGLE_AWQ, SINGLE_NORMS)
               for i in range(config["num_single_layers"])]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    with torch.no_grad():
        for prefix, modules, awq, norms in blocks:
            split = {}
            for fused in modules:
                names = [f"{prefix}.{p}" for p in fused.parts]
                outs = [named[n].out_features if n in named else inner for n in names]
                k = named[names[0]].in_features if names[0] in named else inner * (1 if ".part0" in names[0] else 4)
                linear = from_nunchaku(module_tensors(f"{prefix}.{fused.v1}"), fmt, in_features=k,
                                       out_features=sum(outs))
                row = 0
                for name, n in zip(names, outs):
                    post_gelu = fused.v1.startswith("mlp") and fused.v1.endswith("fc2")
                    module = CheckpointLinear(linear, slice(row, row + n), fmt, post_gelu)
                    row += n
                    if ".part" in name:
                        split[name] = module
                    else:
                        replace(name, module)
            if split:
                replace(f"{prefix}.proj_out", SplitProjOut(split[f"{prefix}.proj_out.part0"],
                                                           split[f"{prefix}.proj_out.part1"], inner))
            for local, splits in awq.items():
                linear = named[f"{prefix}.{local}"]
                weight, bias = from_nunchaku_awq(module_tensors(f"{prefix}.{local}"), in_features=linear.in_features,
                                                 out_features=linear.out_features, adanorm_splits=splits)
                replace(f"{prefix}.{local}", CheckpointWeightOnly(weight, bias))
            for v1, ours in norms.items():
                named[f"{prefix}.{ours}"].weight.copy_(tensors[f"{prefix}.{v1}.weight"])
    return model


def eval_inputs(seed=5):
    model = meta_flux()
    adapter = adapter_for(model)
    return adapter.calib_inputs(model, 1, 2, seed=seed, batch=2)


def run(model, inputs):
    with torch.no_grad():
        return torch.cat([model(**x)[0].float() for x in inputs])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["int4", pytest.param("nvfp4", marks=pytest.mark.slow)])
def test_import_runs_the_checkpoint_as_its_modules_compute_it(tmp_path, fmt):
    path = tmp_path / f"svdq-{fmt}.safetensors"
    synthetic_checkpoint(path, fmt)
    gm = import_nunchaku(path)
    inputs = eval_inputs()
    imported, reference = run(gm, inputs), run(reference_model(path, fmt), inputs)
    # the same math: only the re-rounded λ fold of the down projection and the fused op order differ
    assert rel(imported, reference) < 2e-2, rel(imported, reference)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "svdq.fused_gemm.default" in ops and "svdq.fused_weight_only_linear.default" in ops  # AdaLN: kernel W


def test_import_verifies_and_dumps_its_passes(tmp_path):
    """The import runs through run_passes like a compile: --verify's checks and one dump per pass."""
    path, dumps = tmp_path / "svdq-int4.safetensors", tmp_path / "ir"
    synthetic_checkpoint(path, "int4")
    gm = import_nunchaku(path, verify=True, dump_ir=dumps)
    assert sorted(p.name for p in dumps.glob("*.py")) == [
        "000_capture.py", "001_annotate_linears.py", "002_import_weights.py", "003_lower.py", "004_fuse.kernels.py",
        "004_fuse.py"]
    assert json.loads((dumps / "002_import_weights.stats.json").read_text())["stats"]["format"] == "int4"
    assert "svdq.fused_gemm" in (dumps / "004_fuse.py").read_text()
    assert [r["name"] for r in gm.meta["svdq_report"]["passes"]] == ["annotate_linears", "import_weights", "lower",
                                                                     "fuse"]


def test_nvfp4_activation_scale_folds_into_smooth_factor_and_wtscale():
    """Nunchaku has no per-tensor activation scale t: the export folds it into the quantized path (smooth_factor
    = λ·t, wtscale × t) and keeps the branch's L2/λ, so Nunchaku's one-level computation equals ours."""
    generator = torch.Generator().manual_seed(4)
    n, k = 48, 128
    linear = random_linear(generator, n, k, "nvfp4")
    x = (torch.randn(3, 7, k, generator=generator) * 3000).to(DTYPE)  # beyond 2688: one level would saturate
    t = nvfp4_act_scale((x.float() / linear.smooth.float()).abs().amax(), 16.0)
    ours = torch.ops.svdq.linear(x, linear.smooth, linear.weight.qweight, linear.weight.wscales,
                                 linear.weight.wtscale, linear.lora_down, linear.lora_up, linear.bias, 0.0, "nvfp4",
                                 16, t)
    plain = to_nunchaku(linear)
    folded = to_nunchaku(NunchakuLinear(**{**linear.__dict__, "act_scale": t}))
    back = from_nunchaku(folded, "nvfp4", in_features=k, out_features=n)
    torch.testing.assert_close(back.smooth, (linear.smooth.float() * t).to(DTYPE), rtol=0, atol=0)
    assert torch.equal(folded["wtscale"], (linear.weight.wtscale * t).reshape(1).to(DTYPE))
    for key in ("qweight", "wscales", "lora_down", "lora_up", "bias", "smooth_orig"):
        assert torch.equal(folded[key].view(torch.uint8), plain[key].view(torch.uint8)), key
    # what Nunchaku computes from the file: x/smooth_factor quantized with no tensor scale, α = wtscale
    theirs = torch.ops.svdq.linear(x, back.smooth, back.weight.qweight, back.weight.wscales, back.weight.wtscale,
                                   back.lora_down, back.lora_up, back.bias, 0.0, "nvfp4", 16, torch.ones(()))
    # λ·t rounded to bf16 flips a few E2M1 codes at their boundaries; nvfp4's own error here is ~0.1
    assert rel(theirs.float(), ours.float()) < 5e-2
    effective = (dequantize(unpack_weight(linear.weight)).float() + linear.lora_up.float() @ linear.lora_down.float())
    exact = torch.nn.functional.linear(x.float(), effective / linear.smooth.float(), linear.bias.float())
    assert rel(ours.float(), exact) < 0.2  # and neither saturates


def test_v2_names_import_like_v1(tmp_path):
    synthetic_checkpoint(tmp_path / "v1.safetensors", "int4", naming="v1", seed=3)
    synthetic_checkpoint(tmp_path / "v2.safetensors", "int4", naming="v2", seed=3)
    v1, _, _ = read_checkpoint(tmp_path / "v1.safetensors")
    v2, _, _ = read_checkpoint(tmp_path / "v2.safetensors")
    assert v1.keys() == v2.keys()
    assert all(torch.equal(v1[k], v2[k]) for k in v1)


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    path = tmp_path / "bad.safetensors"
    synthetic_checkpoint(path, "int4")
    tensors, config, _ = read_checkpoint(path)
    tensors["transformer_blocks.0.mlp_fc1.qweight"] = tensors["transformer_blocks.0.mlp_fc1.qweight"][:64]
    write_checkpoint(tensors, path, config, "int4", RANK)
    with pytest.raises(CheckpointError, match=r"mlp_fc1.qweight has 4096 bytes, 256×64 needs 16384"):
        import_nunchaku(path)  # refused before the capture


@pytest.mark.parametrize("drop, message", [
    ("transformer_blocks.0.mlp_fc1.smooth", r"transformer_blocks.0.mlp_fc1 has no smooth"),
    ("single_transformer_blocks.0.qkv_proj.lora_up", r"single_transformer_blocks.0.qkv_proj has no lora_up"),
    ("config", r"FLUX config lacks positive integers for \['num_layers'"),
])
def test_incomplete_checkpoint_is_one_clear_error(tmp_path, drop, message):
    path = tmp_path / "incomplete.safetensors"
    synthetic_checkpoint(path, "int4")
    tensors, config, _ = read_checkpoint(path)
    assert drop == "config" or drop in tensors
    write_checkpoint({k: v for k, v in tensors.items() if k != drop}, path, {} if drop == "config" else config,
                     "int4", RANK)
    with pytest.raises(CheckpointError, match=message):
        import_nunchaku(path)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Fused ops run their reference path here (the kernels have their own tests under the interpreter)."""
    monkeypatch.setenv("SVDQ_KERNELS", "reference")


@pytest.fixture(scope="module")
def compiled_bf16():
    fp = load_model("random:flux", dtype=DTYPE)
    adapter = adapter_for(fp)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=4, calib_rows=64, skip=[r"^norm_out\.linear$"],
                                              **NUNCHAKU_COMPATIBLE)
    return svdq_compiler.compile(fp, adapter.example_inputs(fp, batch=2), config,
                                 calib_inputs=adapter.calib_inputs(fp, 1, 2, seed=0, batch=2))


def test_export_import_round_trip(compiled_bf16, tmp_path):
    gm = compiled_bf16
    path = tmp_path / "ours.safetensors"
    tensors = export_nunchaku(gm, path)
    assert "transformer_blocks.0.qkv_proj.qweight" in tensors and "single_transformer_blocks.0.mlp_fc2.lora_up" in tensors
    back = import_nunchaku(path)
    ours, theirs = find_layers(gm), find_layers(back)
    assert set(ours.quantized) == set(theirs.quantized)
    for name, weight in ours.quantized.items():
        other = theirs.quantized[name]
        for attr in ("qweight", "wscales"):
            assert torch.equal(get_attr_value(gm, getattr(weight, attr)), get_attr_value(back, getattr(other, attr)))
        assert torch.equal(get_attr_value(gm, ours.branched[name][2].up), get_attr_value(back, theirs.branched[name][2].up))
        down, down_back = segment_rows(gm, ours, name).float(), segment_rows(back, theirs, name).float()
        assert (down - down_back).abs().max() <= 2 ** -7 * down.abs().max()  # one more rounding of the λ fold
    for name, weight in ours.weight_only.items():
        assert torch.equal(get_attr_value(gm, weight.qweight), get_attr_value(back, theirs.weight_only[name].qweight))
    inputs = eval_inputs(seed=11)
    assert rel(run(back, inputs), run(gm, inputs)) < 1e-2
    # and back again: the Nunchaku tensors are reproduced (lora_down within the rounding of the λ fold)
    again = export_nunchaku(back)
    for key, value in tensors.items():
        if key.endswith("lora_down"):
            assert (value.float() - again[key].float()).abs().max() <= 2 ** -7 * value.float().abs().max(), key
        else:
            assert torch.equal(value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
                               again[key].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else again[key]), key


@pytest.mark.slow
def test_export_refuses_layers_nunchaku_cannot_hold(compiled_bf16, tmp_path):
    fp = load_model("random:flux", dtype=DTYPE)
    adapter = adapter_for(fp)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=2, calib_rows=32, skip=[r"attn\.to_out\.0$"],
                                              **NUNCHAKU_COMPATIBLE)
    gm = svdq_compiler.compile(fp, adapter.example_inputs(fp, batch=2), config,
                               calib_inputs=adapter.calib_inputs(fp, 1, 1, seed=0, batch=2))
    with pytest.raises(CheckpointError, match="to_out.0"):
        export_nunchaku(gm, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
