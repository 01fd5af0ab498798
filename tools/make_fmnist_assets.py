"""Regenerate the Fashion-MNIST files shipped in svdq_compiler/models/assets/fmnist_data/ from the full data.

    python tools/make_fmnist_assets.py [--data /usr/share/datasets/fashion-mnist] [--out DIR] [--count 1000]

Writes the first COUNT test images and labels (gzip idx files, as in the dataset) and the shipped classifier's
feature statistics (mean, covariance) of all 10,000 test images, tagged with the classifier's weight digest. Rerun
after retraining the classifier. The data: Debian's dataset-fashion-mnist; without installing it,
`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fm` and pass
--data /tmp/fm/usr/share/datasets/fashion-mnist. The output is byte-for-byte reproducible at a fixed torch build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from svdq_compiler.files import atomic_path, ensure_dir
from svdq_compiler.models.fmnist import (SHIPPED_DATA_DIR, SHIPPED_STATISTICS, SHIPPED_TEST_FILES, classifier_digest,
                                         classify, data_dir, feature_statistics, load_classifier, load_split,
                                         write_idx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_dir(), help="folder of the four idx files")
    parser.add_argument("--out", type=Path, default=SHIPPED_DATA_DIR)
    parser.add_argument("--count", type=int, default=1000, help="test images to ship (the first COUNT)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the statistics are summed in a fixed order
    images, labels = load_split("test", args.data)
    ensure_dir(args.out, "--out")
    for name, tensor in zip(SHIPPED_TEST_FILES, (images[:args.count], labels[:args.count])):
        with atomic_path(args.out / name, "shipped Fashion-MNIST subset") as tmp:
            write_idx(tmp, tensor)
    classifier = load_classifier()
    _, features = classify(classifier, images.float().div(255.0).unsqueeze(1))
    mean, covariance = feature_statistics(features)
    from safetensors.torch import save_file

    with atomic_path(args.out / SHIPPED_STATISTICS, "feature statistics") as tmp:
        save_file({"mean": mean.contiguous(), "covariance": covariance.contiguous()}, str(tmp),
                  # one key: safetensors writes several in no fixed order, and the file should be reproducible
                  metadata={"classifier_sha256": classifier_digest(classifier)})
    print(f"wrote {args.count} test images and the feature statistics of {len(images)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
