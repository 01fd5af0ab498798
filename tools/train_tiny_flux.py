"""Train the shipped tiny FLUX on Fashion-MNIST with rectified flow, and write its assets.

    python tools/train_tiny_flux.py [--steps 2200] [--seed 0] [--fresh]
    python tools/train_tiny_flux.py --repack FOLDER [--out FOLDER]

It resumes from the checkpoint in --work if one is there. When training ends it writes the EMA weights, configs
and training record to --out, then (if the Fashion-MNIST classifier is trained) tunes the sampler defaults and
writes the sample grid, evaluation and model card with tools/tiny_flux_card.py. The transformer is stored in
float16 (models.tiny_flux.STORAGE_DTYPE; loaded as float32), and training.json records what that does to the
samples; `--repack` rewrites an earlier float32 export that way.

A diffusers FluxTransformer2DModel and the tiny text encoder are trained together, as FLUX is trained: t from a
logit-normal distribution, x_t = (1 − t)·x0 + t·ε, velocity target ε − x0, mean squared error. Prompts are the
class names ("a sneaker"); 10% are replaced by the empty prompt so that the sampler can use classifier-free
guidance. The weights shipped are an exponential moving average of the trained ones.

Deterministic for a seed: every step draws its batch, t, noise and prompt drops from a generator seeded by
(seed, step), so a run resumed from a checkpoint continues exactly as an uninterrupted one (at a fixed thread
count). Progress (a loss curve) is printed every --log-every steps; a checkpoint is written every
--checkpoint-every steps, to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from svdq_compiler.errors import CheckpointError
from svdq_compiler.image_metrics import psnr
from svdq_compiler.models import tiny_flux
from svdq_compiler.models.fmnist import CLASSIFIER_DIR, CLASS_NAMES, PROMPTS, load_split, to_model_range
from svdq_compiler.models.tiny_flux import (TOKEN_GRID, TRANSFORMER_CONFIG, SamplerConfig, TextEncoderConfig,
                                            TinyFluxPipeline, TinyTextEncoder, build_transformer, image_ids,
                                            images_to_tokens, rope_axes, text_ids)
from svdq_compiler.models.tiny_flux_eval import eval_pairs, sample_pairs

PROMPT_DROP = 0.1
VALIDATION_IMAGES = 256
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
STORAGE_CHECK_PAIRS = 40


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2200, help="optimizer steps (default 2200, the shipped run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=8e-4, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=150, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--decay", choices=("matrices", "all"), default="matrices",
                        help="which parameters weight decay applies to: weight matrices and embeddings only (as "
                             "GPT-style and DiT-style training does: biases and norm scales are free to grow), or all")
    parser.add_argument("--heads", type=int, default=TRANSFORMER_CONFIG["num_attention_heads"])
    parser.add_argument("--head-dim", type=int, default=TRANSFORMER_CONFIG["attention_head_dim"],
                        help="attention head width (a multiple of 8; models.tiny_flux.rope_axes splits it)")
    parser.add_argument("--double-blocks", type=int, default=TRANSFORMER_CONFIG["num_layers"])
    parser.add_argument("--single-blocks", type=int, default=TRANSFORMER_CONFIG["num_single_layers"])
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weight average that is shipped")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other whenever one is descheduled,
    # measured at 5–20× slower per step than a single thread under load.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    parser.add_argument("--work", type=Path, default=Path("build/tiny_flux_train"),
                        help="checkpoints and the training log (default build/tiny_flux_train)")
    parser.add_argument("--out", type=Path, default=tiny_flux.TINY_FLUX_DIR, help="where the assets are written")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --work")
    parser.add_argument("--repack", type=Path, metavar="FOLDER",
                        help="train nothing: rewrite the assets an earlier run exported to FOLDER (float32 weights) "
                             "in the shipped storage into --out, then redo the model card with its sampler defaults")
    return parser.parse_args(argv)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def transformer_config(args) -> dict:
    return {**TRANSFORMER_CONFIG, "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
            "num_layers": args.double_blocks, "num_single_layers": args.single_blocks,
            "axes_dims_rope": rope_axes(args.head_dim)}


def parameter_groups(parameters: list, args) -> list[dict]:
    """AdamW groups: with --decay matrices, weight decay only on tensors of two or more dimensions."""
    if args.decay == "all":
        return [{"params": parameters, "weight_decay": args.weight_decay}]
    return [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}]


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then constant: the weights at a step do not depend on --steps, so a run can be extended
    (resumed with a larger --steps) and still equal an uninterrupted one; the EMA does the averaging."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


def flow_loss(transformer, encoder, images, token_ids, t, noise):
    """Rectified-flow loss: predict the velocity ε − x0 at x_t = (1 − t)·x0 + t·ε."""
    x0 = images_to_tokens(images)
    t_ = t.view(-1, 1, 1)
    noisy = (1 - t_) * x0 + t_ * noise
    hidden, pooled = encoder.encode_ids(token_ids)
    velocity = transformer(hidden_states=noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                           timestep=t, img_ids=image_ids(*TOKEN_GRID), txt_ids=text_ids(hidden.shape[1])).sample
    return (velocity - (noise - x0)).square().mean()


class Trainer:
    def __init__(self, args):
        self.args = args
        torch.manual_seed(args.seed)
        self.transformer = build_transformer(transformer_config(args))
        self.encoder = TinyTextEncoder(TextEncoderConfig.for_prompts(PROMPTS))
        self.ema_transformer = copy.deepcopy(self.transformer).requires_grad_(False)
        self.ema_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.parameters = list(self.transformer.parameters()) + list(self.encoder.parameters())
        self.ema_parameters = list(self.ema_transformer.parameters()) + list(self.ema_encoder.parameters())
        self.optimizer = torch.optim.AdamW(parameter_groups(self.parameters, args), lr=args.lr, foreach=True)
        images, labels = load_split("train")
        self.images, self.labels = images, labels
        self.prompt_ids = self.encoder.tokenize(list(PROMPTS))
        self.empty_ids = self.encoder.tokenize([""])[0]
        val_images, val_labels = load_split("test")
        generator = torch.Generator().manual_seed(args.seed + 1)
        pick = torch.randperm(len(val_images), generator=generator)[:VALIDATION_IMAGES]
        self.val_images, self.val_ids = to_model_range(val_images[pick]), self.prompt_ids[val_labels[pick]]
        self.val_noise = torch.randn(len(VALIDATION_TIMES), VALIDATION_IMAGES, 64, 16, generator=generator)
        self.step, self.elapsed, self.curve, self.validation = 0, 0.0, [], []

    def batch(self, step: int):
        generator = step_generator(self.args.seed, step)
        index = torch.randint(len(self.images), (self.args.batch_size,), generator=generator)
        ids = self.prompt_ids[self.labels[index]].clone()
        dropped = torch.rand(self.args.batch_size, generator=generator) < PROMPT_DROP
        ids[dropped] = self.empty_ids
        t = torch.sigmoid(torch.randn(self.args.batch_size, generator=generator))  # logit-normal(0, 1)
        noise = torch.randn(self.args.batch_size, 64, 16, generator=generator)
        return to_model_range(self.images[index]), ids, t, noise

    @torch.no_grad()
    def validation_loss(self) -> float:
        losses = []
        for t_value, noise in zip(VALIDATION_TIMES, self.val_noise):
            for start in range(0, VALIDATION_IMAGES, 128):
                rows = slice(start, start + 128)
                t = torch.full((noise[rows].shape[0],), t_value)
                losses.append(flow_loss(self.ema_transformer, self.ema_encoder, self.val_images[rows],
                                        self.val_ids[rows], t, noise[rows]).item())
        return sum(losses) / len(losses)

    def ema_decay(self) -> float:
        return min(self.args.ema, (1 + self.step) / (10 + self.step))

    def checkpoint_path(self) -> Path:
        return self.args.work / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.args.work.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "elapsed": self.elapsed, "curve": self.curve, "validation": self.validation,
                 "transformer": self.transformer.state_dict(), "encoder": self.encoder.state_dict(),
                 "ema_transformer": self.ema_transformer.state_dict(), "ema_encoder": self.ema_encoder.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "args": {k: str(v) for k, v in vars(self.args).items()}}
        tmp = self.checkpoint_path().with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path())

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path()
        if self.args.fresh or not path.is_file():
            return False
        state = torch.load(path, weights_only=True)
        for name in ("transformer", "encoder", "ema_transformer", "ema_encoder", "optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.curve, self.validation = state["curve"], state["validation"]
        print(f"resumed from {path} at step {self.step} ({self.elapsed / 60:.1f} min trained)", flush=True)
        return True

    def train(self) -> None:
        args = self.args
        window, window_start = [], time.perf_counter()
        while self.step < args.steps:
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.step, args)
            images, ids, t, noise = self.batch(self.step)
            loss = flow_loss(self.transformer, self.encoder, images, ids, t, noise)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_parameters, self.parameters, 1 - self.ema_decay())
            self.step += 1
            self.elapsed += time.perf_counter() - started
            window.append(loss.item())
            if self.step % args.log_every == 0 or self.step == args.steps:
                mean = sum(window) / len(window)
                seconds = (time.perf_counter() - window_start) / len(window)
                self.curve.append({"step": self.step, "loss": round(mean, 5)})
                print(f"step {self.step:6d}  loss {mean:.4f}  lr {learning_rate(self.step - 1, args):.2e}  "
                      f"{seconds:.2f} s/step  {self.elapsed / 60:.1f} min", flush=True)
                window, window_start = [], time.perf_counter()
            if self.step % args.checkpoint_every == 0 or self.step == args.steps:
                validation = self.validation_loss()
                self.validation.append({"step": self.step, "loss": round(validation, 5)})
                print(f"step {self.step:6d}  validation loss (EMA weights) {validation:.4f}", flush=True)
                self.save_checkpoint()

    def export(self) -> None:
        """Write the EMA weights, configs and training record into --out."""
        parameters = sum(p.numel() for p in self.ema_transformer.parameters())
        record = {
            "data": "Fashion-MNIST train split (60,000 images), Debian package dataset-fashion-mnist",
            "classes": list(CLASS_NAMES), "prompts": list(PROMPTS), "prompt_drop": PROMPT_DROP,
            "steps": self.step, "batch_size": self.args.batch_size, "lr": self.args.lr, "warmup": self.args.warmup,
            "weight_decay": self.args.weight_decay, "decay": self.args.decay, "ema": self.args.ema, "seed": self.args.seed,
            "threads": self.args.threads, "timestep_sampling": "logit-normal(0, 1)",
            "final_train_loss": self.curve[-1]["loss"] if self.curve else None,
            "final_validation_loss": self.validation[-1]["loss"] if self.validation else None,
            "training_minutes": round(self.elapsed / 60, 1),
            "transformer_parameters": parameters,
            "text_encoder_parameters": sum(p.numel() for p in self.ema_encoder.parameters()),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch": torch.__version__, "loss_curve": self.curve, "validation_curve": self.validation,
        }
        write_assets(self.ema_transformer, self.ema_encoder, self.args.out, record)
        print(f"wrote the EMA weights ({parameters / 1e6:.2f}M transformer parameters) to {self.args.out}", flush=True)


@torch.no_grad()
def storage_check(transformer, encoder, sampler: SamplerConfig) -> dict:
    """What storing the transformer in tiny_flux.STORAGE_DTYPE does: the weights' relative L2 error, and the PSNR
    of the stored weights' samples against the float32 weights' samples on the quality table's first pairs."""
    stored = copy.deepcopy(transformer)
    stored.load_state_dict({name: tensor.to(tiny_flux.STORAGE_DTYPE).float()
                            for name, tensor in transformer.state_dict().items()})
    weights = torch.cat([p.flatten() for p in transformer.parameters()])
    rounded = torch.cat([p.flatten() for p in stored.parameters()])
    pairs = eval_pairs(STORAGE_CHECK_PAIRS)
    pipeline = TinyFluxPipeline(transformer, encoder, sampler)
    reference = sample_pairs(pipeline, pairs)
    images = sample_pairs(pipeline.with_transformer(stored), pairs)
    per_image = psnr(images, reference)
    finite = per_image[torch.isfinite(per_image)]
    return {"dtype": str(tiny_flux.STORAGE_DTYPE).removeprefix("torch."), "loaded_as": "float32",
            "weights_rel_l2_error": float((rounded - weights).norm() / weights.norm()),
            "sample_pairs": len(pairs), "first_seed": pairs[0].seed, "sampler": asdict(sampler),
            "psnr_mean": round(float(finite.mean()), 2) if len(finite) else None,
            "psnr_min": round(float(finite.min()), 2) if len(finite) else None,
            "identical_images": len(pairs) - len(finite),
            "max_pixel_difference": round(float((images - reference).abs().max()), 5)}


def write_assets(transformer, encoder, out: Path, record: dict) -> dict:
    """The transformer (in tiny_flux.STORAGE_DTYPE), text encoder and training record into `out`, each part
    replaced whole, with sampler defaults if `out` has none; the record gains the storage check, returned."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "sampler.json").is_file():
        tiny_flux.save_sampler_config(SamplerConfig(), out)
    storage = storage_check(transformer, encoder, tiny_flux.load_sampler_config(out))
    record = {**record, "storage": storage}
    tiny_flux.save_transformer(transformer, out)
    tiny_flux.save_text_encoder(encoder, out)
    tmp = out / "training.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / "training.json")
    print(f"stored the transformer in {storage['dtype']}: samples at {storage['psnr_mean']} dB PSNR (min "
          f"{storage['psnr_min']}) against the float32 weights' on {storage['sample_pairs']} pairs", flush=True)
    return storage


def repack(source: Path, out: Path) -> None:
    """Rewrite the assets of an earlier export (float32 weights) in the shipped storage into `out`, keeping its
    training record, sampler defaults and evaluation (the model card keeps the sampler tuning from it)."""
    missing = [name for name in ("training.json", "sampler.json") if not (source / name).is_file()]
    if missing:
        raise CheckpointError(f"{source} is not an export of tools/train_tiny_flux.py: it lacks {', '.join(missing)}",
                              where=str(source), fix="give the --out folder of a finished training run")
    transformer, encoder = tiny_flux.load_transformer(source), tiny_flux.load_text_encoder(source)
    record = json.loads((source / "training.json").read_text())
    record.pop("storage", None)
    out.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out.resolve():
        for name in ("sampler.json", "evaluation.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    write_assets(transformer, encoder, out, record)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.repack is not None:
        repack(args.repack, args.out)
    else:
        trainer = Trainer(args)
        trainer.load_checkpoint()
        print(f"training tiny FLUX: {sum(p.numel() for p in trainer.transformer.parameters()) / 1e6:.2f}M "
              f"parameters, {args.steps} steps of batch {args.batch_size}, seed {args.seed}", flush=True)
        trainer.train()
        trainer.export()
    if not (CLASSIFIER_DIR / "config.json").is_file():
        print("no Fashion-MNIST classifier yet: run tools/train_fmnist_classifier.py, then "
              f"tools/tiny_flux_card.py {args.out} --tune for the sample grid and model card", flush=True)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_flux_card import write_model_card

    write_model_card(args.out, tune=args.repack is None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
