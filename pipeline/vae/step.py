"""One training step: model.py's loss through autograd (the reference path), its compiled form
for a GPU (`train.compile`), and the choice between it and the hand-written step of fast_step.py
(`train.step`). training.py runs the steps; cuda_graph.py records the autograd one."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import ConfigError
from pipeline.vae import fast_step
from pipeline.vae.model import VAE, loss_terms


def summed_terms(
    model: VAE,
    x: torch.Tensor,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The batch's reconstruction and KL terms, each summed over its images (model.py's loss);
    the noise `eps`, or drawn from `generator`."""
    return torch.stack([term.sum() for term in loss_terms(model, x, generator, eps=eps)])


def autograd_step(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    index: torch.Tensor,
    binarize: bool,
    terms: torch.Tensor,
    forward: Callable[..., torch.Tensor] = summed_terms,
) -> None:
    """One step of the reference path: model.py's loss, autograd's gradients, Adam; the batch's
    summed reconstruction and KL terms go into `terms`. `forward` is summed_terms or its compiled
    form (`forward_of`)."""
    x = images[index]
    if binarize:  # dynamic binarisation: a fresh Bernoulli(pixel) sample, drawn as U < pixel
        x = (torch.rand_like(x) < x).to(x.dtype)  # (torch.bernoulli: the same law, 4x the time)
    # The reparameterisation's noise, drawn as model.py would draw it, but here: compiled code may
    # reorder random draws, and then the compiled step would train on other noise.
    eps = torch.randn(len(x), model.latent_dim, device=x.device, dtype=x.dtype)
    summed = forward(model, x, eps)
    loss = summed.sum()  # summed over the batch, as the lab (and the PyTorch example) does
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    terms.copy_(summed.detach())


def forward_of(setting: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """train.compile: `on` is summed_terms through torch.compile (its element-wise kernels fused,
    forward and backward; each batch shape waits for the compiler once), CUDA only; `off` is
    summed_terms as it is. Its noise comes in as an input, so both compute the same function."""
    if setting == "off":
        return summed_terms
    if device.type != "cuda":
        raise ConfigError(
            f"train.compile = on needs a CUDA device, and the device is {device.type};"
            " set train.compile to off"
        )
    return torch.compile(summed_terms, dynamic=False, fullgraph=True)


def use_fast_step(
    step: str, model: VAE, optimizer: torch.optim.Optimizer, images: torch.Tensor
) -> bool:
    """train.step: `autograd` is model.py through autograd, the reference. `auto` takes the
    hand-written step (fast_step.py) on the CPU when it proves, on a probe batch of `images`,
    that it computes what autograd computes for this model and loss; otherwise autograd, and
    says why. `fast` insists: a model it does not cover, or a GPU, is a one-line error."""
    if step == "autograd":
        return False
    if images.device.type != "cpu":
        if step == "fast":
            raise ConfigError(
                f"train.step: fast runs on the CPU only, and the device is {images.device.type};"
                " set train.step to auto or autograd"
            )
        return False
    missing = fast_step.uncovered(model, optimizer, images)
    if missing is None:
        return True
    if step == "fast":
        raise ConfigError(
            f"train.step = fast: the hand-written step (vae/fast_step.py) does not cover {missing};"
            " set train.step to autograd, which trains model.py as it is"
        )
    print(f"train.step auto: autograd, since the hand-written step does not cover {missing}")
    return False
