"""The training loop: batches, steps, binarisation, the test loss, stop requests, the schedule."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import Interrupted, NonFiniteLoss
from pipeline.runtime import StopRequest
from pipeline.vae import step as vae_step
from pipeline.vae import training
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.training import evaluate_loss, fit, make_optimizer, train_epoch


def tiny_setup(n: int = 40, seed: int = 0) -> tuple[VAE, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(seed)
    model = VAE(hidden_dim=16, latent_dim=3)
    images = torch.rand(n, 784) * (torch.rand(n, 784) > 0.6)
    return model, make_optimizer(model, 1e-2), images


def spy_on_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, float, float]]:
    """Record what each training step consumed and the loss terms it summed."""
    steps = []

    def spy(model, x, generator=None, eps=None):
        recon, kl = loss_terms(model, x, generator, eps)
        if generator is None:
            steps.append((x.detach().clone(), recon.sum().item(), kl.sum().item()))
        return recon, kl

    monkeypatch.setattr(vae_step, "loss_terms", spy)
    return steps


def test_an_epoch_visits_every_image_once_in_batches_and_returns_mean_terms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, images = tiny_setup()
    steps = spy_on_steps(monkeypatch)
    recon, kl = train_epoch(model, optimizer, images, 16, False, 1, 1)
    assert [len(x) for x, _, _ in steps] == [16, 16, 8]
    seen = torch.cat([x for x, _, _ in steps])
    assert torch.equal(seen.sum(1).sort().values, images.sum(1).sort().values)
    assert not torch.equal(seen, images)  # shuffled
    assert recon == pytest.approx(sum(r for _, r, _ in steps) / 40, rel=1e-5)
    assert kl == pytest.approx(sum(k for _, _, k in steps) / 40, rel=1e-5)
    assert kl > 0


def test_each_step_updates_the_weights_against_the_summed_loss() -> None:
    model, optimizer, images = tiny_setup()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = train_epoch(model, optimizer, images, 8, False, 1, 3)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    for epoch in (2, 3):
        last = train_epoch(model, optimizer, images, 8, False, epoch, 3)
    assert sum(last) < sum(first) - 5  # nats per image: it learns
    assert model.training  # train_epoch leaves the model in training mode


def test_dynamic_binarisation_draws_fresh_binary_pixels_each_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, images = tiny_setup(n=32)
    steps = spy_on_steps(monkeypatch)
    for epoch in (1, 2):
        train_epoch(model, optimizer, images, 32, True, epoch, 2)
    (first, _, _), (second, _, _) = steps
    assert set(torch.cat([first, second]).unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first.sum(1).sort().values, second.sum(1).sort().values)
    assert abs(first.mean().item() - images.mean().item()) < 0.02


def test_a_non_finite_loss_names_the_epoch_and_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, images = tiny_setup()
    calls = {"n": 0}

    def nan_in_batch_2(model, x, generator=None, eps=None):
        recon, kl = loss_terms(model, x, generator, eps)
        calls["n"] += 1
        return (recon * float("inf"), kl) if calls["n"] == 2 else (recon, kl)

    monkeypatch.setattr(vae_step, "loss_terms", nan_in_batch_2)
    with pytest.raises(NonFiniteLoss) as raised:
        train_epoch(model, optimizer, images, 16, False, 4, 9)
    assert str(raised.value) == (
        "loss became inf at epoch 4, batch 2 of 3; lower train.lr or check the data. "
        "The last good checkpoint and outputs are kept"
    )


def test_the_test_loss_is_seeded_and_leaves_the_training_rng_alone() -> None:
    model, _, images = tiny_setup()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = evaluate_loss(model, images, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluate_loss(model, images, seed=3) == first
    assert evaluate_loss(model, images, seed=4) != first
    recon, kl = loss_terms(model.eval(), images, torch.Generator().manual_seed(3))
    assert first == pytest.approx((recon.mean().item(), kl.mean().item()), rel=1e-5)
    assert not model.training


def test_fit_yields_one_row_per_remaining_epoch_with_consistent_totals() -> None:
    model, optimizer, images = tiny_setup()
    rows = list(
        fit(model, optimizer, images, images[:10], first_epoch=3, epochs=5, batch_size=16,
            binarize=False)
    )  # fmt: skip
    assert [row.epoch for row in rows] == [3, 4, 5]
    for row in rows:
        assert row.train_loss == pytest.approx(row.train_recon + row.train_kl)
        assert row.test_loss == pytest.approx(row.test_recon + row.test_kl)
        assert row.seconds > 0
    assert (rows[-1].test_recon, rows[-1].test_kl) == pytest.approx(
        evaluate_loss(model, images[:10])
    )
    assert "Epoch [5/5] Loss: " in rows[-1].line(5)


def test_fit_passes_its_epoch_and_binarisation_to_each_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, images = tiny_setup(n=16)
    steps = spy_on_steps(monkeypatch)
    clock = iter([100.0, 102.5, 200.0, 201.0, 300.0, 300.0])
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    epochs = fit(
        model, optimizer, images, images, first_epoch=1, epochs=2, batch_size=16, binarize=True
    )
    assert [row.seconds for row in epochs] == [2.5, 1.0]
    assert all(set(x.unique().tolist()) == {0.0, 1.0} for x, _, _ in steps)
    nan = [t * torch.nan for t in loss_terms(model, images)]
    monkeypatch.setattr(vae_step, "loss_terms", lambda *args, **kwargs: nan)
    with pytest.raises(NonFiniteLoss, match=r"at epoch 3, batch 1 of 1"):
        next(fit(model, optimizer, images, images, first_epoch=3, epochs=7, batch_size=16,
                 binarize=False))  # fmt: skip


def test_the_optimizer_is_fused_adam_with_the_given_rate() -> None:
    optimizer = make_optimizer(VAE(hidden_dim=4, latent_dim=2), 0.05)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["fused"] is True


def test_fit_stops_before_the_next_batch_when_asked() -> None:
    model, optimizer, images = tiny_setup()
    stop = StopRequest()
    stop(signal.SIGTERM, None)  # as the signal handler would
    with pytest.raises(Interrupted) as stopped:
        next(fit(model, optimizer, images, images, first_epoch=1, epochs=2, batch_size=16,
                 binarize=False, stop=stop))  # fmt: skip
    assert stopped.value.exit_code == 128 + signal.SIGTERM


def test_burdas_schedule_has_eight_stages_of_3_to_the_i_epochs_at_the_codes_rates() -> None:
    from pipeline.vae.training import learning_rate, schedule_stage

    first_epochs = [1, 2, 5, 14, 41, 122, 365, 1094]  # stage i starts after 1 + 3 + ... + 3^(i-1)
    assert [schedule_stage(e) for e in first_epochs] == list(range(8))
    assert [schedule_stage(e - 1) for e in first_epochs[1:]] == list(range(7))
    assert schedule_stage(3280) == schedule_stage(5000) == 7
    rates = [learning_rate("burda", 1e-3, e) for e in first_epochs]
    # 1e-4 * round(10 ** (1 - i / 7), 1), as the authors' experiments.py
    assert rates == pytest.approx([1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4])
    assert learning_rate("constant", 1e-3, 1094) == 1e-3


def test_fit_sets_each_epochs_learning_rate() -> None:
    model, optimizer, images = tiny_setup()
    rows = fit(model, optimizer, images, images[:10], first_epoch=1, epochs=3, batch_size=16,
               binarize=False, lr_at=lambda epoch: 0.1 / epoch)  # fmt: skip
    assert [row.lr for row in rows] == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_adam_can_start_its_second_moment_at_one_as_burdas_code() -> None:
    """First step with v0 = 1: m = (1 - b1) g, v = b2 + (1 - b2) g^2, and the step is
    lr * m_hat / (sqrt(v_hat) + eps) with the usual bias corrections."""
    lr, (b1, b2), eps = 1e-3, (0.99, 0.999), 1e-4
    steps = {}
    for v0 in (0.0, 1.0):
        model = VAE(hidden_dim=4, latent_dim=2)
        optimizer = make_optimizer(model, lr, (b1, b2), eps, v0)
        weight = model.to_mu.bias
        with torch.no_grad():
            weight.zero_()  # float32 steps of 1e-5 from 0, without rounding against a weight
        before, gradient = weight.detach().clone(), torch.full_like(weight, 0.5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        weight.grad = gradient.clone()
        optimizer.step()
        steps[v0] = before - weight.detach()
    m_hat = (1 - b1) * 0.5 / (1 - b1)
    v_hat = (b2 + (1 - b2) * 0.25) / (1 - b2)
    assert steps[1.0] == pytest.approx(torch.full((2,), lr * m_hat / (v_hat**0.5 + eps)), rel=1e-4)
    assert steps[0.0] == pytest.approx(torch.full((2,), lr * 0.5 / (0.5 + eps)), rel=1e-4)


def test_every_model_param_builds_the_network_and_is_saved_with_it(tmp_path) -> None:
    from dataclasses import asdict, replace

    from pipeline.config import load_params
    from pipeline.data.weights import load_vae, save_vae

    shape = replace(load_params().model, hidden_dim=12, latent_dim=3, hidden_layers=2)
    model = training.build_vae(replace(shape, activation="tanh"))
    # One place per model param: each is an argument of VAE (or sets the initial weights), and
    # the weights file keeps every argument, so the loaded network is the one trained.
    wanted = {k: v for k, v in asdict(shape).items() if k not in training.INITIALISATION_PARAMS}
    assert model.shape == wanted | {"activation": "tanh"}
    save_vae(model, tmp_path / "vae.safetensors")
    assert load_vae(tmp_path / "vae.safetensors").shape == model.shape


def test_a_model_param_that_vae_does_not_take_fails_loudly() -> None:
    from dataclasses import dataclass

    from pipeline.config import load_params

    @dataclass(frozen=True)
    class WithNewParam(type(load_params().model)):  # params.yaml grew a key model.py lacks
        dropout: float = 0.1

    shape = WithNewParam(**{**vars(load_params().model)})
    with pytest.raises(TypeError, match="dropout"):
        training.build_vae(shape)
