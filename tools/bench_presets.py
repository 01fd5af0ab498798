"""Every preset on every adapter's random model: output error, compression and pass time.

Each `random:<family>` built-in is captured once; every preset then runs the SVDQuant passes on a copy of that
graph with the adapter's calibration inputs (prompts × steps), and the result is compared with the eager model
on a held-out input (a different seed). This is the slow test matrix of tests/passes/test_presets_end_to_end.py,
measured: writes bench/results/presets-random-models.json (per model × preset: relative output error, cosine
similarity, compression ratio, quantized layers, fallbacks, pass wall and CPU time). `--conv-kxk keep w4a4`
adds each preset with k×k convolutions quantized (the U-Net: bench/results/conv-kxk-random-unet.json).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from bench_common import machine, write_result
from eval_quality import first_output

import svdq_compiler
from svdq_compiler import PRESETS
from svdq_compiler.capture import install_shape_check
from svdq_compiler.config import CONV_KXK
from svdq_compiler.models import adapter_for, load_model
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline

FAMILIES = ("flux", "pixart", "sd3", "sana", "unet")


def bench_family(family: str, presets: list[str], prompts: int, steps: int, conv_options: list[str]) -> dict:
    model = load_model(f"random:{family}")
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model)
    start, cpu_start = time.perf_counter(), time.process_time()
    captured = svdq_compiler.capture(model, inputs)
    capture = {"capture_s": round(time.perf_counter() - start, 2),
               "capture_cpu_s": round(time.process_time() - cpu_start, 2)}
    calib = adapter.calib_inputs(model, prompts, steps, seed=0)
    check = adapter.calib_inputs(model, 1, 1, seed=99)[0]
    with torch.no_grad():
        reference = first_output(model(**check)).float()
    results = {}
    for preset, conv_kxk in [(preset, option) for preset in presets for option in conv_options]:
        config = svdq_compiler.QuantConfig.preset(preset, conv_kxk=conv_kxk)
        preset = preset if conv_kxk == "keep" else f"{preset} conv_kxk={conv_kxk}"
        ctx = PassContext(config=config, example_inputs=inputs, calib_inputs=calib, adapter=adapter, model=model)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            gm = run_passes(copy.deepcopy(captured), ctx, svdquant_pipeline())
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            install_shape_check(gm)
            with torch.no_grad():
                compiled = first_output(gm(**check)).float()
        except Exception as exc:  # a failing combination is a result of the matrix, recorded, not the end of it
            results[preset] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            print(family, preset, results[preset], flush=True)
            continue
        totals = gm.meta["svdq_layers"]["totals"]
        results[preset] = {
            "output_rel_error": round(float((compiled - reference).norm() / reference.norm()), 5),
            "cosine": round(float(torch.nn.functional.cosine_similarity(compiled.flatten(), reference.flatten(),
                                                                        dim=0)), 6),
            "compression_ratio": totals["compression_ratio"], "quantized_layers": totals["quantized_layers"],
            "fallbacks": totals["fallbacks"], "four_bit_weight_share": totals["four_bit_weight_share"],
            "passes_s": round(wall, 2), "passes_cpu_s": round(cpu, 2),
            "passes_cpu_by_pass_s": {r["name"]: r["cpu_s"] for r in ctx.records},
        }
        print(family, preset, {k: v for k, v in results[preset].items() if k != "passes_cpu_by_pass_s"}, flush=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "calibration_inputs": len(calib),
            **capture, "presets": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--conv-kxk", nargs="+", default=["keep"], choices=CONV_KXK,
                        help="k×k convolution settings to run with each preset (rows 'preset conv_kxk=…')")
    parser.add_argument("--out", type=Path, default=Path("bench/results/presets-random-models.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {family: bench_family(family, args.presets, args.prompts, args.steps, args.conv_kxk)
              for family in args.families}
    write_result({"benchmark": "every preset on every adapter's random model", "reference": "fp32 eager",
                  "models": models, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
