"""Does the low-rank refinement (QuantConfig.iterations > 1) pay? The int4 compile of the pretrained MiniLM
and of the shipped tiny-flux with iterations 1, 2, 3, 5, 10 (early stop on) and 3 (early stop off).

Per setting: the error on held-out inputs (MiniLM: sentence-embedding cosine and token-state relative L2 on the
evaluation sentences of tools/eval_quality.py; tiny-flux: relative L2 of the transformer output on adapter inputs
from seeds apart from the calibration ones), the mean per-layer output error on the calibration rows, what the
lowrank pass kept (iterate per group, error against iteration 1) and its time. Each model is captured once; every
setting runs the passes on a copy. Writes bench/results/lowrank-iterations.json; a run of some `--models`
replaces those models' entries and keeps the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from bench_common import machine, write_result
from eval_quality import compare, first_output, minilm

import svdq_compiler
from svdq_compiler.models import adapter_for
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline

NO_STOP = "-no-stop"
SETTINGS = "1,2,3,3-no-stop,5,10"  # iterations, early stop on unless NO_STOP


def model_case(name: str) -> dict:
    if name == "minilm":
        model, example, calib, evaluation = minilm()
        return {"model": model, "example": example, "calib": calib, "eval": evaluation, "adapter": adapter_for(model),
                "mask": torch.cat([inputs["attention_mask"] for inputs in evaluation]),
                "eval_description": "tools/eval_quality.py EVAL_SENTENCES (16 sentences)"}
    from svdq_compiler.models import load_model

    model = load_model(name)
    adapter = adapter_for(model)
    return {"model": model, "example": adapter.example_inputs(model, batch=2), "adapter": adapter, "mask": None,
            "calib": adapter.calib_inputs(model, 4, 4, seed=0, batch=2),
            "eval": adapter.calib_inputs(model, 2, 4, seed=1234, batch=2),
            "eval_description": "adapter calib_inputs(2 prompts, 4 steps, seed=1234, batch=2)"}


def measure(case: dict, captured: torch.fx.GraphModule, iterations: int, early_stop: bool) -> dict:
    config = svdq_compiler.QuantConfig.preset("int4", iterations=iterations, early_stop=early_stop)
    ctx = PassContext(config=config, example_inputs=case["example"], calib_inputs=case["calib"],
                      adapter=case["adapter"], model=case["model"])
    start = time.perf_counter()
    gm = run_passes(copy.deepcopy(captured), ctx, svdquant_pipeline())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        references = torch.cat([first_output(case["model"](**inputs)).float() for inputs in case["eval"]])
        outputs = torch.cat([first_output(gm(**inputs)).float() for inputs in case["eval"]])
    lowrank = next(record for record in ctx.records if record["name"] == "lowrank")
    per_group = lowrank["stats"]["per_group"].values()
    totals = gm.meta["svdq_layers"]["totals"]
    return {"iterations": iterations, "early_stop": early_stop,
            **compare(references, outputs, case["mask"]),
            "layer_output_rel_error_mean": totals["output_rel_error_mean"],
            "kept_iteration_counts": {str(k): sum(1 for g in per_group if g["kept"] == k)
                                      for k in range(1, iterations + 1)},
            "group_error_vs_first_median": lowrank["stats"]["error_vs_first_median"],
            "group_error_vs_first_min": min((g["error_vs_first"] for g in per_group), default=None),
            "lowrank_s": lowrank["wall_s"], "passes_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tiny-flux")
    parser.add_argument("--settings", default=SETTINGS, help="iterations per run; '-no-stop' turns early stop off")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench/results/lowrank-iterations.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # each model's rows replace its entry in an existing result (models can be measured in separate runs)
    results = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
    for name in args.models.split(","):
        case = model_case(name)
        captured = svdq_compiler.capture(case["model"], case["example"], adapter=case["adapter"])
        rows = []
        for setting in args.settings.split(","):
            iterations, early_stop = int(setting.removesuffix(NO_STOP)), not setting.endswith(NO_STOP)
            rows.append(measure(case, captured, iterations, early_stop))
            print(name, rows[-1], flush=True)
        metric = "token_rel_l2" if case["mask"] is not None else "rel_l2"
        base = rows[0][metric]
        results[name] = {"eval_inputs": case["eval_description"], "calibration_inputs": len(case["calib"]),
                         "parameters": sum(p.numel() for p in case["model"].parameters()),
                         "metric": metric, "settings": rows, "machine": machine(),
                         "held_out_error_vs_iterations_1": {
                             f"{r['iterations']}{'' if r['early_stop'] else NO_STOP}": round(r[metric] / base, 4)
                             for r in rows}}
        write_result({"benchmark": "lowrank-iterations", "preset": "int4", "models": results,
                      "note": "error_vs_first: a group's objective at the kept iterate / at iteration 1"}, args.out)


if __name__ == "__main__":
    main()
