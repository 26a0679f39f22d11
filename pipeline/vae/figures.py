"""The sample stage's figures: digits, curves and the latent space.

Figures are matplotlib `Figure` objects made without pyplot: no backend, no display and no global
figure list, so nothing needs closing and any thread or server can draw them.
"""

from __future__ import annotations

import matplotlib
import torch
from matplotlib.figure import Figure

from pipeline.config import SampleConfig
from pipeline.vae.evaluation import posterior_means
from pipeline.vae.grids import digit_grid
from pipeline.vae.model import VAE


def loss_curves(history: list[dict]) -> Figure:
    """Train and test loss, reconstruction and KL per epoch, one panel each."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
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


def titled_grid(
    images: torch.Tensor, nrow: int, title: str, row_labels: list[str] | None = None
) -> Figure:
    """A digit grid in a figure with a title and optional row labels."""
    picture = digit_grid(images, nrow)
    rows = -(-len(images) // nrow)
    width = max(4.0, nrow * 0.45 + 1.5)
    # As tall as the grid drawn across the width (less the row labels), plus the title.
    height = (width - 1.3) * picture.shape[0] / picture.shape[1] + 0.6
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([2 + 30 * i + 14 for i in range(rows)], row_labels)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def latent_scatter(
    points: torch.Tensor, labels: torch.Tensor, axis_names: tuple[str, str], title: str
) -> Figure:
    """Latent means in 2D, one colour per digit, with a legend."""
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for digit in range(10):
        chosen = labels == digit
        ax.scatter(*points[chosen].T.cpu(), s=3, alpha=0.6, color=colours(digit), label=str(digit))
    ax.set(title=title, xlabel=axis_names[0], ylabel=axis_names[1])
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return fig


def manifold(
    images: torch.Tensor, quantiles: torch.Tensor, axis_names: tuple[str, str], title: str
) -> Figure:
    """Digits decoded on a grid across a latent plane; the axes show each position's quantile."""
    size = len(quantiles)
    fig = Figure(figsize=(8, 8))
    ax = fig.subplots()
    ax.imshow(digit_grid(images, nrow=size), interpolation="nearest")
    ticks = [2 + 30 * i + 14 for i in range(size)]
    step = max(1, size // 5)
    labels = [f"{q:.2f}" for q in quantiles.tolist()]
    ax.set_xticks(ticks[::step], labels[::step])
    ax.set_yticks(ticks[::step], labels[::-1][::step])  # the top row holds the high quantiles
    ax.set(
        title=title,
        xlabel=f"{axis_names[0]}: position as a quantile",
        ylabel=f"{axis_names[1]}: position as a quantile",
    )
    fig.tight_layout()
    return fig


# --- The sample stage's figures ------------------------------------------------------------


def latent_plane(
    mu: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, str]]:
    """A 2D plane of the latent space: centre, two unit directions, their spreads, axis names.

    With one or two latent dimensions it is the latent space itself under the N(0, I) prior;
    otherwise the top two principal directions of the test set's latent means.
    """
    if mu.shape[1] == 1:  # a line, drawn as a plane whose second direction is unused
        return torch.zeros(1), torch.tensor([[1.0], [0.0]]), torch.ones(2), ("z1", "(unused)")
    if mu.shape[1] == 2:
        return torch.zeros(2), torch.eye(2), torch.ones(2), ("z1", "z2")
    centre = mu.mean(dim=0)
    _, singular, directions = torch.linalg.svd(mu - centre, full_matrices=False)
    variance = singular**2 / len(mu)
    share = variance / variance.sum()
    names = (f"PC 1, {share[0]:.0%} of the variance", f"PC 2, {share[1]:.0%} of the variance")
    # ** 0.5, not .sqrt(): oneMKL's sqrt gives other bits on other CPU vendors (pipeline/exact.py)
    return centre, directions[:2], variance[:2] ** 0.5, names


def plane_grid(
    centre: torch.Tensor, directions: torch.Tensor, spread: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Latent points on a square grid across the plane, `offsets` standard deviations out."""
    across, down = torch.meshgrid(offsets, offsets.flip(0), indexing="xy")  # top row: high values
    steps = torch.stack([across.reshape(-1), down.reshape(-1)], dim=1) * spread
    return centre + steps @ directions


def generated(model: VAE, cfg: SampleConfig, generator: torch.Generator) -> Figure:
    z = torch.randn(cfg.n_samples, model.latent_dim, generator=generator)
    nrow = max(1, round(cfg.n_samples**0.5))
    return titled_grid(
        model.decode(z), nrow, f"{cfg.n_samples} new digits decoded from z ~ N(0, I)"
    )


def reconstructions(
    model: VAE, images: torch.Tensor, cfg: SampleConfig, generator: torch.Generator
) -> Figure:
    chosen = images[torch.randperm(len(images), generator=generator)[: cfg.n_reconstructions]]
    mu, _ = model.encode(chosen)
    both = torch.cat([chosen, model.decode(mu)])
    title = "Test digits (top) and their reconstructions from the posterior mean (bottom)"
    return titled_grid(both, cfg.n_reconstructions, title, ["original", "reconstruction"])


def interpolation(
    model: VAE,
    mu: torch.Tensor,
    labels: torch.Tensor,
    cfg: SampleConfig,
    generator: torch.Generator,
) -> Figure:
    rows, names = [], []
    t = torch.linspace(0, 1, cfg.interpolation_steps).unsqueeze(1)
    for row in range(cfg.interpolation_rows):
        start, end = row % 10, (row * 3 + 5) % 10  # different classes in every row
        end = end if end != start else (end + 1) % 10
        pick = [torch.nonzero(labels == digit)[:, 0] for digit in (start, end)]
        a, b = (ids[torch.randint(len(ids), (1,), generator=generator)] for ids in pick)
        rows.append(model.decode((1 - t) * mu[a] + t * mu[b]))
        names.append(f"{start} → {end}")
    title = "Straight lines in latent space between test digits of different classes"
    return titled_grid(torch.cat(rows), cfg.interpolation_steps, title, names)


@torch.no_grad()
def draw_all(
    model: VAE, images: torch.Tensor, labels: torch.Tensor, history: list[dict], cfg: SampleConfig
) -> dict[str, Figure]:
    generator = torch.Generator().manual_seed(cfg.seed)
    mu, _ = posterior_means(model, images, batch_size=1000)
    centre, directions, spread, names = latent_plane(mu)
    if mu.shape[1] <= 2:
        where = "the latent space"
        plane = "the latent space itself"
    else:  # a plane through a space of more dimensions: say which one
        where = f"the {mu.shape[1]}-D latent space, seen along its two main directions"
        plane = (
            f"a 2-D slice of the {mu.shape[1]}-D latent space\n(the plane of the test set's two "
            "main directions, the others at their mean)"
        )
    quantiles = torch.linspace(0.05, 0.95, cfg.manifold_size)
    grid = plane_grid(centre, directions, spread, torch.distributions.Normal(0, 1).icdf(quantiles))
    return {
        "generated": generated(model, cfg, generator),
        "reconstructions": reconstructions(model, images, cfg, generator),
        "latent_space": latent_scatter(
            (mu - centre) @ directions.T,
            labels,
            names,
            f"Where the test digits land in {where}\n(each point: one image's posterior mean)",
        ),
        "manifold": manifold(
            model.decode(grid),
            quantiles,
            names,
            f"Digits decoded across {plane},\nat evenly spaced quantiles along each direction",
        ),
        "interpolation": interpolation(model, mu, labels, cfg, generator),
        "training_curves": loss_curves(history),
    }
