"""save → a new Python process → load → run gives exactly the outputs the graph gave before saving, on the fused
kernels (Triton interpreter on CPU, kernels regenerated from the spec strings into an empty cache) and on the
reference ops, at the captured token count and at others."""

import os
import subprocess
import sys
import textwrap

import torch

import svdq_compiler
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_blocks import compile_block

RUN_LOADED = textwrap.dedent("""
    import sys, torch, svdq_compiler
    from svdq_compiler.codegen.fused_ops import kernel_backend
    graph = svdq_compiler.load(sys.argv[1])
    inputs = torch.load(sys.argv[2], weights_only=True)
    outputs = {}
    with torch.no_grad():
        for backend in ("triton", "reference"):
            with kernel_backend(backend):
                for name, x in inputs.items():
                    outputs[f"{backend}/{name}"] = graph(x=x)[0]
    torch.save(outputs, sys.argv[3])
""")


def test_a_new_process_loads_the_graph_and_reproduces_its_outputs_exactly(tmp_path):
    gm = compile_block("int4")
    inputs = {f"tokens{t}": torch.randn(2, t, 64, generator=torch.Generator().manual_seed(t)) for t in (8, 21)}
    before = {}
    with torch.no_grad():
        for backend in ("triton", "reference"):
            with kernel_backend(backend):
                before.update({f"{backend}/{name}": gm(x=x)[0] for name, x in inputs.items()})
    graph = svdq_compiler.save(gm, tmp_path / "graph.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SVDQ_KERNEL_CACHE": str(tmp_path / "empty_kernel_cache")}
    run = subprocess.run([sys.executable, "-c", RUN_LOADED, str(graph), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=1800, env=env)
    assert run.returncode == 0, run.stderr
    after = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert any((tmp_path / "empty_kernel_cache").rglob("*.py"))  # the new process generated the kernels
