"""Digit grids as plain pictures: what the MLflow run shows at every step of training.

Made with torch alone, without matplotlib or torchvision, because the train stage draws them every
epoch and importing either would cost it more time than all its logging.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.vae.model import VAE

GRID_SIZE, SHOWN_DIGITS = 64, 8  # generated and reconstructed digits in the run, each step
PAD = 2  # white pixels around every digit, as torchvision's make_grid(padding=2, pad_value=1)


def digit_grid(images: torch.Tensor, nrow: int, scale: int = 1, grey: bool = False) -> np.ndarray:
    """(n, 784) images in [0, 1] -> one uint8 RGB picture (H, W, 3), `nrow` digits a row, each
    pixel drawn as a `scale` x `scale` block (the MLflow UI shows images at their own size);
    `grey`: the one channel (H, W), a third of the PNG to encode.

    The layout is torchvision's make_grid, pixel for pixel (tested).
    """
    tiles = images.detach().cpu().reshape(-1, 28, 28)
    nrow = min(nrow, len(tiles))
    rows = -(-len(tiles) // nrow)
    blanks = tiles.new_ones(rows * nrow - len(tiles), 28, 28)  # fill the last row, as make_grid
    tiles = F.pad(torch.cat([tiles, blanks]), (PAD, 0, PAD, 0), value=1.0)
    side = 28 + PAD
    grid = tiles.view(rows, nrow, side, side).transpose(1, 2).reshape(rows * side, nrow * side)
    grid = F.pad(grid, (0, PAD, 0, PAD), value=1.0)
    grid = grid.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    levels = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    return levels.numpy() if grey else levels.unsqueeze(-1).repeat(1, 1, 3).numpy()


def fixed_latents(latent_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The latent vectors the run decodes at every step, from a generator of their own (training's
    random numbers are untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(GRID_SIZE, latent_dim, generator=generator).to(device)


@torch.no_grad()
def training_pictures(model: VAE, fixed_z: torch.Tensor, fixed_x: torch.Tensor) -> dict:
    """What the MLflow run shows at each step: digits decoded from the same latent vectors, and
    the same test digits (top row) over their reconstructions, three times their size, in grey
    (MLflow encodes a PNG and a WebP thumbnail of each picture at every step: grey takes about
    two thirds of RGB's time)."""
    model.eval()
    mu, _ = model.encode(fixed_x)
    pairs = torch.cat([fixed_x, model.decode(mu)])
    return {
        "generated": digit_grid(model.decode(fixed_z), nrow=8, scale=3, grey=True),
        "reconstructions": digit_grid(pairs, nrow=len(fixed_x), scale=3, grey=True),
    }
