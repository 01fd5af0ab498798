"""The streaming compile: a diffusers folder compiled one block at a time into a graph.pt that load opens."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

import svdq_compiler
from scale_fixtures import TINY_FLUX, write_tiny_flux
from svdq_compiler.config import QuantConfig
from svdq_compiler.errors import CheckpointError
from svdq_compiler.models import adapter_for, adapter_for_class
from svdq_compiler.pipeline import PASS_REGISTRY, PassContext, run_passes
from svdq_compiler.streaming import compile_streaming, unit_of

DTYPE = "bfloat16"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Fused ops run their reference path here (the kernels have their own tests under the interpreter)."""
    monkeypatch.setenv("SVDQ_KERNELS", "reference")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("flux"), dtype=DTYPE, max_shard_gb=0.0002)


@pytest.fixture(scope="module")
def streamed(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "graph.pt"
    report = compile_streaming(folder, out, QuantConfig.preset("int4"), calibration="none")
    return out, report


def inputs_for(model, seed):
    return adapter_for(model).calib_inputs(model, 1, 2, seed=seed, batch=2)


def run(model, inputs):
    with torch.no_grad():
        return torch.cat([model(**x)[0].float() for x in inputs])


def test_units_are_blocks():
    assert unit_of("transformer_blocks.3.attn.to_q.weight") == "transformer_blocks.3"
    assert unit_of("single_transformer_blocks.12.proj_out.part0.weight") == "single_transformer_blocks.12"
    assert unit_of("x_embedder.weight") == "(model)"


def test_flux_folders_get_the_flux_adapter():
    assert adapter_for_class("FluxTransformer2DModel").name == "flux"


def test_streamed_graph_loads_and_runs_close_to_the_fp_model(folder, streamed):
    out, report = streamed
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    gm = svdq_compiler.load(out)
    inputs = inputs_for(model, seed=7)
    reference = run(model, inputs)
    error = float((run(gm, inputs) - reference).norm() / reference.norm())
    assert error < 0.25, error  # int4 W4A4 on a 64-wide random model, data-free
    stream = report["streaming"]
    assert [u["name"] for u in stream["units"]] == ["(model)", "transformer_blocks.0", "single_transformer_blocks.0"]
    assert stream["peak_rss_bytes"] > 0 and stream["wall_s"] > 0
    assert stream["output_bytes"] == out.stat().st_size
    # every quantized linear went through the passes: lowered, fused, with a branch of the configured rank
    dense_block_linears = [n.args[1].target for n in gm.graph.nodes
                           if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                           and n.args[1].op == "get_attr" and n.args[1].target.endswith(".weight")
                           and "transformer_blocks." in n.args[1].target]
    assert dense_block_linears == []  # every block linear became svdq ops (16-bit linears are only the branch's)
    assert any("svdq" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    layers = report["layers"]["layers"]
    assert {layer["rank"] for layer in layers if layer["scheme"] and "A:" in layer["scheme"] and "A:16" not in
            layer["scheme"]} == {32}


def test_block_wise_calibration_equals_the_in_memory_compile(folder, tmp_path):
    """Calibrated block by block, with every block input spilled to disk, the streamed compile writes the very
    tensors (λ, branches, packed weights) of the same passes run in memory on the whole model calibrated at once."""
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    adapter = adapter_for(model)
    calib = adapter.calib_inputs(model, 2, 2, seed=3, tokens=16)
    config = QuantConfig.preset("int4").replace(svd="randomized", calib_rows=32)
    out = tmp_path / "blockwise.pt"
    report = compile_streaming(folder, out, config, calibration="activations", calib_inputs=calib, tokens=16,
                               memory_budget=0)
    example = adapter.example_inputs(model, batch=2, tokens=16)
    ctx = PassContext(config=config, example_inputs=example, calib_inputs=calib, adapter=adapter, model=model)
    in_memory = run_passes(svdq_compiler.capture(model, example), ctx, [PASS_REGISTRY[name] for name in (
        "annotate_linears", "calibrate", "smooth", "compress", "lower", "fuse")]).state_dict()
    streamed = {name.removeprefix("graph_module."): t for name, t in svdq_compiler.load(out).state_dict().items()}
    assert sorted(streamed) == sorted(in_memory)
    assert [name for name in in_memory if not torch.equal(in_memory[name], streamed[name])] == []
    smoothed = [t for name, t in in_memory.items() if name.endswith(".smooth")]
    assert smoothed and any(not torch.all(t == 1) for t in smoothed)  # activation-aware λ, not the data-free 1
    stream = report["streaming"]
    assert [u["name"] for u in stream["units"]] == ["transformer_blocks.0", "single_transformer_blocks.0", "(model)"]
    block_calibration = stream["block_calibration"]
    assert block_calibration["inputs"] == 4 and block_calibration["propagation"] == "fp"
    assert block_calibration["spilled_bytes"] > 0 and block_calibration["peak_memory_bytes"] == 0


def test_streamed_compile_verifies_dumps_and_prints_every_unit(folder, streamed, tmp_path, capsys):
    """--verify, --dump-ir and --print-ir-after-change on the streamed path: the whole-graph passes dump at the top,
    each unit into its own folder, and none of it changes what is written."""
    dumps, out = tmp_path / "ir", tmp_path / "g.pt"
    (dumps / "units" / "007_stale").mkdir(parents=True)
    (dumps / "units" / "007_stale" / "003_fuse.py").write_text("from an earlier compile")
    compile_streaming(folder, out, QuantConfig.preset("int4"), calibration="none", dump_ir=dumps, verify=True,
                      print_ir_after_change=True)
    assert sorted(p.name for p in dumps.glob("*.py")) == ["000_capture.py", "001_annotate_linears.py"]
    units = sorted(p.name for p in (dumps / "units").iterdir())
    assert units == ["000_model", "001_transformer_blocks.0", "002_single_transformer_blocks.0"]
    for unit in units:
        names = sorted(p.name for p in (dumps / "units" / unit).glob("*.py"))
        # each unit's kernels once, in the dump of the pass that made them
        assert names == ["000_unit_weights_read.py", "001_synthetic_calibration.py", "002_compress.py",
                         "003_lower.py", "004_fuse.kernels.py", "004_fuse.py"], (unit, names)
    last = (dumps / "units" / units[-1] / "004_fuse.py").read_text()
    assert "svdq.fused_gemm" in last and "# svdq: (set aside) transformer_blocks.0.attn.to_q" in last
    assert json.loads((dumps / "units" / units[0] / "002_compress.stats.json").read_text())["name"] == "compress"
    printed = capsys.readouterr().out
    assert printed.count("// ----- IR after fuse -----") == 3 and printed.count("// ----- IR after annotate_linears")
    first, second = svdq_compiler.load(streamed[0]).state_dict(), svdq_compiler.load(out).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_streams_with_verify_and_ir_dumps(folder, tmp_path, capsys):
    from svdq_compiler.cli import compile_main

    dumps = tmp_path / "ir"
    assert compile_main([str(folder), "--out", str(tmp_path / "g.pt"), "--stream", "on", "--verify", "--dump-ir",
                         str(dumps), "--tokens", "16"]) == 0
    assert (dumps / "001_annotate_linears.py").is_file() and len(list((dumps / "units").iterdir())) == 3
    assert f"IR dumps {dumps}" in capsys.readouterr().out


def test_streamed_compile_verifies_each_units_passes(folder, tmp_path, monkeypatch):
    """With verify on, a unit pass that breaks an invariant is caught right after it, named with its unit's pass."""
    import svdq_compiler.streaming as streaming
    from svdq_compiler.passes.verify import VerifyError
    from svdq_compiler.pipeline import PassResult, make_pass

    def orphan(gm, ctx):
        gm.register_buffer("orphan", torch.zeros(1))
        return PassResult(gm, True)

    passes = streaming.unit_passes
    monkeypatch.setattr(streaming, "unit_passes", lambda *a: passes(*a) + [make_pass("orphan", orphan, summary="")])
    with pytest.raises(VerifyError, match=r"after orphan: parameter/buffer 'orphan' is not used"):
        compile_streaming(folder, tmp_path / "g.pt", QuantConfig.preset("int4"), calibration="none", verify=True)


@pytest.mark.slow
def test_streaming_is_deterministic(folder, streamed, tmp_path):
    """Two streaming compiles of one folder write the same tensors."""
    out, _ = streamed
    again = compile_streaming(folder, tmp_path / "again.pt", QuantConfig.preset("int4"), calibration="none")
    first, second = svdq_compiler.load(out).state_dict(), svdq_compiler.load(tmp_path / "again.pt").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again["streaming"]["calibration"] == "none"


@pytest.mark.slow
@pytest.mark.parametrize("smoothing, how", [("none", "none smoothing, data-free"),
                                            ("activations", "activations smoothing, calibrated block by block on 2")])
def test_cli_streams_a_folder_and_reports(folder, tmp_path, smoothing, how):
    out, report_path = tmp_path / "g.pt", tmp_path / "report.json"
    # The data-free run leaves --calib-prompts at its default, which the streamed compile's config must take too.
    prompts = ["--calib-prompts", "1"] if smoothing == "activations" else []
    done = subprocess.run([str(Path(sys.executable).parent / "svdq-compile"), str(folder), "--out", str(out), "--stream",
                           "on", "--stream-smoothing", smoothing, *prompts, "--calib-steps", "2",
                           "--tokens", "16", "--report", str(report_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "streamed 3 units" in done.stdout and how in done.stdout and "peak RSS" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["streaming"]["output_bytes"] == out.stat().st_size
    assert (report["streaming"]["block_calibration"] is not None) == (smoothing == "activations")
    assert report["calibration"]["source"] == ("random conditioning" if smoothing == "activations" else "none")
    assert ("calibration: random conditioning, calibrated block by block" in done.stdout) == (smoothing == "activations")


def test_missing_shard_fails_before_any_work(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in folder.iterdir():
        if not file.name.endswith("00002-of-00003.safetensors"):
            (broken / file.name).write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match="missing"):
        compile_streaming(broken, tmp_path / "g.pt", QuantConfig.preset("int4"), calibration="none")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".g.pt*"))


def test_mismatched_shapes_fail_before_any_work(folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    other = write_tiny_flux(tmp_path / "other", {**TINY_FLUX, "joint_attention_dim": 32}, dtype=DTYPE)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"context_embedder.weight: \[64, 32\]"):
        compile_streaming(other, tmp_path / "g.pt", QuantConfig.preset("int4"), calibration="none")


@pytest.mark.slow
def test_disk_full_during_the_stream_leaves_no_output(folder, tmp_path):
    mount = tmp_path / f"quota-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises((OSError, RuntimeError)):
            compile_streaming(folder, mount / "graph.pt", QuantConfig.preset("int4"), calibration="none")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_inspect_layers_of_a_streamed_graph_ends_with_the_totals(streamed, capsys):
    from svdq_compiler.cli import inspect_main

    out, report = streamed
    assert inspect_main([str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    totals = report["layers"]["totals"]
    assert totals["layers"] == len(report["layers"]["layers"]) > 0
    assert f"{totals['quantized_layers']}/{totals['layers']} layers quantized" in text
    assert totals["model_bytes_before"] > totals["model_bytes_after"] > 0 and "compression" in text
