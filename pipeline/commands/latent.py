"""What the explorer page asks of a logged VAE, through its pyfunc methods only: digits drawn by
hand made to look like MNIST's, their score in plain words, the latent units ranked by use, a 2-D
view of the test digits, walks, interpolations and samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError

DIGIT_BOX = 20  # MNIST's digits fill a 20x20 box centred by mass in the 28x28 image
TYPICAL_SCORE = 200.0  # nats: test digits score about 105, noise and scribbles in the thousands


class InputError(PipelineError):
    """An image the page cannot use; its message is shown on the page."""


def mnist_like(image: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Any image (a drawing on a transparent or white canvas, an upload of any size or colour
    mode) as MNIST pixels: (784,) float32 in [0, 1], a bright digit on black, the digit scaled to
    a 20x20 box and centred by its mass. Returns the pixels and what was done to them."""
    if image is None:
        raise InputError("Draw a digit (or upload a PNG) first.")
    picture = Image.fromarray(np.asarray(image))
    notes = []
    if picture.mode in ("RGBA", "LA"):  # strokes on a transparent canvas: ink is opacity
        alpha = np.asarray(picture.getchannel("A"), dtype=np.float32) / 255
        grey = np.asarray(picture.convert("L"), dtype=np.float32) / 255
        ink = alpha * (1 - grey)
    else:
        grey = np.asarray(picture.convert("L"), dtype=np.float32) / 255
        ink = 1 - grey if grey.mean() > 0.5 else grey  # dark on light: inverted, as MNIST is
        if grey.mean() > 0.5:
            notes.append("inverted (MNIST digits are light on dark)")
    if picture.size != (28, 28) or picture.mode != "L":
        notes.insert(0, f"{picture.size[0]}x{picture.size[1]} {picture.mode} made 28x28 grey")
    rows, cols = np.nonzero(ink > 0.1)
    if len(rows) == 0:
        raise InputError("The canvas is empty: draw a digit (or upload a PNG) first.")
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = DIGIT_BOX / max(ink.shape)
    size = (max(1, round(ink.shape[1] * scale)), max(1, round(ink.shape[0] * scale)))
    small = np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS))
    digit = np.zeros((28, 28), dtype=np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    digit[top : top + size[1], left : left + size[0]] = small
    mass = digit.clip(0).sum()
    centre = (
        np.array(
            [(digit.sum(axis=1) * np.arange(28)).sum(), (digit.sum(axis=0) * np.arange(28)).sum()]
        )
        / mass
    )
    shift = np.round(13.5 - centre).astype(int)
    digit = np.roll(digit, tuple(shift), axis=(0, 1))
    return digit.clip(0, 1).reshape(784), "; ".join(notes)


def reading(score: float) -> str:
    """A score in plain words, against what MNIST's test digits score."""
    verdict = "looks like a digit" if score < TYPICAL_SCORE else "does not look like a digit"
    return f"{score:.0f} nats: {verdict} to this model (test digits score about 105)"


@dataclass
class Explorer:
    """A logged VAE (an MLflow pyfunc model) and the test digits it is explored against."""

    model: object  # mlflow.pyfunc.PyFuncModel
    test_images: np.ndarray  # (n, 784) float32 in [0, 1]
    test_labels: np.ndarray  # (n,)

    def __post_init__(self) -> None:
        encoded = self.predict(self.test_images, method="encode", logvar=True)
        self.latent_dim = encoded.shape[1] // 2
        mu, logvar = encoded[:, : self.latent_dim], encoded[:, self.latent_dim :]
        kl = 0.5 * (mu**2 + np.exp(logvar) - 1 - logvar).mean(axis=0)
        self.ranked = [int(d) for d in np.argsort(-kl)]  # units by their KL, most used first
        self.kl, self.mu = kl, mu
        centred = mu - mu.mean(axis=0)
        if self.latent_dim <= 2:
            self.directions = np.eye(self.latent_dim, 2, dtype=np.float32).T
        else:
            self.directions = np.linalg.svd(centred, full_matrices=False)[2][:2]
        self.plane = centred @ self.directions.T  # the test digits in 2-D

    def predict(self, data: np.ndarray, **params) -> np.ndarray:
        return np.asarray(self.model.predict(np.asarray(data, np.float32), params=params))

    def look(self, pixels: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """A digit's reconstruction, its score (16 seeded draws) and its place in the 2-D view."""
        batch = pixels.reshape(1, 784)
        recon = self.predict(batch, method="reconstruct")[0]
        score = float(self.predict(batch, method="score", samples=16, seed=0)[0])
        mu = self.predict(batch, method="encode")[0]
        return recon, score, (mu - self.mu.mean(axis=0)) @ self.directions.T

    def walk(self, values: dict[int, float]) -> np.ndarray:
        """Decode the mean test latent with the given units set to the given values."""
        z = self.mu.mean(axis=0).copy()
        for unit, value in values.items():
            z[unit] = value
        return self.predict(z.reshape(1, -1), method="decode")[0]

    def interpolate(self, first: int, last: int, steps: int) -> np.ndarray:
        """Decoded points on the straight line between two test digits' latent means."""
        for index in (first, last):
            if not 0 <= index < len(self.mu):
                raise InputError(f"Test digit {index} does not exist: use 0 to {len(self.mu) - 1}.")
        t = np.linspace(0, 1, steps, dtype=np.float32)[:, None]
        return self.predict((1 - t) * self.mu[first] + t * self.mu[last], method="decode")

    def first_of(self, label: int) -> int:
        return int(np.flatnonzero(self.test_labels == label)[0])

    def sample(self, n: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, self.latent_dim), dtype=np.float32)
        return self.predict(z, method="decode")


def strip(images: np.ndarray, scale: int = 4, columns: int | None = None) -> np.ndarray:
    """Digits (n, 784) side by side (or `columns` a row), as a uint8 picture `scale` times their
    size, for the page."""
    tiles = np.asarray(images, np.float32).reshape(-1, 28, 28)
    columns = columns or len(tiles)
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * 30, columns * 30), np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = tile
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return (grid.clip(0, 1) * 255).round().astype(np.uint8)
