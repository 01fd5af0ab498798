"""Streaming compile benchmarks.

    python tools/bench_streaming.py quality --model random:flux      # data-free streaming vs calibrated compile
    python tools/bench_streaming.py full --folder /work/bigdata/flux-random --out /work/bigdata/flux12b.pt
    python tools/bench_streaming.py full --folder /work/bigdata/flux-random --out /work/bigdata/flux12b.pt \
        --smoothing activations --result bench/results/stream-flux12b-calibrated.json   # 4 prompts x 2 steps

`quality`: the same weights compiled three ways — the normal compile calibrated on the adapter's inputs, and
the streaming compile (from a diffusers folder of those weights) with weight-only smoothing and with no
smoothing — each compared with the fp model on held-out inputs (relative L2 error and cosine similarity of the
output, as tools/eval_quality.py measures them); for tiny-flux also the PSNR of the images the shipped sampler
draws with each against the fp model's (8 prompts, fixed seeds). Writes
bench/results/streaming-quality-<model>.json.

`full`: one streaming compile of a (large) diffusers folder in this process: wall time per step, peak RSS,
checkpoint and output bytes; with `--smoothing activations` block-wise calibration on the adapter's
`--calib-prompts` x `--calib-steps` inputs of `--tokens` image tokens. Writes bench/results/scale-<name>.json. Run it alone, in the background, on a
machine as quiet as you can get: the load average at start and end is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from bench_common import machine, write_result
from eval_quality import compare, first_output

import svdq_compiler
from svdq_compiler.config import QuantConfig
from svdq_compiler.files import write_json
from svdq_compiler.streaming import compile_streaming


def quality(args: argparse.Namespace) -> None:
    from svdq_compiler.models import adapter_for, load_model

    model = load_model(args.model)
    adapter = adapter_for(model)
    example = adapter.example_inputs(model, batch=2)
    calib = adapter.calib_inputs(model, 4, 2, seed=0, batch=2)
    eval_inputs = adapter.calib_inputs(model, 2, 2, seed=1234, batch=2)
    with torch.no_grad():
        reference = torch.cat([first_output(model(**inputs)).float() for inputs in eval_inputs])
    config = QuantConfig.preset(args.preset)
    rows = {}

    images = sample_images(args.model, model) if args.model == "tiny-flux" else None

    def evaluate(name: str, gm: torch.nn.Module, seconds: float, layers: dict | None) -> None:
        with torch.no_grad():
            output = torch.cat([first_output(gm(**inputs)).float() for inputs in eval_inputs])
        rows[name] = {**compare(reference, output, None), "compile_s": round(seconds, 1)}
        if images is not None:
            rows[name]["image_psnr_db_vs_fp"] = round(psnr(sample_images(args.model, gm), images), 2)
        if layers and layers.get("layers"):
            errors = [layer["output_rel_error"] for layer in layers["layers"]
                      if layer.get("output_rel_error") is not None]
            rows[name]["layer_output_rel_error_mean"] = round(sum(errors) / len(errors), 5) if errors else None
        print(name, rows[name], flush=True)

    start = time.perf_counter()
    gm = svdq_compiler.compile(model, example, config.replace(svd="randomized"), calib_inputs=calib)
    evaluate("calibrated", gm, time.perf_counter() - start, gm.meta["svdq_report"]["layers"])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        model.save_pretrained(folder)
        for smoothing in ("weight-only", "none"):
            start = time.perf_counter()
            out = Path(scratch) / f"{smoothing}.pt"
            report = compile_streaming(folder, out, config, calibration=smoothing)
            seconds = time.perf_counter() - start
            evaluate(f"streamed-{smoothing}", svdq_compiler.load(out), seconds, report["layers"])
    base = rows["calibrated"]["rel_l2"]
    for row in rows.values():
        row["rel_l2_vs_calibrated"] = round(row["rel_l2"] / base, 3) if base else None
    write_result({"benchmark": "streaming-quality", "model": args.model, "preset": args.preset,
                  "reference": "the fp model", "svd": "randomized (as the streaming compile uses)",
                  "calibration_inputs": "adapter calib_inputs(4 prompts, 2 steps, seed 0), batch 2",
                  "eval_inputs": "adapter calib_inputs(2, 2, seed=1234), batch 2",
                  "rows": rows, "machine": machine()},
                 Path(args.out or f"bench/results/streaming-quality-{args.model.replace(':', '-')}.json"))


PROMPTS = ["a sneaker", "an ankle boot", "a dress", "a bag", "a shirt", "a trouser", "a pullover", "a coat"]


def sample_images(model_name: str, transformer) -> torch.Tensor:
    """Images of the shipped sampler (fixed prompts and seeds) with `transformer` in place of the fp one."""
    from svdq_compiler.models.tiny_flux import load_pipeline

    return load_pipeline(transformer=transformer)(PROMPTS, seeds=100)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [0, 1] against the fp pipeline's (the "vs 16-bit" PSNR)."""
    mse = float((images.float() - reference.float()).pow(2).mean())
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def full(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()
    start = time.perf_counter()
    path = Path(args.result or f"bench/results/scale-{Path(args.folder).name}.json")
    progress: dict = {"benchmark": "streaming-compile", "complete": False, "folder": str(args.folder),
                      "preset": args.preset, "smoothing": args.smoothing, "nice": os.nice(0),
                      "load_average_start": load_start, "unit_s": {}, "rss_after_unit_gib": {}, "cpu_s_after_unit": {}}
    if args.smoothing == "activations":
        # a run cut short says what it calibrated on too (the final result takes the compile's own account)
        progress["block_calibration"] = {
            "source": f"adapter random conditioning ({args.calib_prompts} prompts x {args.calib_steps} steps)",
            "calib_prompts": args.calib_prompts, "calib_steps": args.calib_steps, "image_tokens": args.tokens}

    def on_unit(record, index, total):
        print(f"{time.perf_counter() - start:7.1f}s  {index + 1}/{total} {record.name}: {record.wall_s}, resident "
              f"{record.rss_bytes / 2**30:.2f} GiB", flush=True)
        # A run cut short still leaves what it measured: the result file is rewritten after every unit.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        progress["unit_s"][record.name] = record.wall_s
        progress["rss_after_unit_gib"][record.name] = round(record.rss_bytes / 2**30, 2)
        # CPU seconds, unlike wall time, barely depend on how many other processes share the cores: their
        # differences give each unit's cost for an estimate on a quiet machine
        progress["cpu_s_after_unit"][record.name] = round(usage.ru_utime + usage.ru_stime, 1)
        progress.update(units_done=index + 1, units_total=total, elapsed_s=round(time.perf_counter() - start, 1),
                        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                        peak_rss_gib=round(usage.ru_maxrss * 1024 / 2**30, 2), machine=machine())
        write_json(path, progress, "benchmark progress")

    config = QuantConfig.preset(args.preset).replace(calib_prompts=args.calib_prompts, calib_steps=args.calib_steps)
    report = compile_streaming(args.folder, args.out, config, calibration=args.smoothing, tokens=args.tokens,
                               on_unit=on_unit)
    load_end = os.getloadavg()
    streaming = report["streaming"]
    result = {
        "benchmark": "streaming-compile", "complete": True, "folder": str(args.folder), "preset": args.preset,
        "smoothing": args.smoothing, "torch_threads": torch.get_num_threads(), "nice": os.nice(0),
        "block_calibration": streaming["block_calibration"] and {
            **streaming["block_calibration"], "calib_prompts": args.calib_prompts, "calib_steps": args.calib_steps,
            "image_tokens": args.tokens, "calib_rows": config.calib_rows},
        "wall_s": streaming["wall_s"], "cpu_s": streaming["cpu_s"], "peak_rss_bytes": streaming["peak_rss_bytes"],
        "peak_rss_gib": round(streaming["peak_rss_bytes"] / 2**30, 2),
        "checkpoint_bytes": streaming["checkpoint_bytes"], "checkpoint_dtype": streaming["dtype"],
        "output_bytes": streaming["output_bytes"], "size_ratio": streaming["size_ratio"],
        "steps_s": streaming["steps_s"],
        "capture": {key: report["capture"].get(key) for key in ("wall_s", "replicated_blocks")},
        "unit_s": {record["name"]: record["wall_s"] for record in streaming["units"]},
        "rss_after_unit_gib": {record["name"]: round(record["rss_bytes"] / 2**30, 2) for record in streaming["units"]},
        "cpu_s_after_unit": progress["cpu_s_after_unit"],
        "parameters": sum(layer["in_features"] * layer["out_features"] for layer in report["linears"]),
        "load_average_start": load_start, "load_average_end_of_compile": load_end, "machine": machine(),
    }
    write_result(result, path)  # the compile's numbers first: the check below loads the whole graph
    if not args.check:
        return
    loaded = time.perf_counter()
    gm = svdq_compiler.load(args.out)
    load_s = time.perf_counter() - loaded
    # the loaded graph runs: a few tokens through every block on the reference ops
    from svdq_compiler.models import adapter_for_class

    adapter = adapter_for_class(report["capture"]["module_class"])
    ran = time.perf_counter()
    with torch.no_grad():
        sample = gm(**adapter.example_inputs(_config_model(report), batch=2, tokens=4))[0]
    result["check_after_compile"] = {
        "load_s": round(load_s, 1), "graph_nodes": len(gm.graph.nodes), "tokens": 4, "batch": 2,
        "run_s": round(time.perf_counter() - ran, 1), "finite": bool(torch.isfinite(sample).all()),
        "output_shape": list(sample.shape)}
    write_result(result, path)


def _config_model(report: dict) -> torch.nn.Module:
    """A meta-device model of the compiled config, for building example inputs of another size."""
    from svdq_compiler.models import adapter_for_class

    with torch.device("meta"):
        return adapter_for_class(report["capture"]["module_class"]).model_class().from_config(
            report["capture"]["model_config"]).to(getattr(torch, report["streaming"]["dtype"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--model", default="random:flux")
    q.add_argument("--preset", default="int4")
    q.add_argument("--out")
    f = sub.add_parser("full")
    f.add_argument("--folder", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--preset", default="int4")
    f.add_argument("--smoothing", default="none", choices=("none", "weight-only", "activations"),
                   help="activations: block-wise calibration on the adapter's inputs, activation-aware smoothing")
    f.add_argument("--calib-prompts", type=int, default=4, help="activations: prompts (x steps = samples)")
    f.add_argument("--calib-steps", type=int, default=2, help="activations: denoising steps per prompt")
    f.add_argument("--tokens", type=int, default=256, help="image tokens of the calibration inputs")
    f.add_argument("--result")
    f.add_argument("--check", action="store_true", help="then load the graph and run a few tokens through it")
    args = parser.parse_args()
    quality(args) if args.command == "quality" else full(args)


if __name__ == "__main__":
    main()
