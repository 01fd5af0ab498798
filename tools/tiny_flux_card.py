"""Evaluate the tiny FLUX in a folder and write its sample grid, evaluation and model card.

    python tools/tiny_flux_card.py [FOLDER] [--tune]

- `--tune` first picks the sampler defaults (guidance × shift, at the default step count) on seeds kept apart from
  the evaluation ones, by the Fréchet distance among the settings whose class accuracy is near the best, and
  writes them to sampler.json.
- samples.png: one row per class prompt, 8 seeds each, with the shipped sampler defaults.
- evaluation.json: the classifier's accuracy on 30 samples per class against the prompted class, the Fréchet
  distance of those 300 samples to the 10,000 real test images (and, as the floor for that sample size, the
  distance of 300 real training images), and the activation outliers of every linear's input along real sampler
  trajectories (per-channel absmax, max over median).
- README.md: the model card, built from training.json and evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from svdq_compiler.models import tiny_flux
from svdq_compiler.models.fmnist import (CLASS_NAMES, PROMPTS, classify, feature_statistics, frechet_distance,
                                         load_classifier, load_split, reference_statistics, save_image_grid)

GRID_SEEDS = 8
EVAL_PER_CLASS = 30
TUNE_PER_CLASS = 10
TUNE_SEED = 100_000
TUNE_GUIDANCE = (2.0, 3.0, 4.0, 5.0)
TUNE_SHIFT = (1.0,)
ACCURACY_SLACK = 0.02


def generate(pipeline, per_class: int, first_seed: int, batch_classes: int = 5, **sampler) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """per_class images of every class prompt (seeds first_seed, first_seed + 1, … per class) and their labels."""
    images, labels = [], []
    for start in range(0, len(PROMPTS), batch_classes):
        classes = list(range(start, min(start + batch_classes, len(PROMPTS))))
        prompts = [PROMPTS[c] for c in classes for _ in range(per_class)]
        seeds = [first_seed + i for _ in classes for i in range(per_class)]
        images.append(pipeline(prompts, seeds, **sampler))
        labels.append(torch.tensor([c for c in classes for _ in range(per_class)]))
    return torch.cat(images), torch.cat(labels)


def measure(pipeline, classifier, reference, per_class: int, first_seed: int, **sampler) -> dict:
    images, labels = generate(pipeline, per_class, first_seed, **sampler)
    predictions, features = classify(classifier, images)
    correct = predictions == labels
    return {"samples": len(labels), "accuracy": round(correct.float().mean().item(), 4),
            "per_class_accuracy": {name: round(correct[labels == c].float().mean().item(), 3)
                                   for c, name in enumerate(CLASS_NAMES)},
            "frechet_distance": round(frechet_distance(feature_statistics(features), reference), 3)}


def tune_sampler(folder: Path, pipeline, classifier, reference) -> tuple[tiny_flux.SamplerConfig, list]:
    trials = []
    for guidance in TUNE_GUIDANCE:
        for shift in TUNE_SHIFT:
            result = measure(pipeline, classifier, reference, TUNE_PER_CLASS, TUNE_SEED, guidance_scale=guidance,
                             shift=shift)
            trials.append({"guidance_scale": guidance, "shift": shift, "accuracy": result["accuracy"],
                           "frechet_distance": result["frechet_distance"]})
            print(f"tune: guidance {guidance}  shift {shift}  accuracy {result['accuracy']:.3f}  "
                  f"FD {result['frechet_distance']:.2f}", flush=True)
    best_accuracy = max(t["accuracy"] for t in trials)
    chosen = min((t for t in trials if t["accuracy"] >= best_accuracy - ACCURACY_SLACK),
                 key=lambda t: t["frechet_distance"])
    sampler = tiny_flux.SamplerConfig(num_steps=pipeline.sampler.num_steps, guidance_scale=chosen["guidance_scale"],
                                      shift=chosen["shift"])
    tiny_flux.save_sampler_config(sampler, folder)
    return sampler, trials


@torch.no_grad()
def activation_outliers(transformer, inputs: list[dict]) -> dict[str, dict]:
    """Per linear: the per-channel absmax of its input over all `inputs`, summarized as max / median."""
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            def record(_module, args, name=name):
                channels = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                absmax[name] = torch.maximum(absmax[name], channels) if name in absmax else channels
            hooks.append(module.register_forward_pre_hook(record))
    try:
        for kwargs in inputs:
            transformer(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    summary = {}
    for name, channels in absmax.items():
        median = channels.median().clamp(min=1e-12)
        summary[name] = {"channels": channels.numel(), "max": round(channels.max().item(), 3),
                         "median": round(median.item(), 4),
                         "max_over_median": round((channels.max() / median).item(), 2),
                         "p99_over_median": round((channels.quantile(0.99) / median).item(), 2)}
    return summary


def write_model_card(folder: Path, tune: bool = False) -> None:
    folder = Path(folder)
    pipeline = tiny_flux.load_pipeline(folder)
    classifier = load_classifier()
    reference = reference_statistics(classifier)
    evaluation: dict = {}
    if tune:
        sampler, evaluation["sampler_tuning"] = tune_sampler(folder, pipeline, classifier, reference)
        pipeline = tiny_flux.TinyFluxPipeline(pipeline.transformer, pipeline.text_encoder, sampler)
    elif (folder / "evaluation.json").is_file():
        evaluation["sampler_tuning"] = json.loads((folder / "evaluation.json").read_text()).get("sampler_tuning")
    evaluation["sampler"] = asdict(pipeline.sampler)

    grid = pipeline([p for p in PROMPTS for _ in range(GRID_SEEDS)], [s for _ in PROMPTS for s in range(GRID_SEEDS)])
    save_image_grid(grid, folder / "samples.png", GRID_SEEDS, row_labels=PROMPTS)
    grid_predictions, _ = classify(classifier, grid)
    grid_labels = torch.arange(len(PROMPTS)).repeat_interleave(GRID_SEEDS)
    evaluation["grid_accuracy"] = round((grid_predictions == grid_labels).float().mean().item(), 4)

    evaluation["samples"] = measure(pipeline, classifier, reference, EVAL_PER_CLASS, 1_000)
    real_images, _ = load_split("train")
    pick = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(0))[:len(PROMPTS) * EVAL_PER_CLASS]
    _, real_features = classify(classifier, real_images[pick].float().div(255.0).unsqueeze(1))
    evaluation["real_train_frechet_distance"] = round(frechet_distance(feature_statistics(real_features), reference), 3)

    outliers = activation_outliers(pipeline.transformer, tiny_flux.calib_inputs(pipeline.transformer, 10, 4, 0,
                                                                                 pipeline=pipeline))
    ratios = [v["max_over_median"] for v in outliers.values()]
    evaluation["activation_outliers"] = {
        "linears": len(ratios), "median_max_over_median": round(statistics.median(ratios), 2),
        "largest_max_over_median": max(ratios), "linears_over_10x": sum(r > 10 for r in ratios),
        "per_linear": outliers}
    tmp = folder / "evaluation.json.tmp"
    tmp.write_text(json.dumps(evaluation, indent=2) + "\n")
    tmp.replace(folder / "evaluation.json")
    training = json.loads((folder / "training.json").read_text())
    card = folder / "README.md.tmp"
    card.write_text(model_card_text(training, evaluation, pipeline, folder))
    card.replace(folder / "README.md")
    print(f"wrote {folder / 'samples.png'}, evaluation.json and README.md: accuracy "
          f"{evaluation['samples']['accuracy']:.3f}, FD {evaluation['samples']['frechet_distance']:.2f} "
          f"(real images: {evaluation['real_train_frechet_distance']:.2f})", flush=True)


def storage_lines(storage: dict | None, folder: Path) -> list[str]:
    """The card's line on how the weights are stored, and what storing them that way does to the samples."""
    if storage is None:
        return ["- Storage: float32 safetensors."]
    stored = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
    return [f"- Storage: the transformer's weights are stored in {storage['dtype']} ({stored / 2**20:.1f} MiB) and "
            f"upcast to {storage['loaded_as']} when loaded, so every computation runs in {storage['loaded_as']}. "
            f"Rounding them to {storage['dtype']} moves the weights by {storage['weights_rel_l2_error']:.1e} "
            f"(relative L2); the samples of the stored weights against those of the float32 weights on "
            f"{storage['sample_pairs']} (prompt, seed) pairs: PSNR {storage['psnr_mean']} dB on average, "
            f"{storage['psnr_min']} dB at worst ({storage['identical_images']} images identical), largest pixel "
            f"difference {storage['max_pixel_difference']} of 1."]


def model_card_text(training: dict, evaluation: dict, pipeline, folder: Path) -> str:
    config = pipeline.transformer.config
    samples = evaluation["samples"]
    outliers = evaluation["activation_outliers"]
    top = sorted(outliers["per_linear"].items(), key=lambda item: -item[1]["max_over_median"])[:8]
    curve = training["loss_curve"]
    shown = [point for i, point in enumerate(curve) if i % max(1, len(curve) // 15) == 0 or i == len(curve) - 1]
    lines = [
        "# tiny-flux: a FLUX transformer trained on Fashion-MNIST",
        "",
        "The project's built-in model `tiny-flux`: a real diffusers `FluxTransformer2DModel` (double- and "
        "single-stream blocks, RoPE, AdaLN modulation), small enough to train and to quantize on a 2-core CPU, "
        "and trained, so that quality numbers measured on it mean something.",
        "",
        "![samples](samples.png)",
        "",
        f"*One row per prompt, seeds 0–{GRID_SEEDS - 1}, {pipeline.sampler.num_steps} Euler steps, guidance "
        f"{pipeline.sampler.guidance_scale}, shift {pipeline.sampler.shift}. The classifier agrees with the prompt on "
        f"{evaluation['grid_accuracy']:.0%} of this grid.*",
        "",
        "## Model",
        "",
        f"- Transformer: {training['transformer_parameters'] / 1e6:.2f}M parameters; {config.num_layers} double and "
        f"{config.num_single_layers} single blocks, {config.num_attention_heads} heads of {config.attention_head_dim}, "
        f"in_channels {config.in_channels}, joint_attention_dim {config.joint_attention_dim}, pooled_projection_dim "
        f"{config.pooled_projection_dim}, RoPE axes {list(config.axes_dims_rope)}, no guidance embedding.",
        f"- Text encoder: {training['text_encoder_parameters'] / 1e3:.0f}k parameters; a fixed word vocabulary "
        f"({len(pipeline.text_encoder.config.vocab) - 1} words), token + position embedding, "
        f"{pipeline.text_encoder.config.layers} pre-norm transformer layers of width "
        f"{pipeline.text_encoder.config.width}; gives `encoder_hidden_states` [B, "
        f"{pipeline.text_encoder.config.max_tokens}, {config.joint_attention_dim}] and `pooled_projections` "
        f"(mean over tokens) [B, {config.pooled_projection_dim}].",
        "- Images: 28×28 padded to 32×32 in [−1, 1]; a 2×2 pixel-unshuffle gives a 4×16×16 latent, FLUX's 2×2 "
        "packing gives 64 tokens of 16 channels.",
        *storage_lines(training.get("storage"), folder),
        "- Prompts: " + ", ".join(f'"{p}"' for p in PROMPTS) + "; the empty prompt is the unconditional input.",
        "",
        "## Training",
        "",
        f"- Data: {training['data']}.",
        f"- Rectified flow as FLUX: t ~ {training['timestep_sampling']}, x_t = (1 − t)·x0 + t·ε, velocity target "
        f"ε − x0; prompts dropped {training['prompt_drop']:.0%} of the time for classifier-free guidance.",
        f"- {training['steps']} AdamW steps of batch {training['batch_size']}, peak lr {training['lr']} "
        f"({training['warmup']} warm-up steps, then constant), weight decay {training['weight_decay']}, "
        f"gradient clipping 1.0; the shipped weights are the EMA ({training['ema']}).",
        f"- Seed {training['seed']}, {training['threads']} CPU thread{'s' if training['threads'] != 1 else ''}, {training['training_minutes']} minutes of "
        f"training on {training['machine']} (torch {training['torch']}).",
        f"- Final training loss {training['final_train_loss']}, validation loss (EMA weights, held-out test images "
        f"at 5 noise levels) {training['final_validation_loss']}.",
        "",
        "| step | training loss |",
        "|---:|---:|",
        *[f"| {p['step']} | {p['loss']:.4f} |" for p in shown],
        "",
        "## Evaluation",
        "",
        f"With the shipped sampler defaults, on {samples['samples']} samples ({EVAL_PER_CLASS} seeds per prompt), "
        "scored by the shipped Fashion-MNIST classifier (models/assets/fmnist_classifier):",
        "",
        f"- The classifier's class agrees with the prompt for **{samples['accuracy']:.1%}** of the samples.",
        f"- Fréchet distance on the classifier's features to the 10,000 real test images: "
        f"**{samples['frechet_distance']:.2f}**; {len(PROMPTS) * EVAL_PER_CLASS} real training images score "
        f"{evaluation['real_train_frechet_distance']:.2f} (the floor at this sample size).",
        "",
        "| class | " + " | ".join(CLASS_NAMES) + " |",
        "|---|" + "---:|" * len(CLASS_NAMES),
        "| accuracy | " + " | ".join(f"{samples['per_class_accuracy'][c]:.2f}" for c in CLASS_NAMES) + " |",
        "",
    ]
    if evaluation.get("sampler_tuning"):
        lines += [f"Sampler defaults were chosen on separate seeds ({TUNE_PER_CLASS} per prompt) by the lowest "
                  f"Fréchet distance among the settings within {ACCURACY_SLACK:.0%} of the best accuracy:", "",
                  "| guidance | shift | accuracy | FD |", "|---:|---:|---:|---:|",
                  *[f"| {t['guidance_scale']} | {t['shift']} | {t['accuracy']:.3f} | {t['frechet_distance']:.2f} |"
                    for t in evaluation["sampler_tuning"]], ""]
    lines += [
        "## Activation outliers",
        "",
        "SVDQuant exists because of activation outliers. Per-channel absmax of every linear's input over real "
        "sampler trajectories (10 prompts × 4 steps, conditional and unconditional rows), as max / median over "
        f"channels: median over the {outliers['linears']} linears **{outliers['median_max_over_median']}×**, "
        f"largest **{outliers['largest_max_over_median']}×**, {outliers['linears_over_10x']} linears above 10×. "
        "The largest:",
        "",
        "| linear | channels | max | median | max/median | p99/median |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {name} | {v['channels']} | {v['max']} | {v['median']} | {v['max_over_median']} | "
          f"{v['p99_over_median']} |" for name, v in top],
        "",
        "## Use",
        "",
        "```python",
        "from svdq_compiler.models import tiny_flux",
        "pipe = tiny_flux.load_pipeline()                     # the shipped weights",
        "images = pipe([\"a sneaker\", \"an ankle boot\"], seeds=[0, 1])  # [2, 1, 28, 28] in [0, 1]",
        "```",
        "",
        "Retrain with `python tools/train_tiny_flux.py`; redo this card with `python tools/tiny_flux_card.py`. "
        "Fashion-MNIST is © Zalando SE, MIT license.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=tiny_flux.TINY_FLUX_DIR)
    parser.add_argument("--tune", action="store_true", help="pick the sampler defaults first (writes sampler.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    write_model_card(args.folder, tune=args.tune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
