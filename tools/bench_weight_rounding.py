"""Round to nearest against GPTQ (`QuantConfig.weight_rounding`) on the peers benchmark's cases, one process.

    .venv/bin/python tools/bench_weight_rounding.py --model minilm --presets w8a8,int4
    .venv/bin/python tools/bench_weight_rounding.py --model tiny-flux --presets int4 --pairs 16

Per preset and rounding: the held-out score of tools/bench_peers.py's case (MiniLM: token-state relative L2 and
sentence cosine; tiny-flux: sampled images' PSNR/SSIM against fp32), the mean relative output error of the
quantized layers on the calibration rows (what GPTQ minimises), and the compile's CPU seconds (after an untimed
compile, so that no row carries the process's one-time costs). Writes
bench/results/weight-rounding-<model>.json. Needs `make peers` for MiniLM.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_common import machine, write_result
from bench_peers import CASES

import svdq_compiler
from svdq_compiler.dropin import graph_module_of
from svdq_compiler.ir import annotated_linears


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "tiny-flux", "outlier-flux"])
    parser.add_argument("--presets", default="w8a8,int4")
    parser.add_argument("--pairs", type=int, default=16, help="tiny-flux: sampled (prompt, seed) pairs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    case = CASES[args.model](argparse.Namespace(pairs=args.pairs, batch=4, threads=1, seed=0, quick=True,
                                                cache="build/peers"))
    presets = args.presets.split(",")
    # untimed: the process's one-time costs (imports, kernel builds) belong to neither rounding
    svdq_compiler.compile(case.model, case.example, config=presets[0], calib_inputs=case.calib)
    rows = []
    for preset in presets:
        for rounding in ("rtn", "gptq"):
            config = svdq_compiler.QuantConfig.preset(preset, weight_rounding=rounding)
            start = time.process_time()
            compiled = svdq_compiler.compile(case.model, case.example, config=config, calib_inputs=case.calib)
            cpu_s = time.process_time() - start
            layer_errors = [info.errors["output_rel"] for _, info in annotated_linears(graph_module_of(compiled))
                            if info.errors.get("output_rel") is not None]
            row = {"preset": preset, "weight_rounding": rounding, "compile_cpu_s": round(cpu_s, 1),
                   "calibration_layer_error_mean": round(statistics.mean(layer_errors), 5), **case.evaluate(compiled)}
            print(row, flush=True)
            rows.append(row)
    write_result({"benchmark": "weight-rounding", "model": args.model, "case": case.description,
                  "machine": machine(), "rows": rows},
                 args.out or Path(f"bench/results/weight-rounding-{args.model}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
