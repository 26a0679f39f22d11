"""DVC stage `sample`: the pictures the lab asks for, as PNG files for DVC and in the MLflow run."""

from __future__ import annotations

import csv

import matplotlib.pyplot as plt
import mlflow
import torch
from matplotlib.figure import Figure

from pipeline import figures, tracking
from pipeline.config import Params, SampleConfig, load_params
from pipeline.data import load_split
from pipeline.errors import reports_errors
from pipeline.evaluation import posterior_means
from pipeline.files import atomic_path
from pipeline.model import VAE, load_vae
from pipeline.paths import FIGURES, RUN_INFO, TEST_SPLIT, TRAIN_HISTORY, WEIGHTS


def latent_plane(
    mu: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, str]]:
    """A 2D plane of the latent space: centre, two unit directions, their spreads, axis names.

    With two latent dimensions it is the latent space itself under the N(0, I) prior; otherwise
    the top two principal directions of the test set's latent means.
    """
    if mu.shape[1] == 2:
        return torch.zeros(2), torch.eye(2), torch.ones(2), ("z1", "z2")
    centre = mu.mean(dim=0)
    _, singular, directions = torch.linalg.svd(mu - centre, full_matrices=False)
    variance = singular**2 / len(mu)
    share = variance / variance.sum()
    names = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
    return centre, directions[:2], variance[:2].sqrt(), names


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
    return figures.titled_grid(
        model.decode(z), nrow, f"{cfg.n_samples} new digits decoded from z ~ N(0, I)"
    )


def reconstructions(
    model: VAE, images: torch.Tensor, cfg: SampleConfig, generator: torch.Generator
) -> Figure:
    chosen = images[torch.randperm(len(images), generator=generator)[: cfg.n_reconstructions]]
    mu, _ = model.encode(chosen)
    both = torch.cat([chosen, model.decode(mu)])
    title = "Test digits (top) and their reconstructions from the posterior mean (bottom)"
    return figures.titled_grid(both, cfg.n_reconstructions, title, ["original", "reconstruction"])


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
    return figures.titled_grid(torch.cat(rows), cfg.interpolation_steps, title, names)


@torch.no_grad()
def draw_all(
    model: VAE, images: torch.Tensor, labels: torch.Tensor, history: list[dict], cfg: SampleConfig
) -> dict[str, Figure]:
    generator = torch.Generator().manual_seed(cfg.seed)
    mu, _ = posterior_means(model, images, batch_size=1000)
    centre, directions, spread, names = latent_plane(mu)
    kind = "latent space" if mu.shape[1] == 2 else "latent means' top-2 PCA plane"
    quantiles = torch.linspace(0.05, 0.95, cfg.manifold_size)
    grid = plane_grid(centre, directions, spread, torch.distributions.Normal(0, 1).icdf(quantiles))
    return {
        "generated": generated(model, cfg, generator),
        "reconstructions": reconstructions(model, images, cfg, generator),
        "latent_space": figures.latent_scatter(
            (mu - centre) @ directions.T,
            labels,
            names,
            f"Test set's posterior means in the {kind}",
        ),
        "manifold": figures.manifold(
            model.decode(grid),
            quantiles,
            names,
            f"Digits decoded across the {kind},\nevenly spaced in probability",
        ),
        "interpolation": interpolation(model, mu, labels, cfg, generator),
        "training_curves": figures.loss_curves(history),
    }


def read_history() -> list[dict]:
    with TRAIN_HISTORY.open() as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def run_sampling(params: Params) -> list[str]:
    model = load_vae(WEIGHTS)
    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(model, images, labels, read_history(), params.sample)
    for name, fig in drawn.items():
        with atomic_path(FIGURES / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
    with tracking.attached_run(params.mlflow.experiment, RUN_INFO):
        for name in drawn:
            mlflow.log_artifact(str(FIGURES / f"{name}.png"), "figures")
    return list(drawn)


@reports_errors
def main() -> None:
    names = run_sampling(load_params())
    print(f"wrote {len(names)} figures to {FIGURES}/: {', '.join(names)}")


if __name__ == "__main__":
    main()
