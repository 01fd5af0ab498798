"""Every preset compiles every adapter's random model end to end, and the compiled graph runs close to eager."""

import pytest
import torch

import svdq_compiler
from svdq_compiler import PRESETS
from svdq_compiler.models import adapter_for, builtin_names, load_model

RANDOM_MODELS = sorted(name for name in builtin_names() if name.startswith("random:"))
# Loose bounds: random weights have none of the structure real checkpoints have; the point is that every
# scheme runs and the ordering of the baselines holds (see tools/eval_quality.py for measured quality).
BOUNDS = {"int4": 0.15, "nvfp4": 0.2, "w8a8": 0.05, "w4a16-nf4": 0.3, "w4a4-rtn": 0.6, "w4a4-smoothquant": 0.5}


def output(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "sample", result)


def compile_and_compare(name, preset, **overrides):
    model = load_model(name)
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model)
    config = svdq_compiler.QuantConfig.preset(preset, calib_prompts=2, calib_steps=1, **overrides)
    gm = svdq_compiler.compile(model, inputs, config, verify=True)
    check = adapter.calib_inputs(model, 1, 1, seed=99)[0]
    with torch.no_grad():
        reference, compiled = output(model(**check)), output(gm(**check))
    assert torch.isfinite(compiled).all()
    totals = gm.meta["svdq_report"]["layers"]["totals"]
    assert totals["quantized_layers"] > 0
    return float((compiled - reference).norm() / reference.norm()), totals


# Capture dominates (10-50 s per model on 2 cores): the default run compiles FLUX; `make test-slow` the rest.
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "random:flux" else pytest.mark.slow)
                                  for n in RANDOM_MODELS])
def test_int4_compiles_every_adapter(name):
    error, totals = compile_and_compare(name, "int4", smooth_grid=4)
    assert error < BOUNDS["int4"]
    assert totals["model_bytes_after"] < totals["model_bytes_before"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_compiles_flux(preset):
    error, _ = compile_and_compare("random:flux", preset, smooth_grid=4)
    assert error < BOUNDS[preset]


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM_MODELS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_on_every_adapter(name, preset):
    error, _ = compile_and_compare(name, preset)
    assert error < BOUNDS[preset]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int4", "nvfp4", "w8a8"])
def test_unet_with_quantized_resnet_convs(preset):
    keep_error, keep = compile_and_compare("random:unet", preset, smooth_grid=4)
    error, totals = compile_and_compare("random:unet", preset, smooth_grid=4, conv_kxk="w4a4")
    assert totals["quantized_layers"] == keep["quantized_layers"] + 16  # 8 resnets × conv1, conv2
    assert totals["model_bytes_after"] < keep["model_bytes_after"]
    assert error < 2 * BOUNDS[preset] and error > keep_error
