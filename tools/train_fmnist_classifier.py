"""Train the small Fashion-MNIST classifier shipped for measuring generated images, and write its assets.

    python tools/train_fmnist_classifier.py [--epochs 3] [--seed 0] [--out DIR]

Its test accuracy and the training record go into the config beside the weights. It is used for the class accuracy
of generated samples and for the Fréchet distance on its penultimate features (svdq_compiler.models.fmnist).
Deterministic for a seed at a fixed thread count.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from svdq_compiler.models.fmnist import CLASSIFIER_DIR, FashionClassifier, classify, load_split, save_classifier


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest on a shared machine)")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    return parser.parse_args(argv)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips: garments are roughly mirror-symmetric."""
    padded = F.pad(images, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    shifted = padded[..., dy:dy + 28, dx:dx + 28]
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), shifted.flip(-1), shifted)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    train_x = train_images.float().div(255.0).unsqueeze(1)
    test_x = test_images.float().div(255.0).unsqueeze(1)
    model = FashionClassifier()
    steps_per_epoch = len(train_x) // args.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(train_x[index], generator)), train_labels[index],
                                   label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        model.eval()
        predictions, _ = classify(model, test_x)
        accuracy = (predictions == test_labels).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}  train loss {total / steps_per_epoch:.4f}  "
              f"test accuracy {accuracy:.4f}  {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    save_classifier(model, args.out, {
        "test_accuracy": round(accuracy, 4), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "training_minutes": round((time.perf_counter() - started) / 60, 1),
        "data": "Fashion-MNIST (Debian package dataset-fashion-mnist); train split for training, test for accuracy",
        "torch": torch.__version__})
    print(f"wrote {args.out} (test accuracy {accuracy:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
