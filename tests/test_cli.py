"""svdq-compile and svdq-inspect: the documented end-to-end run, IR dumps, the report, and one-line errors."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from svdq_compiler.cli import compile_main, compile_parser, inspect_main, inspect_parser, pass_line
from svdq_compiler.serialize import FORMAT_VERSION

LOAD_AND_COMPARE = textwrap.dedent("""
    import sys, torch, svdq_compiler
    from svdq_compiler.models import load_model, adapter_for
    graph = svdq_compiler.load(sys.argv[1])
    model = load_model("random:flux")
    adapter = adapter_for(model)
    for batch, tokens in [(2, None), (1, 1024)]:
        inputs = adapter.example_inputs(model, batch=batch, tokens=tokens, seed=7)
        with torch.no_grad():
            compiled, reference = graph(**inputs)[0], model(**inputs)[0]
        error = float((compiled - reference).norm() / reference.norm())
        assert error < 0.1, f"relative error {error} at batch {batch}, tokens {tokens}"
    print("close to eager")
""")


def console_script(name):
    script = Path(sys.executable).parent / name
    entry = {"svdq-compile": "compile_main", "svdq-inspect": "inspect_main"}[name]
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from svdq_compiler.cli import {entry}; sys.exit({entry}())"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`svdq-compile random:flux --out g.pt --dump-ir ir` as the README shows it, plus --report, --verify and
    --save-calib."""
    folder = tmp_path_factory.mktemp("cli")
    graph, dumps, report = folder / "g.pt", folder / "ir", folder / "report.json"
    run = subprocess.run(console_script("svdq-compile") + ["random:flux", "--out", str(graph), "--dump-ir", str(dumps),
                                                            "--report", str(report), "--verify", "--progress", "on",
                                                            "--save-calib", str(folder / "calib.safetensors")],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr
    return graph, dumps, json.loads(report.read_text()), run


def test_compile_writes_a_graph_that_a_new_process_runs_like_eager(compiled):
    graph, _, report, run = compiled
    assert graph.stat().st_size == report["output"]["bytes"] == report["compression"]["graph_bytes"] > 0
    assert "smaller than float32" in run.stdout  # random weights: no checkpoint to compare with
    assert f"wrote {graph}" in run.stdout and "image tokens 2..65536" in run.stdout
    assert "save" in run.stderr  # the progress bar named the steps
    # The quantizing passes ran; the graph computes the int4 model, close to what the model does.
    modified = {record["name"] for record in report["passes"] if record["modified"]}
    assert {"annotate_linears", "smooth", "lowrank", "quantize_weights", "lower"} <= modified
    check = subprocess.run([sys.executable, "-c", LOAD_AND_COMPARE, str(graph)], capture_output=True, text=True,
                           timeout=1800)
    assert check.returncode == 0, check.stderr
    assert "close to eager" in check.stdout


def test_saved_calibration_statistics_load_and_name_their_readers(compiled):
    from svdq_compiler.calibration import load_calibration

    graph, _, report, _ = compiled
    calibration = load_calibration(graph.parent / "calib.safetensors")
    recorded = next(r for r in report["passes"] if r["name"] == "calibrate")["stats"]
    assert len(calibration.sites) == recorded["sites"] and calibration.inputs == recorded["inputs"]
    assert all(site.readers and site.rows.shape[0] <= 512 for site in calibration.sites.values())


def test_compile_is_quiet_and_says_where_each_output_went(compiled):
    """No dependency's warnings (accelerate, diffusers' to(), torch's LeafSpec and pt2 archive notices) on stderr;
    the last line names every output."""
    graph, dumps, report, run = compiled
    # stderr holds the progress bars only (the run asked for them)
    assert not re.search(r"(?i)warn|accelerate|casting directly|complete tensor|LeafSpec|torchvision|Traceback",
                         run.stderr), run.stderr
    folder = graph.parent
    assert run.stdout.rstrip().splitlines()[-1] == (
        f"outputs: graph {graph}; report {folder / 'report.json'}; IR dumps {dumps}; "
        f"calibration statistics {folder / 'calib.safetensors'}")
    assert report["written"]["graph"] == str(graph)


def test_one_dump_per_pass(compiled):
    _, dumps, report, _ = compiled
    names = ["capture"] + [record["name"] for record in report["passes"]]
    expected = [f"{i:03d}_{name}{suffix}" for i, name in enumerate(names) for suffix in (".py", ".stats.json")]
    expected += [f"{i:03d}_fuse.kernels.py" for i, name in enumerate(names) if name == "fuse"]  # generated source
    assert sorted(p.name for p in dumps.iterdir()) == sorted(expected)
    assert "def forward" in (dumps / "000_capture.py").read_text()
    assert json.loads((dumps / "000_capture.stats.json").read_text())["name"] == "capture"


def test_report_describes_the_compile(compiled):
    _, _, report, _ = compiled
    assert report["model"] == "random:flux" and report["adapter"] == "flux"
    assert report["config"]["preset_name"] == "int4"
    assert {d["name"] for d in report["capture"]["dims"]} == {"batch", "image_tokens", "text_tokens"}
    assert set(report["steps_s"]) == {"load model", "example inputs", "calibration inputs", "compile", "save"}
    assert report["calibration"]["source"] == "random conditioning"  # a built-in has no pipeline
    assert report["versions"]["torch"] and report["totals"]["nodes"] > 100


def test_inspect_summarizes_the_graph(compiled, capsys):
    graph, _, report, _ = compiled
    assert inspect_main([str(graph)]) == 0
    text = capsys.readouterr().out
    for expected in [f"svdq graph format {FORMAT_VERSION}", "FluxTransformer2DModel (adapter flux)", "preset int4",
                     "image tokens 2..65536", f"nodes: {report['totals']['nodes']}", "svdq ops",
                     "parameters: "]:
        assert expected in text
    assert inspect_main([str(graph), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["svdq_ops"] > 0 and summary["parameter_bytes"] == report["totals"]["parameter_bytes"]
    assert inspect_main([str(graph), "--layers"]) == 0
    layers = capsys.readouterr().out
    assert "transformer_blocks.0.ff.net.2" in layers and "A:uint4/g64" in layers and "compression" in layers
    # every layer's choice, measured: the AdaLN layer's weight-only candidates with their errors
    adaln = next(line for line in layers.splitlines() if line.startswith("transformer_blocks.0.norm1.linear "))
    assert "chose " in adaln and "plain 0." in adaln and "+awq" in adaln
    assert inspect_main([str(graph), "--ir"]) == 0
    assert "def forward(self, hidden_states" in capsys.readouterr().out


def test_inspect_honours_every_flag_together(compiled, capsys):
    graph = str(compiled[0])
    assert inspect_main([graph, "--ir", "--json"]) == 0
    assert "def forward(self, hidden_states" in json.loads(capsys.readouterr().out)
    assert inspect_main([graph, "--layers", "--ir", "--kernels"]) == 0
    text = capsys.readouterr().out
    layers_at, ir_at, kernels_at = (text.index(marker) for marker in
                                    ("layers quantized", "def forward(self, hidden_states", "@triton.jit"))
    assert layers_at < ir_at < kernels_at and "svdq graph format" in text
    assert inspect_main([graph, "--layers", "--ir", "--kernels", "--json"]) == 0
    sections = json.loads(capsys.readouterr().out)
    assert set(sections) == {"summary", "ir", "kernels"}
    assert sections["summary"]["layer_report"]["totals"]["layers"] > 0 and sections["kernels"][0]["source"]


def test_inspect_prints_the_generated_kernels(compiled, capsys):
    graph = compiled[0]
    assert inspect_main([str(graph), "--kernels", "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)
    assert {k["kind"] for k in kernels} == {"quantize_lora_down", "gemm", "weight_only_gemm"}  # AdaLN: kernel W
    assert all("@triton.jit" in k["source"] for k in kernels)
    assert inspect_main([str(graph), "--kernels"]) == 0
    text = capsys.readouterr().out
    distinct = {k["spec"] for k in kernels}
    assert text.count("# ==== ") == len(distinct) and all(f"# spec: {spec}\n" in text for spec in distinct)
    assert all(re.search(rf"launched by .*\b{k['node']}\b", text) for k in kernels)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["portable", "custom"])
def test_compile_also_exports_onnx(form, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    import svdq_compiler
    from svdq_compiler.codegen.fused_ops import kernel_backend

    graph, model_path = tmp_path / "g.pt", tmp_path / "g.onnx"
    assert compile_main(["random:flux", "--out", str(graph), "--onnx", str(model_path), "--onnx-form", form,
                         "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["onnx"] == {"path": str(model_path), "bytes": model_path.stat().st_size, "form": form}
    model = onnx.load(str(model_path))
    domains = {node.domain for node in model.graph.node}
    if form == "custom":
        assert "svdq" in domains
        return
    assert domains <= {"", "ai.onnx"}
    loaded = svdq_compiler.load(graph)
    inputs = {name: value for name, value in loaded.graph_module.meta["svdq_capture_inputs"].items()
              if isinstance(value, torch.Tensor)}
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    with kernel_backend("reference"), torch.no_grad():
        expected = loaded(**inputs, return_dict=False)[0].numpy()
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def test_help_documents_every_flag():
    for parser in (compile_parser(), inspect_parser()):
        for action in parser._actions:
            assert action.help and len(action.help) > 10, action.option_strings or action.dest
        text = parser.format_help()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text


@pytest.mark.parametrize("argv, message", [
    (["random:nope", "--out", "{tmp}/g.pt"], "unknown model name 'random:nope'.*random:flux"),
    (["{tmp}/missing-folder", "--out", "{tmp}/g.pt"], "no such file or folder"),
    (["random:flux", "--out", "{tmp}/file/g.pt"], "cannot create the folder of --out"),
    (["random:flux", "--out", "{tmp}"], "--out is a folder"),
    (["random:flux", "--out", "{tmp}/g.pt", "--report", "{tmp}/file/r.json"], "cannot create the folder of --report"),
    (["random:flux", "--out", "{tmp}/g.pt", "--save-calib", "{tmp}/file/c.st"], "cannot create the folder of --save-calib"),
    (["random:flux", "--out", "{tmp}/g.pt", "--onnx", "{tmp}"], "--onnx is a folder"),
    (["random:flux", "--out", "{tmp}/g.pt", "--passes", "annotate,nope"], r"unknown pass\(es\)"),
    (["random:flux", "--out", "{tmp}/g.pt", "--set", "ranks=3"], "unknown QuantConfig field"),
    (["random:flux", "--out", "{tmp}/g.pt", "--tokens", "40x4x"], None),
])
def test_bad_input_is_one_line_and_leaves_no_graph(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if message is None:  # argparse rejects the value itself
        with pytest.raises(SystemExit) as exit_:
            compile_main(argv)
        assert exit_.value.code == 2 and "is not a token count" in capsys.readouterr().err
        return
    assert compile_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdq-compile: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "g.pt").exists()


def test_onnx_form_that_cannot_hold_the_preset_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    import svdq_compiler.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded: the refusal came after the work started")

    monkeypatch.setattr(svdq_compiler.models, "load_model", no_loading)
    graph = tmp_path / "g.pt"
    graph.write_text("an earlier graph")
    assert compile_main(["random:flux", "--out", str(graph), "--preset", "nvfp4", "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nvfp4 has no portable ONNX form" in err and "--onnx-form custom" in err
    assert graph.read_text() == "an earlier graph" and not (tmp_path / "x.onnx").exists()


def test_onnx_without_the_onnx_packages_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    import importlib.util

    import svdq_compiler.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded: the refusal came after the work started")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    monkeypatch.setattr(svdq_compiler.models, "load_model", no_loading)
    assert compile_main(["random:flux", "--out", str(tmp_path / "g.pt"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the package onnxscript" in err and "svdq-compiler[onnx]" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shipped_model_compiles_and_runs_in_a_16_bit_dtype(dtype, tmp_path, capsys, monkeypatch):
    import torch

    # The fused ops' reference path: this checks the CLI and the model's dtype (the kernels have their own tests).
    monkeypatch.setenv("SVDQ_KERNELS", "reference")

    import svdq_compiler
    from svdq_compiler.models import adapter_for, load_model

    graph = tmp_path / "g.pt"
    assert compile_main(["tiny-flux", "--out", str(graph), "--dtype", dtype, "--batch", "1", "--calib-prompts", "1",
                         "--calib-steps", "1"]) == 0, capsys.readouterr().err
    model = load_model("tiny-flux", dtype=getattr(torch, dtype))
    inputs = adapter_for(model).example_inputs(model, batch=2, seed=3)
    assert inputs["hidden_states"].dtype == getattr(torch, dtype)
    loaded = svdq_compiler.load(graph)
    with torch.no_grad():
        got, want = loaded(**inputs)[0], model(**inputs)[0]
    assert got.dtype == want.dtype == getattr(torch, dtype)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.15


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdq-inspect: error: no such graph file") and err.count("\n") == 1


def test_pass_lines_show_scalars_and_small_tables_only():
    record = {"name": "smooth", "modified": True, "wall_s": 1.234,
              "stats": {"groups": 2, "search": "grid", "roles": {"qkv": 3, "out": 1},
                        "per_group": {"a": {"alpha": 0.5}, "b": {"alpha": 0.7}}, "fallbacks": ["x: too large"]}}
    assert pass_line(record) == ('pass smooth: changed, 1.23s groups=2 search=grid roles={"qkv":3,"out":1} '
                                 'per_group=[2] fallbacks=[1]')


@pytest.mark.parametrize("main", ["compile_main", "inspect_main"])
def test_help_imports_neither_torch_nor_diffusers(main):
    """--help must answer at once: building the parsers imports nothing heavy (torch alone takes seconds)."""
    code = textwrap.dedent(f"""
        import sys
        from svdq_compiler.cli import {main}
        try:
            {main}(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print("heavy:", sorted(m for m in ("torch", "diffusers", "transformers", "triton", "numpy") if m in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: svdq-" in run.stdout and run.stdout.rstrip().endswith("heavy: []")


def test_help_names_every_builtin_model():
    from svdq_compiler.models import builtin_names

    help_text = " ".join(compile_parser().format_help().split())
    assert all(name in help_text for name in builtin_names())
