"""The memory fast_step.py's training step works in, allocated once: the parameters in one flat
tensor (its gradients and Adam's moments alike) with each layer's views into it, and every
activation and gradient of a batch size in a buffer of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from pipeline.vae.model import IMAGE_DIM, VAE


def flat_order(model: VAE) -> list[nn.Parameter]:
    """The parameters in the flat buffer's order: the two heads' weights next to each other (and
    their biases), so that one [2 latent, hidden] view multiplies both."""
    encoder = [m for m in model.encoder if isinstance(m, nn.Linear)]
    decoder = [m for m in model.decoder if isinstance(m, nn.Linear)]
    heads = [model.to_mu.weight, model.to_logvar.weight, model.to_mu.bias, model.to_logvar.bias]
    layers = [p for layer in encoder for p in (layer.weight, layer.bias)]
    return layers + heads + [p for layer in decoder for p in (layer.weight, layer.bias)]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class Linear(NamedTuple):
    """A layer's weight (and its transpose, for x W^T), bias and gradients: views of the flat
    buffers, made once."""

    weight: torch.Tensor
    weight_t: torch.Tensor
    bias: torch.Tensor
    weight_grad: torch.Tensor
    bias_grad: torch.Tensor


@dataclass
class Buffers:
    """Every activation and gradient of one batch size, allocated once."""

    x: torch.Tensor  # the batch, binarised in place
    pixels: torch.Tensor  # uniform noise, then the reconstruction term, then dL/dlogits
    positive: torch.Tensor  # max(logits, 0)
    encoder: list[torch.Tensor]  # each hidden layer's output
    heads: torch.Tensor  # [mu, logvar]
    heads_grad: torch.Tensor
    std: torch.Tensor
    eps: torch.Tensor
    noise: torch.Tensor  # std eps = z - mu
    z: torch.Tensor
    var: torch.Tensor
    half_var_m1: torch.Tensor  # 0.5 (exp(logvar) - 1)
    kl: torch.Tensor
    z_grad: torch.Tensor
    decoder: list[torch.Tensor]
    logits: torch.Tensor
    hidden_grads: tuple[torch.Tensor, torch.Tensor]  # in turn: a product can't write its input

    def __post_init__(self) -> None:
        latent = self.z.shape[1]
        self.mu, self.logvar = self.heads[:, :latent], self.heads[:, latent:]
        self.mu_grad, self.logvar_grad = self.heads_grad[:, :latent], self.heads_grad[:, latent:]

    def spare(self, grad: torch.Tensor) -> torch.Tensor:
        return self.hidden_grads[1] if grad is self.hidden_grads[0] else self.hidden_grads[0]

    @classmethod
    def allocate(cls, model: VAE, batch: int, device: torch.device) -> Buffers:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(batch, *shape, device=device)

        hidden, latent, layers = model.hidden_dim, model.latent_dim, model.hidden_layers
        return cls(
            x=empty(IMAGE_DIM),
            pixels=empty(IMAGE_DIM),
            positive=empty(IMAGE_DIM),
            encoder=[empty(hidden) for _ in range(layers)],
            heads=empty(2 * latent),
            heads_grad=empty(2 * latent),
            std=empty(latent),
            eps=empty(latent),
            noise=empty(latent),
            z=empty(latent),
            var=empty(latent),
            half_var_m1=empty(latent),
            kl=empty(latent),
            z_grad=empty(latent),
            decoder=[empty(hidden) for _ in range(layers)],
            logits=empty(IMAGE_DIM),
            hidden_grads=(empty(hidden), empty(hidden)),
        )
