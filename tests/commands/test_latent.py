"""What the explorer page computes: drawings made MNIST-like, scores in words, the latent space
ranked, viewed in 2-D, walked, interpolated and sampled, through the pyfunc model's methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.commands.latent import Explorer, InputError, mnist_like, reading, strip
from pipeline.tracking.pyfunc import run_method
from pipeline.vae.model import VAE


class Direct:
    """The logged model's `predict`, on a VAE in memory: what MLflow calls after loading it."""

    def __init__(self, vae: VAE) -> None:
        self.vae = vae

    def predict(self, data: np.ndarray, params: dict) -> np.ndarray:
        return run_method(self.vae, data, params)


def explorer(latent_dim: int) -> Explorer:
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((50, 784), dtype=np.float32)
    return Explorer(Direct(VAE(32, latent_dim).eval()), images, np.arange(50) % 10)


def test_nothing_drawn_is_a_message_not_a_traceback() -> None:
    for empty in (None, np.zeros((280, 280, 4), np.uint8)):
        with pytest.raises(InputError, match="first"):
            mnist_like(empty)


def test_a_stroke_on_a_transparent_canvas_becomes_a_centred_bright_digit() -> None:
    canvas = np.zeros((280, 280, 4), np.uint8)
    canvas[20:200, 30:60, 3] = 255  # a black bar, high and to the left
    pixels, notes = mnist_like(canvas)
    digit = pixels.reshape(28, 28)
    assert pixels.shape == (784,) and pixels.dtype == np.float32 and digit.max() > 0.9
    rows, cols = np.nonzero(digit > 0.1)
    assert rows.max() - rows.min() + 1 in (20, 21)  # scaled into MNIST's 20-pixel box
    centre = [(digit.sum(axis=1) * np.arange(28)).sum(), (digit.sum(axis=0) * np.arange(28)).sum()]
    assert np.allclose(np.array(centre) / digit.sum(), 13.5, atol=1.0)  # centred by its mass
    assert notes == "280x280 RGBA made 28x28 grey"


def test_a_dark_digit_on_white_of_another_size_is_inverted_and_says_so() -> None:
    photo = np.full((60, 100, 3), 250, np.uint8)
    photo[10:50, 45:55] = 10
    pixels, notes = mnist_like(photo)
    assert pixels.reshape(28, 28)[0, 0] == 0 and pixels.max() > 0.9
    assert notes == "100x60 RGB made 28x28 grey; inverted (MNIST digits are light on dark)"


def test_scores_read_in_plain_words() -> None:
    assert reading(104.6).startswith("105 nats: looks like a digit")
    assert "does not look like a digit" in reading(2500)


@pytest.mark.parametrize("latent_dim", [2, 5])
def test_the_latent_space_ranked_viewed_walked_interpolated_and_sampled(latent_dim: int) -> None:
    seen = explorer(latent_dim)
    assert seen.latent_dim == latent_dim and sorted(seen.ranked) == list(range(latent_dim))
    assert list(seen.kl[seen.ranked]) == sorted(seen.kl, reverse=True)
    assert seen.plane.shape == (50, 2)
    if latent_dim == 2:  # a 2-D model is shown as it is, not through PCA
        assert np.allclose(seen.plane, seen.mu - seen.mu.mean(axis=0))
    recon, score, point = seen.look(seen.test_images[0])
    assert recon.shape == (784,) and score > 0 and point.shape == (2,)
    moved = seen.walk({seen.ranked[0]: 3.0})
    assert moved.shape == (784,) and not np.allclose(moved, seen.walk({seen.ranked[0]: -3.0}))
    frames = seen.interpolate(seen.first_of(3), seen.first_of(8), 7)
    assert frames.shape == (7, 784)
    assert np.allclose(frames[0], seen.predict(seen.mu[3:4], method="decode")[0], atol=1e-6)
    with pytest.raises(InputError, match="Test digit 50 does not exist: use 0 to 49"):
        seen.interpolate(0, 50, 3)
    assert seen.sample(16, seed=1).shape == (16, 784)
    assert np.array_equal(seen.sample(16, seed=1), seen.sample(16, seed=1))


def test_strips_lay_digits_out_scaled() -> None:
    picture = strip(np.ones((10, 784)), scale=2, columns=4)
    assert picture.shape == (3 * 30 * 2, 4 * 30 * 2) and picture.dtype == np.uint8
