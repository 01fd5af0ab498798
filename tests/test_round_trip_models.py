"""Every built-in model under every preset: compile, save, load in a fresh Python process, and get outputs
bit-identical to the graph's before saving (the graph-file checks, guards on nested inputs included, accept
what the compiler writes).

Each model is captured once and every preset runs the passes on a copy of that capture with one calibration
input; all the graphs of a run are loaded by ONE subprocess. The fused ops run their reference backend in both
processes (the kernels' own fresh-process test is tests/test_fresh_process.py). The default run pairs every
model with one preset and covers every preset once; the full 6 × 6 matrix is marked slow (capture dominates:
several seconds per model on 2 cores).
"""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._pytree as pytree

import svdq_compiler
from svdq_compiler import PRESETS
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_compiler.models import adapter_for, builtin_names, load_model
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline

MODELS = builtin_names()  # tiny-flux and random:{flux, pixart, sana, sd3, unet}
PRESET_NAMES = sorted(PRESETS)
# every model once and every preset once (presets assigned in turn); the slow test runs the whole matrix
DEFAULT_PAIRS = [(model, PRESET_NAMES[i % len(PRESET_NAMES)]) for i, model in enumerate(MODELS)]
# the smallest calibration that exercises every pass: one input, a coarse smoothing grid, one branch iteration
FAST = dict(calib_prompts=1, calib_steps=1, smooth_grid=2, iterations=1, calib_rows=64)

RUN_LOADED = textwrap.dedent("""
    import sys, torch, svdq_compiler
    import torch.utils._pytree as pytree
    cases = torch.load(sys.argv[1], weights_only=True)
    outputs = {}
    with torch.no_grad():
        for key, case in cases.items():
            graph = svdq_compiler.load(case["path"])
            outputs[key] = pytree.tree_leaves(graph(**case["inputs"]))
    torch.save(outputs, sys.argv[2])
""")


def _tensors(result) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def _compiled(pairs, tmp_path) -> dict[str, dict]:
    """{"model/preset": {"path", "inputs", "outputs"}} for each pair, each model captured once."""
    cases = {}
    for name in dict.fromkeys(model for model, _ in pairs):
        model = load_model(name)
        adapter = adapter_for(model)
        inputs = adapter.example_inputs(model)
        captured = svdq_compiler.capture(model, inputs)
        calib = adapter.calib_inputs(model, 1, 1, seed=0)
        check = adapter.calib_inputs(model, 1, 1, seed=99)[0]
        for preset in [p for m, p in pairs if m == name]:
            config = svdq_compiler.QuantConfig.preset(preset, **FAST)
            ctx = PassContext(config=config, example_inputs=inputs, calib_inputs=calib, adapter=adapter,
                              model=model)
            gm = run_passes(copy.deepcopy(captured), ctx, svdquant_pipeline())
            key = f"{name}/{preset}"
            path = svdq_compiler.save(gm, tmp_path / f"{name.replace(':', '_')}-{preset}.pt")
            with torch.no_grad():
                outputs = _tensors(gm(**check))
            cases[key] = {"path": str(path), "inputs": check, "outputs": outputs}
    return cases


def _round_trip(pairs, tmp_path) -> None:
    with kernel_backend("reference"):
        cases = _compiled(pairs, tmp_path)
    torch.save({k: {"path": c["path"], "inputs": c["inputs"]} for k, c in cases.items()}, tmp_path / "cases.pt")
    # one thread, as this process runs (conftest): CPU convolutions split their sums by thread, so two thread
    # counts can differ in the last bit (a U-Net's, on a 2-core Xeon)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "SVDQ_KERNELS": "reference",
           "SVDQ_KERNEL_CACHE": str(tmp_path / "kernel_cache")}
    run = subprocess.run([sys.executable, "-c", RUN_LOADED, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=1800, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    after = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(after) == sorted(cases)
    for key, case in cases.items():
        assert len(after[key]) == len(case["outputs"]) > 0, key
        for got, want in zip(after[key], case["outputs"]):
            assert torch.equal(got, want), f"{key}: the loaded graph's output differs"


def test_every_model_and_every_preset_round_trips_through_a_fresh_process(tmp_path):
    assert {p for _, p in DEFAULT_PAIRS} == set(PRESET_NAMES) and len(MODELS) >= 6
    _round_trip(DEFAULT_PAIRS, tmp_path)


@pytest.mark.slow
def test_the_whole_model_by_preset_matrix_round_trips_through_a_fresh_process(tmp_path):
    _round_trip([(model, preset) for model in MODELS for preset in PRESET_NAMES], tmp_path)
