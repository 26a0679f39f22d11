"""Batch scoring with a logged VAE: images from a folder of PNGs or a .npy file, rows for a CSV."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.errors import PipelineError


def read_images(source: Path) -> tuple[list[str], np.ndarray]:
    """Names and float32 images (n, 784) in [0, 1] from a folder of 28x28 PNGs or a .npy file."""
    if source.is_dir():
        files = sorted(source.glob("*.png"))
        if not files:
            raise PipelineError(f"{source}: no .png files; give a folder of 28x28 PNG digits")
        return [f.name for f in files], np.stack([read_png(f) for f in files])
    if source.suffix == ".npy" and source.is_file():
        array = np.load(source, allow_pickle=False)  # plain arrays only: no code runs
        if array.ndim not in (2, 3) or array.reshape(len(array), -1).shape[1] != 784:
            raise PipelineError(f"{source}: shape {array.shape}; expected (n, 784) or (n, 28, 28)")
        pixels = array.reshape(len(array), 784).astype(np.float32)
        if array.dtype == np.uint8:
            pixels /= 255.0
        if not np.isfinite(pixels).all():
            raise PipelineError(f"{source}: NaN or infinite values; give uint8 or [0, 1] floats")
        if pixels.min() < 0 or pixels.max() > 1:
            raise PipelineError(f"{source}: values outside [0, 1]; give uint8 or [0, 1] floats")
        return [f"{source.name}[{i}]" for i in range(len(pixels))], pixels
    raise PipelineError(f"{source}: not a folder of PNGs nor a .npy file")


def read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (OSError, UnidentifiedImageError):
        raise PipelineError(f"{path}: not a readable image") from None
    if grey.size != (28, 28):
        raise PipelineError(f"{path}: {grey.size[0]}x{grey.size[1]} pixels; expected 28x28")
    return np.asarray(grey, dtype=np.float32).reshape(784) / 255.0


def score_images(
    model, names: list[str], images: np.ndarray, batch_size: int, samples: int, seed: int
) -> list[dict]:
    """One row per image: its name, negative ELBO (nats) and posterior means."""
    rows = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not sys.stderr.isatty()):
        batch = images[start : start + batch_size]
        scores = model.predict(batch, params={"method": "score", "samples": samples, "seed": seed})
        means = model.predict(batch, params={"method": "encode"})
        for i, (nll, mu) in enumerate(zip(scores, means, strict=True)):
            row = {"file": names[start + i], "score": float(nll)}
            rows.append(row | {f"z{d}": float(v) for d, v in enumerate(mu)})
    return rows
