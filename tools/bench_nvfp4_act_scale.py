"""NVFP4 activations: which per-tensor scale — one level (none), calibrated with a headroom, or dynamic per call.

Each model is compiled once with the nvfp4 preset (headroom 1, reference ops, no fuse), then its held-out
inputs run under each choice of the activation tensor scale t, substituted at run time (a TorchDispatchMode
rewrites the `act_scale` / `a_tscale` arguments of svdq.quantize_act, svdq.gemm and svdq.conv2d):
- `one-level`: t = 1, what the compiler did before (group scales cap at 6·448 = 2688 and underflow below 6·2⁻¹⁰);
- `calibrated hN`: t = N·(largest |x/λ| seen in calibration)/(6·448), as compiled graphs store it;
- `dynamic`: t = (largest |x/λ| of this call)/(6·448).
Per choice: the relative output error against the fp32 eager model, and over every quantized activation the
share of values above the top grid point 6·448·t (saturated) and of nonzero groups whose FP8 scale is 0
(flushed). "in-distribution" inputs are the adapter's held-out inputs; "shifted" multiplies the input latents
by 8 (activations beyond what calibration saw). A last table is one nvfp4 linear on rows with 1e4 and 1e9
outliers. Writes bench/results/nvfp4-act-scale.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from bench_common import machine, write_result
from eval_quality import first_output
from torch.utils._python_dispatch import TorchDispatchMode

import svdq_compiler
from svdq_compiler import quant
from svdq_compiler.capture import install_shape_check
from svdq_compiler.models import adapter_for, load_model
from svdq_compiler.ops import smoothed_input
from svdq_compiler.pipeline import PassContext, run_passes, svdquant_pipeline

svdq = torch.ops.svdq
TOP = quant.E2M1_MAX * quant.E4M3_MAX
HEADROOMS = (1, 4, 16, 64)


class ActScales(TorchDispatchMode):
    """Replace the per-tensor activation scale of every nvfp4 quantization by `choice`; count saturation."""

    def __init__(self, choice: str):
        super().__init__()
        self.choice = choice
        self.by_codes: dict[int, torch.Tensor] = {}
        self.values = self.saturated = self.groups = self.flushed = 0

    def scale(self, xs: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
        if self.choice == "one-level":
            t = torch.ones((), dtype=torch.float32)
        elif self.choice == "dynamic":
            t = quant.nvfp4_act_scale(xs.abs().amax().float())
        else:
            t = calibrated * float(self.choice.removeprefix("calibrated h"))
        magnitude = xs.abs().float()
        self.values += magnitude.numel()
        self.saturated += int((magnitude > TOP * t * (1 + 1e-6)).sum())  # beyond the top grid point, not its rounding
        pad = -magnitude.shape[-1] % 16
        absmax = torch.nn.functional.pad(magnitude, (0, pad)).unflatten(-1, (-1, 16)).amax(-1)
        self.groups += int((absmax > 0).sum())
        self.flushed += int(((absmax > 0) & (quant.round_e4m3((absmax / 6 / t).clamp(max=448)) == 0)).sum())
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is svdq.quantize_act.default and len(args) > 5 and args[5] is not None:
            t = self.scale(smoothed_input(args[0], args[1], args[2]), args[5])
            out = func(*args[:5], t)
            self.by_codes[out[0].data_ptr()] = t
            return out
        if func is svdq.gemm.default and len(args) > 9 and args[9] is not None:
            return func(*args[:9], self.by_codes[args[0].data_ptr()])
        if func is svdq.conv2d.default and len(args) > 12 and args[12] is not None:
            t = self.scale(smoothed_input(args[0].movedim(1, -1), None, args[5]), args[12])
            return func(*args[:12], t)
        return func(*args, **kwargs)


def _shifted(inputs: dict, factor: float) -> dict:
    out = dict(inputs)
    for key in ("hidden_states", "sample", "x"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key] * factor
            return out
    raise ValueError(f"no latent input among {sorted(inputs)}")


def bench_model(name: str, prompts: int, steps: int) -> dict:
    model = load_model(name).float()
    adapter = adapter_for(model)
    inputs = adapter.example_inputs(model)
    config = svdq_compiler.QuantConfig.preset("nvfp4", nvfp4_act_headroom=1.0)
    ctx = PassContext(config=config, example_inputs=inputs, calib_inputs=adapter.calib_inputs(model, prompts, steps,
                                                                                                seed=0),
                      adapter=adapter, model=model)
    passes = svdquant_pipeline([p.name for p in svdquant_pipeline() if p.name != "fuse"])
    gm = run_passes(copy.deepcopy(svdq_compiler.capture(model, inputs)), ctx, passes)
    install_shape_check(gm)
    held_out = adapter.calib_inputs(model, 2, 1, seed=99)
    cases = {"in-distribution": held_out, "shifted x8": [_shifted(i, 8.0) for i in held_out]}
    result = {}
    for case, samples in cases.items():
        with torch.no_grad():
            references = [first_output(model(**s)).float() for s in samples]
        rows = {}
        for choice in ["one-level", *(f"calibrated h{h}" for h in HEADROOMS), "dynamic"]:
            mode = ActScales(choice)
            errors = []
            with torch.no_grad(), mode:
                for sample, reference in zip(samples, references):
                    out = first_output(gm(**sample)).float()
                    errors.append(float((out - reference).norm() / reference.norm()))
            rows[choice] = {"output_rel_error": round(sum(errors) / len(errors), 5),
                            "saturated_share": mode.saturated / max(mode.values, 1),
                            "flushed_group_share": mode.flushed / max(mode.groups, 1)}
            print(name, case, choice, rows[choice], flush=True)
        result[case] = rows
    return result


def outlier_linear() -> dict:
    """One nvfp4 linear (x·Wᵀ, 64 → 32) on rows with an outlier of 1e4 or 1e9: relative error of the output."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen) / 8
    wq = quant.fake_quantize_weight(w, "nvfp4", 16)
    result = {}
    for outlier in (1e4, 1e9):
        x = torch.randn(8, 64, generator=gen)
        x[:, 5] = outlier
        exact = x @ w.T
        rows = {}
        for choice, t in (("one-level", torch.ones(())), ("calibrated h4", quant.nvfp4_act_scale(outlier, 4.0)),
                          ("dynamic", None)):
            y = quant.fake_quantize_act(x, "nvfp4", 16, tensor_scale=t) @ wq.T
            rows[choice] = round(float((y - exact).norm() / exact.norm()), 5)
        result[f"outlier {outlier:g}"] = rows
        print("linear", outlier, rows, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-flux", "random:flux", "random:sd3", "random:unet"])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/nvfp4-act-scale.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"benchmark": "nvfp4 activation tensor scale: one-level vs calibrated headroom vs dynamic",
              "reference": "fp32 eager", "linear_with_outliers": outlier_linear(),
              "models": {name: bench_model(name, args.prompts, args.steps) for name in args.models},
              "machine": machine()}
    write_result(report, args.out)


if __name__ == "__main__":
    main()
