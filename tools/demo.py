"""`make demo`: compile a model end to end and show what came out.

Writes OUT/graph.pt, OUT/report.json and OUT/ir/ (one IR dump per pass), prints the svdq-inspect summary, then
loads the graph as a fresh user would and compares it with the original model at the captured size and at a
larger one (relative error of the quantized output; 0 when no pass quantized anything).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import svdq_compiler
from svdq_compiler.cli import DEFAULT_MODEL, compile_main, inspect_main
from svdq_compiler.models import adapter_for, load_model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, diffusers folder or .safetensors")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="output folder")
    parser.add_argument("--preset", default="int4", help="quantization preset")
    args = parser.parse_args(argv)
    graph = args.out / "graph.pt"
    status = compile_main([args.model, "--out", str(graph), "--preset", args.preset, "--dump-ir",
                           str(args.out / "ir"), "--report", str(args.out / "report.json"), "--verify"])
    if status:
        return status
    print()
    inspect_main([str(graph)])
    print()
    loaded = svdq_compiler.load(graph)
    model = load_model(args.model)
    adapter = adapter_for(model)
    example = adapter.example_inputs(model, batch=2, seed=1)
    tokens = adapter.tokens_of(model, example)
    larger = 4 * tokens if isinstance(tokens, int) else (2 * tokens[0], 2 * tokens[1])
    for label, inputs in [("at the captured size", example),
                          ("at batch 1 and 4x the image tokens",
                           adapter.example_inputs(model, batch=1, seed=2, tokens=larger))]:
        with torch.no_grad():
            error = relative_error(loaded(**inputs)[0], model(**inputs)[0])
        print(f"loaded graph vs the original model {label}: relative error {error:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
