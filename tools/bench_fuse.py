"""Wall and CPU time of the fuse pass on lowered graphs: the random FLUX built-in and the ~100M-parameter FLUX of
bench_compile.py (6 double + 11 single blocks, the node count that matters for the pass's cost).

Each model is compiled once up to `lower` (int4, the cheapest search settings: the searches do not change the
graph fuse sees), then fuse runs on fresh deep copies `--repeat` times; the best time is kept (the machine is
shared). `--label` names the measurement (e.g. the code version) and results accumulate under that label in
bench/results/fuse-time.json, so a before/after pair sits in one file.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from bench_common import machine, write_result
from bench_compile import build

import svdq_compiler
from svdq_compiler.models import adapter_for
from svdq_compiler.pipeline import PASS_REGISTRY

UP_TO_LOWER = ["annotate_linears", "calibrate", "smooth", "lowrank", "quantize_weights", "lower"]


def measure(name: str, repeat: int) -> dict:
    model, _, _ = build(name)
    adapter = adapter_for(model)
    config = svdq_compiler.QuantConfig.preset("int4", smooth_grid=2, calib_prompts=1, calib_steps=1,
                                              calib_rows=64)
    lowered = svdq_compiler.compile(model, adapter.example_inputs(model), config, passes=UP_TO_LOWER)
    nodes = len(lowered.graph.nodes)
    walls, cpus, stats = [], [], None
    for _ in range(repeat):
        gm = copy.deepcopy(lowered)
        wall, cpu = time.perf_counter(), time.process_time()
        stats = PASS_REGISTRY["fuse"](gm, None).stats
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"model": name, "nodes_before": nodes, "nodes_after": len(gm.graph.nodes),
            "linears_fused": stats["linears_fused"], "weight_only_fused": stats.get("weight_only_fused", 0),
            "kernel_a": stats["kernel_a"], "fuse_wall_s": round(min(walls), 3), "fuse_cpu_s": round(min(cpus), 3),
            "wall_s_all": [round(w, 3) for w in walls]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what this measurement is (e.g. before, after)")
    parser.add_argument("--models", default="random:flux,flux100m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuse-time.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(name, args.repeat) for name in args.models.split(",")]
    report = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "fuse-time", "runs": {}}
    report["runs"][args.label] = {"machine": machine(), "results": results}
    write_result(report, args.out)
    for r in results:
        print(f"{args.label}: {r['model']}: {r['nodes_before']} nodes, fuse {r['fuse_wall_s']} s wall, "
              f"{r['fuse_cpu_s']} s CPU")


if __name__ == "__main__":
    main()
