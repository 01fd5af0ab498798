"""Image quality of a (quantized) tiny FLUX against the 32-bit model, as the SVDQuant paper measures it.

The same fixed (prompt, seed) pairs are sampled through the reference transformer and through each candidate
(a compiled graph, run by the same sampler with the same text encoder and starting noise), then:
- PSNR and SSIM of every candidate image against the reference image of its pair (per image, then the mean);
- the Fréchet distance of the candidate's images to the 10,000 real Fashion-MNIST test images, on the shipped
  classifier's features (the offline stand-in for FID; it is measured against real images, not the reference);
- the classifier's accuracy against the prompted class.

`tools/demo.py` scores its grid with this, `tools/eval_quality.py tiny-flux` the quality table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from svdq_compiler.errors import InputError
from svdq_compiler.image_metrics import psnr, ssim
from svdq_compiler.models.base import MAX_BATCH
from svdq_compiler.models.fmnist import PROMPTS, classify, feature_statistics, frechet_distance

# Pairs per sampler call. Larger batches do not sample faster on CPU (bench/results/sampling-tiny-flux.json, 1
# thread): fp32 and int4 cost about the same per pair from 5 to 10 pairs and more at 20, because the compiled
# graphs' reference GEMM materializes [groups, rows, N] products that outgrow the caches; nvfp4 (16-wide groups)
# is fastest at 2.
EVAL_BATCH = 5
MAX_EVAL_BATCH = MAX_BATCH // 2
# Far from the seeds the adapter calibrates on (0, 1, …) and the model card's tuning and evaluation seeds.
EVAL_FIRST_SEED = 50_000


@dataclass(frozen=True)
class SamplePair:
    prompt: str
    seed: int
    label: int  # the prompted class


def eval_pairs(count: int, first_seed: int = EVAL_FIRST_SEED) -> list[SamplePair]:
    """`count` fixed pairs: the class prompts in turn, each pair with its own seed."""
    if count < 1:
        raise InputError(f"an evaluation needs at least one (prompt, seed) pair, got {count}")
    return [SamplePair(PROMPTS[i % len(PROMPTS)], first_seed + i, i % len(PROMPTS)) for i in range(count)]


def sample_pairs(pipeline: Callable, pairs: Sequence[SamplePair], batch: int = EVAL_BATCH) -> torch.Tensor:
    """Images [N, 1, 28, 28] in [0, 1] of `pairs`, `batch` pairs per sampler call.

    Each pair draws its starting noise from its own seed and no op mixes rows, so at one batch size a pair's image
    is the same bits whatever else shares its call; another batch size can change it by float rounding (BLAS
    picks its kernels by the row count)."""
    if not 1 <= batch <= MAX_EVAL_BATCH:
        raise InputError(f"{batch} pairs per sampler call is outside [1, {MAX_EVAL_BATCH}]",
                         fix=f"a compiled graph takes at most {MAX_BATCH} rows, two per pair with guidance")
    images = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images.append(pipeline([p.prompt for p in chunk], [p.seed for p in chunk]))
    return torch.cat(images)


def score_images(images: torch.Tensor, reference: torch.Tensor | None, labels: torch.Tensor, classifier,
                 real_statistics: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """PSNR and SSIM against `reference` (skipped when None: the reference scoring itself), Fréchet distance to
    real images, and the classifier's accuracy against `labels`."""
    predictions, features = classify(classifier, images)
    scores = {"samples": len(images),
              "frechet_distance": round(frechet_distance(feature_statistics(features), real_statistics), 3),
              "accuracy": round(float((predictions == labels).float().mean()), 4)}
    if reference is not None:
        # An image equal to its reference has an infinite PSNR: it is counted apart, the mean is over the rest.
        per_image_psnr = psnr(images, reference)
        finite = per_image_psnr[torch.isfinite(per_image_psnr)]
        scores.update(psnr=round(float(finite.mean()), 3) if len(finite) else None,
                      psnr_min=round(float(finite.min()), 3) if len(finite) else None,
                      identical_images=len(images) - len(finite),
                      ssim=round(float(ssim(images, reference).mean()), 4))
    return scores
