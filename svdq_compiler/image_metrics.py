"""Full-reference image similarity: PSNR and SSIM of generated images against the 16-bit model's images.

Both take batches [N, C, H, W] of the same shape with values in [0, data_range] and return one value per image, so
that a table can average them the way the SVDQuant paper does (per image, then the mean).

SSIM is Wang et al. (2004): local means, variances and covariance under an 11×11 Gaussian window (σ = 1.5),
C1 = (0.01·L)², C2 = (0.03·L)², population (not sample) moments, averaged over the window positions that lie
inside the image (no padding) and over channels. This equals scikit-image's `structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svdq_compiler.errors import InputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what} needs two image batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}",
                         fix="compare images of the same prompts, seeds and size")
    if a.dim() != 4:
        raise InputError(f"{what} takes image batches [N, C, H, W], got a {a.dim()}-d tensor")


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, 10·log10(L² / MSE); identical images give +inf."""
    _check_pair(images, reference, "PSNR")
    mse = (images.double() - reference.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalized separable Gaussian [size], float64."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-offsets.square() / (2 * sigma ** 2))
    return weights / weights.sum()


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image (1 for identical images), Gaussian window, no padding."""
    _check_pair(images, reference, "SSIM")
    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise InputError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got "
                         f"{tuple(images.shape[-2:])}")
    n, c, h, w = images.shape
    x = images.double().reshape(n * c, 1, h, w)
    y = reference.double().reshape(n * c, 1, h, w)
    window = gaussian_window()

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, window.view(1, 1, -1, 1))
        return F.conv2d(t, window.view(1, 1, 1, -1))

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x.square()
    var_y = local_mean(y * y) - mean_y.square()
    cov = local_mean(x * y) - mean_x * mean_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x.square() + mean_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, -1).mean(dim=1)
