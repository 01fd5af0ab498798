"""Coverage of every denoiser class in the installed diffusers: does a tiny model of it compile and run?

The classes are enumerated from the package (every ModelMixin subclass defined in diffusers.models.transformers
and diffusers.models.unets), never listed by hand. For each one:

1. build it from `tiny_config` (its constructor's defaults, shrunk: one block of each kind, 2 heads of 32,
   widths 64; svdq_compiler/models/auto.py), with GIVEN_CONFIGS where the defaults cannot build a model that
   runs (the entry's `given_config` says so), random weights, seed 0; weights diffusers initializes to zero
   (adaLN-zero modulation, output projections, padding tokens) are drawn at random too: zero modulation makes
   every block of a random model an identity, and the output would not see its layers' quantization;
2. build its inputs with the model's adapter (a family adapter, or the auto one: from the forward signature
   and the config), or, for the four classes whose forward only their pipeline lays out, as that pipeline
   calls it (tools/coverage_inputs.py; the entry's `inputs_given` keeps the adapter's failure), and capture
   it: which dimensions became dynamic and why; where torch.export fails on the model's data-dependent code,
   svdq_compiler.compile takes the eager path (module swap), and the entry says which path each class took
   and why;
3. compile it with each preset (calibration: 2 prompts × 2 steps), count the quantized linears;
4. run the compiled graph at the example size and at a second latent grid, and measure the relative L2 error
   of its output against the fp32 model on the same inputs.

Each class runs in its own process (a crash or a hang costs that class only), `--jobs` at a time:

    OMP_NUM_THREADS=1 python tools/bench_coverage.py --jobs 2
    python tools/bench_coverage.py --only FluxTransformer2DModel,UNet2DModel --out /tmp/c.json

writes bench/results/coverage-diffusers.json: per class the stage it reached, the failure (stage and message)
if any, and the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from svdq_compiler.files import write_json  # noqa: E402

from bench_common import machine  # noqa: E402
from coverage_inputs import GIVEN_INPUTS  # noqa: E402
from ir_fingerprint import CaptureOnce  # noqa: E402

PRESETS = ("int4", "w4a4-rtn")  # SVDQuant against its round-to-nearest baseline
# Classes whose constructor defaults cannot build a model that runs, with the values a released checkpoint's config
# gives (a user compiles from that config, never from the defaults). HiDream: caption_channels and llama_layers
# default to None (the constructor indexes both), its rope axes (32, 32) give two of the three position axes its
# forward reads, and max_resolution pads every image to 128² / 4 tokens.
GIVEN_CONFIGS = {
    "HiDreamImageTransformer2DModel": {"caption_channels": [64, 64], "llama_layers": [0, 1],
                                       "axes_dims_rope": (8, 12, 12), "max_resolution": (32, 32)},
    # Cosmos 3 Omni: patch_latent_dim is latent_channel · latent_patch_size², which shrinking widths breaks
    "Cosmos3OmniTransformer": {"patch_latent_dim": 192},
}
BATCH = 2  # a batch of 2 (classifier-free guidance's pair) at both sizes
STAGES = ("build", "inputs", "capture", "compile", "run")


def wake_zero_weights(model: torch.nn.Module) -> list[str]:
    """Give every all-zero parameter of two or more dimensions small random values (a zero bias stays); returns
    their names."""
    woken = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and parameter.is_floating_point() and not parameter.any():
                parameter.normal_(0.0, 0.02)
                woken.append(name)
    return woken


def first_tensor(result: Any) -> torch.Tensor:
    """The output to score: the first of a tuple, or a model output's sample; a list of per-sample tensors
    (WanAnimate 2) as one flat tensor."""
    if isinstance(result, list) and result and all(torch.is_tensor(item) for item in result):
        return torch.cat([item.flatten() for item in result])
    if isinstance(result, (tuple, list)):
        return first_tensor(result[0])
    sample = getattr(result, "sample", result)
    return sample if torch.is_tensor(sample) else first_tensor(sample)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def second_grid(rows: int, cols: int, unit: int = 1, square: bool = False) -> tuple[int, int]:
    """Another latent grid, different on both axes, in steps of the adapter's grid unit (a U-Net's
    down-sampling); square for a model that takes square grids only."""
    if square:
        return rows + 3 * unit, rows + 3 * unit
    second = rows + 3 * unit, max(2 * unit, cols - 2 * unit)
    # not square: a model captured on a non-square grid may have width ≠ height as a guard (Latte)
    return second if second[0] != second[1] else (second[0], second[1] + unit)


def cover(class_name: str, module_name: str, presets: tuple[str, ...] = PRESETS,
          calibration: tuple[int, int] = (2, 2)) -> dict[str, Any]:
    """Everything the benchmark measures for one class; `failure` names the first stage that failed."""
    import svdq_compiler
    from svdq_compiler.capture import opaque_inputs
    from svdq_compiler.eager import compile_report_of, data_dependent_failure
    from svdq_compiler.errors import CaptureError, InputError, first_line
    from svdq_compiler.models import adapter_for
    from svdq_compiler.models.auto import tiny_config
    from svdq_compiler.models.base import factor_grid

    entry: dict[str, Any] = {"class": class_name, "module": module_name, "reached": None, "failure": None}
    stage = "build"
    start = time.perf_counter()
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        given = GIVEN_CONFIGS.get(class_name)
        config = tiny_config(cls, given)
        entry["tiny_config"] = json.loads(json.dumps(config, default=list))
        if given:
            entry["given_config"] = json.loads(json.dumps(given, default=list))
        torch.manual_seed(0)
        model = cls(**config).eval()
        entry["woken_zero_weights"] = wake_zero_weights(model)
        entry["parameters"] = sum(p.numel() for p in model.parameters())
        entry["reached"] = stage

        stage = "inputs"
        adapter = adapter_for(model)
        entry["adapter"] = adapter.name
        try:
            example = adapter.example_inputs(model, batch=BATCH)
        except InputError as exc:
            given_inputs = GIVEN_INPUTS.get(class_name)
            if given_inputs is None:
                raise
            # the pipeline's call, as its user passes it; the adapter's failure stays in the entry
            entry["inputs_given"] = {"why": given_inputs.why, "adapter_error": first_line(exc)[:300]}
            (rows, cols), grid = given_inputs.grids
            example, other = (given_inputs.build(model, given_inputs.batch, size, seed)
                              for size, seed in (((rows, cols), 0), (grid, 1)))
            calib = [given_inputs.build(model, given_inputs.batch, (rows, cols), 10 + i)
                     for i in range(calibration[0] * calibration[1])]
        else:
            # a token count where the latent is packed (FLUX): as a grid
            rows, cols = factor_grid(adapter.tokens_of(model, example), what="image tokens")
            grid = second_grid(rows, cols, adapter.grid_unit(model), adapter.square_grid(model))
            other = adapter.example_inputs(model, batch=BATCH, tokens=grid, seed=1)
            calib = adapter.calib_inputs(model, *calibration, batch=BATCH)
        entry["inputs"] = {name: list(value.shape) for name, value in example.items() if torch.is_tensor(value)}
        entry["grids"] = [[rows, cols], list(grid)]
        with torch.no_grad():
            want = [first_tensor(model(**inputs)) for inputs in (example, other)]
        entry["reached"] = stage

        stage = "capture"
        once = CaptureOnce()  # the presets share one capture (deep-copied for each)
        try:
            if not opaque_inputs(example):  # an object input: svdq_compiler.compile goes eager without a try
                once.cached = svdq_compiler.capture(model, example, adapter=adapter)
        except CaptureError as exc:
            if data_dependent_failure(exc) is None:
                raise
            entry["capture_error"] = first_line(exc)[:400]  # svdq_compiler.compile takes the eager path
        if once.cached is not None:
            report = once.cached.meta["svdq_capture"]
            entry["dims"] = [{key: dim[key] for key in ("input", "index", "status", "name", "why_dynamic", "reason")}
                             for dim in report["dims"]]
            entry["dynamic"] = sorted({dim["name"] for dim in report["dims"] if dim["status"] == "dynamic"})
            entry["capture_s"] = report["wall_s"]
        entry["reached"] = stage

        stage = "compile"
        entry["presets"] = {}
        graphs = {}
        for preset in presets:
            # the eager path swaps the model's linears in place: each preset gets its own copy
            with once if once.cached is not None else contextlib.nullcontext():
                compiled = svdq_compiler.compile(copy.deepcopy(model), example, preset, calib_inputs=calib,
                                                 adapter=adapter)
            report = compile_report_of(compiled)
            entry["path"], entry["path_reason"] = report["path"], report["path_reason"]
            totals = report["layers"]["totals"]
            graphs[preset] = compiled
            entry["presets"][preset] = {"quantized_linears": totals["quantized_layers"], "layers": totals["layers"],
                                        "four_bit_weight_share": totals["four_bit_weight_share"]}
        entry["reached"] = stage

        stage = "run"
        for preset, gm in graphs.items():
            with torch.no_grad():
                errors = [relative_error(first_tensor(gm(**inputs)), reference)
                          for inputs, reference in zip((example, other), want)]
            entry["presets"][preset]["rel_error"] = [round(error, 5) for error in errors]
        entry["reached"] = stage
    except Exception as exc:  # the benchmark records every failure with its stage instead of stopping
        entry["failure"] = {"stage": stage, "error": f"{type(exc).__name__}: {first_line(exc)}"[:400]}
    entry["wall_s"] = round(time.perf_counter() - start, 2)
    return entry


def cover_in_subprocess(class_name: str, module_name: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "entry.json"
        command = [sys.executable, __file__, "--one", f"{module_name}:{class_name}", "--out", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"class": class_name, "module": module_name, "reached": None,
                    "failure": {"stage": "timeout", "error": f"no result within {timeout:.0f} s"}}
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"class": class_name, "module": module_name, "reached": None,
                    "failure": {"stage": "crash", "error": f"exit {done.returncode}: {tail[0][:300]}"}}
        return json.loads(out.read_text())


def summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    built = [e for e in entries if e.get("reached")]
    ran = [e for e in entries if e.get("reached") == "run"]
    two = [e for e in ran if all(len(p.get("rel_error", [])) == 2 for p in e["presets"].values())]
    failures: dict[str, int] = {}
    for entry in entries:
        if entry["failure"]:
            failures[entry["failure"]["stage"]] = failures.get(entry["failure"]["stage"], 0) + 1
    return {"classes": len(entries), "built": len(built), "compiled": len([e for e in entries if e.get("reached") in
                                                                          ("compile", "run")]),
            "ran_two_resolutions": len(two), "failures_by_stage": failures,
            "paths": {path: sum(1 for e in entries if e.get("path") == path) for path in ("graph", "eager")}}


def markdown(report: dict[str, Any]) -> str:
    """The classes that ran (path, dynamic dimensions, quantized linears, errors at both grids), then the
    failures grouped by stage."""
    presets, total = report["presets"], report["summary"]
    last = report["runs"][-1]
    enumerated, done = len(last["classes"]), last.get("done")  # runs before "done" was recorded lack it
    if last.get("complete", True):
        # an --update run over some of the classes: the others keep an earlier run's results
        note = "" if enumerated >= total["classes"] else \
            f" (the last run reran {enumerated} of them; the rest are earlier results)"
    elif done is None or len(done) < total["classes"]:  # an --update run: the entries it did not reach are older
        after = f" after {len(done)}" if done is not None else ""
        note = f" (the last run, over {enumerated} of them, was cut short{after}; the rest are earlier results)"
    else:
        note = f" of {enumerated} (the run was cut short)"
    lines = [f"{total['classes']} classes{note}: "
             f"{total['built']} built from a tiny config, {total['compiled']} compiled, "
             f"{total['ran_two_resolutions']} ran at two latent grids ({total['paths']['graph']} as a graph, "
             f"{total['paths']['eager']} eagerly).", "",
             "| class | path | dynamic dims | quantized linears | " + " | ".join(
        f"{preset} rel. error (grid 1 / 2)" for preset in presets) + " |", "|---|---|---|---:|" + "---:|" * len(presets)]
    entries = sorted(report["classes"], key=lambda entry: entry["class"])  # in the order classes finish
    for entry in entries:
        if entry.get("reached") != "run":
            continue
        dims = ", ".join(entry.get("dynamic", [])) if entry["path"] == "graph" else "any (eager)"
        errors = " | ".join("{:.4f} / {:.4f}".format(*entry["presets"][preset]["rel_error"]) for preset in presets)
        # GIVEN_CONFIGS: the class's defaults do not build, the values a checkpoint's config holds were given;
        # GIVEN_INPUTS: the pipeline's call, where the adapter cannot lay out the forward's inputs
        given = [what for what, key in (("config", "given_config"), ("inputs", "inputs_given")) if entry.get(key)]
        name = entry["class"] + (f" ({' and '.join(given)} given)" if given else "")
        lines.append(f"| {name} | {entry['path']} | {dims} | "
                     f"{entry['presets'][presets[0]]['quantized_linears']} | {errors} |")
    failed: dict[str, list[str]] = {}
    for entry in entries:
        if entry["failure"]:
            failed.setdefault(entry["failure"]["stage"], []).append(entry["class"])
    lines.append("")
    lines += [f"- failed at {stage} ({len(names)}): {', '.join(names)}" for stage, names in failed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/coverage-diffusers.json"))
    parser.add_argument("--only", help="comma-separated class names (default: every class)")
    parser.add_argument("--jobs", type=int, default=1, help="classes run at once, each in its own process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per class")
    parser.add_argument("--update", action="store_true",
                        help="run only --only's classes and replace their entries in the existing --out")
    parser.add_argument("--table", action="store_true", help="print --out's result as a Markdown table, run nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # module:class, run in this process (the worker)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.one:
        module_name, class_name = args.one.split(":")
        args.out.write_text(json.dumps(cover(class_name, module_name)))
        return 0
    if (args.update or args.table) and not args.out.exists():
        print(f"error: {args.out} does not exist (--update and --table read an earlier result)", file=sys.stderr)
        return 2
    if args.only and not args.update and args.out.exists():
        print(f"error: --only without --update would replace {args.out}, every class's result, with these "
              f"classes alone; add --update, or give another --out", file=sys.stderr)
        return 2
    from svdq_compiler.models.auto import denoiser_classes

    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    enumerated = classes = denoiser_classes()
    if args.only:
        wanted = set(args.only.split(","))
        classes = {name: module for name, module in classes.items() if name in wanted}
    import diffusers

    start = time.perf_counter()
    earlier = json.loads(args.out.read_text()) if args.update else {"runs": [], "classes": []}
    # a class the package no longer yields (or the enumeration now leaves out) is not kept from an earlier run
    earlier["classes"] = [entry for entry in earlier["classes"] if entry["class"] in enumerated]
    done: dict[str, dict[str, Any]] = {}

    def record(complete: bool) -> None:
        """The result so far (complete: false until every class has run), so a run cut short keeps its classes;
        with --update, the earlier run's entries for the classes not rerun, and its machine records."""
        run = {"machine": machine(), "classes": sorted(classes),  # the machine record holds the commit
               "wall_s": round(time.perf_counter() - start, 1),
               "cpu_s": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                              + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, 1), "complete": complete,
               "done": sorted(done)}
        kept = {entry["class"] for entry in earlier["classes"]}
        entries = [done.get(entry["class"], entry) for entry in earlier["classes"]]
        entries += [entry for name, entry in done.items() if name not in kept]
        report = {"diffusers": diffusers.__version__, "torch": torch.__version__, "presets": list(PRESETS),
                  "batch": BATCH, "runs": [*earlier["runs"], run], "summary": summary(entries), "classes": entries}
        write_json(args.out, report, "benchmark result")

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(cover_in_subprocess, name, module, args.timeout) for name, module in classes.items()]
        for future in as_completed(futures):
            entry = future.result()
            outcome = entry["failure"] and f"{entry['failure']['stage']}: {entry['failure']['error'][:100]}" or "ok"
            print(f"{entry['class']:42s} {entry.get('path') or '-':6s} {outcome}", flush=True)
            done[entry["class"]] = entry
            record(complete=False)
    record(complete=True)
    print(json.dumps(json.loads(args.out.read_text())["summary"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
