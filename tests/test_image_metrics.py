"""PSNR and SSIM against closed forms, a direct per-window computation, and scikit-image's value."""

import math

import pytest
import torch

from svdq_compiler.errors import InputError
from svdq_compiler.image_metrics import gaussian_window, psnr, ssim


def pattern_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth, different 16×20 images built from arithmetic alone (no random generator)."""
    yy, xx = torch.meshgrid(torch.arange(16, dtype=torch.float64), torch.arange(20, dtype=torch.float64),
                            indexing="ij")
    a = 0.5 + 0.4 * torch.sin(xx / 3.0) * torch.cos(yy / 4.0)
    b = (a + 0.15 * torch.cos(xx * yy / 7.0)).clamp(0, 1)
    return b.view(1, 1, 16, 20), a.view(1, 1, 16, 20)


def test_psnr_closed_form():
    reference = torch.zeros(2, 1, 4, 4)
    images = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.5)])
    # MSE 0.01 → 20 dB, MSE 0.25 → 6.02 dB at data range 1; data range 2 adds 20·log10(2).
    torch.testing.assert_close(psnr(images, reference), torch.tensor([20.0, -10 * math.log10(0.25)],
                                                                     dtype=torch.float64))
    torch.testing.assert_close(psnr(images, reference, data_range=2.0) - psnr(images, reference),
                               torch.full((2,), 20 * math.log10(2), dtype=torch.float64))
    assert psnr(reference, reference).isinf().all()


def test_ssim_of_identical_images_is_one_and_it_is_symmetric():
    images, reference = pattern_pair()
    torch.testing.assert_close(ssim(reference, reference), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(ssim(images, reference), ssim(reference, images))
    assert ssim(images, reference).item() < 0.9


def test_ssim_of_constant_images_is_the_luminance_term():
    # No variance anywhere: contrast-structure is (0 + C2)/(0 + C2) = 1, leaving (2ab + C1)/(a² + b² + C1).
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    constant = lambda value: torch.full((1, 1, 12, 12), value, dtype=torch.float64)  # noqa: E731
    got = ssim(constant(a), constant(b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_ssim_equals_a_direct_per_window_computation():
    images, reference = pattern_pair()
    x, y = images[0, 0], reference[0, 0]
    window = torch.outer(gaussian_window(), gaussian_window())
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for top in range(x.shape[0] - 10):
        for left in range(x.shape[1] - 10):
            px, py = x[top:top + 11, left:left + 11], y[top:top + 11, left:left + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * (px - mx) ** 2).sum(), (window * (py - my) ** 2).sum()
            cov = (window * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(images, reference).item() == pytest.approx(torch.stack(values).mean().item(), rel=1e-9)


def test_ssim_matches_scikit_image():
    # skimage.metrics.structural_similarity(b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=1.0) on these two arrays, scikit-image 0.26.0.
    images, reference = pattern_pair()
    assert ssim(images, reference).item() == pytest.approx(0.650503995562062, abs=1e-12)
    assert ssim(255 * images, 255 * reference, data_range=255.0).item() == pytest.approx(0.650503995562062,
                                                                                          abs=1e-12)


def test_metrics_are_per_image_and_average_channels():
    images, reference = pattern_pair()
    batch = torch.cat([images, reference])
    both = ssim(batch, torch.cat([reference, reference]))
    assert both[1].item() == pytest.approx(1.0) and both[0].item() == pytest.approx(ssim(images, reference).item())
    two_channels = ssim(torch.cat([images, reference], dim=1), torch.cat([reference, reference], dim=1))
    assert two_channels.item() == pytest.approx((both[0].item() + 1.0) / 2)


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match="same shape|one shape"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        ssim(torch.zeros(12, 12), torch.zeros(12, 12))
    with pytest.raises(InputError, match="at least 11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
