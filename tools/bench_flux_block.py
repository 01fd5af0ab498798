"""One full-size FLUX.1 double block and one single block (width 3072, 24 heads, 4096 text-embedding channels):
bf16 eager against the int4 SVDQuant compile running the generated kernels.

The model is a random-weight `FluxTransformer2DModel` with `num_layers=1, num_single_layers=1` at FLUX.1's
sizes, so its embedders and output projection come along (a few percent of the time). Calibration is minimal
(one prompt, one step, 256 image tokens: the point is speed, not quality); timing runs at `--tokens` image
tokens (4096: a 1024×1024 image) plus the adapter's text tokens, medians of `triton.testing.do_bench`.
Writes bench/results/flux-block-<device>.json. `--smoke` builds a narrow model on the CPU under the Triton
interpreter to check the wiring (writes to build/).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from bench_common import machine, write_result  # noqa: E402
from bench_kernels import _timer  # noqa: E402

import svdq_compiler  # noqa: E402
from svdq_compiler.models import adapter_for  # noqa: E402

FLUX_BLOCKS = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SMOKE_BLOCKS = dict(FLUX_BLOCKS, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                    pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def _on(inputs, device: torch.device):
    """The adapter's inputs (built on the CPU) moved to `device`."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a narrow model on the CPU (Triton interpreter)")
    parser.add_argument("--tokens", type=int, default=None, help="image tokens when timing (default 4096)")
    parser.add_argument("--preset", default="int4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    tokens = args.tokens or (16 if args.smoke else 4096)
    dtype = torch.bfloat16
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    sizes = SMOKE_BLOCKS if args.smoke else FLUX_BLOCKS
    model = FluxTransformer2DModel(**sizes).to(device, dtype).eval().requires_grad_(False)
    adapter = adapter_for(model)
    calib_tokens = min(256, tokens)
    config = svdq_compiler.QuantConfig.preset(args.preset, smooth_grid=2, calib_prompts=1, calib_steps=1)
    example = adapter.example_inputs(model, tokens=calib_tokens)
    calib = adapter.calib_inputs(model, 1, 1, seed=0, tokens=calib_tokens)
    start = time.perf_counter()
    compiled_on, compile_error = device.type, None
    try:
        gm = svdq_compiler.compile(model, _on(example, device), config, calib_inputs=_on(calib, device))
    except Exception as exc:  # noqa: BLE001  (a failed compile on the GPU is a finding; the CLI's path still times)
        if device.type == "cpu":
            raise
        traceback.print_exc()
        # what svdq-compile does: compile on the CPU, then load the graph file onto the GPU
        compiled_on, compile_error = "cpu, then svdq_compiler.load(device='cuda')", f"{type(exc).__name__}: {exc}"
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "block.pt"
            svdq_compiler.save(svdq_compiler.compile(model.to("cpu"), example, config, calib_inputs=calib), path)
            gm = svdq_compiler.load(path, device=str(device))
        model.to(device)
    compile_s = time.perf_counter() - start
    inputs = _on(adapter.calib_inputs(model, 1, 1, seed=7, tokens=tokens)[0], device)
    timed = _timer(device, 200)
    with torch.no_grad():
        reference, compiled = model(**inputs)[0], gm(**inputs)[0]
        bf16_ms = timed(lambda: model(**inputs))
        int4_ms = timed(lambda: gm(**inputs))
    error = float((compiled.float() - reference.float()).norm() / reference.float().norm())
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "interpreter"
    result = {"benchmark": "flux-block", "model": "random FluxTransformer2DModel, 1 double + 1 single block",
              "sizes": sizes, "preset": args.preset, "image_tokens": tokens, "dtype": "bfloat16",
              "compiled_on": compiled_on, "compile_error_on_device": compile_error,
              "compile_s": round(compile_s, 1), "bf16_ms": round(bf16_ms, 3), "svdq_ms": round(int4_ms, 3),
              "speedup_vs_bf16": round(bf16_ms / int4_ms, 3), "output_rel_error": error,
              "machine": machine(device.type)}
    print({k: v for k, v in result.items() if k not in ("sizes", "machine")})
    default = Path("build" if args.smoke else "bench/results") / f"flux-block-{name}.json"
    write_result(result, args.out or default)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
