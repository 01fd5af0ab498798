"""compile() captures FLUX-like models by tracing three blocks of each kind on a meta twin and replicating them
(svdq_compiler.meta_capture.capture_replicated): the compiled graph must be the one a full capture gives."""

import pytest
import torch
from diffusers import FluxTransformer2DModel

import svdq_compiler
import svdq_compiler.passes  # noqa: F401  (registers the passes)
from svdq_compiler.meta_capture import capture_replicated
from svdq_compiler.models import adapter_for
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline

CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=5, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))


def test_models_without_long_block_lists_are_captured_as_usual():
    torch.manual_seed(0)
    shallow = FluxTransformer2DModel(**{**CONFIG, "num_single_layers": 3}).eval()
    assert capture_replicated(shallow, adapter_for(shallow).example_inputs(shallow)) is None
    mixed = FluxTransformer2DModel(**CONFIG).eval()
    mixed.proj_out.to(torch.float64)  # a twin built in one dtype could not stand for it
    assert capture_replicated(mixed, adapter_for(mixed).example_inputs(mixed)) is None


@pytest.mark.slow
def test_compile_of_replicated_capture_equals_full_capture():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval().requires_grad_(False)
    adapter = adapter_for(model)
    inputs, calib = adapter.example_inputs(model), adapter.calib_inputs(model, 2, 2, seed=0)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=4)
    compiled = svdq_compiler.compile(model, inputs, config, calib_inputs=calib)
    assert compiled.meta["svdq_capture"]["replicated_blocks"] == {"single_transformer_blocks": 5}
    ctx = PassContext(config=config, example_inputs=inputs, calib_inputs=calib, adapter=adapter, model=model)
    full = run_passes(svdq_compiler.capture(model, inputs, adapter=adapter), ctx, svdquant_pipeline())
    for tokens in (16, 36):
        check = adapter.example_inputs(model, tokens=tokens, seed=tokens)
        with torch.no_grad():
            assert torch.equal(compiled(**check)[0], full(**check)[0])
    # the same layers, schemes, λ and errors; only the attention node a role reason names is numbered differently
    without_reason = lambda layers: [{k: v for k, v in layer.items() if k != "role_reason"} for layer in layers]  # noqa
    assert without_reason(compiled.meta["svdq_layers"]["layers"]) == without_reason(full.meta["svdq_layers"]["layers"])
