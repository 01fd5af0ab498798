"""Kernel benchmark: the fused SVDQuant linear against bf16, W8A8 and the unfused sequence, on FLUX shapes.

For each M ∈ {256, 1024, 4096} and (K, N) ∈ {(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072)}:
  bf16_matmul          x @ Wᵀ in bf16 (cuBLAS): the baseline every ratio is taken against
  int_mm_w8a8          torch._int_mm on int8 operands (the GEMM alone, no quantization or scaling)
  svdq_int4_fused      kernel A (x/λ, int4 quantize, rank-32 down) + kernel B (int4 GEMM, up, bias): the layer
  svdq_int4_rank0      the same two kernels without the low-rank branch: the branch's cost is the difference
  svdq_int4_gemm_only  kernel B alone (rank 0, no bias) on pre-quantized activations
  svdq_unfused         the unfused sequence with our kernels: quantize kernel, aten down projection, GEMM kernel,
                       aten up projection, add (what fusion saves)
  svdq_lowered_ref     the lowered graph's reference ops (svdq.quantize_act, svdq.gemm in PyTorch) + aten
  svdq_w8a8_fused      kernels A + B for W8A8 (per-token int8, rank 32)
  svdq_nvfp4_fused     kernels A + B for NVFP4 (dequantize path below sm_100)
  svdq_w4a16_nf4       kernel W: bf16 x times an NF4 g64 weight dequantized in registers, + bias
  svdq_w4a16_int4      kernel W with an INT4 g64 weight (AdaLN modulation under the int4 preset)
  w4a16_reference_op   svdq.weight_only_linear, the unfused op (dequantizes the whole weight every call)
The W4A16 rows also run at the modulation shapes, one row per sample: M = 1 with (K, N) = (3072, 18432) (a
double block's six chunks) and (3072, 9216) (a single block's three).
TFLOP/s counts 2·M·N·K for every case (the branch's extra flops are not credited). Times are medians of CUDA
graph replays (no launch overhead), after the launcher has tuned its tile configuration for the shape.

Writes bench/results/kernels-<device>.json with the machine, the versions and every number, and prints a table.
`--smoke` runs tiny shapes under the Triton interpreter (no GPU) to check the wiring; it writes to build/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FLUX_M = (256, 1024, 4096)
FLUX_KN = ((3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072))
FLUX_MODULATION = ((1, 3072, 18432), (1, 3072, 9216))  # (M, K, N): W4A16 rows only
SMOKE_M = (16, 33)
SMOKE_KN = ((64, 64), (128, 32))
SMOKE_MODULATION = ((1, 128, 96),)
RANK = 32


def _machine(device: torch.device) -> dict:
    import triton

    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device="triton-interpreter", capability=None)
    return info


def _timer(device: torch.device, rep_ms: int):
    import triton.testing

    if device.type != "cuda":
        def timed(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return timed

    def timed(fn):
        fn()  # tunes the launcher's configuration outside the graph capture
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return timed


class Layer:
    """One quantized linear's tensors, built with the project's own quantizers and packers."""

    def __init__(self, fmt: str, m: int, k: int, n: int, device: torch.device, dtype=torch.bfloat16):
        from svdq_compiler import quant
        from svdq_compiler.codegen.layout import pack_weight

        group = {"int4": 64, "nvfp4": 16, "int8": 0}[fmt]
        self.fmt, self.group, self.k, self.n = fmt, group, k, n
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        self.smooth = (torch.rand(k, device=device, generator=gen) + 0.5).to(dtype)
        weight = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
        packed = pack_weight(quant.quantize_weight(weight, fmt, group))
        self.w_codes, self.w_scales, self.w_tscale = packed.qweight, packed.wscales, packed.wtscale
        self.lora_down = torch.randn(RANK, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
        self.lora_up = torch.randn(n, RANK, device=device, dtype=dtype, generator=gen) / RANK ** 0.5
        self.bias = torch.randn(n, device=device, dtype=dtype, generator=gen)
        self.act_scale = quant.act_tensor_scale(self.x / self.smooth, fmt)  # nvfp4's per-tensor scale, else None

    def specs(self, rank: int, bias: bool):
        from svdq_compiler.codegen.spec import ActQuant, GemmSpec, QuantizeSpec

        quantize = QuantizeSpec(ActQuant(self.fmt, self.group), rank, "bfloat16", k=self.k)
        gemm = GemmSpec(self.fmt, self.group, rank, bias, "bfloat16", k=self.k, n=self.n)
        return quantize, gemm

    def fused(self, rank: int = RANK, bias: bool = True):
        from svdq_compiler.codegen import launch

        quantize, gemm = self.specs(rank, bias)

        def run():
            codes, scales, down = launch.quantize_lora_down(self.x, self.smooth, self.lora_down if rank else None,
                                                            quantize, self.act_scale)
            return launch.gemm(codes, scales, self.w_codes, self.w_scales, self.w_tscale, down if rank else None,
                               self.lora_up if rank else None, self.bias if bias else None, [], None, None, gemm,
                               self.act_scale)[0]
        return run

    def gemm_only(self):
        from svdq_compiler.codegen import launch

        quantize, gemm = self.specs(0, False)
        codes, scales, _ = launch.quantize_lora_down(self.x, self.smooth, None, quantize, self.act_scale)
        return lambda: launch.gemm(codes, scales, self.w_codes, self.w_scales, self.w_tscale, None, None, None, [],
                                   None, None, gemm, self.act_scale)[0]

    def unfused(self):
        from svdq_compiler.codegen import launch

        quantize, gemm = self.specs(0, False)

        def run():
            codes, scales, _ = launch.quantize_lora_down(self.x, self.smooth, None, quantize, self.act_scale)
            down = F.linear(self.x / self.smooth, self.lora_down)
            acc = launch.gemm(codes, scales, self.w_codes, self.w_scales, self.w_tscale, None, None, None, [], None,
                              None, gemm, self.act_scale)[0]
            return acc + F.linear(down, self.lora_up, self.bias)
        return run

    def lowered_reference(self):
        import svdq_compiler.ops  # noqa: F401

        ops = torch.ops.svdq

        def run():
            codes, scales = ops.quantize_act(self.x, self.smooth, 0.0, self.fmt, self.group, self.act_scale)
            down = F.linear(self.x / self.smooth, self.lora_down)
            acc = ops.gemm(codes, scales, self.w_codes, self.w_scales, self.w_tscale, self.fmt, self.group, self.k,
                           self.x.dtype, self.act_scale)
            return acc + F.linear(down, self.lora_up, self.bias)
        return run


class WeightOnlyLayer:
    """One weight-only (W4A16) linear: x [M, K] in bf16, an int4 / nf4 g64 weight, a bias."""

    def __init__(self, fmt: str, m: int, k: int, n: int, device: torch.device, dtype=torch.bfloat16):
        from svdq_compiler import quant
        from svdq_compiler.codegen.layout import pack_weight
        from svdq_compiler.codegen.spec import WeightOnlySpec

        self.fmt, self.group = fmt, 64
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
        weight = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
        packed = pack_weight(quant.quantize_weight(weight, fmt, self.group))
        self.w_codes, self.w_scales = packed.qweight, packed.wscales
        self.bias = torch.randn(n, device=device, dtype=dtype, generator=gen)
        self.spec = WeightOnlySpec(fmt, self.group, 0, True, "bfloat16", k=k, n=n)

    def fused(self):
        from svdq_compiler.codegen import launch

        return lambda: launch.weight_only_linear(self.x, self.w_codes, self.w_scales, None, None, self.bias, [],
                                                 self.spec)

    def reference_op(self):
        import svdq_compiler.ops  # noqa: F401

        return lambda: torch.ops.svdq.weight_only_linear(self.x, self.w_codes, self.w_scales, self.bias, self.fmt,
                                                         self.group)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _tiles_chosen(m: int, k: int, n: int) -> dict[str, str]:
    """The tile each launcher chose (timed once per kernel and shape bucket) for this shape: a slow case is often
    a tuning choice, and this says which. Keys end (n, k, bucket) for kernels B and W, (k, bucket) for kernel A."""
    from svdq_compiler.codegen import launch
    from svdq_compiler.codegen.configs import m_bucket

    bucket = m_bucket(m)
    return {key[0]: repr(config) for key, config in launch._TUNED.items()
            if key[-3:] == (n, k, bucket) or (key[0].startswith("svdq_quantize") and key[-2:] == (k, bucket))}


def bench_shape(m: int, k: int, n: int, device: torch.device, timed, formats: list[str],
                with_reference: bool) -> dict:
    flops = 2.0 * m * n * k
    cases: dict[str, dict] = {}

    def record(name: str, make):
        try:
            ms = timed(make())
            cases[name] = {"ms": round(ms, 5), "tflops": round(flops / ms / 1e9, 2)}
        except Exception as exc:  # one failing case must not hide the others' numbers
            cases[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            traceback.print_exc()

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    record("bf16_matmul", lambda: (lambda: torch.matmul(x, w.t())))
    if device.type == "cuda":
        xi = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
        wi = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        record("int_mm_w8a8", lambda: (lambda: torch._int_mm(xi, wi.t())))
    check = {}
    if "int4" in formats:
        layer = Layer("int4", m, k, n, device)
        record("svdq_int4_fused", layer.fused)
        record("svdq_int4_rank0", lambda: layer.fused(rank=0))
        record("svdq_int4_gemm_only", layer.gemm_only)
        record("svdq_unfused", layer.unfused)
        if with_reference:
            record("svdq_lowered_ref", layer.lowered_reference)
            ref = layer.lowered_reference()()
            check["int4_fused_vs_lowered_rel_err"] = _rel_err(layer.fused()(), ref)
            check["int4_unfused_vs_lowered_rel_err"] = _rel_err(layer.unfused()(), ref)
        del layer
    for fmt in ("int8", "nvfp4"):
        if fmt in formats:
            layer = Layer(fmt, m, k, n, device)
            record(f"svdq_{'w8a8' if fmt == 'int8' else fmt}_fused", layer.fused)
            if with_reference:
                check[f"{fmt}_fused_vs_lowered_rel_err"] = _rel_err(layer.fused()(), layer.lowered_reference()())
            del layer
    if "w4a16" in formats:
        for fmt in ("nf4", "int4"):
            layer = WeightOnlyLayer(fmt, m, k, n, device)
            record(f"svdq_w4a16_{fmt}", layer.fused)
            if fmt == "nf4":
                record("w4a16_reference_op", layer.reference_op)
            check[f"w4a16_{fmt}_vs_reference_op_rel_err"] = _rel_err(layer.fused()(), layer.reference_op()())
            del layer
    base = cases["bf16_matmul"].get("ms")
    for case in cases.values():
        if base and "ms" in case:
            case["speedup_vs_bf16"] = round(base / case["ms"], 3)
    result = {"m": m, "k": k, "n": n, "cases": cases, "check": check, "tiles": _tiles_chosen(m, k, n)}
    fused, rank0 = cases.get("svdq_int4_fused", {}).get("ms"), cases.get("svdq_int4_rank0", {}).get("ms")
    if fused and rank0:
        result["branch_overhead"] = round(fused / rank0 - 1.0, 4)
    return result


def _table(results: list[dict]) -> str:
    names = ["bf16_matmul", "int_mm_w8a8", "svdq_int4_fused", "svdq_int4_rank0", "svdq_unfused",
             "svdq_lowered_ref", "svdq_w8a8_fused", "svdq_nvfp4_fused", "svdq_w4a16_nf4", "svdq_w4a16_int4",
             "w4a16_reference_op"]
    present = [n for n in names if any(n in r["cases"] for r in results)]
    lines = ["M     K     N      " + " ".join(f"{n[:16]:>16}" for n in present) + "  branch"]
    for r in results:
        cells = []
        for name in present:
            case = r["cases"].get(name, {})
            cells.append(f"{case['tflops']:>9.1f}T {case.get('speedup_vs_bf16', 0):4.2f}x" if "tflops" in case
                         else f"{'err' if 'error' in case else '-':>16}")
        branch = f"{r['branch_overhead'] * 100:5.1f}%" if "branch_overhead" in r else "   -"
        lines.append(f"{r['m']:<5} {r['k']:<5} {r['n']:<6} " + " ".join(cells) + "  " + branch)
    return "\n".join(lines)


def _write_report(out: Path, machine: dict, results: list[dict], complete: bool) -> None:
    goals = {}
    for r in results:
        if r["m"] == 4096 and "speedup_vs_bf16" in r["cases"].get("svdq_int4_fused", {}):
            goals[f"int4_fused_vs_bf16_at_M4096_K{r['k']}_N{r['n']}"] = r["cases"]["svdq_int4_fused"][
                "speedup_vs_bf16"]
        if "branch_overhead" in r:
            goals[f"branch_overhead_M{r['m']}_K{r['k']}_N{r['n']}"] = r["branch_overhead"]
    report = {"benchmark": "kernels", "complete": complete, "machine": machine, "rank": RANK,
              "dtype": "bfloat16", "goals": {"int4_fused_vs_bf16_at_M4096": ">= 1.6", "branch_overhead": "<= 0.10"},
              "measured_goals": goals, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


README_COLUMNS = (("svdq_int4_fused", "int4 W4A4 (A+B)"), ("svdq_int4_gemm_only", "int4 GEMM alone"),
                  ("svdq_w8a8_fused", "W8A8 (A+B)"), ("svdq_nvfp4_fused", "nvfp4 (A+B)"),
                  ("svdq_w4a16_int4", "W4A16 int4"), ("svdq_w4a16_nf4", "W4A16 nf4"))


def markdown_table(report: dict) -> str:
    """README's table of a committed result: each case's time as a multiple of bf16's speed (>1 is faster)."""
    device = report["machine"].get("device", "?")
    lines = [f"| M × K × N ({device}) | bf16 ms | " + " | ".join(title for _, title in README_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(README_COLUMNS)]
    for r in report["results"]:
        cases = r["cases"]
        cells = [f"{cases[name]['speedup_vs_bf16']:.2f}×" if "speedup_vs_bf16" in cases.get(name, {}) else "–"
                 for name, _ in README_COLUMNS]
        lines.append(f"| {r['m']} × {r['k']} × {r['n']} | {cases['bf16_matmul']['ms']:.4f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes under the Triton interpreter (no GPU)")
    parser.add_argument("--formats", default="int4,int8,nvfp4,w4a16",
                        help="comma-separated: int4, int8, nvfp4, w4a16 (kernel W with nf4 and int4 weights)")
    parser.add_argument("--m", default=None, help="comma-separated token counts (default: the FLUX set)")
    parser.add_argument("--kn", default=None,
                        help="comma-separated KxN weight shapes, e.g. 3072x3072 (default: the FLUX set)")
    parser.add_argument("--no-modulation", action="store_true", help="skip the M=1 modulation rows")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow lowered reference ops")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA-graph replay time per case")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: bench/results/…)")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print README's table of a result and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; run with --smoke to check the wiring under the interpreter",
              file=sys.stderr)
        return 2
    machine = _machine(device)
    ms = [int(v) for v in args.m.split(",")] if args.m else list(SMOKE_M if args.smoke else FLUX_M)
    kns = ([tuple(int(v) for v in kn.split("x")) for kn in args.kn.split(",")] if args.kn
           else SMOKE_KN if args.smoke else FLUX_KN)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    device_tag = re.sub(r"[^A-Za-z0-9]+", "-", machine["device"]).strip("-").lower()
    out = args.out or (Path("build/bench") if args.smoke else Path("bench/results")) / f"kernels-{device_tag}.json"
    # the modulation layers: one row per sample, W4A16 only, no lowered reference
    modulation = [] if args.no_modulation or "w4a16" not in formats else (
        SMOKE_MODULATION if args.smoke else FLUX_MODULATION)
    shapes = [(m, k, n, formats, not args.no_reference) for m in ms for k, n in kns]
    shapes += [(m, k, n, ["w4a16"], False) for m, k, n in modulation]
    timed = _timer(device, args.rep_ms)
    results = []
    for index, (m, k, n, shape_formats, with_reference) in enumerate(shapes):
        start = time.perf_counter()
        results.append(bench_shape(m, k, n, device, timed, shape_formats, with_reference))
        print(f"M={m} K={k} N={n}: {time.perf_counter() - start:.1f}s", flush=True)
        # after every shape, so that a run stopped at its time limit keeps what it measured
        _write_report(out, machine, results, complete=index == len(shapes) - 1)
    print(_table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
