"""Is a batch of images what the model was evaluated on? Two-sample tests of the batch's profile
(scores and posterior means, tracking/reference.py) against the reference profile, with Holm's
correction over all of them, so that `alpha` bounds the chance of any false alarm.

- `score`: Kolmogorov-Smirnov on the negative ELBO: any change in how well the model explains the
  images, up or down;
- `tail`: an exact one-sided test (hypergeometric, `tail_test`) of the share of images scoring
  above the reference's 99th percentile: a few very unusual images in a large clean batch;
- `z<d>`: Kolmogorov-Smirnov on each latent unit's posterior mean: the images land elsewhere in the
  latent space (other digits, other styles) even where their scores look alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

TAIL_PERCENT = 1  # the tail test looks above the reference's 99th percentile


@dataclass(frozen=True)
class Test:
    name: str
    statistic: float
    p_value: float
    p_holm: float  # adjusted for every test of the batch
    flagged: bool


@dataclass(frozen=True)
class Verdict:
    drift: bool
    alpha: float
    images: int
    reference_images: int
    tail_threshold: float  # the reference's 99th percentile score, nats
    share_above: float  # the batch's share above it (the reference's is 1%)
    tests: list[Test]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        decision = "DRIFT" if self.drift else "no drift"
        flagged = [t.name for t in self.tests if t.flagged]
        strongest = min(self.tests, key=lambda t: t.p_holm)
        evidence = (
            f"{len(flagged)} of {len(self.tests)} tests flagged ({', '.join(flagged[:6])}"
            f"{', ...' if len(flagged) > 6 else ''})"
            if flagged
            else f"no test flagged; smallest Holm p = {strongest.p_holm:.3g} ({strongest.name})"
        )
        return (
            f"{decision} at alpha {self.alpha:g}: {evidence}; {self.share_above:.1%} of "
            f"{self.images} images score above the reference's 99th percentile "
            f"({self.tail_threshold:.1f} nats; 1% of the reference does)"
        )


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (valid under any dependence between the tests).

    scipy's `false_discovery_control` adjusts for the false discovery rate (Benjamini-Hochberg),
    which does not bound the chance of a false alarm: hence these four lines."""
    m = len(p_values)
    order = np.argsort(p_values)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p_values[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def tail_test(ref_scores: np.ndarray, scores: np.ndarray) -> tuple[float, float, int]:
    """The reference's 99th percentile (its k-th highest score), the batch's share above it, and
    the exact p-value of that many or more under exchangeability.

    The batch has x scores above the reference's k-th highest exactly when at least x of the
    x + k - 1 highest scores of both together are the batch's: hypergeometric when batch and
    reference come from one distribution. Exact whatever the sizes: a binomial test against 1%
    would take the reference's estimated percentile for the true one, and its false alarms would
    grow with the batch."""
    k = max(1, -(-len(ref_scores) * TAIL_PERCENT // 100))  # ceil, in integers
    threshold = float(np.sort(ref_scores)[-k])
    above = int((scores > threshold).sum())
    total = len(ref_scores) + len(scores)
    p_value = (
        1.0
        if above == 0
        else float(stats.hypergeom.sf(above - 1, total, len(scores), above + k - 1))
    )
    return threshold, p_value, above


def compare(
    ref_scores: np.ndarray,
    ref_means: np.ndarray,
    scores: np.ndarray,
    means: np.ndarray,
    alpha: float,
) -> Verdict:
    """The batch (`scores`, `means`) against the reference's, every test at family-wise `alpha`."""
    if not (np.isfinite(scores).all() and np.isfinite(means).all()):
        raise ValueError("non-finite scores or latent means: the images were not checked")
    threshold, tail_p, above = tail_test(ref_scores, scores)
    raw = [("score", *stats.ks_2samp(scores, ref_scores)[:2])]
    raw.append(("tail", above / len(scores), tail_p))
    for d in range(ref_means.shape[1]):
        raw.append((f"z{d}", *stats.ks_2samp(means[:, d], ref_means[:, d])[:2]))
    p_values = np.array([float(p) for _, _, p in raw])
    adjusted = holm(p_values)
    tests = [
        Test(name, float(statistic), float(p), float(q), bool(q <= alpha))
        for (name, statistic, _), p, q in zip(raw, p_values, adjusted, strict=True)
    ]
    return Verdict(
        drift=any(t.flagged for t in tests),
        alpha=alpha,
        images=len(scores),
        reference_images=len(ref_scores),
        tail_threshold=threshold,
        share_above=above / len(scores),
        tests=tests,
    )
