"""Fashion-MNIST data reading, the shipped classifier, the Fréchet distance and the image grid."""

import gzip

import pytest
import torch

from svdq_compiler.errors import InputError
from svdq_compiler.models import fmnist


write_idx = fmnist.write_idx


@pytest.fixture
def fake_split(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 3, 9, 1, 2], dtype=torch.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_reads_idx_files(fake_split):
    folder, images, labels = fake_split
    read_images, read_labels = fmnist.load_split("test", folder)
    assert torch.equal(read_images, images) and torch.equal(read_labels, labels.long())


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_split("train", tmp_path)


def test_truncated_idx_file_is_rejected(fake_split):
    folder, images, _ = fake_split
    path = folder / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(data[:-10])
    with pytest.raises(InputError, match="header promises"):
        fmnist.load_split("test", folder)


def test_unknown_split():
    with pytest.raises(InputError, match="split"):
        fmnist.load_split("validation")


def test_model_range_round_trip():
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    padded = fmnist.to_model_range(images)
    assert padded.shape == (2, 1, 32, 32)
    assert padded[..., :2, :].eq(-1).all() and padded[..., :, 30:].eq(-1).all()
    torch.testing.assert_close(fmnist.to_unit_range(padded), images.float().div(255).unsqueeze(1))


def test_prompts_use_the_right_article():
    assert fmnist.PROMPTS[0] == "a t-shirt" and fmnist.PROMPTS[9] == "an ankle boot"


def test_frechet_distance_of_equal_sets_is_zero():
    features = torch.randn(200, 6, dtype=torch.float64)
    stats = fmnist.feature_statistics(features)
    assert fmnist.frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_for_commuting_covariances():
    """Diagonal covariances: FD = ‖Δμ‖² + Σ (σa − σb)²."""
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    stats_a = (mean_a.double(), torch.diag(var_a).double())
    stats_b = (mean_b.double(), torch.diag(var_b).double())
    expected = (mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    assert fmnist.frechet_distance(stats_a, stats_b) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_general_covariances():
    """tr((ΣaΣb)^½) against the eigenvalues of ΣaΣb computed directly (they are real and non-negative)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    cov_a, cov_b = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    mean = torch.zeros(5, dtype=torch.float64)
    cross = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = cov_a.trace() + cov_b.trace() - 2 * cross
    assert fmnist.frechet_distance((mean, cov_a), (mean, cov_b)) == pytest.approx(float(expected), rel=1e-8)


def test_feature_statistics_need_two_samples():
    with pytest.raises(InputError, match="at least 2"):
        fmnist.feature_statistics(torch.randn(1, 4))


def test_shipped_classifier_is_accurate():
    classifier = fmnist.load_classifier()
    images, labels = fmnist.load_split("test")
    predictions, features = fmnist.classify(classifier, images[:300].float().div(255).unsqueeze(1))
    assert features.shape == (300, classifier.config["feature_dim"])
    assert (predictions == labels[:300]).float().mean() > 0.88


@pytest.fixture
def no_dataset(tmp_path, monkeypatch):
    """A machine without the Debian package: the data folder is empty, and the fallback notice not yet said."""
    monkeypatch.setenv(fmnist.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(fmnist, "_said_fallback", set())
    return tmp_path


def test_without_the_dataset_the_test_split_is_the_shipped_subset_said_once(no_dataset, capsys):
    images, labels = fmnist.load_split("test")
    assert images.shape == (1000, 28, 28) and labels.shape == (1000,)
    assert torch.bincount(labels, minlength=10).min() > 70  # every class is there
    fmnist.load_split("test")
    notice = capsys.readouterr().err.splitlines()
    assert len(notice) == 1 and "shipped first 1,000 test images" in notice[0] and str(no_dataset) in notice[0]
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_split("train")  # training has no fallback


def test_shipped_subset_files_are_what_the_tool_writes(no_dataset, tmp_path):
    """tools/make_fmnist_assets.py writes the subset with write_idx: rewriting it gives the same bytes."""
    for name, tensor in zip(fmnist.SHIPPED_TEST_FILES, fmnist.load_split("test")):
        write_idx(tmp_path / name, tensor)
        assert (tmp_path / name).read_bytes() == (fmnist.SHIPPED_DATA_DIR / name).read_bytes()


def test_shipped_statistics_are_the_shipped_classifiers_test_features(no_dataset, capsys):
    """The shipped statistics describe all 10,000 test images; the 1,000 shipped ones come close (FD 1.2)."""
    classifier = fmnist.load_classifier()
    shipped = fmnist.reference_statistics(classifier)
    assert "shipped feature statistics of the 10,000 test images" in capsys.readouterr().err
    images, _ = fmnist.load_split("test")
    _, features = fmnist.classify(classifier, images.float().div(255).unsqueeze(1))
    subset = fmnist.feature_statistics(features)
    assert 0.1 < fmnist.frechet_distance(subset, shipped) < 3.0
    other = fmnist.FashionClassifier()
    with pytest.raises(InputError, match="belong to another classifier"):
        fmnist.reference_statistics(other)


def test_installed_dataset_is_preferred_to_the_shipped_files(fake_split, monkeypatch, capsys):
    folder, images, labels = fake_split
    monkeypatch.setenv(fmnist.DATA_DIR_ENV, str(folder))
    read_images, read_labels = fmnist.load_split("test")
    assert torch.equal(read_images, images) and torch.equal(read_labels, labels.long())
    classifier = fmnist.load_classifier()
    _, features = fmnist.classify(classifier, images.float().div(255).unsqueeze(1))
    computed = fmnist.reference_statistics(classifier)
    torch.testing.assert_close(computed[0], fmnist.feature_statistics(features)[0])
    assert "shipped" not in capsys.readouterr().err


def test_image_grid_png(tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    fmnist.save_image_grid(torch.rand(5, 1, 28, 28), path, columns=3, row_labels=["a bag", "a coat"],
                           column_labels=["fp32", "int4", "nvfp4"])
    with Image.open(path) as image:
        width, height = image.size
    assert height == 14 + 2 * (2 * 28 + 2) and width > 3 * (2 * 28 + 2)
    assert not (tmp_path / "grid.png.tmp").exists()
