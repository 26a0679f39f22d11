"""train.cuda_graphs: the step recorded in a CUDA graph trains what the eager step trains.

The tests that replay a graph need a CUDA device and are skipped without one; the choice of path
and its one-line errors are checked everywhere.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.vae import cuda_graph, training
from pipeline.vae import step as vae_step
from pipeline.vae.cuda_graph import make_capturable
from pipeline.vae.model import VAE

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the graphed step runs on a GPU")

LAB = {"hidden_dim": 400, "latent_dim": 20}
PAPER = {"hidden_dim": 200, "latent_dim": 50, "hidden_layers": 2, "activation": "tanh"}


def test_auto_captures_on_a_gpu_only_and_on_refuses_a_cpu_in_one_line() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cuda_graph.use_cuda_graphs("auto", cuda) and cuda_graph.use_cuda_graphs("on", cuda)
    assert not cuda_graph.use_cuda_graphs("off", cuda)
    assert not cuda_graph.use_cuda_graphs("auto", cpu) and not cuda_graph.use_cuda_graphs(
        "off", cpu
    )
    with pytest.raises(ConfigError) as refused:
        cuda_graph.use_cuda_graphs("on", cpu)
    assert str(refused.value) == (
        "train.cuda_graphs = on needs a CUDA device, and the device is cpu; "
        "set train.cuda_graphs to auto or off"
    )


def test_the_step_state_is_every_parameter_then_adams_moments() -> None:
    model = VAE(hidden_dim=8, latent_dim=2)
    optimizer = training.make_optimizer(model, 1e-3)
    n = len(list(model.parameters()))
    assert len(cuda_graph.step_state(model, optimizer)) == n  # Adam has no state before a step
    index = torch.arange(4)
    vae_step.autograd_step(model, optimizer, torch.rand(4, 784), index, False, torch.zeros(2))
    state = cuda_graph.step_state(model, optimizer)
    assert len(state) == 4 * n  # and then its step, exp_avg and exp_avg_sq per parameter
    assert all(a is b for a, b in zip(state, model.parameters(), strict=False))


def test_a_learning_rate_on_the_device_is_refilled_not_replaced() -> None:
    model = VAE(hidden_dim=8, latent_dim=2)
    optimizer = training.make_optimizer(model, 1e-3)
    training.set_learning_rate(optimizer, 5e-4)
    assert optimizer.param_groups[0]["lr"] == 5e-4
    lr = torch.tensor(1e-3)
    optimizer.param_groups[0]["lr"] = lr
    training.set_learning_rate(optimizer, 2.5e-4)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(2.5e-4)


def test_capturing_puts_the_learning_rate_on_the_device_even_from_a_checkpoints_tensor() -> None:
    optimizer = training.make_optimizer(VAE(hidden_dim=8, latent_dim=2), 1e-3)
    restored = torch.tensor(5e-4)  # a checkpoint's, loaded onto the CPU
    optimizer.param_groups[0]["lr"] = restored
    make_capturable(optimizer, torch.device("cpu"))  # the device a capture would name
    group = optimizer.param_groups[0]
    assert group["capturable"] and group["lr"] is not restored
    assert group["lr"].item() == restored.item()


def test_the_history_logs_the_scheduled_rate_not_its_float32_copy() -> None:
    model = VAE(hidden_dim=8, latent_dim=2)
    optimizer = training.make_optimizer(model, 1e-3)
    optimizer.param_groups[0]["lr"] = torch.tensor(1e-3)  # as a graphed run holds it
    images = torch.rand(32, 784)
    rows = training.fit(model, optimizer, images, images, first_epoch=1, epochs=2, batch_size=16,
                        binarize=False, lr_at=lambda epoch: 1e-3 / epoch)  # fmt: skip
    assert [row.lr for row in rows] == [1e-3, 5e-4]


def train(shape: dict, cuda_graphs: str, binarize: bool, epochs: int = 2) -> tuple:
    """`epochs` epochs on fixed random images (not a multiple of the batch: the eager last step
    runs too), the learning rate halved each epoch; each epoch's train loss, train KL, test loss
    and learning rate in a row, and the trained weights."""
    device = torch.device("cuda")
    images = torch.rand(1000, 784, generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(0)
    model = VAE(**shape).to(device)
    optimizer = training.make_optimizer(model, 1e-3)
    rows = training.fit(
        model, optimizer, images, images[:200], first_epoch=1, epochs=epochs, batch_size=128,
        binarize=binarize, lr_at=lambda epoch: 1e-3 / 2 ** (epoch - 1), cuda_graphs=cuda_graphs,
    )  # fmt: skip
    rows = [
        value for row in rows for value in (row.train_loss, row.train_kl, row.test_loss, row.lr)
    ]
    return rows, [p.detach().clone() for p in model.parameters()]


@needs_cuda
@pytest.mark.parametrize(
    ("shape", "binarize"), [(LAB, False), (PAPER, True)], ids=["lab", "paper-binarised"]
)
def test_the_graphed_step_trains_what_the_eager_step_trains(shape: dict, binarize: bool) -> None:
    eager_rows, eager_weights = train(shape, "off", binarize)
    graphed_rows, graphed_weights = train(shape, "on", binarize)
    assert graphed_rows == pytest.approx(eager_rows, rel=1e-5)
    for eager, graphed in zip(eager_weights, graphed_weights, strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert graphed_rows[3::4] == pytest.approx([1e-3, 5e-4])  # the schedule reached the graph


@needs_cuda
def test_the_compiled_forward_computes_what_the_eager_forward_computes() -> None:
    """On the same batch and noise, the same loss terms and gradients up to float rounding."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.rand(128, 784, generator=generator), generator=generator).to(device)
    eps = torch.randn(128, PAPER["latent_dim"], generator=generator).to(device)
    torch.manual_seed(0)
    model = VAE(**PAPER).to(device)
    results = []
    for forward in (vae_step.summed_terms, vae_step.forward_of("on", device)):
        copy = deepcopy(model)
        summed = forward(copy, x, eps)
        summed.sum().backward()
        results.append((summed.detach(), [p.grad for p in copy.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)


def test_compile_is_for_a_gpu_and_off_is_the_plain_forward() -> None:
    assert vae_step.forward_of("off", torch.device("cpu")) is vae_step.summed_terms
    with pytest.raises(ConfigError) as refused:
        vae_step.forward_of("on", torch.device("cpu"))
    assert str(refused.value) == (
        "train.compile = on needs a CUDA device, and the device is cpu; set train.compile to off"
    )


@needs_cuda
def test_the_same_seed_replays_the_same_numbers() -> None:
    first_rows, first_weights = train(PAPER, "on", binarize=True)
    second_rows, second_weights = train(PAPER, "on", binarize=True)
    assert first_rows == second_rows
    assert all(torch.equal(a, b) for a, b in zip(first_weights, second_weights, strict=True))


class Uncapturable(VAE):
    """A model whose forward reads a value back to the host, which no CUDA graph can record."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if float(x.sum()) < 0:
            raise AssertionError("pixels are never negative")
        return super().encode(x)


@needs_cuda
def test_a_step_that_cannot_be_captured_is_refused_or_run_eagerly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    device = torch.device("cuda")
    images = torch.rand(300, 784, device=device)
    model = Uncapturable(hidden_dim=16, latent_dim=2).to(device)
    optimizer = training.make_optimizer(model, 1e-3)
    step = vae_step.autograd_step
    with pytest.raises(ConfigError, match=r"^train.cuda_graphs = on: the training step could not"):
        cuda_graph.capture(step, model, optimizer, images, 128, False, "on")
    assert cuda_graph.capture(step, model, optimizer, images, 128, False, "auto") is None
    assert "train.cuda_graphs auto: eager steps" in capsys.readouterr().out
    rows = list(
        training.fit(
            model,
            optimizer,
            images,
            images,
            first_epoch=1,
            epochs=1,
            batch_size=128,
            binarize=False,
            cuda_graphs="auto",
        )  # fmt: skip
    )
    assert torch.isfinite(torch.tensor(rows[0].train_loss))
