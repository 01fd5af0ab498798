"""Memory of the eager path (module swap) against the graph path on one small random FLUX (width 512) that both
can compile: peak RSS while compiling, RSS the compiled model holds, what a `.to("meta")` leaves behind, and the
load of its saved file in a fresh process.

    OMP_NUM_THREADS=1 nice .venv/bin/python tools/bench_eager_memory.py --work /tmp/eager-memory

Each path runs in its own fresh process, which first compiles a 1-layer model of the same class along the same
path (so the ~1000 modules a compile imports, and their first-call caches, are not counted), then measures the
real one with RSS read from /proc/self/status (the peak, VmHWM, reset through /proc/self/clear_refs before the
compile). Tensors are also counted exactly: the distinct CPU storages of the Python tensors alive (gc), after
the compile (against the compiled model's parameter bytes: 1.0x means no tensor is held twice; the eager path's
stub graph keeps meta tensors only, svdq_compiler/eager.py) and after `.to("meta")` (what stays on the CPU once
the model's tensors move elsewhere: what a `model.to("cuda")` would leave behind; ~0 is the goal). RSS says less
there: glibc keeps freed small blocks (low-rank factors, scales) in its arenas, so the children fix
MALLOC_MMAP_THRESHOLD_ (large freed blocks go back to the kernel) and RSS is reported beside the tensor count.
The load is measured by tools/bench_load_memory.py's fresh-process method.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

# ~40M parameters (160 MB in fp32): the tensors outweigh what a compile leaves in Python objects and malloc
# arenas (~20 MiB, measured at width 256, 2+2 layers), which would hide a tensor held twice
SMALL_FLUX = dict(num_layers=3, num_single_layers=3, num_attention_heads=8, attention_head_dim=64,
                  joint_attention_dim=512, pooled_projection_dim=256, in_channels=16, axes_dims_rope=(8, 28, 28))
WARM_UP_FLUX = {**SMALL_FLUX, "num_layers": 1, "num_single_layers": 1}
TOKENS = 64


def status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_compile(path: str, preset: str, out: Path) -> dict:
    """In this (fresh) process: compile SMALL_FLUX along `path` after a warm-up on WARM_UP_FLUX; save to `out`."""
    import gc

    import torch
    from diffusers import FluxTransformer2DModel

    import svdq_compiler
    from svdq_compiler.eager import compile_report_of
    from svdq_compiler.models import adapter_for

    def build(config: dict) -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**config).eval().requires_grad_(False)
        return model, adapter_for(model).example_inputs(model, tokens=TOKENS)

    def run(config: dict) -> torch.nn.Module:
        model, inputs = build(config)
        # dynamic_shapes=None: the same capture on both paths' share (eager captures its stub with dynamic rows)
        return svdq_compiler.compile(model, inputs, preset, calib_inputs=[inputs], path=path, dynamic_shapes=None)

    def tensor_bytes() -> int:
        """Bytes of the distinct CPU storages that Python tensors alive now hold (fake and meta ones hold none)."""
        gc.collect()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gc.get_objects()
                    if type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"}
        return sum(storages.values())

    run(WARM_UP_FLUX)
    gc.collect()
    base, base_tensors = status("VmRSS"), tensor_bytes()
    model, inputs = build(SMALL_FLUX)
    model_bytes = svdq_compiler.parameter_bytes(model)
    built = status("VmRSS") - base
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    compiled = svdq_compiler.compile(model, inputs, preset, calib_inputs=[inputs], path=path, dynamic_shapes=None)
    peak = status("VmHWM") - base
    del model, inputs  # the caller's references; the eager path returns the model itself, changed
    tensors = tensor_bytes() - base_tensors
    held = status("VmRSS") - base
    compiled_bytes = svdq_compiler.parameter_bytes(compiled)
    svdq_compiler.save(compiled, out)
    compiled.to("meta")
    tensors_left = tensor_bytes() - base_tensors
    left = status("VmRSS") - base
    report = compile_report_of(compiled)
    return {"path": report["path"], "float_model_bytes": model_bytes, "rss_after_build": built,
            "compile_peak_rss_above_start": peak, "compiled_parameter_bytes": compiled_bytes,
            "tensor_bytes_after_compile": tensors, "tensors_over_parameter_bytes": round(tensors / compiled_bytes, 3),
            "rss_held_after_compile": held, "tensor_bytes_left_after_to_meta": tensors_left,
            "rss_left_after_to_meta": left, "file_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/svdq-eager-memory"), help="where graphs are saved")
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eager-memory.json")
    parser.add_argument("--paths", default="graph,eager", help="compile paths to measure, comma-separated")
    parser.add_argument("--note", help="recorded with the result: which code ran when it is not this checkout's "
                                       "(PYTHONPATH=an older tree measures that tree's svdq_compiler)")
    parser.add_argument("--child", choices=("graph", "eager"), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_compile(args.child, args.preset, args.work / f"{args.child}.pt")))
        return 0
    from bench_common import machine, write_result
    from bench_load_memory import measure_load

    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}  # fixed: freed large blocks return (module doc)
    cases = []
    for path in args.paths.split(","):
        run = subprocess.run([sys.executable, __file__, "--child", path, "--work", str(args.work), "--preset",
                              args.preset], capture_output=True, text=True, env=env, timeout=3600)
        if run.returncode != 0:
            print(f"bench_eager_memory: the {path} path failed:\n{run.stderr[-3000:]}", file=sys.stderr)
            return 1
        case = json.loads(run.stdout.strip().splitlines()[-1])
        case["load"] = measure_load(args.work / f"{path}.pt")
        cases.append(case)
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        print(f"{path}: compile peak RSS {mib(case['compile_peak_rss_above_start'])}; after: tensors "
              f"{mib(case['tensor_bytes_after_compile'])} for {mib(case['compiled_parameter_bytes'])} of parameters "
              f"({case['tensors_over_parameter_bytes']}x), RSS {mib(case['rss_held_after_compile'])}; after "
              f".to('meta'): tensors {mib(case['tensor_bytes_left_after_to_meta'])}, RSS "
              f"{mib(case['rss_left_after_to_meta'])}; load peak RSS {mib(case['load']['peak_rss_above_import'])}")
    import svdq_compiler

    write_result({"benchmark": "eager-memory", "model": {"class": "FluxTransformer2DModel", "config": SMALL_FLUX,
                                                         "tokens": TOKENS},
                  "preset": args.preset, "cases": cases, "svdq_compiler_from": svdq_compiler.__file__,
                  "code_note": args.note, "machine": machine(),
                  "note": "shared machine: see load_average; RSS in bytes above the state after a warm-up compile",
                  "command": " ".join(["tools/bench_eager_memory.py", *(argv or sys.argv[1:])])}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
