"""The evaluation's maths: the IWAE bound against exact values, active units, breakdowns."""

import math

import pytest
import torch

from pipeline.vae.evaluation import (
    active_units,
    elbo_terms,
    evaluate,
    iwae_log_likelihood,
    posterior_means,
)
from pipeline.vae.model import VAE, loss_terms, reconstruction_loss


def trained_tiny_model() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    model = VAE(hidden_dim=32, latent_dim=4)
    images = (torch.rand(48, 784) > 0.7).float() * torch.rand(48, 784)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        recon, kl = loss_terms(model.train(), images)
        optimizer.zero_grad()
        (recon + kl).sum().backward()
        optimizer.step()
    return model.eval(), images


def mean_iwae(model: VAE, images: torch.Tensor, k: int, seeds: range) -> float:
    values = [
        iwae_log_likelihood(model, images, k, 16, torch.Generator().manual_seed(s)).mean().item()
        for s in seeds
    ]
    return sum(values) / len(values)


def mean_elbo(model: VAE, images: torch.Tensor, seeds: range) -> float:
    values = []
    for s in seeds:
        recon, kl = elbo_terms(model, images, 16, torch.Generator().manual_seed(s))
        values.append(-(recon + kl).mean().item())
    return sum(values) / len(values)


def test_iwae_bounds_the_elbo_and_tightens_with_k() -> None:
    model, images = trained_tiny_model()
    seeds = range(20)
    elbo = mean_elbo(model, images, seeds)
    bounds = [mean_iwae(model, images, k, seeds) for k in (1, 5, 50)]
    assert abs(bounds[0] - elbo) < 0.005 * abs(elbo)  # k = 1: the ELBO, in expectation
    assert elbo < bounds[1] < bounds[2]  # a bound above the ELBO that tightens as k grows
    assert bounds[0] < bounds[1]


def constant_decoder_with_the_prior_as_posterior(latent_dim: int = 2) -> VAE:
    """A model whose decoder ignores z and whose encoder returns the prior: then q(z|x) is the
    exact posterior, every importance weight equals p(x), and every k gives log p(x) exactly."""
    torch.manual_seed(0)
    model = VAE(hidden_dim=8, latent_dim=latent_dim)
    with torch.no_grad():
        for layer in (model.to_mu, model.to_logvar):
            layer.weight.zero_()
            layer.bias.zero_()
        model.decoder[0].weight.zero_()
    return model.eval()


def test_iwae_is_exact_when_the_posterior_is_exact() -> None:
    model = constant_decoder_with_the_prior_as_posterior()
    images = (torch.rand(6, 784) > 0.5).float()
    logits = model.decoder(torch.zeros(1, 2))  # the same for every z
    log_px = -reconstruction_loss(logits.expand(6, -1), images)
    for k in (1, 7, 100):
        estimate = iwae_log_likelihood(model, images, k, 4, torch.Generator().manual_seed(k))
        torch.testing.assert_close(estimate, log_px, rtol=0, atol=1e-3)


def log_px_by_integration(model: VAE, x: torch.Tensor) -> tuple[float, float, float]:
    """log p(x) for a 1-D latent by quadrature over z, and the posterior's mean and std."""
    z = torch.linspace(-10, 10, 20001).unsqueeze(1)
    log_joint = -reconstruction_loss(model.decoder(z), x.expand(len(z), -1))
    log_joint += torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 0])
    log_px = torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])
    posterior = torch.softmax(log_joint, 0)
    mean = (posterior * z[:, 0]).sum()
    std = ((posterior * (z[:, 0] - mean) ** 2).sum()).sqrt()
    return log_px.item(), mean.item(), std.item()


@torch.no_grad()
def test_iwae_matches_log_px_integrated_over_a_1d_latent() -> None:
    torch.manual_seed(1)
    model = VAE(hidden_dim=16, latent_dim=1).eval()
    model.decoder[0].weight.mul_(4.0)  # a decoder that depends strongly on z
    for z0 in (-1.0, 0.3, 1.5):
        x = torch.bernoulli(model.decode(torch.tensor([[z0]])))
        log_px, mean, std = log_px_by_integration(model, x)
        # q(z|x): the posterior's mean, 1.5 times its spread (importance sampling wants q wider)
        model.to_mu.weight.zero_(), model.to_mu.bias.fill_(mean)
        model.to_logvar.weight.zero_(), model.to_logvar.bias.fill_(2 * math.log(1.5 * std))
        draws = [
            iwae_log_likelihood(model, x, 5000, 1, torch.Generator().manual_seed(s)).item()
            for s in range(4)
        ]
        assert abs(sum(draws) / 4 - log_px) < 0.02, (z0, draws, log_px)
        recon, kl = elbo_terms(model, x.expand(2000, -1), 500, torch.Generator().manual_seed(9))
        elbo = -(recon + kl).mean().item()
        assert elbo < log_px - 0.01  # q is not the posterior: a strictly looser bound


def test_iwae_chunks_samples_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = trained_tiny_model()
    whole = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    monkeypatch.setattr("pipeline.vae.evaluation.ROWS_PER_CHUNK", 16 * 5)  # chunks of 5 samples
    chunked = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_evaluate_is_repeatable_and_counts_active_units_with_its_threshold() -> None:
    model, images = trained_tiny_model()
    labels = torch.arange(len(images)) % 10
    first = evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=0)
    assert evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=0) == first
    reseeded = evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=1)
    assert reseeded["log_px_iwae"] != first["log_px_iwae"]
    activity = sorted(first["activity_per_dim"].values())
    middle = (activity[1] + activity[2]) / 2
    halved = evaluate(model, images, labels, k=5, batch_size=16, threshold=middle, seed=0)
    assert halved["active_units"] == 2 and first["active_units"] == 4
    assert list(first) == [
        "test_loss", "test_recon", "test_kl", "elbo", "log_px_iwae", "log_px_iwae_se",
        "iwae_samples", "active_units", "latent_dim", "kl_per_dim", "activity_per_dim",
        "loss_per_class",
    ]  # fmt: skip
    assert first["elbo"] == -first["test_loss"] < first["log_px_iwae"] < 0
    assert (first["iwae_samples"], first["latent_dim"]) == (5, 4)


def test_activity_is_the_population_variance_and_must_exceed_the_threshold() -> None:
    mu = torch.tensor([[0.0, 0.0, 3.0], [2.0, 1.0, 3.0], [0.0, 0.0, 3.0], [2.0, 1.0, 3.0]])
    count, activity = active_units(mu)  # Burda et al.'s threshold, 0.01, by default
    assert activity.tolist() == [1.0, 0.25, 0.0] and count == 2
    assert active_units(mu, threshold=1.0)[0] == 0  # a unit must exceed it
    assert active_units(mu, threshold=0.5)[0] == 1


def test_active_units_counts_dimensions_the_encoder_uses() -> None:
    model = VAE(hidden_dim=32, latent_dim=6)
    with torch.no_grad():
        model.to_mu.weight.mul_(20.0)
        model.to_mu.weight[[1, 4]] = 0.0  # dimensions 1 and 4 ignore the input
    mu, _ = posterior_means(model, torch.rand(200, 784), batch_size=64)
    count, activity = active_units(mu, threshold=0.01)
    assert count == 4
    assert activity[1] == 0 and activity[4] == 0 and (activity[[0, 2, 3, 5]] > 0.01).all()


def test_breakdowns_match_a_hand_computed_case() -> None:
    # Encoder: fixed mu = (1, 0, 2) and logvar = (0, log 2, 0) for every image, so each
    # dimension's KL is -(1 + logvar - mu^2 - exp(logvar)) / 2 = 0.5, (1 - log 2) / 2 and 2.
    # Decoder: every logit 0.5 whatever z, so BCE is 784 softplus(0.5) for a blank image and
    # 784 softplus(-0.5) for a white one.
    model = VAE(hidden_dim=4, latent_dim=3)
    with torch.no_grad():
        for layer in (model.to_mu, model.to_logvar, model.decoder[2]):
            layer.weight.zero_()
        model.to_mu.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
        model.to_logvar.bias.copy_(torch.tensor([0.0, math.log(2.0), 0.0]))
        model.decoder[2].bias.fill_(0.5)
    images = torch.cat([torch.zeros(3, 784), torch.ones(2, 784)])
    labels = torch.tensor([0, 0, 0, 1, 1])
    metrics = evaluate(model, images, labels, k=4, batch_size=2, threshold=0.01, seed=0)

    kl_dims = [0.5, (1 - math.log(2.0)) / 2, 2.0]
    assert list(metrics["kl_per_dim"].values()) == pytest.approx(kl_dims)
    blank, white = 784 * math.log1p(math.exp(0.5)), 784 * math.log1p(math.exp(-0.5))
    assert metrics["loss_per_class"] == pytest.approx(
        {"0": blank + sum(kl_dims), "1": white + sum(kl_dims)}
    )
    assert metrics["test_kl"] == pytest.approx(sum(kl_dims))
    assert metrics["test_recon"] == pytest.approx((3 * blank + 2 * white) / 5)
    assert metrics["active_units"] == 0  # every image gets the same mu
    assert list(metrics["activity_per_dim"].values()) == [0.0, 0.0, 0.0]
