"""The shifts the drift monitor's figures and tests are made of (tools/drift_power.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.tools.drift_power import SHIFTS, thicker


def digits() -> np.ndarray:
    images = np.zeros((6, 28, 28), dtype=np.float32)
    images[:, 6:22, 12:16] = 1.0  # a "1"
    return images.reshape(6, 784)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_a_shift_changes_the_digits_into_new_images_in_range(name: str) -> None:
    clean = digits()
    shifted = SHIFTS[name](clean, np.random.default_rng(0))
    assert np.array_equal(clean, digits())  # the clean digits are untouched
    assert shifted.shape == clean.shape and shifted.dtype == np.float32
    assert shifted.min() >= 0 and shifted.max() <= 1
    assert not np.allclose(shifted, clean)


def test_thicker_strokes_only_add_ink() -> None:
    clean = digits()
    wider = thicker(clean, np.random.default_rng(0))
    assert (wider >= clean).all()
    assert wider.sum() == pytest.approx(clean.sum() * 18 * 6 / (16 * 4))  # a pixel each side
