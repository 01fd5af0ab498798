"""Capture, save and load times of every family's random model, and what the capture made dynamic.

For each built-in `random:<family>`: capture (torch.export with the adapter's dynamic dimensions, decompositions,
unlifting, guard probing), save (re-export + torch.export.save), load, graph file size, and the eager and
loaded-graph forward times at the example size. Writes bench/results/capture-random-models.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.models import adapter_for, load_model

FAMILIES = ("flux", "pixart", "sd3", "sana", "unet")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 3)


def forward_seconds(fn, inputs, repeats: int) -> float:
    with torch.no_grad():
        fn(**inputs)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(**inputs)
    return round((time.perf_counter() - start) / repeats, 5)


def bench_family(family: str, repeats: int, folder: Path) -> dict:
    model = load_model(f"random:{family}")
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, batch=2)
    gm, capture_s = timed(lambda: svdq_compiler.capture(model, inputs))
    path = folder / f"{family}.pt"
    _, save_s = timed(lambda: svdq_compiler.save(gm, path))
    loaded, load_s = timed(lambda: svdq_compiler.load(path))
    report = gm.meta["svdq_capture"]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "nodes": len(gm.graph.nodes),
        "export_attempts": report["export_attempts"],
        "dynamic": sorted({d["name"] for d in report["dims"] if d["status"] == "dynamic"}),
        "static": {d["name"]: d["reason"] for d in report["dims"] if d["status"] == "static"},
        "relaxed_guards": report["relaxed_guards"] is not None,
        "capture_s": capture_s, "save_s": save_s, "load_s": load_s,
        "graph_bytes": path.stat().st_size,
        "eager_forward_s": forward_seconds(model, inputs, repeats),
        "loaded_forward_s": forward_seconds(loaded, inputs, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families")
    parser.add_argument("--repeats", type=int, default=5, help="forward calls timed per model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/capture-random-models.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families.split(","):
            results[family] = bench_family(family, args.repeats, Path(folder))
            print(family, results[family])
    write_result({"benchmark": "capture/save/load of the random built-in models", "machine": machine(),
                  "results": results}, args.out)


if __name__ == "__main__":
    main()
