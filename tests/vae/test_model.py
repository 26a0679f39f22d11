"""The handout's maths: shapes, the loss terms, gradients and the network's layers."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.vae.model import VAE, kl_divergence, loss_terms, reconstruction_loss, reparameterize


def test_shapes() -> None:
    model = VAE(hidden_dim=32, latent_dim=3)
    x = torch.rand(5, 784)
    logits, mu, logvar = model(x)
    assert logits.shape == (5, 784) and mu.shape == (5, 3) and logvar.shape == (5, 3)
    images = model.decode(torch.randn(7, 3))
    assert images.shape == (7, 784) and images.min() >= 0 and images.max() <= 1
    recon, kl = loss_terms(model, x)
    assert recon.shape == (5,) and kl.shape == (5,)


def test_kl_is_zero_for_the_prior() -> None:
    zeros = torch.zeros(4, 6)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(4))


def test_kl_matches_a_monte_carlo_estimate() -> None:
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.8, -1.5, 0.3]]), torch.tensor([[-0.7, 0.4, -2.0]])
    z = reparameterize(mu.expand(200_000, 3), logvar.expand(200_000, 3))
    std = torch.exp(0.5 * logvar)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    estimate = (log_q - log_p).mean()
    assert abs(estimate.item() - kl_divergence(mu, logvar).item()) < 0.02


def test_reconstruction_equals_torch_bce_on_sigmoid_outputs() -> None:
    torch.manual_seed(0)
    logits, x = torch.randn(4, 784), torch.rand(4, 784)
    expected = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(-1)
    assert torch.allclose(reconstruction_loss(logits, x), expected, rtol=1e-4)


def test_gradients_flow_through_the_reparameterisation() -> None:
    mu = torch.zeros(2, 3, requires_grad=True)
    logvar = torch.zeros(2, 3, requires_grad=True)
    reparameterize(mu, logvar).pow(2).sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert logvar.grad.abs().sum() > 0


def test_every_parameter_gets_a_gradient() -> None:
    model = VAE(hidden_dim=16, latent_dim=2)
    recon, kl = loss_terms(model, torch.rand(3, 784))
    (recon + kl).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_default_network_is_the_labs_and_follows_the_handout() -> None:
    model = VAE()
    assert (model.hidden_dim, model.latent_dim) == (400, 20)
    x = torch.rand(3, 784)
    hidden = torch.relu(x @ model.encoder[0].weight.T + model.encoder[0].bias)
    mu, logvar = model.encode(x)
    torch.testing.assert_close(mu, hidden @ model.to_mu.weight.T + model.to_mu.bias)
    torch.testing.assert_close(logvar, hidden @ model.to_logvar.weight.T + model.to_logvar.bias)
    z = torch.randn(3, 20)
    first = torch.relu(z @ model.decoder[0].weight.T + model.decoder[0].bias)
    logits = first @ model.decoder[2].weight.T + model.decoder[2].bias
    torch.testing.assert_close(model.decode(z), torch.sigmoid(logits))


def test_the_output_bias_starts_at_the_logit_of_the_clipped_mean_pixel() -> None:
    from pipeline.vae.model import init_output_bias

    model = VAE(hidden_dim=8, latent_dim=2)
    means = torch.linspace(0, 1, 784)
    init_output_bias(model, means)
    bias = model.decoder[-1].bias
    assert bias[0].item() == pytest.approx(math.log(0.001 / 0.999), rel=1e-4)  # clipped at 0.001
    assert bias[-1].item() == pytest.approx(math.log(0.999 / 0.001), rel=1e-4)
    assert torch.allclose(torch.sigmoid(bias[100:-100]), means[100:-100], atol=1e-6)
