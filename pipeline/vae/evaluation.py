"""Honest numbers for a trained VAE: ELBO terms, an importance-weighted log p(x), latent usage."""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from pipeline.vae.model import VAE, kl_per_dimension, loss_terms, reconstruction_loss

# The headline numbers in metrics/evaluate.json; registry.metric must name one of them. (The
# ELBO, also returned, is minus the test loss.)
# log_px_iwae_se: the standard error of the mean log p(x) over the test images.
SCALAR_METRICS = (
    "test_loss", "test_recon", "test_kl", "log_px_iwae", "log_px_iwae_se", "active_units",
)  # fmt: skip
BREAKDOWNS = ("kl_per_dim", "activity_per_dim", "loss_per_class")  # per unit and per digit
ROWS_PER_CHUNK = 32768  # decoder rows (samples x images) per pass: ~100 MB of logits


@torch.no_grad()
def elbo_terms(
    model: VAE, images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction and KL (one posterior sample each), as in training."""
    model.eval()
    terms = [loss_terms(model, x, generator) for x in images.split(batch_size)]
    return torch.cat([r for r, _ in terms]), torch.cat([k for _, k in terms])


@torch.no_grad()
def iwae_log_likelihood(
    model: VAE, images: torch.Tensor, k: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-image IWAE bound: log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x).

    It equals the ELBO in expectation for k = 1 and tightens as k grows (Burda et al., 2016).
    """
    model.eval()
    standard = torch.distributions.Normal(0.0, 1.0)
    out = []
    batches = images.split(batch_size)  # minutes at large k: a progress bar with an ETA
    progress = tqdm(batches, desc=f"IWAE k={k}", leave=False, disable=not sys.stderr.isatty())
    for x in progress:
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)
        per_chunk = max(1, ROWS_PER_CHUNK // len(x))
        log_weights = []
        for start in range(0, k, per_chunk):
            n = min(per_chunk, k - start)
            eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device)
            z = mu + std * eps  # (n, batch, latent)
            log_px_given_z = -reconstruction_loss(model.decoder(z), x.expand(n, *x.shape))
            log_pz = standard.log_prob(z).sum(-1)
            log_qz = (standard.log_prob(eps) - torch.log(std)).sum(-1)  # N(mu, std) at z
            log_weights.append(log_px_given_z + log_pz - log_qz)
        out.append(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k))
    return torch.cat(out)


@torch.no_grad()
def posterior_means(
    model: VAE, images: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    encoded = [model.encode(x) for x in images.split(batch_size)]
    return torch.cat([mu for mu, _ in encoded]), torch.cat([lv for _, lv in encoded])


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al.: dimension d is active when Cov_x(E_q[z_d | x]) exceeds `threshold`."""
    activity = mu.var(dim=0, unbiased=False)
    return int((activity > threshold).sum()), activity


def evaluate(
    model: VAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    batch_size: int,
    threshold: float,
    seed: int,
) -> dict:
    """Every metric of the evaluate stage, as plain numbers (per image, averaged over `images`)."""
    generator = torch.Generator(images.device).manual_seed(seed)
    recon, kl = elbo_terms(model, images, batch_size, generator)
    loss = recon + kl
    log_px = iwae_log_likelihood(model, images, k, batch_size, generator)
    mu, logvar = posterior_means(model, images, batch_size)
    n_active, activity = active_units(mu, threshold)
    kl_dims = kl_per_dimension(mu, logvar).mean(dim=0)
    # How far the mean log p(x) would move with another test set of the same size.
    log_px_se = log_px.std().item() / math.sqrt(len(log_px)) if len(log_px) > 1 else 0.0
    return {
        "test_loss": loss.mean().item(),
        "test_recon": recon.mean().item(),
        "test_kl": kl.mean().item(),
        "elbo": -loss.mean().item(),
        "log_px_iwae": log_px.mean().item(),
        "log_px_iwae_se": log_px_se,
        "iwae_samples": k,
        "active_units": n_active,
        "latent_dim": mu.shape[1],
        "kl_per_dim": {f"z{d:02d}": v for d, v in enumerate(kl_dims.tolist())},
        "activity_per_dim": {f"z{d:02d}": v for d, v in enumerate(activity.tolist())},
        "loss_per_class": {
            str(digit): loss[labels == digit].mean().item()
            for digit in range(10)
            if (labels == digit).any()
        },
    }
