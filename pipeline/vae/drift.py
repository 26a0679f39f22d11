"""Is a batch of images what the model was evaluated on? Two-sample tests of the batch's profile
(scores and posterior means, tracking/reference.py) against the reference profile, with Holm's
correction over all of them, so that `alpha` bounds the chance of any false alarm.

- `score`: Kolmogorov-Smirnov on the negative ELBO: any change in how well the model explains the
  images, up or down;
- `tail`: a one-sided binomial test on the share of images scoring above the reference's 99th
  percentile: a few very unusual images in a large clean batch;
- `z<d>`: Kolmogorov-Smirnov on each latent unit's posterior mean: the images land elsewhere in the
  latent space (other digits, other styles) even where their scores look alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

TAIL_QUANTILE = 0.99


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


def compare(
    ref_scores: np.ndarray,
    ref_means: np.ndarray,
    scores: np.ndarray,
    means: np.ndarray,
    alpha: float,
) -> Verdict:
    """The batch (`scores`, `means`) against the reference's, every test at family-wise `alpha`."""
    threshold = float(np.quantile(ref_scores, TAIL_QUANTILE))
    above = int((scores > threshold).sum())
    raw = [("score", stats.ks_2samp(scores, ref_scores))]
    tail = stats.binomtest(above, len(scores), 1 - TAIL_QUANTILE, alternative="greater")
    raw.append(("tail", (above / len(scores), tail.pvalue)))
    for d in range(ref_means.shape[1]):
        raw.append((f"z{d}", stats.ks_2samp(means[:, d], ref_means[:, d])))
    p_values = np.array([float(result[1]) for _, result in raw])
    adjusted = holm(p_values)
    tests = [
        Test(name, float(result[0]), float(p), float(q), bool(q <= alpha))
        for (name, result), p, q in zip(raw, p_values, adjusted, strict=True)
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
