"""The smoothing search (`svdquant.search`, what the smooth pass runs per group) on groups of FLUX.1-12B's sizes.

The groups of one double block (hidden 3072, MLP 12288: the stacked q/k/v of a stream, its output projection,
the MLP up and down projections) and of one single block (q/k/v and the MLP up reading one tensor, 21504 × 3072;
the 3072 × 15360 output projection), random bf16 weights, reading `--rows` bf16 sample rows (the calibration
reservoir: 512 by default, of 8 samples × 256 image tokens) with a few outlier channels; the int4 preset's
search (its grid, search_rows, search_outputs, search_svd, search_refine). CPU seconds of this process per group, and
the (α, β) chosen; with `--all-outputs`, also the same search on every output row of each weight and the regret of
ranking on a subset of them (the objective on every row of the subset's choice against the full search's).

`--before DIR` runs the same groups, in a second process, with the svdq_compiler package found in DIR (an
importable copy of an earlier commit: `git archive <commit>` with passes/ and codegen/ copied under
svdq_compiler/), so one run records both. Writes bench/results/smooth-search-flux12b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (name, [(member, rows)], columns, role of the members, post-GELU input)
GROUPS = [
    ("double.attn_qkv", [("to_q", 3072), ("to_k", 3072), ("to_v", 3072)], 3072, "qkv", False),
    ("double.attn_out", [("to_out", 3072)], 3072, "out", False),
    ("double.mlp_up", [("ff.0", 12288)], 3072, "mlp_up", False),
    ("double.mlp_down", [("ff.2", 3072)], 12288, "mlp_down", True),
    ("single.qkv_mlp", [("to_q", 3072), ("to_k", 3072), ("to_v", 3072), ("proj_mlp", 12288)], 3072, "qkv",
     False),
    ("single.proj_out", [("proj_out", 3072)], 15360, "out", False),
    # AdaLN modulation (weight-only: the search is AWQ's, with 16-bit activations and no branch)
    ("double.adaln", [("norm1.linear", 18432)], 3072, "adaln", False),
    ("single.adaln", [("norm.linear", 9216)], 3072, "adaln", False),
]
# How many of each group one double / single block has (the double block has an image and a text stream).
PER_BLOCK = {"double": 2, "single": 1}


def worker(rows: int, threads: int, only: list[str] | None, all_outputs: bool) -> dict:
    import torch

    from svdq_compiler.config import QuantConfig
    from svdq_compiler.ir import Role
    from svdq_compiler.svdquant import GroupProblem, search, smoothing_candidates

    torch.set_num_threads(threads)
    config = QuantConfig.preset("int4")
    candidates = smoothing_candidates(config.smooth, config.smooth_grid)
    result = {}
    for index, (name, members, columns, role, post_gelu) in enumerate(GROUPS):
        if only and name not in only:
            continue
        scheme = config.scheme(config.role_schemes["adaln"]) if role == "adaln" else \
            config.scheme("w4a4", unsigned_input=post_gelu)
        search_rank = scheme.rank if scheme.act is not None else 0  # as the smooth pass searches
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(rows, columns, generator=generator)
        x[:, torch.randperm(columns, generator=generator)[:8]] *= 30  # outlier channels
        if post_gelu:
            x = torch.nn.functional.gelu(x)
        weights = {member: (torch.randn(n, columns, generator=generator) / columns ** 0.5).bfloat16()
                   for member, n in members}
        stacked = Role.QKV if role == "qkv" else Role.OTHER
        entries = [(member, member, "x", stacked if member.startswith("to_") else Role.OTHER)
                   for member, _ in members]
        problem = GroupProblem.build(scheme, torch.bfloat16, weights, {"x": x.bfloat16()},
                                     {"x": scheme.shift} if post_gelu else {}, entries)
        absmax = x.add(scheme.shift if post_gelu else 0.0).abs().amax(0)
        start, cpu = time.perf_counter(), time.process_time()
        # an earlier commit's search has no coarse-to-fine option (nor the config field)
        refine = {"refine": config.search_refine} if hasattr(config, "search_refine") else {}
        # an earlier commit's search ranks on every output row (nor has it the config field)
        outputs = {"search_outputs": config.search_outputs} if hasattr(config, "search_outputs") else {}
        (alpha, beta), scale, error, identity_error = search(problem, absmax, candidates, search_rank,
                                                             config.search_svd, config.calib_seed,
                                                             config.search_rows, **refine, **outputs)
        result[name] = {"cpu_s": round(time.process_time() - cpu, 2), "wall_s": round(time.perf_counter() - start, 2),
                        "alpha": alpha, "beta": beta, "error_ratio": round(error / identity_error, 4),
                        "weight": [sum(n for _, n in members), columns]}
        if all_outputs and outputs.get("search_outputs") is not None:
            # the same search ranking on every output row; `regret`: how much larger the objective on every output
            # row is for the subset's choice than for this one's
            problem.grams.clear()  # its own Gram matrices, as a search of its own would compute them
            cpu = time.process_time()
            (alpha_all, beta_all), scale_all, _, _ = search(problem, absmax, candidates, search_rank,
                                                            config.search_svd, config.calib_seed, config.search_rows,
                                                            **refine)
            result[name]["every_output_row"] = {"cpu_s": round(time.process_time() - cpu, 2), "alpha": alpha_all,
                                                "beta": beta_all}
            ranked = problem.subsample(config.search_rows, config.calib_seed)
            both = ranked.candidate_errors(torch.stack([scale, scale_all]), search_rank, config.search_svd,
                                           config.calib_seed)
            result[name]["regret"] = round(float(both[0] / both[1]) - 1, 5)
        print(name, result[name], file=sys.stderr, flush=True)
    return result


def per_block(groups: dict) -> dict:
    return {kind: round(sum(g["cpu_s"] * PER_BLOCK[kind] for name, g in groups.items()
                            if name.startswith(kind)), 1) for kind in PER_BLOCK}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="calibration sample rows per site")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", type=Path, help="a directory with the baseline's importable svdq_compiler")
    parser.add_argument("--groups", nargs="*", help="only these groups (names as in GROUPS)")
    parser.add_argument("--all-outputs", action="store_true",
                        help="also search each group ranking on every output row (search_outputs=None), in the same "
                             "process: its CPU seconds, its choice, and the subset choice's regret")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/smooth-search-flux12b.json"))
    args = parser.parse_args()
    problem = "--rows and --threads must be at least 1" if args.rows < 1 or args.threads < 1 else \
        f"--before {args.before}: no svdq_compiler/svdquant.py there" if args.before is not None and \
        not (args.before / "svdq_compiler" / "svdquant.py").is_file() else \
        f"--groups: unknown {sorted(set(args.groups) - {g[0] for g in GROUPS})}" if args.groups and \
        set(args.groups) - {g[0] for g in GROUPS} else None
    if problem:
        print(f"bench_smooth_search: {problem}", file=sys.stderr)
        sys.exit(2)
    if args.worker:
        print(json.dumps(worker(args.rows, args.threads, args.groups, args.all_outputs)))
        return
    from bench_common import machine, write_result

    load_start = os.getloadavg()
    runs = {}
    for label, path in (("before", args.before), ("after", None)):
        if label == "before" and path is None:
            continue
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if path is not None:  # first on sys.path, ahead of the editable install of this checkout
            env["PYTHONPATH"] = str(path.resolve())
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rows", str(args.rows),
                   "--threads", str(args.threads)] + (["--groups", *args.groups] if args.groups else []) + \
            (["--all-outputs"] if args.all_outputs and label == "after" else [])
        # cwd outside the checkout: the script's folder would otherwise shadow PYTHONPATH's package
        done = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{label} run failed: {done.stderr.strip().splitlines()[-1:]}")
        runs[label] = {"groups": json.loads(done.stdout), "cpu_s_per_block": None}
        runs[label]["cpu_s_per_block"] = per_block(runs[label]["groups"])
        print(label, runs[label]["cpu_s_per_block"], flush=True)
    report = {"benchmark": "smooth-search", "model": "FLUX.1-12B layer sizes (random bf16 weights)",
              "preset": "int4", "rows": args.rows, "per_block": PER_BLOCK, **runs,
              "load_average_start": load_start, "machine": machine()}
    if "before" in runs:
        before, after = runs["before"], runs["after"]
        report["speedup"] = {name: round(before["groups"][name]["cpu_s"] / group["cpu_s"], 2)
                             for name, group in after["groups"].items()}
        report["speedup_per_block"] = {kind: round(before["cpu_s_per_block"][kind] / value, 2)
                                       for kind, value in after["cpu_s_per_block"].items() if value}
        report["same_choice"] = {name: (group["alpha"], group["beta"]) == (before["groups"][name]["alpha"],
                                                                           before["groups"][name]["beta"])
                                 for name, group in after["groups"].items()}
    write_result(report, args.out)


if __name__ == "__main__":
    main()
