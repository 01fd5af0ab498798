"""Model adapters: every family's random model captures with its dynamic dimensions and runs equal to eager at
the captured size and at others; built-in names; calibration inputs."""

import pytest
import torch

import svdq_compiler
from svdq_compiler.capture import CAPTURE_META
from svdq_compiler.errors import InputError, ShapeError
from svdq_compiler.models import (ADAPTERS, GenericAdapter, adapter_for, builtin_names, load_model,
                                  register_builtin)
from svdq_compiler.models.base import factor_grid
from svdq_compiler.models.flux import image_ids

FAMILIES = ["flux", "pixart", "sd3", "sana", "unet"]
# Sizes other than the example's, per family: (batch, tokens). None = the adapter's default grid.
OTHER_SIZES = {
    "flux": [(1, 1024), (3, (8, 32))],
    "pixart": [(1, (4, 4)), (3, (6, 6)), (1, (8, 4))],  # native grid, square, width dividing height
    "sd3": [(1, (6, 6)), (3, (16, 4))],
    "sana": [(1, (6, 6)), (3, (8, 20))],
    "unet": [(1, (8, 8)), (3, (6, 10))],
}
SPATIAL = {"height", "width"}


_CAPTURES = {}


def capture_family(family):
    """(family, model, adapter, graph, example inputs), captured once per test process at batch 2."""
    if family not in _CAPTURES:
        model = load_model(f"random:{family}")
        adapter = adapter_for(model)
        inputs = adapter.example_inputs(model, batch=2)
        _CAPTURES[family] = family, model, adapter, svdq_compiler.capture(model, inputs), inputs
    return _CAPTURES[family]


@pytest.fixture(params=FAMILIES)
def captured(request):
    return capture_family(request.param)


def assert_runs_like_eager(gm, model, inputs):
    with torch.no_grad():
        expected = model(**inputs)[0]
        got = gm(**inputs)[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_family_captures_and_runs_equal_to_eager_at_other_sizes(captured):
    family, model, adapter, gm, inputs = captured
    assert_runs_like_eager(gm, model, inputs)
    for batch, tokens in OTHER_SIZES[family]:
        assert_runs_like_eager(gm, model, adapter.example_inputs(model, batch=batch, tokens=tokens, seed=1))


def test_capture_report_lists_the_dynamic_dimensions(captured):
    family, _, adapter, gm, _ = captured
    report = gm.meta[CAPTURE_META]
    assert report["adapter"] == family
    dynamic = {d["name"] for d in report["dims"] if d["status"] == "dynamic"}
    expected = {"batch", "text_tokens"} | ({"image_tokens"} if family == "flux" else SPATIAL)
    assert dynamic == expected
    assert all(d["status"] == "dynamic" for d in report["dims"])
    # found by rebuilding the inputs one size larger, and the report says so
    assert all("inputs were rebuilt one larger" in d["why_dynamic"] for d in report["dims"])
    assert (report["relaxed_guards"] is not None) == (family == "pixart")


def test_unservable_size_is_a_shape_error_naming_the_dimension(captured):
    family, model, adapter, gm, inputs = captured
    bad = dict(inputs)
    if family == "flux":
        bad["img_ids"] = image_ids(4, 5)  # 20 positions for 256 tokens
        expected = r"img_ids dim 0 \(image tokens\) is 20, which does not match hidden_states dim 1"
    else:
        key = adapter.latent_key
        latent = inputs[key]
        height = next(d for d in gm.meta[CAPTURE_META]["dims"] if d["name"] == "height")
        # Off the patch multiple where there is one, else past the upper bound.
        size = height["size"] + 1 if height["multiple"] > 1 else height["max"] + 1
        bad[key] = torch.randn(*latent.shape[:2], size, latent.shape[3])
        expected = rf"{key} dim 2 \(latent height\) is {size}, outside the captured range"
    with pytest.raises(ShapeError, match=expected):
        gm(**bad)


def test_calibration_inputs_span_prompts_and_steps(captured):
    family, model, adapter, gm, inputs = captured
    samples = adapter.calib_inputs(model, num_prompts=2, num_steps=3, seed=0)
    assert len(samples) == 6
    assert all(sample.keys() == inputs.keys() for sample in samples)
    latent = adapter.latent_key
    timesteps = [float(s["timestep"][0]) for s in samples]
    assert timesteps[:3] == timesteps[3:] and len(set(timesteps[:3])) == 3  # same schedule for every prompt
    assert timesteps[0] > timesteps[1] > timesteps[2]  # from the noisiest step down
    text = "encoder_hidden_states"
    assert not torch.equal(samples[0][text], samples[3][text])  # prompts differ
    assert torch.equal(samples[0][text], samples[1][text])  # one prompt keeps its conditioning across steps
    assert not torch.equal(samples[0][latent], samples[1][latent])
    with torch.no_grad():
        gm(**samples[-1])  # a calibration sample is something the graph can run


def test_flux_captured_at_256_tokens_runs_at_1024():
    _, model, adapter, gm, inputs = capture_family("flux")
    assert inputs["hidden_states"].shape[1] == 256
    big = adapter.example_inputs(model, batch=1, tokens=1024, seed=3)
    assert big["hidden_states"].shape[1] == 1024
    assert_runs_like_eager(gm, model, big)


def test_builtin_names_and_unknown_names():
    assert {f"random:{family}" for family in FAMILIES} <= set(builtin_names())
    with pytest.raises(InputError, match="unknown model name 'random:nope'.*random:flux"):
        load_model("random:nope")
    with pytest.raises(InputError, match="no such file or folder"):
        load_model("/no/such/model.safetensors")


def test_register_builtin_adds_a_loadable_name():
    register_builtin("test-mlp", lambda: torch.nn.Linear(4, 4), "a test model")
    try:
        assert isinstance(load_model("test-mlp"), torch.nn.Linear)
        assert load_model("test-mlp", dtype=torch.float16).weight.dtype == torch.float16
    finally:
        from svdq_compiler.models import BUILTINS

        BUILTINS.pop("test-mlp")
    with pytest.raises(InputError, match="would read as a path"):
        register_builtin("models/x.safetensors", lambda: None)


def test_adapter_lookup_and_generic_fallback():
    assert [a.name for a in ADAPTERS] == ["tiny-flux", *FAMILIES]  # registered by the shipped model
    assert isinstance(adapter_for(torch.nn.Linear(2, 2)), GenericAdapter)
    with pytest.raises(InputError, match="no model adapter knows how to build inputs for Linear"):
        adapter_for(torch.nn.Linear(2, 2)).example_inputs(torch.nn.Linear(2, 2))


def test_role_hints_name_real_linears():
    import re

    for family in FAMILIES:
        model = load_model(f"random:{family}")
        names = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        for pattern, role in adapter_for(model).role_hints(model).items():
            assert any(re.search(pattern, name) for name in names), (family, pattern, role)


def test_factor_grid():
    assert factor_grid(256) == (16, 16)
    assert factor_grid(24) == (4, 6)
    assert factor_grid((3, 5)) == (3, 5)
    assert factor_grid(64, 4) == (8, 8)
    with pytest.raises(InputError, match="multiple of 16"):
        factor_grid(40, 4)
    with pytest.raises(InputError, match="multiples of 2"):
        factor_grid((3, 4), 2)
