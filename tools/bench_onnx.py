"""ONNX export of a compiled model: export time, file sizes, and onnxruntime (CPU) against our reference ops.

Compiles MODEL (default tiny-flux, the shipped trained model) with a preset, saves graph.pt, exports the portable
and custom ONNX forms, then runs the portable model in onnxruntime at MatMulNBits accuracy level 1 (float32
activations) and 4 (ONNX Runtime's default: int8 activations), and our graph on the reference ops, at the
example inputs and at another token count. Records times, sizes, the ops ONNX Runtime fused, and relative
errors (‖a − b‖ / ‖b‖) against the reference ops and against the 16-bit model.
Writes bench/results/onnx-<model>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.codegen.fused_ops import kernel_backend
from svdq_compiler.models import adapter_for, load_model


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - start, 3)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def session(path: Path, accuracy_level: int, optimized: Path | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    options.intra_op_num_threads = torch.get_num_threads()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_seconds(fn, repeats: int):
    result = fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return result, round((time.perf_counter() - start) / repeats, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per runtime and size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnx

    model = load_model(args.model).eval()
    adapter = adapter_for(model)
    example = adapter.example_inputs(model, batch=2)
    calib = adapter.calib_inputs(model, 4, 4, batch=2)
    with torch.no_grad():
        gm, compile_s = timed(lambda: svdq_compiler.compile(model, example, args.preset, calib_inputs=calib))
    result = {"model": args.model, "preset": args.preset, "compile_s": compile_s, "sizes_bytes": {},
              "export_s": {}, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        svdq_compiler.save(gm, folder / "graph.pt")
        result["sizes_bytes"]["graph.pt"] = (folder / "graph.pt").stat().st_size
        result["sizes_bytes"]["parameters_16bit_model"] = sum(p.numel() * p.element_size()
                                                              for p in model.parameters())
        for form in ("portable", "custom"):
            path = folder / f"{form}.onnx"
            _, result["export_s"][form] = timed(lambda: svdq_compiler.export_onnx(gm, path, form=form))
            result["sizes_bytes"][f"{form}.onnx"] = path.stat().st_size
        portable = folder / "portable.onnx"
        sessions = {}
        for level in (1, 4):
            optimized = folder / f"optimized{level}.onnx"
            sessions[level], result[f"session_create_s_level{level}"] = timed(
                lambda: session(portable, level, optimized))
            ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
            result[f"ort_fused_ops_level{level}"] = {"MatMulNBits": ops.count("MatMulNBits"),
                                                      "DequantizeLinear": ops.count("DequantizeLinear")}
        for label, tokens in (("example", None), ("other_tokens", (8, 12))):
            inputs = example if tokens is None else adapter.example_inputs(model, batch=2, tokens=tokens, seed=3)
            tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad(), kernel_backend("reference"):
                reference, reference_s = run_seconds(lambda: gm(**inputs)[0].numpy(), args.repeats)
                eager, eager_s = run_seconds(lambda: model(**inputs)[0].numpy(), args.repeats)
            run = {"shape": list(reference.shape), "reference_ops_s": reference_s, "eager_16bit_s": eager_s,
                   "int4_reference_vs_16bit": relative(reference, eager)}
            for level, ort in sessions.items():
                feeds = {i.name: tensors[i.name].numpy() for i in ort.get_inputs()}
                out, seconds = run_seconds(lambda: ort.run(None, feeds)[0], args.repeats)
                run[f"ort_level{level}_s"] = seconds
                run[f"ort_level{level}_vs_reference"] = relative(out, reference)
                run[f"ort_level{level}_max_abs_vs_reference"] = float(np.abs(out - reference).max())
                run[f"ort_level{level}_vs_16bit"] = relative(out, eager)
            result["runs"][label] = run
            print(label, run)
    import onnxruntime

    info = machine()
    info.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    out = args.out or Path(f"bench/results/onnx-{args.model.replace(':', '-')}.json")
    write_result({"benchmark": "ONNX export and onnxruntime CPU vs reference ops", "machine": info,
                  "result": result}, out)


if __name__ == "__main__":
    main()
