"""The drift monitor's operating figures (docs/monitoring.md): its false-alarm rate on clean MNIST
batches it never saw, and its power on shifts made from real test digits, by batch size.

`mnist-vae drift-power [--model URI]` (`make drift-power`) prints the tables.
Every test digit is profiled once, as it is and under every shift; each batch is then drawn from
those profiles (distinct digits) and compared with a random half of the test set it does not
overlap, so a thousand batches cost a thousand sets of tests, not a thousand passes of the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import rotate

from pipeline.tracking.reference import Profile
from pipeline.vae.drift import compare

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def as_grid(images: np.ndarray) -> torch.Tensor:
    """A copy as (n, 1, 28, 28): the shifts must not touch the clean images."""
    return torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28)


def rotated(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turned by 30 degrees, half of them each way."""
    grid = as_grid(images)
    left = rng.random(len(images)) < 0.5
    grid[left] = rotate(grid[left], 30.0, interpolation=2)  # bilinear
    grid[~left] = rotate(grid[~left], -30.0, interpolation=2)
    return grid.reshape(-1, 784).clamp(0, 1).numpy()


def noisy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of standard deviation 0.1, clipped to [0, 1]: a grainy scan."""
    noise = rng.normal(0.0, 0.1, images.shape).astype(np.float32)
    return np.clip(images + noise, 0.0, 1.0)


def inverted(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on light paper."""
    return 1.0 - images


def thicker(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strokes a pixel wider on every side: a grey-level dilation (3x3 maximum)."""
    return F.max_pool2d(as_grid(images), 3, stride=1, padding=1).reshape(-1, 784).numpy()


def occluded(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 10x10 square erased somewhere over the digit's centre (cutout)."""
    grid = as_grid(images)
    for i, (top, left) in enumerate(rng.integers(4, 15, size=(len(images), 2))):
        grid[i, 0, top : top + 10, left : left + 10] = 0.0
    return grid.reshape(-1, 784).numpy()


SHIFTS: dict[str, Shift] = {
    "rotation": rotated,
    "noise": noisy,
    "inverted": inverted,
    "thicker strokes": thicker,
    "occlusion": occluded,
}
BATCH_SIZES = (100, 1000)
MIXED_SHARES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class Profiles:
    """Every test digit profiled as it is (`clean`) and under every shift, and the reference
    logged with the model (a seeded half of them: `logged.indices`)."""

    logged: Profile
    clean: Profile
    shifted: dict[str, Profile]


def rows_of(profile: Profile, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return profile.scores[rows], profile.means[rows]


def smallest_p(
    found: Profiles,
    shifted: Profile | None,
    size: int,
    share: float,
    batches: int,
    rng: np.random.Generator,
    logged_reference: bool = False,
) -> np.ndarray:
    """The smallest Holm-adjusted p-value of each of `batches` random batches of `size` (a batch
    is flagged at alpha when it is <= alpha), round(share * size) of each batch shifted.

    Each batch is compared with a fresh random half of the test set and drawn from the other half,
    so the figure is the procedure's own rate, over the chance of which half a model is profiled
    on; with `logged_reference`, with the model's one logged half instead."""
    found_p, n = [], len(found.clean.scores)
    k = 0 if shifted is None else round(share * size)
    for _ in range(batches):
        if logged_reference:
            reference = found.logged.indices
            rows = rng.permutation(np.setdiff1d(np.arange(n), reference))[:size]
            ref_scores, ref_means = found.logged.scores, found.logged.means
        else:
            order = rng.permutation(n)
            reference, rows = order[: n // 2], order[n // 2 : n // 2 + size]
            ref_scores, ref_means = rows_of(found.clean, reference)
        scores, means = rows_of(found.clean, rows[k:])
        if k:
            s, m = rows_of(shifted, rows[:k])
            scores, means = np.concatenate([scores, s]), np.concatenate([means, m])
        verdict = compare(ref_scores, ref_means, scores, means, alpha=1.0)
        found_p.append(min(t.p_holm for t in verdict.tests))
    return np.array(found_p)


def profiles(model_uri: str, seed: int) -> Profiles:
    from pipeline.config import load_params
    from pipeline.data.splits import load_test_set
    from pipeline.paths import TEST_SPLIT
    from pipeline.tracking import reference, store

    resolved = reference.resolve(model_uri)
    logged = reference.load_profile(resolved)
    model = store.load_model(resolved.uri)
    data = load_params().data
    images, _ = load_test_set(TEST_SPLIT, data.binarize == "dynamic", data.binarize_seed, "cpu")
    images = images.numpy()
    predict = reference.model_predict(model)

    def profile(batch: np.ndarray) -> Profile:
        return reference.profile_images(predict, batch, logged.samples, logged.seed)

    rng = np.random.default_rng(seed)
    shifted = {name: profile(shift(images, rng)) for name, shift in SHIFTS.items()}
    return Profiles(logged, profile(images), shifted)


def mixed(shifted: dict[str, Profile], rng: np.random.Generator) -> Profile:
    """Every test digit under one of the shifts, drawn at random."""
    stack = list(shifted.values())
    which = rng.integers(len(stack), size=len(stack[0].scores))
    rows = np.arange(len(which))
    scores = np.stack([p.scores for p in stack])[which, rows]
    means = np.stack([p.means for p in stack])[which, rows]
    return Profile(scores, means, np.zeros(0, dtype=np.int64), stack[0].samples, stack[0].seed)


ALPHAS = (0.01, 0.02, 0.03, 0.04, 0.05)


def tables(model_uri: str, batches: int, power_batches: int, alpha: float, seed: int) -> str:
    found = profiles(model_uri, seed)
    rng = np.random.default_rng(seed)
    any_shift = mixed(found.shifted, rng)

    def flagged(*args, **kwargs) -> float:
        return float((smallest_p(found, *args, rng=rng, **kwargs) <= alpha).mean())

    clean = {
        (size, logged): smallest_p(found, None, size, 0, batches, rng, logged_reference=logged)
        for size in BATCH_SIZES
        for logged in (False, True)
    }
    tests = 2 + found.clean.means.shape[1]
    lines = [
        f"{model_uri}; {len(found.clean.scores)} test digits; Holm over {tests} tests; "
        f"{batches:,} batches per false-alarm cell, {power_batches:,} per power cell.",
        "",
        "False alarms by alpha (random halves as reference / the logged reference):",
        "",
        "| batch of | " + " | ".join(f"alpha {a:g}" for a in ALPHAS) + " |",
        "| --- " * (len(ALPHAS) + 1) + "|",
    ]
    for size in BATCH_SIZES:
        cells = [
            f"{(clean[size, False] <= a).mean():.1%} / {(clean[size, True] <= a).mean():.1%}"
            for a in ALPHAS
        ]
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    header = [*(f"{name}: all" for name in SHIFTS), "10% of any shift"]
    lines += ["", f"Batches flagged at alpha {alpha:g}:", ""]
    lines += ["| batch of | " + " | ".join(header) + " |", "| --- " * (len(header) + 1) + "|"]
    for size in BATCH_SIZES:
        cells = [flagged(p, size, 1.0, power_batches) for p in found.shifted.values()]
        cells.append(flagged(any_shift, size, 0.1, power_batches))
        lines.append(f"| {size:,} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    lines += ["", f"A batch of 1,000 with this share shifted: batches flagged at alpha {alpha:g}"]
    lines += ["", "| shift | " + " | ".join(f"{s:.0%}" for s in MIXED_SHARES) + " |"]
    lines += ["| --- " * (len(MIXED_SHARES) + 1) + "|"]
    for name, profile in found.shifted.items():
        cells = [flagged(profile, 1000, part, power_batches) for part in MIXED_SHARES]
        lines.append(f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |")
    return "\n".join(lines)


def run(model_uri: str, batches: int, power_batches: int, alpha: float | None, seed: int) -> None:
    """Print the tables (minutes: each cell is `batches` sets of 22 tests)."""
    from pipeline.config import load_params
    from pipeline.errors import PipelineError

    if min(batches, power_batches) < 1:
        raise PipelineError("--batches and --power-batches: at least one batch a cell")
    alpha = alpha if alpha is not None else load_params().monitor.alpha
    started = time.monotonic()
    print(tables(model_uri, batches, power_batches, alpha, seed))
    print(f"\n({time.monotonic() - started:.0f} s)")
