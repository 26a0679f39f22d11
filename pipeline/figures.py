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
