"""Compile time and peak memory of the SVDQuant pipeline: a ~100M-parameter random FLUX transformer, or a
built-in model (the shipped tiny-flux, a random:<family>).

The 100M config has FLUX.1's structure (double and single blocks, guidance embedding, RoPE) at width 512;
calibration uses the model adapter's inputs (prompts × denoising steps). Writes
bench/results/compile-time-<model>.json: total and per-pass wall time and this process's CPU time (the machine
is shared: CPU time is what the code costs, wall time what a user waits), peak RSS, parameter count, the
output error against the FP model on a held-out input.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.models import adapter_for, load_model

FLUX_100M = dict(patch_size=1, in_channels=64, num_layers=6, num_single_layers=11, attention_head_dim=64,
                 num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True,
                 axes_dims_rope=(8, 28, 28))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(name: str) -> tuple[torch.nn.Module, str, dict | None]:
    if name == "flux100m":
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        return FluxTransformer2DModel(**FLUX_100M).eval().requires_grad_(False), "random FLUX, width 512", FLUX_100M
    return load_model(name).eval().requires_grad_(False), name, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux100m", help="flux100m, or a built-in name such as tiny-flux")
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None,
                        help="image tokens of each calibration input (flux100m: 256; default: the adapter's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                        help="a QuantConfig field, e.g. search_rows=null (repeatable)")
    parser.add_argument("--out", type=Path, help="default: bench/results/compile-time-<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokens = args.tokens or (256 if args.model == "flux100m" else None)
    model, description, config = build(args.model)
    parameters = sum(p.numel() for p in model.parameters())
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, tokens=tokens)
    calib = adapter.calib_inputs(model, args.prompts, args.steps, seed=0, tokens=tokens)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.override)}
    quant_config = svdq_compiler.QuantConfig.preset(args.preset, **overrides)
    rss_model = peak_rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    gm = svdq_compiler.compile(model, inputs, quant_config, calib_inputs=calib, progress=True)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    check = adapter.calib_inputs(model, 1, 1, seed=7, tokens=tokens)[0]
    with torch.no_grad():
        reference, compiled = model(**check)[0], gm(**check)[0]
    report = gm.meta["svdq_report"]
    totals = report["layers"]["totals"]
    passes_cpu = {record["name"]: record["cpu_s"] for record in report["passes"]}
    result = {
        "benchmark": "compile-time",
        "command": shlex.join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", ".venv/bin/python",
                               *sys.argv]),  # how to measure it again
        "model": description, "config": config, "parameters": parameters,
        "preset": args.preset, "overrides": overrides, "calibration_inputs": len(calib), "image_tokens": tokens,
        "compile_s": round(total, 1), "compile_cpu_s": round(total_cpu, 1),
        "capture_s": report["capture"]["wall_s"], "capture_cpu_s": round(total_cpu - sum(passes_cpu.values()), 1),
        "passes_s": {record["name"]: record["wall_s"] for record in report["passes"]},
        "passes_cpu_s": passes_cpu,
        "pass_statistics": {record["name"]: {key: value for key, value in record["stats"].items()
                                             if isinstance(value, (int, float, str)) or value is None}
                            for record in report["passes"]},
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_model_mib": round(rss_model, 1),
        "output_rel_error": float((compiled - reference).norm() / reference.norm()),
        "quantized_layers": totals["quantized_layers"], "fallbacks": totals["fallbacks"],
        "compression_ratio": totals["compression_ratio"], "machine": machine(),
    }
    print({k: v for k, v in result.items() if k not in ("config", "machine")})
    write_result(result, args.out or Path(f"bench/results/compile-time-{args.model.replace(':', '-')}.json"))


if __name__ == "__main__":
    main()
