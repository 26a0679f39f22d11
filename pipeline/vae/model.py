"""The lab's Variational Autoencoder, step by step as the handout writes it.

encoder:  x -> Dense(hidden, relu) -> Dense(latent) = mu, Dense(latent) = log-variance
sample:   z = mu + exp(0.5 * logvar) * eps,  eps ~ N(0, I)      (the reparameterisation trick)
decoder:  z -> Dense(hidden, relu) -> Dense(784, sigmoid)
loss:     reconstruction (BCE summed over the 784 pixels) + KL(q(z|x) || N(0, I)), per image

The number of hidden layers and their activation are parameters (Burda et al.'s network: two
layers of 200, tanh); the defaults are the handout's one layer, relu.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_DIM = 28 * 28
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class VAE(nn.Module):
    def __init__(
        self,
        hidden_dim: int = 400,
        latent_dim: int = 20,
        hidden_layers: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.hidden_dim, self.latent_dim = hidden_dim, latent_dim
        self.hidden_layers, self.activation = hidden_layers, activation

        def hidden(inputs: int) -> list[nn.Module]:  # hidden_layers x Dense(hidden, activation)
            layers = []
            for width_in in [inputs] + [hidden_dim] * (hidden_layers - 1):
                layers += [nn.Linear(width_in, hidden_dim), ACTIVATIONS[activation]()]
            return layers

        self.encoder = nn.Sequential(*hidden(IMAGE_DIM))
        self.to_mu = nn.Linear(hidden_dim, latent_dim)
        self.to_logvar = nn.Linear(hidden_dim, latent_dim)
        # The decoder ends in logits; the sigmoid is applied in the loss (stably) or in `decode`.
        self.decoder = nn.Sequential(*hidden(latent_dim), nn.Linear(hidden_dim, IMAGE_DIM))

    @property
    def shape(self) -> dict:
        """The arguments that rebuild this network, each kept as an attribute of its name: saved
        beside the weights, then VAE(**shape) (data/weights.py)."""
        return {name: getattr(self, name) for name in inspect.signature(VAE).parameters}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: the handout's Dense(784, sigmoid)."""
        return torch.sigmoid(self.decoder(z))

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel logits of the reconstruction, and the posterior's mu and logvar."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator, eps)
        return self.decoder(z), mu, logvar


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) drawn here unless given."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over the pixels of each image, from logits for stability."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, in closed form."""
    return kl_per_dimension(mu, logvar).sum(dim=-1)


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


LOSS_TERMS = ("recon", "kl")  # what loss_terms returns, in order; the loss is their sum


def loss_terms(
    model: VAE,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image reconstruction and KL terms; their sum is the negative ELBO the lab prints."""
    logits, mu, logvar = model(x, generator, eps)
    return reconstruction_loss(logits, x), kl_divergence(mu, logvar)


def init_output_bias(model: VAE, pixel_means: torch.Tensor) -> None:
    """Start the decoder's output at the mean training image: bias = logit(mean pixel), the mean
    clipped to [0.001, 0.999] as in Burda et al.'s code."""
    with torch.no_grad():
        model.decoder[-1].bias.copy_(torch.logit(pixel_means.clamp(0.001, 0.999)))
