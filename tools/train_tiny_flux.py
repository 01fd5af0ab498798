"""Train the shipped tiny FLUX on Fashion-MNIST with rectified flow, and write its assets.

    python tools/train_tiny_flux.py [--steps 3000] [--seed 0] [--fresh]

It resumes from the checkpoint in --work if one is there. When training ends it writes the EMA weights, configs
and training record to --out, then (if the Fashion-MNIST classifier is trained) tunes the sampler defaults and
writes the sample grid, evaluation and model card with tools/tiny_flux_card.py.

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
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from svdq_compiler.models import tiny_flux
from svdq_compiler.models.fmnist import CLASSIFIER_DIR, CLASS_NAMES, PROMPTS, load_split, to_model_range
from svdq_compiler.models.tiny_flux import (TOKEN_GRID, TRANSFORMER_CONFIG, SamplerConfig, TextEncoderConfig,
                                            TinyTextEncoder, build_transformer, image_ids, images_to_tokens,
                                            rope_axes, text_ids)

PROMPT_DROP = 0.1
VALIDATION_IMAGES = 256
VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
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
        """Write the EMA weights, configs and training record into --out; each part replaced whole."""
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        staging = out / "transformer.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.ema_transformer.save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(out / "transformer", ignore_errors=True)
        staging.rename(out / "transformer")
        tiny_flux.save_text_encoder(self.ema_encoder, out)
        if not (out / "sampler.json").is_file():
            tiny_flux.save_sampler_config(SamplerConfig(), out)
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
        tmp = out / "training.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(out / "training.json")
        print(f"wrote the EMA weights ({parameters / 1e6:.2f}M transformer parameters) to {out}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
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

    write_model_card(args.out, tune=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
