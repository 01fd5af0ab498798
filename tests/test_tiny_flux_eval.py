"""The tiny FLUX quality measurement: fixed pairs, batch-independent sampling, and the scores."""

import math

import pytest
import torch

from svdq_compiler.errors import InputError
from svdq_compiler.models.fmnist import PROMPTS, FashionClassifier, classify, feature_statistics
from svdq_compiler.models.tiny_flux_eval import (EVAL_FIRST_SEED, MAX_EVAL_BATCH, eval_pairs, sample_pairs,
                                                score_images)


def test_eval_pairs_cycle_the_class_prompts_with_their_own_seeds():
    pairs = eval_pairs(23)
    assert [p.label for p in pairs[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert all(PROMPTS[p.label] == p.prompt for p in pairs)
    assert [p.seed for p in pairs] == list(range(EVAL_FIRST_SEED, EVAL_FIRST_SEED + 23))
    with pytest.raises(InputError, match="at least one"):
        eval_pairs(0)


class SeededPipeline:
    """Stands in for the sampler: an image that depends only on its own prompt and seed; records batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, prompts, seeds):
        self.batches.append(len(prompts))
        return torch.stack([torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(seed * 31 + len(prompt)))
                            for prompt, seed in zip(prompts, seeds)])


def test_sampling_follows_the_pairs_whatever_the_batch():
    pairs = eval_pairs(7)
    pipeline = SeededPipeline()
    in_threes = sample_pairs(pipeline, pairs, batch=3)
    assert pipeline.batches == [3, 3, 1]
    assert torch.equal(in_threes, sample_pairs(SeededPipeline(), pairs, batch=10))
    assert torch.equal(in_threes[4], sample_pairs(SeededPipeline(), pairs[4:5])[0])
    for batch in (0, MAX_EVAL_BATCH + 1):
        with pytest.raises(InputError, match="pairs per sampler call"):
            sample_pairs(SeededPipeline(), pairs, batch=batch)


def test_a_pair_gives_the_same_bits_whatever_shares_its_batch():
    """Through the real sampler (a random tiny FLUX): at one batch size, a pair's image does not depend on the
    other pairs in its sampler call or on its place there (each pair draws its noise from its own seed, and no op
    mixes rows), so batching the evaluation changes nothing."""
    from svdq_compiler.models.tiny_flux import (SamplerConfig, TextEncoderConfig, TinyFluxPipeline, TinyTextEncoder,
                                                build_transformer)

    torch.manual_seed(0)
    transformer = build_transformer({"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                                     "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                                     "axes_dims_rope": (4, 6, 6), "in_channels": 16}).eval()
    encoder = TinyTextEncoder(TextEncoderConfig.for_prompts(PROMPTS, width=32, layers=1, heads=2,
                                                            joint_attention_dim=32, pooled_projection_dim=32))
    pipeline = TinyFluxPipeline(transformer, encoder, SamplerConfig(num_steps=2, guidance_scale=3.0))
    pairs = eval_pairs(12)
    first = sample_pairs(pipeline, pairs[:6], batch=6)
    shifted = sample_pairs(pipeline, pairs[3:9], batch=6)
    assert torch.equal(first[3:], shifted[:3])
    reordered = sample_pairs(pipeline, pairs[:6][::-1], batch=6)
    assert torch.equal(first, reordered.flip(0))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return FashionClassifier(widths=(4, 8), feature_dim=8).eval()


def test_scores_of_a_perturbed_copy(classifier):
    reference = SeededPipeline()(["a bag"] * 6, list(range(6)))
    offsets = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.0, 0.03]).view(-1, 1, 1, 1)
    images = (reference + offsets).clamp(0, 1)
    predictions, features = classify(classifier, images)
    real = feature_statistics(features)  # real images with exactly these features: a Fréchet distance of 0
    scores = score_images(images, reference, predictions, classifier, real)
    assert scores["samples"] == 6 and scores["accuracy"] == 1.0
    assert scores["frechet_distance"] == pytest.approx(0.0, abs=1e-3)
    # The fifth image equals its reference (infinite PSNR): counted apart, the mean is over the other five.
    assert scores["identical_images"] == 1
    mse = (images - reference).square().flatten(1).mean(1).double()
    expected = [10 * math.log10(1 / float(m)) for m in mse if m > 0]
    assert scores["psnr"] == pytest.approx(sum(expected) / 5, abs=1e-3)
    assert scores["psnr_min"] == pytest.approx(min(expected), abs=1e-3)
    assert 0 < scores["ssim"] < 1


def test_reference_scores_have_no_similarity_columns(classifier):
    images = SeededPipeline()(["a coat"] * 4, [0, 1, 2, 3])
    wrong = (classify(classifier, images)[0] + 1) % len(PROMPTS)
    _, features = classify(classifier, images)
    # Real features shifted by 1 in each of the D dimensions: the means alone are D apart.
    scores = score_images(images, None, wrong, classifier, feature_statistics(features + 1))
    assert set(scores) == {"samples", "frechet_distance", "accuracy"}
    assert scores["accuracy"] == 0.0 and scores["frechet_distance"] == pytest.approx(features.shape[1], abs=1e-3)


def test_identical_images_have_no_psnr(classifier):
    images = SeededPipeline()(["a shirt"] * 3, [0, 1, 2])
    _, features = classify(classifier, images)
    scores = score_images(images, images.clone(), torch.zeros(3, dtype=torch.long), classifier,
                          feature_statistics(features))
    assert scores["psnr"] is None and scores["identical_images"] == 3 and scores["ssim"] == pytest.approx(1.0)
