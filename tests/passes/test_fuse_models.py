"""Whole models: each adapter's random model, lowered, then fused. On the reference backend the fused graph
computes exactly what the lowered graph does; through the kernels every fused op matches its reference on the
same inputs, and the whole output stays as close to the 16-bit model as the lowered graph is."""

import copy

import pytest
import torch
from fuse_check import checking_kernels

import svdq_compiler
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_compiler.models import DynDim, adapter_for, builtin_names, load_model
from svdq_compiler.passes.verify import problems_in
from svdq_compiler.pipeline import PASS_REGISTRY

RANDOM_MODELS = sorted(name for name in builtin_names() if name.startswith("random:"))
UP_TO_LOWER = ["annotate_linears", "calibrate", "smooth", "lowrank", "quantize_weights", "lower"]


def _output(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "sample", result)


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _lowered_and_fused(model, adapter, config):
    """The model compiled up to `lower`, and a copy of it fused (checked well-formed), with the fuse statistics."""
    lowered = svdq_compiler.compile(model, adapter.example_inputs(model), config, passes=UP_TO_LOWER)
    fused = copy.deepcopy(lowered)
    stats = PASS_REGISTRY["fuse"](fused, None).stats
    fused.recompile()
    assert problems_in(fused) == []
    return lowered, fused, stats


def _count(graph, target):
    return sum(1 for n in graph.graph.nodes if n.target == target)


# Capture and calibration dominate; the default run takes FLUX, `make test-slow` every adapter.
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "random:flux" else pytest.mark.slow)
                                  for n in RANDOM_MODELS])
def test_fused_model_equals_the_lowered_model(name):
    model = load_model(name)
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("int4", calib_prompts=1, calib_steps=1, smooth_grid=2)
    lowered, fused, stats = _lowered_and_fused(model, adapter, config)
    gemms = _count(lowered, torch.ops.svdq.gemm.default)
    # weight-only layers the ladder moved to int8 stay svdq.weight_only_linear (kernel W is 4-bit only)
    gemm_fallbacks = [f for f in stats["fallbacks"] if not f["reason"].startswith("kernel W")]
    weight_only = _count(lowered, torch.ops.svdq.weight_only_linear.default)
    assert gemms > 0 and stats["linears_fused"] + len(gemm_fallbacks) == gemms
    assert stats["weight_only_fused"] + len(stats["fallbacks"]) - len(gemm_fallbacks) == weight_only
    assert not any(n.target == torch.ops.svdq.gemm.default for n in fused.graph.nodes) or gemm_fallbacks
    check = adapter.calib_inputs(model, 1, 1, seed=7)[0]
    with torch.no_grad():
        eager = _output(model(**check))
        with kernel_backend("reference"):
            reference = _output(lowered(**check))
            torch.testing.assert_close(_output(fused(**check)), reference, rtol=0, atol=0)
        with checking_kernels() as checked:
            through_kernels = _output(fused(**check))
    assert checked["fused_gemm"] > 0
    # quantization noise dominates: the kernels' rounding differences may flip codes, not add error
    assert _relative(through_kernels, eager) < 1.25 * _relative(reference, eager) + 1e-3


def test_weight_only_flux_fuses_every_layer_into_kernel_w_and_takes_a_lora_inside_it():
    from svdq_compiler.lora import apply_lora

    model = load_model("random:flux")
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("w4a16-nf4")
    lowered, fused, stats = _lowered_and_fused(model, adapter, config)
    weight_only = _count(lowered, torch.ops.svdq.weight_only_linear.default)
    assert weight_only > 0 and stats["weight_only_fused"] == weight_only and stats["weight_only_kept"] == 0
    assert stats["epilogues"].get("gelu_tanh", 0) > 0 and stats["fallbacks"] == []
    check = adapter.calib_inputs(model, 1, 1, seed=7)[0]
    # a LoRA on an MLP up projection, whose GELU is now the kernel's epilogue: the branch must go inside it
    up = dict(model.named_modules())["transformer_blocks.0.ff.net.0.proj"]
    gen = torch.Generator().manual_seed(0)
    lora = {"transformer_blocks.0.ff.net.0.proj.lora_A.weight": torch.randn(4, up.in_features, generator=gen) / 8,
            "transformer_blocks.0.ff.net.0.proj.lora_B.weight": torch.randn(up.out_features, 4, generator=gen) / 8}
    with torch.no_grad():
        with kernel_backend("reference"):
            reference = _output(lowered(**check))
            torch.testing.assert_close(_output(fused(**check)), reference, rtol=0, atol=0)
        with checking_kernels() as checked:
            through_kernels = _output(fused(**check))
        assert checked["fused_weight_only_linear"] == weight_only
        assert _relative(through_kernels, reference) < 1e-2
        for graph in (lowered, fused):
            apply_lora(graph, lora, name="style")
        with kernel_backend("reference"):
            with_lora = _output(lowered(**check))
            assert _relative(with_lora, reference) > 1e-3  # the LoRA changes the output
            torch.testing.assert_close(_output(fused(**check)), with_lora, rtol=0, atol=0)


# ---- nvfp4 activations of any magnitude: the per-tensor scale (quant.py) in the ops and the kernels ----


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _inputs(magnitude, seed):
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[..., 7] *= 30  # an outlier channel, as diffusion activations have
    return {"x": x}


@pytest.mark.parametrize("magnitude", [1e4, 1e9])
def test_a_compiled_nvfp4_layer_keeps_large_activations(magnitude):
    model = TwoLayers().eval()
    # no smoothing, so the quantizers see the raw magnitudes (λ would divide most of them away), and no branch:
    # the 4-bit path alone carries the layer
    config = svdq_compiler.QuantConfig.preset("nvfp4", role_schemes={"embed": "w4a4", "final": "w4a4"},
                                              fallback_error=None, smooth="none", rank=0)
    with torch.no_grad():
        gm = svdq_compiler.compile(model, _inputs(magnitude, 0), config,
                                   calib_inputs=[_inputs(magnitude, s) for s in range(2)],
                                   dynamic_shapes={"x": {1: DynDim("tokens", 2, 64)}})
        scales = [b for name, b in gm.named_buffers() if name.endswith("act_scale")]
        # 16·absmax/2688 of the layer input ≫ 1: a one-level scale (t = 1) would saturate at 2688
        assert len(scales) == 2 and all(s.dtype == torch.float32 and s.item() > magnitude / 1000 for s in scales)
        check = _inputs(magnitude, 5)
        expected = model(**check)
        with kernel_backend("reference"):
            reference = gm(**check)
        with checking_kernels() as checked:  # each kernel against its reference op on the same inputs
            kernels = gm(**check)
    assert checked["fused_quantize_lora_down"] >= 1 and checked["fused_gemm"] == 2
    for out in (reference, kernels):
        error = float((out - expected).norm() / expected.norm())
        assert error < 0.3, f"relative error {error:.3f}: activations clipped?"  # one-level (t = 1): 0.97-1.0
    assert (kernels - reference).norm() / reference.norm() < 1e-2
