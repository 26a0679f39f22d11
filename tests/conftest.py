"""Shared fixtures: tiny synthetic MNIST files, so fast tests never touch the real data set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline import data

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_mnist(folder: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict:
    """Write four small IDX files named like MNIST's; return digests in mnist.json's form."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    reference = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        # Blobby digits: a bright square whose position depends on the label, plus noise.
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = 2 + 2 * (label // 5) * 5, 2 + 4 * (label % 5)
            images[i, row : row + 8, col : col + 6] = 230
        for name, array in (
            (f"{split}-images-idx3-ubyte", images),
            (f"{split}-labels-idx1-ubyte", labels),
        ):
            data.write_idx(folder / name, array)
            blob = (folder / name).read_bytes()
            reference[name] = {
                "md5": hashlib.md5(blob).hexdigest(),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
                "count": n,
            }
    return reference


@pytest.fixture
def tiny_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of tiny IDX files, with pipeline.data's reference digests swapped for theirs."""
    folder = tmp_path / "tiny"
    monkeypatch.setattr(data, "FILES", tiny_mnist(folder))
    return folder
