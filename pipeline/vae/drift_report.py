"""The drift monitor's report as a picture: the batch's scores over the reference's, its latent
positions over the reference's on the two units that moved most, and its most unusual inputs above
their reconstructions."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline.vae.drift import Verdict
from pipeline.vae.grids import digit_grid

BATCH, REFERENCE = "#d62728", "#7f7f7f"


def drift_report(
    verdict: Verdict,
    ref_scores: np.ndarray,
    ref_means: np.ndarray,
    scores: np.ndarray,
    means: np.ndarray,
    worst: np.ndarray,
    reconstructions: np.ndarray,
    title: str,
) -> Figure:
    """Three panels: scores, latent positions, the worst inputs over their reconstructions."""
    fig = Figure(figsize=(13, 8.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[2.2, 1])
    score_histograms(fig.add_subplot(grid[0, 0]), verdict, ref_scores, scores)
    latent_positions(fig.add_subplot(grid[0, 1]), verdict, ref_means, means)
    worst_inputs(fig.add_subplot(grid[1, :]), worst, reconstructions, scores)
    decision = "DRIFT" if verdict.drift else "no drift"
    fig.suptitle(f"{title}\n{decision}: {verdict.summary().split(': ', 1)[1]}", fontsize=10)
    fig.tight_layout()
    return fig


def score_histograms(ax, verdict: Verdict, ref_scores: np.ndarray, scores: np.ndarray) -> None:
    """Shares of images per bin, both axes logarithmic: digits score about a hundred nats, noise
    and inverted digits thousands, and a 1% tail must still show."""
    low = max(1.0, float(min(ref_scores.min(), scores.min())))
    high = float(max(ref_scores.max(), scores.max()))
    bins = np.geomspace(low, max(high, low * 1.01), 60)
    share = lambda x: np.full(len(x), 1 / len(x))  # noqa: E731
    ax.hist(ref_scores, bins, weights=share(ref_scores), color=REFERENCE, alpha=0.5,
            label="reference")  # fmt: skip
    ax.hist(scores, bins, weights=share(scores), histtype="step", lw=2, color=BATCH,
            label="this batch")  # fmt: skip
    ax.axvline(verdict.tail_threshold, color="black", ls="--", lw=1, label="reference's 99th pct")
    ax.set_xscale("log")
    ax.set_yscale("log")
    score = next(t for t in verdict.tests if t.name == "score")
    ax.set(
        title=f"Score (negative ELBO): KS {score.statistic:.3f}, Holm p = {score.p_holm:.2g}",
        xlabel="nats per image (log scale)",
        ylabel="share of images (log scale)",
    )
    ax.legend(fontsize=8)


def latent_positions(ax, verdict: Verdict, ref_means: np.ndarray, means: np.ndarray) -> None:
    """The two latent units whose posterior means moved most (the largest KS statistics): a
    principal plane of 20 units holds too little of the variance to show a shift."""
    units = [t for t in verdict.tests if t.name.startswith("z")]
    a, b = (
        sorted(units, key=lambda t: t.statistic, reverse=True)[:2] if len(units) > 1 else units * 2
    )
    da, db = int(a.name[1:]), int(b.name[1:])
    ax.scatter(ref_means[:, da], ref_means[:, db], s=3, color=REFERENCE, alpha=0.35,
               label="reference")  # fmt: skip
    ax.scatter(means[:, da], means[:, db], s=5, color=BATCH, alpha=0.6, label="this batch")
    ax.set(title="Posterior means: the two units that moved most")
    ax.set(
        xlabel=f"{a.name}: KS {a.statistic:.3f}, Holm p = {a.p_holm:.2g}",
        ylabel=f"{b.name}: KS {b.statistic:.3f}, Holm p = {b.p_holm:.2g}",
    )
    ax.legend(fontsize=8, markerscale=3)


def worst_inputs(ax, worst: np.ndarray, reconstructions: np.ndarray, scores: np.ndarray) -> None:
    picture = digit_grid(torch.from_numpy(np.concatenate([worst, reconstructions])), len(worst))
    ax.imshow(picture, interpolation="nearest")
    top = np.sort(scores)[::-1][: len(worst)]
    ax.set_xticks([2 + 30 * i + 14 for i in range(len(worst))], [f"{s:.0f}" for s in top])
    ax.set_yticks([16, 46], ["input", "recon."])
    ax.tick_params(length=0)
    ax.set_title("The batch's highest scores (nats), above the model's reconstructions")
