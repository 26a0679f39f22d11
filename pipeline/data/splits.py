"""The processed splits: uint8 pixels on disk, float32 in [0, 1] when loaded (x / 255)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from pipeline.data.files import read_tensors, write_tensors
from pipeline.data.mnist import raw_dir
from pipeline.errors import ConfigError, DataError


def preprocess(raw_root: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Write train.safetensors and test.safetensors under `out_dir` from the IDX files under
    `raw_root`; return the number of images per class of each split."""
    # Imported here: train and evaluate import this module and need not load torchvision.
    from torchvision.datasets import MNIST

    counts = {}
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = MNIST(root=raw_root, train=train, download=False)
        except RuntimeError:
            missing = f"{raw_dir(raw_root)}: MNIST files not found; run `dvc repro download`"
            raise DataError(missing) from None
        save_split(out_dir / f"{split}.safetensors", dataset.data, dataset.targets)
        per_class = Counter(dataset.targets.tolist())
        counts[split] = {str(digit): per_class[digit] for digit in range(10)}
    return counts


def save_split(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    tensors = {"images": images.to(torch.uint8), "labels": labels.to(torch.int64)}
    write_tensors(path, tensors, {"images": "uint8 pixels 0-255", "labels": "digit 0-9"})


def load_split(path: Path, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (n, 784) in [0, 1] (the handout's x / 255) and int64 labels."""
    tensors, _ = read_tensors(path, "dvc repro preprocess")
    images = tensors["images"].to(device)
    return images.reshape(len(images), -1).float() / 255.0, tensors["labels"].to(device)


def binarize_once(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed Bernoulli(pixel) sample: the binarised test set of dynamic binarisation."""
    generator = torch.Generator(images.device).manual_seed(seed)
    return torch.bernoulli(images, generator=generator)


def training_images(path: Path, holdout: int, device: torch.device) -> torch.Tensor:
    """The training split without its last `holdout` images (`data.holdout`)."""
    images, _ = load_split(path, device)
    if holdout >= len(images):
        raise ConfigError(
            f"data.holdout = {holdout} leaves no image to train on: {path} has "
            f"{len(images)}; hold out fewer"
        )
    return images[: len(images) - holdout]


def load_test_set(
    path: Path, binarize: bool, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels that training reports on and evaluate scores. Binarised (when
    `binarize`) on the CPU, so that they are the same whatever the device."""
    images, labels = load_split(path)
    if binarize:
        images = binarize_once(images, seed)
    return images.to(device), labels.to(device)
