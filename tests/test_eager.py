"""The eager path (svdq_compiler/eager.py) on the two diffusers classes torch.export cannot capture."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import svdq_compiler
from eager_models import Wobbly, hidream, hidream_inputs, lumina2, lumina2_inputs, wobbly_inputs
from svdq_compiler.codegen.fused_ops import BACKEND_ENV, kernel_backend
from svdq_compiler.codegen.sources import kernel_sources
from svdq_compiler.config import QuantConfig
from svdq_compiler.eager import SVDQLinear, compile_eager, compile_report_of, data_dependent_failure, stub_of
from svdq_compiler.errors import CaptureError, CheckpointError, InputError
from svdq_compiler.ir import EAGER_META, Role
from svdq_compiler.lora import apply_lora
from svdq_compiler.models.base import DynDim

MODELS = {"hidream": (hidream, hidream_inputs), "lumina2": (lumina2, lumina2_inputs)}


def relative_error(y, reference):
    return ((y - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request):
    build, inputs = MODELS[request.param]
    calib = [inputs(8, seed=seed) for seed in range(3)]
    model = compile_eager(build(), inputs(8), QuantConfig.preset("int4"), calib_inputs=calib,
                          reason="torch.export failed (test)")
    return request.param, model, build(), inputs


def test_linears_are_swapped_with_roles_from_the_recording(compiled):
    name, model, _, _ = compiled
    report = model.svdq_eager.report
    swapped = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    assert report["path"] == "eager" and report["path_reason"] == "torch.export failed (test)"
    assert len(swapped) == report["eager"]["swapped_linears"] > 10
    roles = {info["name"]: info["role"] for info in report["linears"]}
    # annotate_linears' structural roles, read from the recorded forward: attention inputs are q/k/v and share
    # one group (one activation quantization), outputs of attention are out projections
    block = "double_stream_blocks.0.block.attn1" if name == "hidream" else "layers.0.attn"
    assert roles[f"{block}.to_q"] == roles[f"{block}.to_k"] == Role.QKV.value
    assert model.get_submodule(f"{block}.to_q").group is model.get_submodule(f"{block}.to_k").group
    assert roles[f"{block}.to_out" if name == "hidream" else f"{block}.to_out.0"] == Role.OUT.value


def test_runs_at_two_resolutions_close_to_the_float_model(compiled):
    """On the generated kernels (the Triton interpreter here) for Lumina2; HiDream's MoE calls its experts on token
    subsets, tens of kernel launches that take the interpreter 40 s, so it runs the reference ops (what the CPU
    runs outside tests)."""
    name, model, reference, inputs = compiled
    with torch.no_grad(), kernel_backend("triton" if name == "lumina2" else "reference"):
        for size, text in ((8, 4), (16, 6)):
            x = inputs(size, text=text, seed=7)
            y, expected = model(**x)[0], reference(**x)[0]
            assert y.shape == expected.shape
            assert 0 < relative_error(y, expected) < 0.08, (name, size)


def test_a_group_recomputes_for_a_new_input(compiled):
    """q/k/v share one computation while the input is the same tensor; another tensor is computed afresh."""
    name, model, reference, _ = compiled
    block = "double_stream_blocks.0.block.attn1" if name == "hidream" else "layers.0.attn"
    to_q, to_k = model.get_submodule(f"{block}.to_q"), model.get_submodule(f"{block}.to_k")
    a, b = torch.randn(2, 5, to_q.in_features), torch.randn(2, 5, to_q.in_features)
    with torch.no_grad():
        q_a = to_q(a)
        k_b = to_k(b)
        assert torch.equal(k_b, to_k(b.clone()))
        assert not torch.equal(q_a, to_q(b))
        b.mul_(2)  # changed in place: same object, new version
        assert torch.equal(to_k(b), to_k(b.clone()))


RUN_LOADED = textwrap.dedent("""
    import sys, torch, svdq_compiler
    model = svdq_compiler.load(sys.argv[1])
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        outputs = {name: model(**x, return_dict=False)[0] for name, x in inputs.items()}
    torch.save(outputs, sys.argv[3])
    print(type(model).__name__, model.svdq_eager.report["path"])
""")


def test_saved_model_loads_in_a_new_process_with_equal_outputs(compiled, tmp_path):
    name, model, _, inputs = compiled
    stub_tensors = lambda: [*model.svdq_eager.stub.parameters(), *model.svdq_eager.stub.buffers()]  # noqa: E731
    # the stub graph holds no tensors of its own (a `model.to(device)` would leave copies behind): save takes the
    # model's live ones
    assert stub_tensors() and all(t.is_meta for t in stub_tensors())
    path = svdq_compiler.save(model, tmp_path / "model.pt")
    assert all(t.is_meta for t in stub_tensors())
    samples = {f"size{size}": {k: v for k, v in inputs(size, text=text, seed=11).items() if k != "return_dict"}
               for size, text in ((8, 4), (16, 6))}
    with torch.no_grad(), kernel_backend("reference"):  # the interpreter's kernels: test_fresh_process.py
        before = {key: model(**x, return_dict=False)[0] for key, x in samples.items()}
    torch.save(samples, tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", BACKEND_ENV: "reference"}
    done = subprocess.run([sys.executable, "-c", RUN_LOADED, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [type(model).__name__, "eager"]
    after = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for key in samples:
        assert torch.equal(after[key], before[key]), key


def test_the_saved_file_refuses_a_tampered_layout(compiled, tmp_path):
    """svdq_eager.json is read as data and checked: a class that is not a diffusers model is one clear error."""
    _, model, _, _ = compiled
    stub = model.svdq_eager.stub
    saved = dict(stub.meta[EAGER_META])
    try:
        stub.meta[EAGER_META] = {**saved, "class": "os"}
        path = svdq_compiler.save(model, tmp_path / "model.pt")
    finally:
        stub.meta[EAGER_META] = saved
    with pytest.raises(CheckpointError, match="'os' is not a diffusers model class"):
        svdq_compiler.load(path)


def test_lora_and_onnx_refuse_an_eager_model_in_one_line(compiled):
    _, model, _, _ = compiled
    with pytest.raises(InputError, match="compiled by the eager path") as caught:
        apply_lora(model, {})
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="compiled by the eager path"):
        svdq_compiler.export_onnx(model, "unused.onnx")


@pytest.mark.parametrize("name, cause, calibration", [
    # torch 2.13 names the SymInt that cannot become a slice bound; 2.11 the guard it could not evaluate
    ("lumina2", ("SymInt", "data-dependent expression"), "adapter auto (1 prompts x 1 steps)"),
    ("hidream", (".numpy()",), "adapter auto (1 prompts x 1 steps)")])  # its layer-stacked text states are built
def test_compile_falls_back_to_eager_on_data_dependent_code_and_says_why(name, cause, calibration):
    """svdq_compiler.compile (path="auto") tries torch.export first; Lumina2's slices from `.tolist()` and
    HiDream's MoE routing through `.numpy()` stop it."""
    build, inputs = MODELS[name]
    config = QuantConfig.preset("w4a4-rtn", calib_prompts=1, calib_steps=1)
    model = svdq_compiler.compile(build(), inputs(8), config)
    report = model.svdq_eager.report
    assert report["path"] == "eager"
    assert report["path_reason"].startswith("torch.export failed: ")
    assert any(phrase in report["path_reason"] for phrase in cause), report["path_reason"]
    assert report["eager"]["calibration_source"].startswith(calibration)
    with pytest.raises(CaptureError):
        svdq_compiler.compile(build(), inputs(8), "w4a4-rtn", path="graph")


def test_a_capture_failure_of_another_kind_is_not_hidden_by_the_fallback():
    class NeedsTwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, x, y):
            return self.proj(x) + y

    with pytest.raises(CaptureError):
        svdq_compiler.compile(NeedsTwoInputs(), {"x": torch.randn(2, 64)}, "w4a4-rtn")
    assert data_dependent_failure(ValueError("unrelated")) is None


def test_a_fake_tensor_left_in_the_exported_program_takes_the_eager_path():
    """ZImage's torch.export failure: an op export cannot trace through, which the eager path runs for real."""
    message = "We found a fake tensor in the exported program constant's list. This typically means ..."
    wrapped = CaptureError("torch.export could not capture M: " + message)
    wrapped.__cause__ = RuntimeError(message)
    assert data_dependent_failure(wrapped).startswith("We found a fake tensor")


def test_a_symbolic_size_handed_to_numpy_takes_the_eager_path():
    """Cosmos's learnable positions scale by np.sqrt(numel / numel): numpy gets a symbolic size while exported,
    and the eager path runs the model's code with real sizes at any grid."""

    class NumpyOfSizes(Wobbly):
        def forward(self, hidden_states, wobble):
            return super().forward(hidden_states, wobble) * float(np.sqrt(hidden_states.numel() / 2))

    tokens = DynDim("tokens", 2, 64)
    dynamic = {"hidden_states": {1: tokens}, "wobble": {1: tokens}}
    compiled = svdq_compiler.compile(NumpyOfSizes(), wobbly_inputs(8), "w4a4-rtn", dynamic_shapes=dynamic)
    report = compile_report_of(compiled)
    assert report["path"] == "eager" and "SymFloat" in report["path_reason"], report["path_reason"]
    with torch.no_grad():
        assert compiled(**wobbly_inputs(12)).shape == (2, 12, 64)


def test_unknown_path_is_an_input_error():
    with pytest.raises(InputError, match="path='trace'"):
        svdq_compiler.compile(lumina2(), lumina2_inputs(8), "int4", path="trace")


def test_eager_and_graph_paths_agree_on_a_model_both_can_compile():
    """Tiny FLUX through both paths: the same annotations, calibration, searches and kernels, so the outputs agree
    to fp32 summation order (measured: 9e-8 relative; bound 1e-5). The graph path splits a linear reading a
    concatenation (FLUX single blocks' proj_out) into per-part layers, which a module swap cannot, so that
    split is off here for both; with it on, the two differ by 0.5% (both 0.6-0.7% from fp32)."""
    from diffusers import FluxTransformer2DModel
    from scale_fixtures import TINY_FLUX, flux_inputs

    def build():
        torch.manual_seed(0)
        return FluxTransformer2DModel(**TINY_FLUX).eval()

    config = QuantConfig.preset("int4", split_concat_linears=False)
    calib = [flux_inputs(seed=seed) for seed in range(2)]
    graph = svdq_compiler.compile(build(), flux_inputs(), config, calib_inputs=calib, dynamic_shapes=None)
    eager = svdq_compiler.compile(build(), flux_inputs(), config, calib_inputs=calib, path="eager")
    assert graph.meta["svdq_report"]["path"] == "graph" and eager.svdq_eager.report["path"] == "eager"
    assert graph.meta["svdq_report"]["path_reason"] == "torch.export captured the model"  # path="auto"
    # graph-level fusion where the graph exists: GELU and residual epilogues join the gemms of the whole-model
    # graph; the eager stub's linears have no neighbours to fuse with
    epilogues = [sum(bool(getattr(k.spec, "epilogue", ())) for k in kernel_sources(m)) for m in (graph, stub_of(eager))]
    assert epilogues[0] > 0 == epilogues[1], epilogues
    quantized = {i["name"]: (i["role"], i["scheme"], i["group"]) for i in graph.meta["svdq_report"]["linears"]
                 if i["scheme"]["weight"] is not None}
    assert quantized == {i["name"]: (i["role"], i["scheme"], i["group"]) for i in eager.svdq_eager.report["linears"]}
    kept = {line.split(":")[0] for line in eager.svdq_eager.report["eager"]["kept_16bit"]}
    assert {"x_embedder", "proj_out", "context_embedder"} <= kept
    x = flux_inputs(seed=5)
    with torch.no_grad():
        from_graph, from_eager, reference = graph(**x)[0], eager(**x)[0], build()(**x)[0]
    assert relative_error(from_eager, from_graph) < 1e-5
    assert relative_error(from_eager, reference) > 1e-3  # it did quantize


def test_svdq_compile_takes_the_eager_path_when_asked_and_says_so(tmp_path, capsys):
    from svdq_compiler.cli import compile_main, inspect_main

    out, report = tmp_path / "g.pt", tmp_path / "report.json"
    assert compile_main(["random:flux", "--path", "eager", "--preset", "w4a4-rtn", "--out", str(out), "--report",
                         str(report), "--calib-prompts", "1", "--calib-steps", "1", "--tokens", "16"]) == 0
    assert "path: eager (the eager path was asked for)" in capsys.readouterr().out
    assert json.loads(report.read_text())["path"] == "eager"
    assert inspect_main([str(out)]) == 0
    assert "path: the eager path was asked for" in capsys.readouterr().out
    # the summary reads the loaded stub graph, whose tensors are on the meta device: their sizes still count
    assert inspect_main([str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["parameter_bytes"] == svdq_compiler.parameter_bytes(svdq_compiler.load(out)) > 0
    assert inspect_main([str(out), "--kernels", "--json"]) == 0
    assert {record["kind"] for record in json.loads(capsys.readouterr().out)}  # the stub's fused kernels


def test_a_model_whose_inputs_the_auto_adapter_cannot_build_calibrates_on_its_example_inputs():
    """A diffusers model with a forward input no name rule knows (`wobble`): the auto adapter builds no
    calibration inputs, so the eager path calibrates on the example inputs it was given, and says so."""
    torch.manual_seed(0)
    reference = Wobbly().eval()
    model = svdq_compiler.compile(copy.deepcopy(reference), wobbly_inputs(8, 0), "int4", path="eager")
    source = model.svdq_eager.report["eager"]["calibration_source"]
    assert source.startswith("example_inputs (adapter auto builds none: ") and "wobble" in source
    assert isinstance(model.blocks[-1], SVDQLinear)  # proj, blocks.0 (read as embeddings) and out stay 16-bit
    other = wobbly_inputs(5, 1)  # another token count: the swapped linears take any
    with torch.no_grad():
        assert 1e-4 < relative_error(model(**other), reference(**other)) < 0.1


class KeywordCalls(torch.nn.Module):
    """Calls its linears by nn.Linear's argument name, as AnimateDiff's motion modules do (proj_in(input=...))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in, self.proj_out = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))

    def forward(self, hidden_states):
        h = self.proj_in(input=hidden_states)
        for block in self.blocks:
            h = h + block(input=torch.nn.functional.gelu(h))
        return self.proj_out(input=h)


def test_linears_called_by_keyword_are_calibrated_and_swapped():
    def inputs(seed):
        return {"hidden_states": torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed))}

    model = compile_eager(KeywordCalls().eval(), inputs(0), QuantConfig.preset("int4"),
                          calib_inputs=[inputs(seed) for seed in range(3)], reason="test")
    assert isinstance(model.blocks[1], SVDQLinear)  # (the roles keep the others 16-bit)
    with torch.no_grad(), kernel_backend("reference"):
        assert 0 < relative_error(model(**inputs(7)), KeywordCalls()(**inputs(7))) < 0.1


class FlexAttention(torch.nn.Module):
    """Self-attention through flex_attention (a higher-order operator, with a score_mod) between two linears."""

    def __init__(self, width=64, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.proj_in, self.norm = torch.nn.Linear(width, width), torch.nn.LayerNorm(width)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(width, width) for _ in range(3))
        self.to_out, self.proj_out = torch.nn.Linear(width, width), torch.nn.Linear(width, width)

    def forward(self, hidden_states):
        from torch.nn.attention.flex_attention import flex_attention

        h = self.proj_in(hidden_states)
        x = self.norm(h)
        batch, tokens, width = x.shape
        heads = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        distance_bias = lambda score, b, head, q, kv: score - 0.05 * (q - kv).abs()  # noqa: E731
        y = flex_attention(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)), score_mod=distance_bias)
        h = h + self.to_out(y.transpose(1, 2).reshape(batch, tokens, width))
        return self.proj_out(h)


def test_a_higher_order_operator_is_recorded_as_one_node_and_read_as_attention():
    """flex_attention reaches the recording as one higher-order operator call (its eager form compiles itself,
    which runs as plain Python while recording): its operands are the attention's q/k/v, its output the
    out projection's input, and the swapped model serves other token counts."""

    def inputs(seed, tokens=8):
        return {"hidden_states": torch.randn(2, tokens, 64, generator=torch.Generator().manual_seed(seed))}

    model = compile_eager(FlexAttention().eval(), inputs(0), QuantConfig.preset("int4"),
                          calib_inputs=[inputs(seed) for seed in range(3)], reason="test")
    roles = {info["name"]: info["role"] for info in model.svdq_eager.report["linears"]}
    assert roles["to_q"] == roles["to_k"] == roles["to_v"] == Role.QKV.value and roles["to_out"] == Role.OUT.value
    assert model.to_q.group is model.to_v.group and isinstance(model.to_out, SVDQLinear)
    with torch.no_grad(), kernel_backend("reference"):
        for tokens in (8, 13):
            x = inputs(7, tokens)
            assert 0 < relative_error(model(**x), FlexAttention()(**x)) < 0.08, tokens
