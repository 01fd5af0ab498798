"""Image quality of the shipped tiny FLUX compiled to int4 from each calibration source, against fp32.

    python tools/calibration_sources.py [--pairs 80] [--threads 1] [--out bench/results/calibration-sources-tiny-flux.json]
    python tools/calibration_sources.py --table bench/results/calibration-sources-tiny-flux.json   # README's table

Every row compiles the same transformer with the same preset and is sampled through the tiny-flux pipeline on the
same (prompt, seed) pairs as tools/eval_quality.py's table (its scoring and fp32 reference are reused): PSNR and SSIM
against the fp32 images, Fréchet distance to real Fashion-MNIST images, class accuracy. The rows differ only in
where the statistics of smoothing, the low-rank branch and the per-layer choices come from:

- real prompts: a calibration set collected through the model's own pipeline (svdq_compiler/calibration_set.py:
  the tiny text encoder, sampler and guidance on the class prompts, one step drawn per quarter of the schedule);
- random conditioning: what `svdq-compile` gives a FLUX model without a pipeline (the FLUX adapter's random text
  embeddings and latents on the flow-matching schedule), with the same number of denoiser calls and rows;
- data-free, smoothing none / weight-only: the streaming compile (`--stream on --stream-smoothing …`), which runs
  no calibration at all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_common import machine, write_result
from eval_quality import compile_preset, fp32_reference, shown

import svdq_compiler
from svdq_compiler.models.tiny_flux_eval import EVAL_BATCH, eval_pairs, sample_pairs, score_images

PRESET = "int4"


def real_prompt_set(pipeline, prompts: int, steps: int):
    from svdq_compiler.calibration_set import collect
    from svdq_compiler.models.fmnist import PROMPTS

    return collect(pipeline, [PROMPTS[i % len(PROMPTS)] for i in range(prompts)], steps, seed=0)


def random_conditioning(model, prompts: int, steps: int):
    """The FLUX adapter's random inputs, two rows per call as the guided sampler's calls have (cond, uncond)."""
    from svdq_compiler.models.flux import FluxAdapter
    from svdq_compiler.models.tiny_flux import TOKEN_GRID

    return FluxAdapter().calib_inputs(model, prompts, steps, seed=0, batch=2, tokens=TOKEN_GRID)


def streamed(smoothing: str, folder: Path) -> tuple[torch.nn.Module, dict]:
    """The data-free streaming compile of the tiny-flux transformer folder, loaded back."""
    from svdq_compiler.config import QuantConfig
    from svdq_compiler.streaming import compile_streaming

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "graph.pt"
        report = compile_streaming(folder / "transformer", out, QuantConfig.preset(PRESET), calibration=smoothing,
                                   dtype=torch.float32)
        graph = svdq_compiler.load(out)
    totals = report["layers"]["totals"] if "layers" in report else {}
    return graph, {"compile_s": round(time.perf_counter() - start, 1),
                   # no calibration rows, so no measured per-layer errors
                   **{k: totals.get(k) for k in ("fallbacks", "four_bit_weight_share", "compression_ratio")}}


def table(result: dict) -> str:
    """The rows of a result as a Markdown table, fp32 first."""
    def cell(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| calibration | FD (↓) | PSNR (↑) | worst PSNR | SSIM (↑) | class accuracy |", "|---|---:|---:|---:|---:|---:|"]
    order = ("real prompts", "random conditioning", "data-free, smoothing none", "data-free, smoothing weight-only")
    rows = sorted(result["rows"].items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    for name, row in [("fp32 (no quantization)", result["fp32"]), *rows]:
        lines.append(f"| {name} | {cell(row['frechet_distance'], 2)} | {cell(row.get('psnr'), 2)} | "
                     f"{cell(row.get('psnr_min'), 2)} | {cell(row.get('ssim'), 4)} | {row['accuracy']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=80)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=EVAL_BATCH)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-cache", type=Path, default=Path("build/quality/tiny-flux-fp32.pt"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/calibration-sources-tiny-flux.json"))
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the table of a written result; nothing runs")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    args.folder = None  # the shipped model (fp32_reference's cache key reads it)
    torch.set_num_threads(args.threads)
    began, load_start = time.perf_counter(), os.getloadavg()

    from svdq_compiler.models import adapter_for, tiny_flux
    from svdq_compiler.models.fmnist import load_classifier, reference_statistics

    model = tiny_flux.load_transformer()
    pipeline = tiny_flux.load_pipeline(transformer=model)
    example = adapter_for(model).example_inputs(model, batch=2)
    pairs = eval_pairs(args.pairs)
    labels = torch.tensor([pair.label for pair in pairs])
    classifier = load_classifier()
    real = reference_statistics(classifier)

    def score(images, reference):
        return score_images(images, reference, labels, classifier, real)

    reference, fp32_row = fp32_reference(args, pipeline, pairs, score)
    rows: dict[str, dict] = {}

    def write(complete: bool) -> None:
        # Rewritten after every row, so a run cut short on the shared machine still leaves what it measured; the
        # CPU time says what the wall times would be without the other work the load average counts.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        write_result({"benchmark": "calibration-sources", "complete": complete, "model": "tiny-flux",
                      "preset": PRESET,
                      "reference": "fp32 images of the same (prompt, seed) pairs (PSNR, SSIM); the 10,000 real "
                                   "Fashion-MNIST test images (Fréchet distance on the shipped classifier's features)",
                      "sampler": asdict(pipeline.sampler),
                      "eval_pairs": {"count": len(pairs), "first_seed": pairs[0].seed, "per_sampler_call": args.batch},
                      "calibration": {"prompts": args.calib_prompts, "steps": args.calib_steps, "seed": 0},
                      "fp32": fp32_row, "rows": rows, "wall_s": round(time.perf_counter() - began, 1),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "nice": os.nice(0),
                      "load_average_start": load_start, "machine": machine()}, args.out)

    def sample(name: str, graph, extra: dict) -> None:
        start = time.perf_counter()
        images = sample_pairs(pipeline.with_transformer(graph), pairs, batch=args.batch)
        rows[name] = {**score(images, reference), "sample_s": round(time.perf_counter() - start, 1), **extra}
        print(name, shown(rows[name]), flush=True)
        write(complete=False)

    start = time.perf_counter()
    calibration_set = real_prompt_set(pipeline, args.calib_prompts, args.calib_steps)
    collect_s = round(time.perf_counter() - start, 1)
    graph, extra = compile_preset(model, example, PRESET, calibration_set)
    sample("real prompts", graph, {**extra, "collect_s": collect_s, "calibration": calibration_set.source,
                                   "calibration_rows": sum(s["hidden_states"].shape[0] for s in calibration_set)})
    random_inputs = random_conditioning(model, args.calib_prompts, args.calib_steps)
    graph, extra = compile_preset(model, example, PRESET, random_inputs)
    sample("random conditioning", graph, {**extra, "calibration": f"FLUX adapter random conditioning "
                                                                   f"({args.calib_prompts} prompts × {args.calib_steps} steps)",
                                          "calibration_rows": sum(s["hidden_states"].shape[0] for s in random_inputs)})
    for smoothing in ("none", "weight-only"):
        graph, extra = streamed(smoothing, tiny_flux.TINY_FLUX_DIR)
        sample(f"data-free, smoothing {smoothing}", graph,
               {**extra, "calibration": f"none (streaming compile, --stream-smoothing {smoothing})"})

    write(complete=True)


if __name__ == "__main__":
    main()
