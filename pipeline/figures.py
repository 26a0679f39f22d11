"""Pictures of digits and curves, shared by the train and sample stages."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def digit_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """(n, 784) images in [0, 1] -> one uint8 RGB picture (H, W, 3), `nrow` digits a row."""
    grid = make_grid(
        images.detach().cpu().reshape(-1, 1, 28, 28), nrow=nrow, padding=2, pad_value=1.0
    )
    return (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def loss_curves(history: list[dict]) -> Figure:
    """Train and test loss, reconstruction and KL per epoch, one panel each."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, term, title in zip(
        axes,
        ("loss", "recon", "kl"),
        ("Loss (recon + KL)", "Reconstruction (BCE)", "KL divergence"),
        strict=True,
    ):
        ax.plot(epochs, [row[f"train_{term}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"test_{term}"] for row in history], "s--", label="test")
        ax.set(title=title, xlabel="epoch", ylabel="nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("VAE training curves (per-image means)")
    fig.tight_layout()
    return fig


def titled_grid(
    images: torch.Tensor, nrow: int, title: str, row_labels: list[str] | None = None
) -> Figure:
    """A digit grid (torchvision's make_grid) in a figure with a title and optional row labels."""
    picture = digit_grid(images, nrow)
    rows = -(-len(images) // nrow)
    fig, ax = plt.subplots(figsize=(max(4.0, nrow * 0.45 + 1.5), rows * 0.45 + 0.9))
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([2 + 30 * i + 14 for i in range(rows)], row_labels)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def latent_scatter(
    points: torch.Tensor, labels: torch.Tensor, axis_names: tuple[str, str], title: str
) -> Figure:
    """Latent means in 2D, one colour per digit, with a legend."""
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10")
    for digit in range(10):
        chosen = labels == digit
        ax.scatter(*points[chosen].T.cpu(), s=3, alpha=0.6, color=colours(digit), label=str(digit))
    ax.set(title=title, xlabel=axis_names[0], ylabel=axis_names[1])
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def manifold(
    images: torch.Tensor, quantiles: torch.Tensor, axis_names: tuple[str, str], title: str
) -> Figure:
    """Digits decoded on a grid across a latent plane; the axes show each position's quantile."""
    size = len(quantiles)
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(digit_grid(images, nrow=size), interpolation="nearest")
    ticks = [2 + 30 * i + 14 for i in range(size)]
    step = max(1, size // 5)
    labels = [f"{q:.2f}" for q in quantiles.tolist()]
    ax.set_xticks(ticks[::step], labels[::step])
    ax.set_yticks(ticks[::step], labels[::-1][::step])  # the top row holds the high quantiles
    ax.set(title=title, xlabel=f"{axis_names[0]} (quantile)", ylabel=f"{axis_names[1]} (quantile)")
    fig.tight_layout()
    return fig
