"""Default compile before and after the compile-time changes, measured in one process on the same inputs.

`before` is the defaults as they were (39-candidate smoothing grid searched in full, full LAPACK SVD in lowrank, no
per-layer choice, plain weight-only layers) and the capture as it was (torch.export's program re-traced to the
inference IR, `run_decompositions({})`, before unlifting); `after` is today's defaults and capture. Both run
today's search code, whose row-chunked evaluation also made `before` faster than it was: the speedup measured here
is a lower bound. For each: this process's CPU time in capture and in every pass (the machine is shared: CPU time
is what the code costs), wall time, and the output quality on held-out inputs against fp32 (relative L2 error and
its SNR in dB, −20·log10 of it). Models: `minilm` (the pretrained all-MiniLM-L6-v2 of tools/eval_quality.py; also
the sentence-embedding cosine) and `tiny-flux` (held-out adapter inputs, seed 1234). Writes
bench/results/compile-speed-<model>.json.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler

BEFORE = dict(smooth_grid=20, search_refine=False, svd="full", layer_choice=False, weight_only_smooth=False, weight_only_rank=0,
              weight_only_error=None)


@contextmanager
def inference_ir_capture():
    """Capture as it was: the exported program re-traced to torch's inference IR before it is unlifted."""
    capture_module = importlib.import_module("svdq_compiler.capture")
    unlift = capture_module.unlift
    capture_module.unlift = lambda program, **kwargs: unlift(capture_module.decompose(program, {}), **kwargs)
    try:
        yield
    finally:
        capture_module.unlift = unlift


def case(name: str):
    if name == "minilm":
        from eval_quality import minilm

        model, example, calib, evaluation = minilm()
        return model, example, calib, evaluation
    from svdq_compiler.models import adapter_for, load_model

    model = load_model(name).eval().requires_grad_(False)
    adapter = adapter_for(model)
    return (model, adapter.example_inputs(model), adapter.calib_inputs(model, 4, 2, seed=0),
            adapter.calib_inputs(model, 2, 2, seed=1234))


def first(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "last_hidden_state", getattr(result, "sample", result))


def measure(model, example, calib, evaluation, reference, preset: str, overrides: dict, old_capture: bool) -> dict:
    config = svdq_compiler.QuantConfig.preset(preset, **overrides)
    start, cpu = time.perf_counter(), time.process_time()
    with inference_ir_capture() if old_capture else nullcontext():
        gm = svdq_compiler.compile(model, example, config, calib_inputs=calib)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = gm.meta["svdq_report"]
    passes = {record["name"]: record["cpu_s"] for record in report["passes"]}
    with torch.no_grad():
        outputs = [first(gm(**inputs)).float() for inputs in evaluation]
    ref, out = torch.cat([r.flatten() for r in reference]), torch.cat([o.flatten() for o in outputs])
    rel = float((out - ref).norm() / ref.norm())
    return {"overrides": overrides, "compile_s": round(wall, 1), "compile_cpu_s": round(cpu, 2),
            "capture_cpu_s": round(cpu - sum(passes.values()), 2), "passes_cpu_s": passes,
            "passes_total_cpu_s": round(sum(passes.values()), 2),
            "rel_l2": round(rel, 5), "snr_db": round(-20 * math.log10(rel), 3),
            "fallbacks": report["layers"]["totals"]["fallbacks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm or a built-in name such as tiny-flux")
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, example, calib, evaluation = case(args.model)
    with torch.no_grad():
        reference = [first(model(**inputs)).float() for inputs in evaluation]
    # the first export in a process pays one-time costs (imports, tracer set-up) that would count against `before`
    svdq_compiler.capture(model, example)
    rows = {}
    for label, overrides in (("before", BEFORE), ("after", {})):
        rows[label] = measure(model, example, calib, evaluation, reference, args.preset, overrides,
                              old_capture=label == "before")
        print(label, rows[label], flush=True)
    before, after = rows["before"], rows["after"]
    summary = {"speedup_compile_cpu": round(before["compile_cpu_s"] / after["compile_cpu_s"], 2),
               "speedup_passes_cpu": round(before["passes_total_cpu_s"] / after["passes_total_cpu_s"], 2),
               "snr_change_db": round(after["snr_db"] - before["snr_db"], 3)}
    print(summary)
    write_result({"benchmark": "compile-speed", "model": args.model, "preset": args.preset,
                  "calibration_inputs": len(calib), "eval_inputs": len(evaluation), "before": before,
                  "after": after, "summary": summary, "machine": machine()},
                 args.out or Path(f"bench/results/compile-speed-{args.model.replace(':', '-')}.json"))


if __name__ == "__main__":
    main()
