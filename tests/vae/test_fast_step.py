"""The hand-written step computes what model.py and autograd compute, and trains the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.vae.fast_step import FastStep
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.training import autograd_step, make_optimizer, train_epoch, use_fast_step

# (hidden layers, activation, hidden, latent, batch): the paper's network at its batch of 20, the
# lab's at 128, and a last partial batch
SHAPES = [(2, "tanh", 200, 50, 20), (1, "relu", 400, 20, 128), (1, "relu", 400, 20, 96)]
ADAM = {"lr": 1e-3, "betas": (0.99, 0.999), "eps": 1e-4}


def twins(layers: int, activation: str, hidden: int, latent: int, v0: float = 1.0):
    """Two copies of one model, each with its own Adam."""
    torch.manual_seed(0)
    model = VAE(hidden, latent, layers, activation)
    twin = copy.deepcopy(model)
    return (
        (model, make_optimizer(model, v0=v0, **ADAM)),
        (twin, make_optimizer(twin, v0=v0, **ADAM)),
    )


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 784, generator=generator) * (torch.rand(n, 784, generator=generator) > 0.5)


@pytest.mark.parametrize(("layers", "activation", "hidden", "latent", "batch"), SHAPES)
@pytest.mark.parametrize("binarize", [False, True])
def test_one_step_gives_autograds_loss_terms_and_gradients(
    layers: int, activation: str, hidden: int, latent: int, batch: int, binarize: bool
) -> None:
    (model, _), (twin, optimizer) = twins(layers, activation, hidden, latent)
    images, index = pixels(300), torch.randperm(300)[:batch]
    torch.manual_seed(7)  # both paths draw the binarisation and the noise from the global RNG
    x = images[index]
    if binarize:
        x = (torch.rand_like(x) < x).to(x.dtype)
    recon, kl = loss_terms(model, x)
    (recon.sum() + kl.sum()).backward()

    step, terms = FastStep(twin, optimizer), torch.zeros(2)
    torch.manual_seed(7)
    step(images, index, binarize, terms)
    assert terms.tolist() == pytest.approx([recon.sum().item(), kl.sum().item()], rel=1e-5)
    grads = dict(zip(step.order, step.views_of(step.grads), strict=True))
    for (name, reference), fast in zip(model.named_parameters(), twin.parameters(), strict=True):
        scale = reference.grad.abs().max()
        assert torch.allclose(grads[fast], reference.grad, atol=1e-5 * scale, rtol=1e-4), name


@pytest.mark.parametrize("v0", [0.0, 1.0])  # Adam's own start, and Burda et al.'s
def test_steps_with_adam_train_the_same_parameters_and_state(v0: float) -> None:
    (model, reference_adam), (twin, adam) = twins(2, "tanh", 64, 8, v0)
    images = pixels(200)
    batches = torch.randperm(200).split(20)
    terms = torch.zeros(2)
    torch.manual_seed(3)
    for index in batches:
        autograd_step(model, reference_adam, images, index, True, terms)
    reference_terms = terms.clone()
    step = FastStep(twin, adam)
    torch.manual_seed(3)
    for index in batches:
        step(images, index, True, terms)
    assert torch.allclose(terms, reference_terms, rtol=1e-4)
    before = [p.detach().clone() for p in twin.parameters()]
    step.write_back()
    for p, q, old in zip(model.parameters(), twin.parameters(), before, strict=True):
        assert not torch.equal(q, old)  # written back
        assert torch.allclose(p, q, atol=1e-5)
        ours, theirs = adam.state[q], reference_adam.state[p]
        assert ours["step"].item() == theirs["step"].item() == len(batches)
        assert torch.allclose(ours["exp_avg"], theirs["exp_avg"], atol=1e-5)
        assert torch.allclose(ours["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-4, atol=1e-8)


def test_adam_state_written_back_saves_and_resumes_on_either_path() -> None:
    (model, reference_adam), (twin, adam) = twins(1, "relu", 32, 4)
    images = pixels(160)
    for fast, (m, opt) in ((False, (model, reference_adam)), (True, (twin, adam))):
        torch.manual_seed(5)
        train_epoch(m, opt, images, 16, True, 1, 2, fast=fast)
    saved = adam.state_dict()  # what a checkpoint holds after a fast epoch
    resumed = copy.deepcopy(twin)
    resumed_adam = make_optimizer(resumed, **ADAM)
    resumed_adam.load_state_dict(saved)
    torch.manual_seed(6)
    train_epoch(model, reference_adam, images, 16, True, 2, 2)
    torch.manual_seed(6)
    train_epoch(resumed, resumed_adam, images, 16, True, 2, 2)  # autograd after the fast epoch
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_an_epoch_on_either_path_returns_the_same_terms() -> None:
    (model, reference_adam), (twin, adam) = twins(2, "tanh", 64, 8)
    images = pixels(250)  # 12 batches of 20 and one of 10
    results = []
    for fast, (m, opt) in ((False, (model, reference_adam)), (True, (twin, adam))):
        torch.manual_seed(11)
        results.append(train_epoch(m, opt, images, 20, True, 1, 1, fast=fast))
    assert results[1] == pytest.approx(results[0], rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_auto_takes_the_fast_step_on_the_cpu_and_fast_is_refused_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fast_step("auto", cpu) and use_fast_step("fast", cpu)
    assert not use_fast_step("autograd", cpu) and not use_fast_step("auto", cuda)
    with pytest.raises(ConfigError, match=r"^train.step: fast runs on the CPU only.*autograd$"):
        use_fast_step("fast", cuda)


def test_other_optimizer_settings_are_refused() -> None:
    model = VAE(8, 2)
    with pytest.raises(ValueError, match="plain Adam"):
        FastStep(model, torch.optim.Adam(model.parameters(), weight_decay=0.1))
