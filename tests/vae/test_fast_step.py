"""The hand-written step computes what model.py and autograd compute, and trains the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.vae import fast_step
from pipeline.vae.fast_step import FastStep
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.step import autograd_step, use_fast_step
from pipeline.vae.training import make_optimizer, train_epoch

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
    model = VAE(32, 4)
    optimizer = make_optimizer(model, 1e-3)
    cpu, elsewhere = pixels(64), torch.empty(64, 784, device="meta")  # meta: no GPU needed
    assert use_fast_step("auto", model, optimizer, cpu)
    assert use_fast_step("fast", model, optimizer, cpu)
    assert not use_fast_step("autograd", model, optimizer, cpu)
    assert not use_fast_step("auto", model, optimizer, elsewhere)
    with pytest.raises(ConfigError, match=r"^train.step: fast runs on the CPU only.*autograd$"):
        use_fast_step("fast", model, optimizer, elsewhere)


def test_checking_the_fast_step_changes_no_weight_and_draws_no_noise() -> None:
    model = VAE(32, 4)
    optimizer = make_optimizer(model, 1e-3)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)
    assert use_fast_step("auto", model, optimizer, pixels(64))
    after_check = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_check, torch.rand(3)) and not optimizer.state
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def with_layer(layer: torch.nn.Module) -> VAE:
    """The lab's model with `layer` after the encoder's first Dense: what a user might add."""
    torch.manual_seed(0)
    model = VAE(32, 4)
    model.encoder = torch.nn.Sequential(model.encoder[0], layer, model.encoder[1])
    return model


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        (torch.nn.LayerNorm(32), "encoder.1 (LayerNorm)"),
        (torch.nn.Dropout(0.2), "encoder.1 (Dropout)"),
    ],
)
def test_a_layer_added_to_the_model_is_trained_by_autograd_or_refused_in_one_line(
    layer: torch.nn.Module, named: str, capsys: pytest.CaptureFixture
) -> None:
    model = with_layer(layer)
    optimizer = make_optimizer(model, 1e-2)
    images = pixels(64)
    with pytest.raises(ConfigError) as refused:
        use_fast_step("fast", model, optimizer, images)
    assert str(refused.value) == (
        f"train.step = fast: the hand-written step (vae/fast_step.py) does not cover the layer "
        f"{named} of the model; set train.step to autograd, which trains model.py as it is"
    )
    fast = use_fast_step("auto", model, optimizer, images)
    assert (
        not fast
        and f"autograd, since the hand-written step does not cover the layer {named}"
        in (capsys.readouterr().out)
    )
    before = copy.deepcopy(model.state_dict())
    train_epoch(model, optimizer, images, 32, False, 1, 1, fast=fast)
    if isinstance(layer, torch.nn.LayerNorm):  # the added layer's own weights were trained
        assert not torch.equal(model.encoder[1].weight, before["encoder.1.weight"])
    assert not torch.equal(model.encoder[0].weight, before["encoder.0.weight"])


def test_a_change_to_the_loss_is_caught_by_the_probe_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A weighted KL in model.py's loss_terms: same layers, other gradients
    def weighted(model, x, generator=None):
        recon, kl = loss_terms(model, x, generator)
        return recon, 2 * kl

    monkeypatch.setattr(fast_step, "loss_terms", weighted)
    model = VAE(32, 4)
    with pytest.raises(ConfigError, match=r"does not cover model.py's loss \(terms"):
        use_fast_step("fast", model, make_optimizer(model, 1e-3), pixels(64))


def test_other_optimizer_settings_are_refused() -> None:
    model = VAE(8, 2)
    with pytest.raises(ValueError, match="without weight decay"):
        FastStep(model, torch.optim.Adam(model.parameters(), weight_decay=0.1))
    decaying = torch.optim.Adam(model.parameters(), weight_decay=0.1, fused=True)
    with pytest.raises(ConfigError, match=r"does not cover this model and optimizer \(it runs"):
        use_fast_step("fast", model, decaying, pixels(64))


def test_a_third_loss_term_is_caught_by_the_probe_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_penalty(model, x, generator=None):
        recon, kl = loss_terms(model, x, generator)
        return recon, kl, 0.0 * kl  # the step computes two terms: told, not trained without it

    monkeypatch.setattr(fast_step, "loss_terms", with_penalty)
    model = VAE(32, 4)
    with pytest.raises(ConfigError, match=r"does not cover model.py's loss"):
        use_fast_step("fast", model, make_optimizer(model, 1e-3), pixels(64))
