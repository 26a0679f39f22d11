"""The drift monitor's statistics (vae/drift.py) and its report picture, on synthetic profiles."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.vae.drift import compare, holm, tail_test
from pipeline.vae.drift_report import drift_report

LATENT = 4


def profile(rng: np.random.Generator, n: int, shift: float = 0.0, tail: float = 0.0):
    """Scores like a VAE's (about 100 nats) and standard normal latent means; `tail` of the
    images score in the thousands (noise, inverted digits)."""
    scores = rng.normal(100 + shift, 20, n).astype(np.float32)
    scores[: int(tail * n)] = 5000
    return scores, rng.normal(0, 1, (n, LATENT)).astype(np.float32)


def test_holm_adjusts_as_the_textbook_example() -> None:
    # Holm (1979) step-down: sorted p times (m, m-1, ...), made monotone, capped at 1.
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm(np.array([0.5, 0.9])) == pytest.approx([1.0, 1.0])


def test_a_batch_like_the_reference_is_not_flagged_and_every_test_is_reported() -> None:
    rng = np.random.default_rng(0)
    ref, batch = profile(rng, 5000), profile(rng, 1000)
    verdict = compare(*ref, *batch, alpha=0.05)
    assert not verdict.drift
    assert [t.name for t in verdict.tests] == ["score", "tail", "z0", "z1", "z2", "z3"]
    assert all(t.p_holm >= t.p_value for t in verdict.tests)
    assert verdict.images == 1000 and verdict.reference_images == 5000
    assert verdict.tail_threshold == np.sort(ref[0])[-50]  # the reference's 99th percentile
    assert "no drift at alpha 0.05" in verdict.summary()


@pytest.mark.parametrize(
    ("change", "flagged"),
    [
        ({"shift": 10.0}, "score"),  # every image a little worse explained
        ({"tail": 0.05}, "tail"),  # 5% of the batch far out, the rest as before
    ],
)
def test_a_shifted_batch_is_flagged_by_the_test_that_sees_it(change: dict, flagged: str) -> None:
    rng = np.random.default_rng(1)
    ref, batch = profile(rng, 5000), profile(rng, 1000, **change)
    verdict = compare(*ref, *batch, alpha=0.05)
    assert verdict.drift
    assert next(t for t in verdict.tests if t.name == flagged).flagged
    assert verdict.summary().startswith("DRIFT at alpha 0.05")


def test_a_move_in_one_latent_unit_alone_is_flagged() -> None:
    rng = np.random.default_rng(2)
    ref, (scores, means) = profile(rng, 5000), profile(rng, 1000)
    means[:, 2] += 0.3
    verdict = compare(*ref, scores, means, alpha=0.05)
    assert [t.name for t in verdict.tests if t.flagged] == ["z2"]


def test_the_false_alarm_rate_on_like_batches_is_within_alpha() -> None:
    rng = np.random.default_rng(3)
    alarms = sum(compare(*profile(rng, 2000), *profile(rng, 200), 0.05).drift for _ in range(200))
    assert alarms / 200 <= 0.08  # 5% nominal; 200 draws leave +-3% of noise


def test_the_tail_test_holds_alpha_for_a_batch_far_larger_than_the_reference() -> None:
    # A binomial test against 1% would take the reference's estimated percentile for the true one:
    # at 40x the reference's size its false alarms were several times alpha.
    rng = np.random.default_rng(5)
    p = [tail_test(rng.normal(size=500), rng.normal(size=20_000))[1] for _ in range(300)]
    assert np.mean(np.array(p) <= 0.05) <= 0.08


def test_non_finite_scores_are_refused_not_passed() -> None:
    rng = np.random.default_rng(6)
    ref, (scores, means) = profile(rng, 500), profile(rng, 100)
    scores[3] = np.nan  # NaN fails every comparison: unrefused, it would read "no drift"
    with pytest.raises(ValueError, match="non-finite"):
        compare(*ref, scores, means, alpha=0.05)


def test_the_report_draws_its_three_panels() -> None:
    rng = np.random.default_rng(4)
    ref, batch = profile(rng, 500), profile(rng, 100, tail=0.1)
    verdict = compare(*ref, *batch, alpha=0.05)
    worst = rng.random((8, 784)).astype(np.float32)
    fig = drift_report(verdict, *ref, *batch, worst, worst, "a model on a batch")
    assert len(fig.axes) == 3
    assert "DRIFT" in fig._suptitle.get_text()
