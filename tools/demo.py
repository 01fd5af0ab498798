"""`make demo`: compile the shipped tiny FLUX to 4 bits, save it, load it back and look at its images.

In order, everything under OUT (build/demo/):
1. compile the model with int4 (svdq-compile with --verify) → graph.pt, report.json, ir/ (one IR dump per pass);
2. print svdq-inspect's summary with one line per linear (scheme, bytes, output error);
3. load graph.pt back as a fresh user would;
4. tiny-flux: sample fixed prompts × seeds with the fp32 model, the loaded int4 graph, and nvfp4 and w4a4-rtn
   graphs compiled the same way → grid.png (one row per prompt; column groups fp32 | int4 | nvfp4 | w4a4-rtn);
   any other model: compare the loaded graph with the original at the captured size and a larger one;
5. print the summary (bytes before and after, per-layer error, and per precision PSNR and SSIM against fp32, the
   Fréchet distance to real images and the classifier's accuracy) and write it to summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import svdq_compiler
from svdq_compiler.cli import DEFAULT_MODEL, compile_main, human_bytes, inspect_main
from svdq_compiler.files import write_json
from svdq_compiler.models import adapter_for, load_model

# Sized for "a few minutes on 2 cores" with the 5.12M model: on CPU the quantized graphs run the reference ops,
# 3–10× the fp32 cost per image (nvfp4 the most), so the grid is 2 seeds per prompt at 10 of the sampler's steps.
GRID_SEEDS = (0, 1)
GRID_STEPS = 10
GRID_PRECISIONS = ("fp32", "int4", "nvfp4", "w4a4-rtn")
# svdq-compile's defaults, so that the in-process compiles of the other presets see the inputs int4 saw.
EXAMPLE_BATCH, CALIB_PROMPTS, CALIB_STEPS = 2, 4, 4


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def compare_outputs(loaded, model) -> None:
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


def report_totals(report: dict) -> dict:
    totals = report["layers"]["totals"]
    return {key: totals[key] for key in ("model_bytes_before", "model_bytes_after", "compression_ratio",
                                         "four_bit_weight_share", "quantized_layers", "layers", "fallbacks",
                                         "output_rel_error_mean", "output_rel_error_max")}


def tiny_flux_grid(loaded, model, out: Path, int4_report: dict) -> dict:
    """Sample the grid with every precision, write grid.png, and score each precision's images."""
    from svdq_compiler.models import tiny_flux
    from svdq_compiler.models.fmnist import PROMPTS, load_classifier, reference_statistics, save_image_grid
    from svdq_compiler.models.tiny_flux_eval import SamplePair, sample_pairs, score_images

    adapter = adapter_for(model)
    shipped = tiny_flux.load_pipeline(transformer=model)
    pipeline = tiny_flux.TinyFluxPipeline(model, shipped.text_encoder, replace(shipped.sampler, num_steps=GRID_STEPS))
    example = adapter.example_inputs(model, batch=EXAMPLE_BATCH)
    calib = adapter.calib_inputs(model, CALIB_PROMPTS, CALIB_STEPS, seed=0, batch=EXAMPLE_BATCH)
    pairs = [SamplePair(prompt, seed, label) for label, prompt in enumerate(PROMPTS) for seed in GRID_SEEDS]
    labels = torch.tensor([pair.label for pair in pairs])
    classifier = load_classifier()
    real = reference_statistics(classifier)
    transformers = {"fp32": model, "int4": loaded}
    totals = {"int4": report_totals(int4_report)}
    images, scores = {}, {}
    for precision in GRID_PRECISIONS:
        start = time.perf_counter()
        if precision not in transformers:
            gm = svdq_compiler.compile(model, example, precision, calib_inputs=calib)
            transformers[precision] = gm
            totals[precision] = report_totals(gm.meta[svdq_compiler.REPORT_META])
            print(f"compiled {precision} in {time.perf_counter() - start:.0f}s", flush=True)
        images[precision] = sample_pairs(pipeline.with_transformer(transformers[precision]), pairs)
        scores[precision] = score_images(images[precision], None if precision == "fp32" else images["fp32"], labels,
                                         classifier, real)
        print(f"sampled {precision}: {time.perf_counter() - start:.0f}s", flush=True)
    # One row per prompt: the seeds of fp32, then of int4, …
    seeds = len(GRID_SEEDS)
    cells = [images[precision][row * seeds + column]
             for row in range(len(PROMPTS)) for precision in GRID_PRECISIONS for column in range(seeds)]
    column_labels = [precision if column == 0 else "" for precision in GRID_PRECISIONS for column in range(seeds)]
    save_image_grid(torch.stack(cells), out / "grid.png", seeds * len(GRID_PRECISIONS), row_labels=PROMPTS,
                    column_labels=column_labels)
    return {"grid": str(out / "grid.png"), "prompts": list(PROMPTS), "seeds": list(GRID_SEEDS),
            "sampler": asdict(pipeline.sampler), "scores": scores, "compile_totals": totals}


def print_summary(summary: dict) -> None:
    print(f"\nsummary ({len(summary['prompts'])} prompts × {len(summary['seeds'])} seeds per precision, "
          f"{summary['sampler']['num_steps']} sampler steps; PSNR and "
          f"SSIM against the fp32 image of the same prompt and seed, FD to 10,000 real test images on this few "
          f"samples — compare the columns, not with the quality table's):")
    print(f"{'precision':<10} {'bytes':>19} {'ratio':>6} {'4-bit':>6} {'layer err':>10} {'PSNR':>7} {'SSIM':>6} "
          f"{'FD':>7} {'accuracy':>9}")
    for precision, score in summary["scores"].items():
        totals = summary["compile_totals"].get(precision)
        if totals is None:
            size = human_bytes(summary["compile_totals"]["int4"]["model_bytes_before"])
            ratio, share, error = "1.0", "0%", "-"
        else:
            size = f"{human_bytes(totals['model_bytes_before'])} → {human_bytes(totals['model_bytes_after'])}"
            ratio, share = f"{totals['compression_ratio']:.1f}", f"{totals['four_bit_weight_share']:.0%}"
            error = f"{totals['output_rel_error_mean']:.4f}"
        psnr = "-" if score.get("psnr") is None else f"{score['psnr']:.2f}"
        ssim = "-" if score.get("ssim") is None else f"{score['ssim']:.3f}"
        print(f"{precision:<10} {size:>19} {ratio:>6} {share:>6} {error:>10} {psnr:>7} {ssim:>6} "
              f"{score['frechet_distance']:>7.2f} {score['accuracy']:>9.1%}")
    print("bytes: the model's parameters before and after; layer err: mean relative output error of the "
          "quantized linears on calibration rows (the per-layer table is above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, diffusers folder or .safetensors")
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="output folder")
    parser.add_argument("--preset", default="int4", help="quantization preset of graph.pt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    graph = args.out / "graph.pt"
    status = compile_main([args.model, "--out", str(graph), "--preset", args.preset, "--dump-ir",
                           str(args.out / "ir"), "--report", str(args.out / "report.json"), "--verify",
                           "--batch", str(EXAMPLE_BATCH), "--calib-prompts", str(CALIB_PROMPTS),
                           "--calib-steps", str(CALIB_STEPS)])
    if status:
        return status
    print()
    inspect_main([str(graph), "--layers"])
    print()
    loaded = svdq_compiler.load(graph)
    model = load_model(args.model)
    if adapter_for(model).name != "tiny-flux" or args.preset != "int4":
        compare_outputs(loaded, model)
        return 0
    report = json.loads((args.out / "report.json").read_text())
    summary = tiny_flux_grid(loaded, model, args.out, report)
    summary["graph_bytes"] = graph.stat().st_size
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "summary.json", summary, "demo summary")
    print_summary(summary)
    print(f"\ngraph.pt {human_bytes(summary['graph_bytes'])}; wrote {summary['grid']} and "
          f"{args.out / 'summary.json'} in {summary['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
