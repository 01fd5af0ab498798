"""torch.compile(model, backend="svdquant"): the same quantized graph as svdq_compiler.compile (outputs match),
on a toy MLP and on every built-in family's random model called as the diffusers pipelines call it (keyword
arguments, return_dict=False); Inductor for the rest, new token counts and latent sizes without recompiling
under dynamic=True, recompiles when Dynamo specializes, calibration inputs bound through Dynamo's sources (by
keyword or position, whatever the forward's first argument is called), the three calibration sources with a
warning naming the one used, and clear errors for bad options."""

import pytest
import torch
import torch._dynamo

import svdq_compiler
from svdq_compiler.capture import CAPTURE_META
from svdq_compiler.errors import InputError
from svdq_compiler.models import DynDim, adapter_for, load_model


class MLP(torch.nn.Module):
    """in (embed, kept 16-bit) → mid (quantized, post-GELU input) → out (final, 16-bit)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 64)

    def forward(self, x, scale):
        return self.out(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(self.inp(x))))) * scale


SCALE = torch.tensor(1.5)


def calib_inputs(count=2, tokens=8):
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(2, tokens, 64, generator=generator), "scale": SCALE} for _ in range(count)]


@pytest.fixture
def compiles(monkeypatch):
    """The graphs svdq_compiler.compile returned while the test ran (one per backend compile)."""
    graphs = []
    real = svdq_compiler.compile

    def recording(*args, **kwargs):
        graphs.append(real(*args, **kwargs))
        return graphs[-1]

    monkeypatch.setattr(svdq_compiler, "compile", recording)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def svdq_ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == "svdq"]


def test_matches_svdq_compile_through_inductor_and_serves_new_token_counts(compiles):
    model, calib = MLP().eval(), calib_inputs()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        reference = svdq_compiler.compile(model, {"x": x, "scale": SCALE}, calib_inputs=calib,
                                          dynamic_shapes={"x": {1: DynDim("tokens", 2, 64)}})
        compiles.clear()
        compiled = torch.compile(model, backend="svdquant", dynamic=True, options={"calib_inputs": calib})
        with pytest.warns(UserWarning, match="2 calibration inputs from options"):
            out = compiled(x, SCALE)
        torch.testing.assert_close(out, reference(x=x, scale=SCALE))
        assert len(compiles) == 1 and svdq_ops(compiles[0]), "the backend quantized the region once"
        for tokens in (5, 13):
            other = torch.randn(2, tokens, 64)
            torch.testing.assert_close(compiled(other, SCALE), reference(x=other, scale=SCALE))
    assert len(compiles) == 1, "a new token count reused the dynamic graph"


def test_recompiles_when_dynamo_specialized_the_first_size(compiles, tmp_path):
    """...and verify checks each compile's passes, whose IR dumps go to a folder per compile."""
    model, calib = MLP().eval(), calib_inputs()
    with torch.no_grad():
        reference = svdq_compiler.compile(model, {"x": calib[0]["x"], "scale": SCALE}, calib_inputs=calib,
                                          dynamic_shapes={"x": {1: DynDim("tokens", 2, 64)}})
    compiles.clear()
    compiled = torch.compile(model, backend="svdquant", options={"calib_inputs": calib, "inductor": False,
                                                                 "verify": True, "dump_ir": tmp_path / "ir"})
    with torch.no_grad(), pytest.warns(UserWarning):
        for tokens in (8, 11, 6):
            x = torch.randn(2, tokens, 64)
            torch.testing.assert_close(compiled(x, SCALE), reference(x=x, scale=SCALE), rtol=0, atol=0)
    assert len(compiles) == 2, "the first graph was static; Dynamo's second one is dynamic and serves both sizes"
    assert [d["status"] for d in compiles[1].meta[CAPTURE_META]["dims"]] == ["dynamic"]
    folders = sorted((tmp_path / "ir").iterdir())
    assert len(folders) == 2 and all(list(folder.glob("*_fuse.py")) for folder in folders)


def test_saved_statistics_give_the_same_graph(compiles, tmp_path):
    model, calib = MLP().eval(), calib_inputs()
    x = torch.randn(2, 8, 64)
    stats = tmp_path / "calib.safetensors"
    with torch.no_grad():
        reference = svdq_compiler.compile(model, {"x": x, "scale": SCALE}, calib_inputs=calib, save_calib=stats)
        compiled = torch.compile(model, backend="svdquant", dynamic=True,
                                 options={"calib_stats": str(stats), "inductor": False, "config": "int4"})
        with pytest.warns(UserWarning, match="saved statistics"):
            torch.testing.assert_close(compiled(x, SCALE), reference(x=x, scale=SCALE), rtol=0, atol=0)
    source = next(r for r in compiles[-1].meta["svdq_report"]["passes"] if r["name"] == "calibrate")
    assert source["stats"]["source"].startswith("saved statistics (calib_inputs")


def test_positional_calibration_inputs_bind_to_the_forward_arguments(compiles):
    model, calib = MLP().eval(), calib_inputs()
    x = torch.randn(2, 8, 64)
    positional = [(sample["x"], sample["scale"]) for sample in calib]
    with torch.no_grad(), pytest.warns(UserWarning):
        by_name = torch.compile(model, backend="svdquant", options={"calib_inputs": calib, "inductor": False})(x, SCALE)
        torch._dynamo.reset()
        by_position = torch.compile(model, backend="svdquant",
                                    options={"calib_inputs": positional, "inductor": False})(x, SCALE)
    torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)


def test_without_calibration_smoothing_is_weight_only_and_says_so(compiles):
    model = MLP().eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad(), pytest.warns(UserWarning, match="weight-only calibration"):
        out = torch.compile(model, backend="svdquant", options={"config": "int4", "inductor": False})(x, SCALE)
    expected = model(x, SCALE)
    assert (out - expected).norm() / expected.norm() < 0.1
    calibrate = next(r for r in compiles[0].meta["svdq_report"]["passes"] if r["name"] == "calibrate")
    assert calibrate["stats"]["source"].startswith("weights")
    assert compiles[0].meta["svdq_report"]["config"]["calib_source"] == "weights"


@pytest.mark.parametrize("options, message", [
    ({"calib_input": []}, r"unknown svdquant backend option\(s\) \['calib_input'\].*valid options: config, "
                          r"calib_inputs, calib_stats, inductor, verify, dump_ir"),
    ({"calib_inputs": calib_inputs(1), "calib_stats": "x"}, "give one"),
    ({"config": "int3"}, "unknown preset 'int3'"),
    ({"calib_inputs": [{"scale": SCALE}]}, r"lacks \['x'\]"),
])
def test_bad_options_are_clear_errors(compiles, options, message):
    compiled = torch.compile(MLP(), backend="svdquant", options=options)
    with pytest.raises(Exception, match=message) as raised:
        compiled(torch.randn(2, 8, 64), SCALE)
    cause = raised.value
    while cause is not None and not isinstance(cause, InputError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, InputError)


def test_the_backend_is_registered_on_import():
    assert "svdquant" in torch._dynamo.list_backends(exclude_tags=())


# ---- every built-in family ------------------------------------------------------------------------------------

# Per family, the example size (`tokens` of the adapter's example_inputs: image tokens for FLUX, the patch or
# latent grid for the others) and another size the same dynamic graph serves. Dynamo's own guards decide what
# one graph serves: PixArt's patch embedding branches on the native grid and on square grids, torch's fake
# conv2d guards U-Net inputs on their element count, and duck sizing ties a size equal to the 8 text tokens to
# them, so each pair stays clear of those.
FAMILY_SIZES = {
    "flux": ((5, 7), (6, 9)),
    "sd3": ((5, 7), (6, 10)),
    "pixart": ((5, 7), (6, 10)),
    "sana": ((5, 7), (6, 10)),
    "unet": ((10, 12), (12, 10)),
}
FAST = svdq_compiler.QuantConfig.preset("int4", smooth_grid=2, calib_rows=32, iterations=1)

_FAMILIES = {}


@pytest.fixture
def reference_kernels(monkeypatch):
    """Fused ops run their reference path: the generated kernels (which the MLP test above runs through Inductor)
    take seconds per call under TRITON_INTERPRET, and what differs between families is the capture."""
    monkeypatch.setenv("SVDQ_KERNELS", "reference")


def family_case(family):
    """(model, calibration inputs, inputs at the example size, inputs at the other size, the reference graph
    from svdq_compiler.compile with the same config and calibration), built once per test process."""
    if family not in _FAMILIES:
        model = load_model(f"random:{family}").eval()
        adapter = adapter_for(model)
        example, other = FAMILY_SIZES[family]
        calib = adapter.calib_inputs(model, num_prompts=1, num_steps=2, tokens=example)
        inputs = adapter.example_inputs(model, batch=1, tokens=example, seed=3)
        other_inputs = adapter.example_inputs(model, batch=1, tokens=other, seed=4)
        with torch.no_grad():
            reference = svdq_compiler.compile(model, inputs, FAST, calib_inputs=calib)
        _FAMILIES[family] = model, calib, inputs, other_inputs, reference
    return _FAMILIES[family]


def pipeline_call(model, inputs):
    """The model called as a diffusers pipeline calls it: keyword arguments, return_dict=False."""
    return model(**{**inputs, "return_dict": False})[0]


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILY_SIZES))
def test_dynamic_compile_of_each_family_matches_svdq_compile_and_serves_another_size(family, compiles,
                                                                                     reference_kernels):
    model, calib, inputs, other, reference = family_case(family)
    compiles.clear()
    compiled = torch.compile(model, backend="svdquant", dynamic=True,
                             options={"calib_inputs": calib, "config": FAST, "inductor": False})
    with torch.no_grad(), pytest.warns(UserWarning, match="2 calibration inputs"):
        out = pipeline_call(compiled, inputs)
        again = pipeline_call(compiled, other)
        expected, expected_other = pipeline_call(reference, inputs), pipeline_call(reference, other)
    assert out.shape == expected.shape and again.shape == expected_other.shape != expected.shape
    # The same pipeline on the same calibration: the same λ, branches and 4-bit weights, so the same numbers.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, expected_other, rtol=0, atol=1e-5)
    assert len(compiles) == 1, "the other size reused the graph Dynamo compiled first"
    assert compiles[0].meta[CAPTURE_META]["adapter"] == f"{family} (torch.compile region)"
    assert len(svdq_ops(compiles[0])) == len(svdq_ops(reference))


@pytest.mark.parametrize("family", [
    "flux", *[pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_SIZES if f != "flux"]])
def test_static_compile_of_each_family_matches_svdq_compile(family, compiles, reference_kernels):
    model, calib, inputs, other, reference = family_case(family)
    compiles.clear()
    compiled = torch.compile(model, backend="svdquant", options={"calib_inputs": calib, "config": FAST,
                                                                 "inductor": False})
    with torch.no_grad(), pytest.warns(UserWarning, match="2 calibration inputs"):
        torch.testing.assert_close(pipeline_call(compiled, inputs), pipeline_call(reference, inputs),
                                   rtol=0, atol=1e-5)
    assert len(compiles) == 1
    assert all(d["status"] == "static" for d in compiles[0].meta[CAPTURE_META]["dims"])
