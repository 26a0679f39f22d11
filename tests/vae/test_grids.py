"""Digit grids: torchvision's make_grid layout without torchvision."""

import pytest
import torch
from torchvision.utils import make_grid

from pipeline.vae.grids import digit_grid


@pytest.mark.parametrize(
    ("count", "nrow", "scale"), [(64, 8, 1), (16, 8, 3), (10, 4, 2), (3, 8, 1)]
)
def test_digit_grids_match_torchvisions_make_grid(count: int, nrow: int, scale: int) -> None:
    images = torch.rand(count, 784, generator=torch.Generator().manual_seed(count))
    expected = make_grid(images.view(-1, 1, 28, 28), nrow=nrow, padding=2, pad_value=1.0)
    expected = expected.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    expected = (expected.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    grid = digit_grid(images, nrow, scale)
    assert grid.shape == expected.shape and (grid == expected).all()
    assert (digit_grid(images, nrow, scale, grey=True) == expected[..., 0]).all()
