"""Fashion-MNIST for the shipped tiny FLUX: the data, its prompts, a small classifier, and the Fréchet distance.

The data is Debian's `dataset-fashion-mnist` (idx files under /usr/share/datasets/fashion-mnist/). The classifier
is trained by tools/train_fmnist_classifier.py and shipped in models/assets/fmnist_classifier/; it serves two
measurements of generated images: whether they are of the prompted class (accuracy), and how far their feature
distribution is from real test images (a Fréchet distance on its penultimate features, the offline stand-in for
FID).

Without the Debian package, what the demo and the tests need comes from models/assets/fmnist_data/ (written by
tools/make_fmnist_assets.py): the first 1,000 test images with their labels, and the classifier's feature
statistics of all 10,000 test images. Training needs the full data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from svdq_compiler.errors import CheckpointError, InputError

DATA_DIR_ENV = "SVDQ_FMNIST_DIR"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
PROMPTS = tuple(("an " if name[0] in "aeiou" else "a ") + name for name in CLASS_NAMES)
IMAGE_SIZE = 28
PADDED_SIZE = 32  # 28 + 2 on each side: divisible by the 2×2 pixel-unshuffle and FLUX's 2×2 packing
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_DIR = ASSETS_DIR / "fmnist_classifier"
SHIPPED_DATA_DIR = ASSETS_DIR / "fmnist_data"
SHIPPED_TEST_FILES = ("t10k-first1000-images-idx3-ubyte.gz", "t10k-first1000-labels-idx1-ubyte.gz")
SHIPPED_STATISTICS = "test-feature-statistics.safetensors"
_said_fallback: set[str] = set()  # what the one-line fallback notice was printed for, once per process


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzip-compressed or not) as a uint8 tensor of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read the Fashion-MNIST file {path.name}: {exc}", where=str(path),
                         fix="reinstall it with `apt-get install --reinstall dataset-fashion-mnist`") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path.name} is not an idx file of unsigned bytes", where=str(path),
                         fix="reinstall it with `apt-get install --reinstall dataset-fashion-mnist`")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        raise InputError(f"{path.name} holds {len(raw)} bytes where its header promises {expected}",
                         where=str(path), fix="reinstall it with `apt-get install --reinstall dataset-fashion-mnist`")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: Path, tensor: torch.Tensor, compress: bool = True) -> None:
    """A uint8 tensor as an idx file, gzip-compressed by default (reproducible: no timestamp in the header)."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
    payload = header + tensor.to(torch.uint8).contiguous().numpy().tobytes()
    if compress:
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    path.write_bytes(payload)


def has_split(split: str, directory: str | Path | None = None) -> bool:
    """Whether the full split's idx files are in `directory` (default: data_dir())."""
    folder = Path(directory) if directory is not None else data_dir()
    return all((folder / name).is_file() for name in SPLIT_FILES[split])


def say_fallback(what: str, line: str) -> None:
    """Print `line` on stderr, once per process for `what`."""
    if what not in _said_fallback:
        _said_fallback.add(what)
        print(line, file=sys.stderr)


def load_split(split: str, directory: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the "train" or "test" split.

    Without `directory` and without the full data in data_dir(), the test split is the shipped subset (its first
    1,000 images), said in one line on stderr; the train split has no such fallback.
    """
    if split not in SPLIT_FILES:
        raise InputError(f"unknown Fashion-MNIST split {split!r}", fix=f"use one of {sorted(SPLIT_FILES)}")
    folder = Path(directory) if directory is not None else data_dir()
    if directory is None and split == "test" and not has_split(split, folder):
        say_fallback("test", f"Fashion-MNIST not found in {folder}: using the shipped first 1,000 test images "
                             f"(models/assets/fmnist_data)")
        return read_images_and_labels([SHIPPED_DATA_DIR / name for name in SHIPPED_TEST_FILES], SHIPPED_DATA_DIR)
    paths = [folder / name for name in SPLIT_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"Fashion-MNIST {split} data not found ({', '.join(missing)} missing)", where=str(folder),
                         fix=f"install it with `apt-get install dataset-fashion-mnist`, or point {DATA_DIR_ENV} "
                             f"at a folder holding the four idx files")
    return read_images_and_labels(paths, folder)


def read_images_and_labels(paths: Sequence[Path], folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = (_read_idx(p) for p in paths)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or labels.shape != images.shape[:1]:
        raise InputError(f"Fashion-MNIST files have shapes {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}, expected [N, 28, 28] and [N]", where=str(folder),
                         fix="reinstall it with `apt-get install --reinstall dataset-fashion-mnist`")
    return images, labels.long()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] → float [N, 1, 32, 32] in [−1, 1], padded with the background value −1."""
    pixels = images.float().div(127.5).sub(1.0).unsqueeze(1)
    pad = (PADDED_SIZE - IMAGE_SIZE) // 2
    return F.pad(pixels, (pad, pad, pad, pad), value=-1.0)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """float [N, 1, 32, 32] in [−1, 1] (model range) → [N, 1, 28, 28] in [0, 1], the padding cropped away."""
    pad = (PADDED_SIZE - IMAGE_SIZE) // 2
    return images[..., pad:pad + IMAGE_SIZE, pad:pad + IMAGE_SIZE].add(1.0).div(2.0).clamp(0.0, 1.0)


class FashionClassifier(nn.Module):
    """A small CNN on [N, 1, 28, 28] images in [0, 1]; `features` gives the penultimate layer for the FD."""

    def __init__(self, widths: tuple[int, int] = (16, 32), feature_dim: int = 64):
        super().__init__()
        first, second = widths
        self.conv = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1), nn.BatchNorm2d(first), nn.ReLU(),
            nn.Conv2d(first, first, 3, padding=1), nn.BatchNorm2d(first), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1), nn.BatchNorm2d(second), nn.ReLU(),
            nn.Conv2d(second, second, 3, padding=1), nn.BatchNorm2d(second), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(second * 7 * 7, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, len(CLASS_NAMES)))
        self.config = {"widths": list(widths), "feature_dim": feature_dim}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv((images - 0.5) / 0.5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def save_classifier(model: FashionClassifier, directory: Path, metadata: dict) -> None:
    """Weights (safetensors) and config (with `metadata`: accuracy, seed, …), each written then renamed."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp = directory / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights_tmp))
    config_tmp = directory / "config.json.tmp"
    config_tmp.write_text(json.dumps({**model.config, **metadata}, indent=2) + "\n")
    weights_tmp.replace(directory / "model.safetensors")
    config_tmp.replace(directory / "config.json")


def load_classifier(directory: str | Path | None = None) -> FashionClassifier:
    """The shipped classifier (or the one in `directory`), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(directory) if directory is not None else CLASSIFIER_DIR
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError("Fashion-MNIST classifier not found", where=str(folder),
                              fix="train it with `python tools/train_fmnist_classifier.py`")
    config = json.loads(config_path.read_text())
    model = FashionClassifier(tuple(config["widths"]), config["feature_dim"])
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval()


@torch.no_grad()
def classify(classifier: FashionClassifier, images: torch.Tensor, batch_size: int = 500
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted class ids [N] and features [N, D] of images [N, 1, 28, 28] in [0, 1]."""
    predictions, features = [], []
    for chunk in images.split(batch_size):
        chunk_features = classifier.features(chunk.float())
        features.append(chunk_features)
        predictions.append(classifier.head(chunk_features).argmax(dim=1))
    return torch.cat(predictions), torch.cat(features)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (unbiased), in float64."""
    features = features.double()
    if features.shape[0] < 2:
        raise InputError(f"a Fréchet distance needs at least 2 samples per set, got {features.shape[0]}",
                         fix="generate more images")
    return features.mean(dim=0), torch.cov(features.T)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(stats_a: tuple[torch.Tensor, torch.Tensor], stats_b: tuple[torch.Tensor, torch.Tensor]
                     ) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa Σb)^½) between two Gaussians given as (mean, covariance).

    tr((Σa Σb)^½) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    Σa^½ Σb Σa^½, which has the same spectrum as Σa Σb and needs no general matrix square root.
    """
    mean_a, cov_a = stats_a
    mean_b, cov_b = stats_b
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(distance.clamp(min=0))


def classifier_digest(classifier: FashionClassifier) -> str:
    """SHA-256 of the classifier's weights, to tell whose features a set of statistics describes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(classifier.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_statistics(classifier: FashionClassifier, directory: str | Path | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature statistics of the 10,000 real Fashion-MNIST test images.

    Computed from the data when it is there (or `directory` is given); otherwise the shipped statistics, which
    tools/make_fmnist_assets.py computed the same way from all 10,000 images, for the shipped classifier only.
    """
    if directory is not None or has_split("test"):
        images, _ = load_split("test", directory)
        _, features = classify(classifier, images.float().div(255.0).unsqueeze(1))
        return feature_statistics(features)
    from safetensors import safe_open

    path = SHIPPED_DATA_DIR / SHIPPED_STATISTICS
    with safe_open(str(path), framework="pt") as handle:
        made_for = handle.metadata().get("classifier_sha256")
        mean, covariance = handle.get_tensor("mean"), handle.get_tensor("covariance")
    if made_for != classifier_digest(classifier):
        raise InputError("the shipped Fashion-MNIST feature statistics belong to another classifier", where=str(path),
                         fix=f"install the data (`apt-get install dataset-fashion-mnist`, or point {DATA_DIR_ENV} at "
                             f"the idx files), or rerun `python tools/make_fmnist_assets.py`")
    say_fallback("statistics", f"Fashion-MNIST not found in {data_dir()}: using the shipped feature statistics of "
                               f"the 10,000 test images (models/assets/fmnist_data)")
    return mean, covariance


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int, *, row_labels: Sequence[str] = (),
                    column_labels: Sequence[str] = (), scale: int = 2) -> None:
    """Images [N, 1, H, W] in [0, 1], row-major, as one PNG with optional labels left of rows and above columns.

    Written to a temporary name and renamed.
    """
    from PIL import Image, ImageDraw, ImageFont

    count, _, height, width = images.shape
    rows = -(-count // columns)
    font = ImageFont.load_default()
    left = 6 + max((int(font.getlength(label)) for label in row_labels), default=-6)
    top = 14 if column_labels else 0
    cell_h, cell_w = height * scale + 2, width * scale + 2
    canvas = Image.new("L", (left + columns * cell_w, top + rows * cell_h), color=255)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    for index in range(count):
        row, column = divmod(index, columns)
        tile = Image.fromarray(pixels[index, 0].numpy(), mode="L").resize((width * scale, height * scale),
                                                                          Image.NEAREST)
        canvas.paste(tile, (left + column * cell_w + 1, top + row * cell_h + 1))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(row_labels):
        draw.text((2, top + row * cell_h + cell_h // 2 - 5), label, fill=0, font=font)
    for column, label in enumerate(column_labels):
        draw.text((left + column * cell_w + 2, 1), label, fill=0, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
