"""Static cost model of the generated kernels, from ahead-of-time compiles (no GPU): bench/results/kernels-static.json.

For each device class (A100, L40S, H100, B200, RTX 5090) every configuration the launcher may time is compiled
for the device's arch (codegen.aot: registers, spills, shared memory, the hot loop's SASS), and the time of each
kernel at the FLUX shapes (M ∈ {256, 1024, 4096}, K = 3072, N ∈ {3072, 12288}; W4A16 also at the M = 1
modulation shape N = 18432) is predicted as the maximum of three floors:

  tensor  = (tiles per SM, rounded up to whole waves) · tile flops / the SM's dense tensor-core rate
  issue   = (tiles per SM) · warps · (iterations · hot-loop cycles + the rest of the kernel once) / 4 schedulers,
            where a warp instruction costs one issue slot, and a pipe narrower than 32 lanes per scheduler
            (the INT32 ALU, the FP32 pipe on A100, the conversion unit) costs 32/lanes cycles
  memory  = compulsory DRAM bytes (each operand read once, each output written once) / bandwidth

The best configuration per shape is kept (as the launcher's timing would). The same is done for a plain Triton
bf16 matmul and a plain Triton int8 matmul (the two kernels at the end of this file), so that a ratio compares
kernels modelled the same way. When a loop waits for each wgmma right after issuing it (`serialized_waits`),
the MMA and the instructions around it cannot overlap within a warpgroup; `predicted_serialized_us` then adds
tensor and issue time instead (an upper bound; the two consumer warpgroups of a CTA still overlap each other).

The rates and their sources are in bench/kernels-model.md. The full AOT gate (every template, arch and
configuration) is `--gate`; `--out` names the JSON (e.g. kernels-static-before.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import machine, write_result  # noqa: E402
from svdq_compiler.codegen.aot import AotJob, compile_jobs, gate_cases, offered_configs, spec_job  # noqa: E402
from svdq_compiler.codegen.generate import Target, _emit_tile_order, _Source  # noqa: E402
from svdq_compiler.codegen.spec import ActQuant, GemmSpec, QuantizeSpec, WeightOnlySpec  # noqa: E402

FLUX_M = (256, 1024, 4096)
FLUX_K = 3072
FLUX_N = (3072, 12288)
MODULATION = (1, 3072, 18432)  # (M, K, N): a double block's six AdaLN chunks
RANK = 32


@dataclass(frozen=True)
class Device:
    name: str
    capability: tuple
    sms: int
    clock_ghz: float  # the clock the datasheet's tensor peaks are quoted at
    tensor_tops: dict  # dense tensor-core ops/s ÷ 1e12 per operand format (fp32 accumulation for bf16)
    bandwidth_gbs: float
    fp32_lanes: int  # per SM: FFMA/FADD/FMUL and IMAD (the FMA pipe)
    int_lanes: int  # per SM: IADD3, LOP3, SHF, PRMT, ISETP (the ALU)
    xu_lanes: int = 16  # per SM: conversions and MUFU


# Sources and caveats: bench/kernels-model.md.
DEVICES = (
    Device("A100-SXM4-80GB", (8, 0), 108, 1.41, {"bf16": 312, "int8": 624, "int4": 1248}, 2039, 64, 64),
    Device("L40S", (8, 9), 142, 2.52, {"bf16": 362, "int8": 733, "int4": 733, "fp8": 733}, 864, 128, 64),
    Device("H100-SXM5", (9, 0), 132, 1.83, {"bf16": 989, "int8": 1979, "fp8": 1979}, 3350, 128, 64),
    Device("H200", (9, 0), 132, 1.83, {"bf16": 989, "int8": 1979, "fp8": 1979}, 4800, 128, 64),
    Device("B200", (10, 0), 148, 1.86, {"bf16": 2250, "int8": 4500, "fp8": 4500, "nvfp4": 9000}, 8000, 128, 64),
    Device("RTX-5090", (12, 0), 170, 2.41, {"bf16": 209.5, "int8": 838, "fp8": 419, "nvfp4": 1676}, 1792, 128,
           128),
)
SCHEDULERS = 4  # warp schedulers per SM, one warp instruction issued per clock each (sm_80 … sm_120)


# ---------------------------------------------------------------------------------------------------------
# Plain Triton baselines (what "bf16 matmul" and "int8 matmul" mean in the ratios)

def _baseline_source() -> str:
    """A plain matmul C[M, N] = A[M, K]·B[N, K]ᵀ in the generated kernels' tile order (bf16 → fp32 → bf16, or
    int8 → int32 → fp32 → bf16), without masks (the modelled shapes are multiples of the tiles)."""
    src = _Source()
    src.add("""
        import triton
        import triton.language as tl


        @triton.jit
        def plain_matmul(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                         INT8: tl.constexpr):""")
    src.indent()
    _emit_tile_order(src)
    src.add("""
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows64[:, None] * K + ks[None, :]
        b_ptrs = b_ptr + cols_in.to(tl.int64)[:, None] * K + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)), acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(tl.float32).to(tl.bfloat16))""")
    return src.text()


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the configurations Triton's matmul tutorial tunes over, per family
_BASELINE_TILES = {
    "big_smem": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                 (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)],
    "small_smem": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
                   (64, 64, 64, 4, 4)],
}


def baseline_jobs(kind: str, device: Device) -> list[AotJob]:
    small = device.capability in ((8, 6), (8, 9), (12, 0))
    element = "*i8" if kind == "int8" else "*bf16"
    types = {"a_ptr": element, "b_ptr": element, "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
             **{name: "constexpr" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_M", "EVEN_N",
                                              "INT8")}}
    source = _baseline_source()
    jobs = []
    for bm, bn, bk, warps, stages in _BASELINE_TILES["small_smem" if small else "big_smem"]:
        bk = bk * 2 if kind == "int8" else bk  # the same bytes per K step
        jobs.append(AotJob(f"{kind} matmul", source, "plain_matmul", types,
                           {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_M": True,
                            "EVEN_N": True, "INT8": kind == "int8"},
                           device.capability, warps, stages))
    return jobs


# ---------------------------------------------------------------------------------------------------------
# The model


def _loop_cycles(mix: dict, length: int, device: Device) -> float:
    """Issue cycles of one warp's pass over a loop body with instruction mix `mix` on one scheduler."""
    per_scheduler = lambda lanes: max(lanes / SCHEDULERS, 1.0)  # noqa: E731
    fma = (mix.get("float", 0) + mix.get("imad", 0)) * 32 / per_scheduler(device.fp32_lanes)
    alu = (mix.get("int", 0) + mix.get("prmt", 0)) * 32 / per_scheduler(device.int_lanes)
    xu = mix.get("convert", 0) * 32 / per_scheduler(device.xu_lanes)
    return max(float(length), fma, alu, xu)


def predict(result, device: Device, m: int, n: int, k: int, *, flops_per_tile_k: float, tensor_format: str | None,
            extra_tensor_flops: float, k_per_iteration: int, dram_bytes: float) -> dict:
    """max(tensor, issue, memory) for one kernel launch (see the module docstring)."""
    c = result.constexprs
    block_m, block_n = c.get("BLOCK_M", 1), c.get("BLOCK_N", 1)
    tiles = math.ceil(m / block_m) * (math.ceil(n / block_n) if "BLOCK_N" in c else 1)
    tiles_per_sm = math.ceil(tiles / device.sms)
    clock = device.clock_ghz * 1e9
    loop = result.hot_loop or {"length": 0, "mix": {}}
    iterations = math.ceil(k / k_per_iteration)
    loop_cycles = _loop_cycles(loop["mix"], loop["length"], device)
    rest = max(result.instructions - loop["length"], 0)
    issue_cycles = tiles_per_sm * result.num_warps * (iterations * loop_cycles + rest) / SCHEDULERS
    issue_us = issue_cycles / clock * 1e6
    tensor_us = 0.0
    if tensor_format is not None:
        per_sm_rate = device.tensor_tops[tensor_format] * 1e12 / device.sms
        tensor_us = tiles_per_sm * flops_per_tile_k * k / per_sm_rate * 1e6
        tensor_us += tiles_per_sm * extra_tensor_flops / (device.tensor_tops["bf16"] * 1e12 / device.sms) * 1e6
    memory_us = dram_bytes / (device.bandwidth_gbs * 1e9) * 1e6
    predicted = max(tensor_us, issue_us, memory_us)
    serialized = max(memory_us, tensor_us + issue_us) if loop.get("serialized_waits") else predicted
    bound = max((("tensor", tensor_us), ("issue", issue_us), ("memory", memory_us)), key=lambda t: t[1])[0]
    return {"tensor_us": round(tensor_us, 2), "issue_us": round(issue_us, 2), "memory_us": round(memory_us, 2),
            "predicted_us": round(predicted, 2), "predicted_serialized_us": round(serialized, 2), "bound": bound}


def _kernel_record(result) -> dict:
    loop = result.hot_loop or {}
    return {"config": {**{k: v for k, v in result.constexprs.items() if not k.startswith("EVEN")},
                       "num_warps": result.num_warps, "num_stages": result.num_stages},
            "registers": result.registers, "spill_stores": result.spill_stores, "spill_loads": result.spill_loads,
            "shared_bytes": result.shared_bytes, "smem_limit": result.smem_limit, "error": result.error,
            "hot_loop": {"instructions": loop.get("length"), "mix": loop.get("mix"),
                         "tensor_ops": loop.get("tensor_ops"), "serialized_waits": loop.get("serialized_waits")}}


def _best(results, device, shapes_of) -> tuple:
    """(record, prediction) of the configuration with the lowest predicted time (spilling ones excluded
    unless nothing else compiles)."""
    scored = []
    for result in results:
        if result.error is not None or not result.fits:
            continue
        prediction = predict(result, device, **shapes_of(result))
        scored.append((result.spills, prediction["predicted_us"], result, prediction))
    if not scored:
        return None, None
    _, _, result, prediction = min(scored, key=lambda t: (t[0], t[1]))
    return _kernel_record(result), prediction


def _gemm_shapes(spec: GemmSpec | None, m: int, n: int, k: int, *, fmt: str, baseline_bytes: int = 0):
    """The `predict` keyword arguments of a kernel B / baseline launch at M × N × K."""

    def shapes_of(result) -> dict:
        c = result.constexprs
        if spec is None:  # plain matmul: operands of `baseline_bytes` each, bf16 output
            return dict(m=m, n=n, k=k, flops_per_tile_k=2 * c["BLOCK_M"] * c["BLOCK_N"], tensor_format=fmt,
                        extra_tensor_flops=0, k_per_iteration=c["BLOCK_K"],
                        dram_bytes=(m + n) * k * baseline_bytes + m * n * 2)
        step = c.get("BLOCK_K") or spec.group_size
        code_bytes = k if fmt == "int8" else k / 2
        groups = 1 if fmt == "int8" else k / spec.group_size
        scale_bytes = 1 if fmt == "nvfp4" else 2
        dram = (m + n) * (code_bytes + groups * scale_bytes) + m * n * 2 + (m + n) * spec.rank * 2 + n * 2
        return dict(m=m, n=n, k=k, flops_per_tile_k=2 * c["BLOCK_M"] * c["BLOCK_N"], tensor_format=fmt,
                    extra_tensor_flops=2 * c["BLOCK_M"] * c["BLOCK_N"] * spec.rank, k_per_iteration=step,
                    dram_bytes=dram)

    return shapes_of


def _quantize_shapes(spec: QuantizeSpec, m: int, k: int):
    def shapes_of(result) -> dict:
        c = result.constexprs
        step = c.get("BLOCK_K") or c["GROUPS_PER_STEP"] * spec.quant.group_size
        code_bytes = k if spec.quant.fmt == "int8" else k / 2
        groups = k / spec.quant.group_size if spec.quant.group_size else 1
        dram = m * k * 2 + m * code_bytes + m * groups * 2 + m * spec.rank * 2 + spec.rank * k * 2
        return dict(m=m, n=1, k=k, flops_per_tile_k=2 * c["BLOCK_M"] * spec.rank, tensor_format=None,
                    extra_tensor_flops=0, k_per_iteration=step, dram_bytes=dram)

    return shapes_of


def _weight_only_shapes(spec: WeightOnlySpec, m: int, n: int, k: int):
    def shapes_of(result) -> dict:
        c = result.constexprs
        dram = m * k * 2 + n * k / 2 + n * (k / spec.group_size) * 2 + m * n * 2 + n * 2
        return dict(m=m, n=n, k=k, flops_per_tile_k=2 * c["BLOCK_M"] * c["BLOCK_N"], tensor_format="bf16",
                    extra_tensor_flops=0, k_per_iteration=c["GROUPS_PER_STEP"] * spec.group_size, dram_bytes=dram)

    return shapes_of


def model_device(device: Device, workers: int) -> dict:
    """Compile what `device` runs and predict every FLUX shape."""
    target = Target("cuda", device.capability)
    int_specs = {
        "A int4 r32": QuantizeSpec(ActQuant("int4", 64), RANK, "bfloat16", k=FLUX_K),
        "A int4 r0": QuantizeSpec(ActQuant("int4", 64), 0, "bfloat16", k=FLUX_K),
    }
    gemm_specs = {(name, n): GemmSpec("int4", 64, rank, rank > 0, "bfloat16", k=FLUX_K, n=n)
                  for n in FLUX_N for name, rank in (("B int4 r32 bias", RANK), ("B int4 r0", 0))}
    if "nvfp4" in device.tensor_tops:
        int_specs["A nvfp4 r32"] = QuantizeSpec(ActQuant("nvfp4", 16), RANK, "bfloat16", k=FLUX_K)
        gemm_specs |= {("B nvfp4 r32 bias", n): GemmSpec("nvfp4", 16, RANK, True, "bfloat16", k=FLUX_K, n=n)
                       for n in FLUX_N}
    w_spec = WeightOnlySpec("int4", 64, 0, True, "bfloat16", k=MODULATION[1], n=MODULATION[2])
    jobs: dict[str, list[AotJob]] = {}
    for name, spec in int_specs.items():
        jobs[name] = [spec_job(spec, target, c, label=name) for c in offered_configs(spec, target)]
    for (name, n), spec in gemm_specs.items():
        jobs[f"{name} N={n}"] = [spec_job(spec, target, c, n=n, label=name) for c in offered_configs(spec, target)]
    jobs["W int4 modulation"] = [spec_job(w_spec, target, c, m=16, n=MODULATION[2], label="W")
                                 for c in offered_configs(w_spec, target)]
    for kind in ("bf16", "int8"):
        jobs[f"{kind} matmul"] = baseline_jobs(kind, device)
    flat = [job for group in jobs.values() for job in group]
    results = dict(zip([id(j) for j in flat], compile_jobs(flat, workers)))
    of = lambda name: [results[id(j)] for j in jobs[name]]  # noqa: E731

    shapes = []
    for n in FLUX_N:
        for m in FLUX_M:
            row = {"m": m, "k": FLUX_K, "n": n, "kernels": {}}
            kernels = row["kernels"]
            for kind in ("bf16", "int8"):
                kernels[f"{kind}_matmul"] = _best(of(f"{kind} matmul"), device, _gemm_shapes(
                    None, m, n, FLUX_K, fmt=kind, baseline_bytes=1 if kind == "int8" else 2))
            for a_name, b_name, key in (("A int4 r32", "B int4 r32 bias", "svdq_int4"),
                                        ("A int4 r0", "B int4 r0", "svdq_int4_rank0"),
                                        ("A nvfp4 r32", "B nvfp4 r32 bias", "svdq_nvfp4")):
                if a_name not in int_specs:
                    continue
                spec = gemm_specs[(b_name, n)]
                fmt = "nvfp4" if spec.act == "nvfp4" and device.capability[0] >= 10 else (
                    "bf16" if spec.act == "nvfp4" else "int8")  # int4 codes are multiplied as int8
                kernels[f"{key}_kernel_a"] = _best(of(a_name), device, _quantize_shapes(int_specs[a_name], m, FLUX_K))
                kernels[f"{key}_kernel_b"] = _best(of(f"{b_name} N={n}"), device,
                                                   _gemm_shapes(spec, m, n, FLUX_K, fmt=fmt))
            row["ratios"] = _ratios(kernels)
            shapes.append(row)
    m, k, n = MODULATION
    modulation = {"m": m, "k": k, "n": n, "kernels": {
        "bf16_matmul": _best(of("bf16 matmul"), device, _gemm_shapes(None, m, n, k, fmt="bf16", baseline_bytes=2)),
        "w4a16_int4": _best(of("W int4 modulation"), device, _weight_only_shapes(w_spec, m, n, k))}}
    modulation["ratios"] = {"w4a16_int4_vs_bf16": _ratio(modulation["kernels"], "bf16_matmul", ["w4a16_int4"])}
    return {"capability": f"sm_{device.capability[0]}{device.capability[1]}", "rates": device.__dict__,
            "flux_shapes": shapes, "modulation": modulation}


def _time(kernels: dict, names: list[str], field: str = "predicted_us") -> float | None:
    parts = [kernels.get(name) for name in names]
    if any(part is None or part[1] is None for part in parts):
        return None
    return sum(part[1][field] for part in parts)


def _ratio(kernels: dict, base: str, names: list[str], field: str = "predicted_us") -> float | None:
    over, under = _time(kernels, [base], field), _time(kernels, names, field)
    return round(over / under, 3) if over and under else None


def _ratios(kernels: dict) -> dict:
    ratios = {}
    for key in ("svdq_int4", "svdq_nvfp4"):
        layer = [f"{key}_kernel_a", f"{key}_kernel_b"]
        for field in ("predicted_us", "predicted_serialized_us"):
            suffix = "" if field == "predicted_us" else "_serialized"
            ratios[f"{key}_fused_vs_bf16{suffix}"] = _ratio(kernels, "bf16_matmul", layer, field)
        ratios[f"{key}_gemm_only_vs_bf16"] = _ratio(kernels, "bf16_matmul", [f"{key}_kernel_b"])
    ratios["int8_matmul_vs_bf16"] = _ratio(kernels, "bf16_matmul", ["int8_matmul"])
    with_branch = _time(kernels, ["svdq_int4_kernel_a", "svdq_int4_kernel_b"])
    without = _time(kernels, ["svdq_int4_rank0_kernel_a", "svdq_int4_rank0_kernel_b"])
    ratios["svdq_int4_branch_overhead"] = round(with_branch / without - 1, 3) if with_branch and without else None
    return {k: v for k, v in ratios.items() if v is not None}


def _flatten(entry) -> dict | None:
    record, prediction = entry
    return None if record is None else {**record, "prediction": prediction}


# kernel_model names → bench_kernels case names, for the model-against-measured check
_MEASURED_AS = {"svdq_int4": ("svdq_int4_kernel_a", "svdq_int4_kernel_b"),
                "svdq_int4_rank0": ("svdq_int4_rank0_kernel_a", "svdq_int4_rank0_kernel_b"),
                "svdq_int4_gemm_only": ("svdq_int4_rank0_kernel_b",), "int_mm_w8a8": ("int8_matmul",),
                "bf16_matmul": ("bf16_matmul",), "svdq_nvfp4_fused": ("svdq_nvfp4_kernel_a", "svdq_nvfp4_kernel_b"),
                "svdq_w4a16_int4": ("w4a16_int4",)}


def check_measured(modelled: dict, measured: dict) -> list[dict]:
    """Predicted against measured times (bench_kernels JSON) for every shape and case both have; the error is
    measured/predicted − 1. bf16 and int8 are measured through cuBLAS (torch), modelled as plain Triton."""
    rows = []
    rows_modelled = modelled["flux_shapes"] + [modelled["modulation"]]
    predicted_rows = {(r["m"], r["k"], r["n"]): r["kernels"] for r in rows_modelled}
    for result in measured["results"]:
        kernels = predicted_rows.get((result["m"], result["k"], result["n"]))
        if kernels is None:
            continue
        for case, parts in _MEASURED_AS.items():
            name = "svdq_int4_fused" if case == "svdq_int4" else case
            ms = result["cases"].get(name, {}).get("ms")
            entries = [kernels.get(part) for part in parts]
            if ms is None or any(e is None for e in entries):
                continue
            predicted_us = sum(e["prediction"]["predicted_us"] for e in entries)
            rows.append({"m": result["m"], "k": result["k"], "n": result["n"], "case": name,
                         "measured_us": round(ms * 1e3, 2), "predicted_us": round(predicted_us, 2),
                         "error": round(ms * 1e3 / predicted_us - 1, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels-static.json")
    parser.add_argument("--devices", default=",".join(d.name for d in DEVICES if d.name != "H200"),
                        help="comma-separated device names (default: all but the H200, which the workplace's "
                             "GPU sessions use for --measured)")
    parser.add_argument("--workers", type=int, default=2, help="compiles at once (default 2)")
    parser.add_argument("--measured", type=Path, default=None,
                        help="a bench_kernels JSON to check the model against (with --devices naming one device)")
    parser.add_argument("--gate", action="store_true",
                        help="also compile the full AOT gate matrix and report what fails it")
    args = parser.parse_args(argv)
    import triton

    start = time.time()
    wanted = args.devices.split(",")
    report = {"machine": machine(), "triton": triton.__version__, "model": __doc__.split("\n\n")[1].strip(),
              "rates_doc": "bench/kernels-model.md", "devices": {}}
    for device in DEVICES:
        if device.name not in wanted:
            continue
        modelled = model_device(device, args.workers)
        for row in modelled["flux_shapes"] + [modelled["modulation"]]:
            row["kernels"] = {name: _flatten(entry) for name, entry in row["kernels"].items()}
        report["devices"][device.name] = modelled
        headline = next(r for r in modelled["flux_shapes"] if r["m"] == 4096 and r["n"] == 12288)["ratios"]
        print(f"{device.name}: M=4096 N=12288 {headline}; modulation {modelled['modulation']['ratios']}")
        if args.measured is not None:
            modelled["measured_check"] = check_measured(modelled, json.loads(args.measured.read_text()))
            for row in modelled["measured_check"]:
                print(f"  {row['case']:<22} M={row['m']:<5} N={row['n']:<6} measured {row['measured_us']:9.1f} us, "
                      f"predicted {row['predicted_us']:9.1f} us, error {row['error']:+.0%}")
    if args.gate:
        cases = gate_cases(True)
        results = compile_jobs([case.job for case in cases], args.workers)
        report["gate"] = [{"template": case.template, "arch": case.arch, **_kernel_record(result)}
                          for case, result in zip(cases, results)
                          if result.error or result.spills or not result.fits]
        print(f"gate: {len(report['gate'])} of {len(cases)} compiles fail (error, spill or shared memory)")
    report["seconds"] = round(time.time() - start, 1)
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
