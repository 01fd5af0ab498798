"""Compile time and peak memory of the SVDQuant pipeline on a ~100M-parameter random FLUX transformer.

The config has FLUX.1's structure (double and single blocks, guidance embedding, RoPE) at width 512;
calibration uses the FLUX adapter's inputs (prompts × denoising steps, 8 by default). Writes
bench/results/compile-time-flux100m.json: total and per-pass wall time, peak RSS, parameter count.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.models import adapter_for

FLUX_100M = dict(patch_size=1, in_channels=64, num_layers=6, num_single_layers=11, attention_head_dim=64,
                 num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True,
                 axes_dims_rope=(8, 28, 28))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of each calibration input")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench/results/compile-time-flux100m.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_100M).eval().requires_grad_(False)
    parameters = sum(p.numel() for p in model.parameters())
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model, tokens=args.tokens)
    calib = adapter.calib_inputs(model, args.prompts, args.steps, seed=0, tokens=args.tokens)
    rss_model = peak_rss_mib()
    start = time.perf_counter()
    gm = svdq_compiler.compile(model, inputs, args.preset, calib_inputs=calib, progress=True)
    total = time.perf_counter() - start
    check = adapter.calib_inputs(model, 1, 1, seed=7, tokens=args.tokens)[0]
    reference, compiled = model(**check)[0], gm(**check)[0]
    report = gm.meta["svdq_report"]
    totals = report["layers"]["totals"]
    result = {
        "benchmark": "compile-time", "model": "random FLUX, width 512", "config": FLUX_100M,
        "parameters": parameters, "preset": args.preset, "calibration_inputs": len(calib),
        "image_tokens": args.tokens, "compile_s": round(total, 1),
        "passes_s": {record["name"]: record["wall_s"] for record in report["passes"]},
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_model_mib": round(rss_model, 1),
        "output_rel_error": float((compiled - reference).norm() / reference.norm()),
        "quantized_layers": totals["quantized_layers"], "fallbacks": totals["fallbacks"],
        "compression_ratio": totals["compression_ratio"], "machine": machine(),
    }
    print({k: v for k, v in result.items() if k not in ("config", "machine")})
    write_result(result, args.out)


if __name__ == "__main__":
    main()
