"""Benchmark the numerics the passes lean on: fake quantization (called 39× per smoothing group), the reference
GEMM, and packing / Nunchaku conversion of one layer. Writes bench/results/numerics_<device>.json.

    python tools/bench_numerics.py [--device cpu|cuda] [--size 1024] [--tokens 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

from svdq_compiler.codegen.layout import NunchakuLinear, from_nunchaku, pack_weight, to_nunchaku
from svdq_compiler.quant import act_tensor_scale, fake_quantize_act, fake_quantize_weight, quantize_weight

FORMATS = [("int4", 64), ("nvfp4", 16), ("int8", 0), ("nf4", 64)]


def timed(fn, device: str, repeat: int) -> float:
    """Median wall time of fn() in milliseconds (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024, help="N = K of the weight")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device, n, m = args.device, args.size, args.tokens
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, n, device=device, generator=gen).to(torch.bfloat16)
    results = []
    for fmt, group in FORMATS:
        row = {"format": fmt, "group": group,
               "fake_quantize_weight_ms": timed(lambda: fake_quantize_weight(w, fmt, group), device, args.repeat)}
        if fmt != "nf4":
            row["fake_quantize_act_ms"] = timed(lambda: fake_quantize_act(x, fmt, group), device, args.repeat)
            packed = pack_weight(quantize_weight(w, fmt, group))
            act_scale = act_tensor_scale(x, fmt)
            codes, scales = torch.ops.svdq.quantize_act(x, None, 0.0, fmt, group, act_scale)
            row["reference_gemm_ms"] = timed(lambda: torch.ops.svdq.gemm(
                codes, scales, packed.qweight, packed.wscales, packed.wtscale, fmt, group, n, torch.bfloat16,
                act_scale), device, args.repeat)
        if fmt in ("int4", "nvfp4"):
            linear = NunchakuLinear(pack_weight(quantize_weight(w, fmt, group)),
                                    lora_down=torch.randn(32, n, device=device).to(torch.bfloat16),
                                    lora_up=torch.randn(n, 32, device=device).to(torch.bfloat16))
            tensors = to_nunchaku(linear)
            row["to_nunchaku_ms"] = timed(lambda: to_nunchaku(linear), device, args.repeat)
            row["from_nunchaku_ms"] = timed(lambda: from_nunchaku(tensors, fmt, in_features=n, out_features=n),
                                            device, args.repeat)
        results.append(row)
        print(json.dumps(row))
    report = {"benchmark": "numerics", "device": device, "weight": [n, n], "tokens": m, "dtype": "bfloat16",
              "repeat": args.repeat, "machine": machine(device), "results": results}
    write_result(report, args.out / f"numerics_{device}.json")


if __name__ == "__main__":
    main()
