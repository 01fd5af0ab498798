"""Sampling time of the shipped tiny-flux per (prompt, seed) pair and sampler step, by pairs per sampler call:
fp32 and compiled presets, as `tools/eval_quality.py tiny-flux` samples them.

The batch sizes are interleaved over `--rounds` rounds (the machine is shared, so load drifts during a run) and
the best round per batch size is kept. Writes bench/results/sampling-tiny-flux.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.models import adapter_for, tiny_flux
from svdq_compiler.models.tiny_flux_eval import eval_pairs, sample_pairs


def per_pair_step_ms(pipeline, pairs, batch: int, steps: int) -> float:
    start = time.perf_counter()
    sample_pairs(lambda prompts, seeds: pipeline(prompts, seeds, num_steps=steps), pairs, batch=batch)
    return (time.perf_counter() - start) / (len(pairs) * steps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="fp32,int4", help="fp32 and/or preset names")
    parser.add_argument("--batches", default="5,10,20", help="pairs per sampler call to compare")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per pair")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampling-tiny-flux.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_flux.load_transformer()
    adapter = adapter_for(model)
    pipeline = tiny_flux.load_pipeline(transformer=model)
    example = adapter.example_inputs(model, batch=2)
    calib = adapter.calib_inputs(model, 4, 4, seed=0, batch=2)
    pairs = eval_pairs(args.pairs)
    batches = [int(b) for b in args.batches.split(",")]
    rows = {}
    for preset in args.presets.split(","):
        transformer = model if preset == "fp32" else svdq_compiler.compile(model, example, preset, calib_inputs=calib)
        candidate = pipeline.with_transformer(transformer)
        rounds = {batch: [] for batch in batches}
        for _ in range(args.rounds):
            for batch in batches:
                rounds[batch].append(round(per_pair_step_ms(candidate, pairs, batch, args.steps), 1))
        rows[preset] = {str(batch): {"best_ms": min(times), "rounds_ms": times} for batch, times in rounds.items()}
        print(preset, {batch: row["best_ms"] for batch, row in rows[preset].items()}, flush=True)
    write_result({"benchmark": "tiny-flux sampling time per pair and step", "unit": "ms",
                  "pairs": args.pairs, "steps": args.steps, "rounds": args.rounds, "by_preset_and_batch": rows,
                  "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
