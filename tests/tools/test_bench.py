"""`make bench`: the paper lines' floor is the step's own matrix products, every path runs, and
the whole command prints its lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.paths import RAW_ROOT
from pipeline.tools import bench
from pipeline.tools.bench_step import matmul_floor, paper_steps
from pipeline.vae.fast_step import FastStep
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.training import make_optimizer

PRODUCTS = {torch.mm: (0, 1), torch.addmm: (1, 2)}  # the positions of the two factors


class MatrixProducts(TorchFunctionMode):
    """Records the shapes of the factors of every matrix product called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in PRODUCTS:
            a, b = (args[i] for i in PRODUCTS[func])
            self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def test_the_floor_makes_exactly_the_products_of_a_paper_step() -> None:
    model = VAE(200, 50, hidden_layers=2, activation="tanh")
    step = FastStep(model, make_optimizer(model, 1e-3, (0.99, 0.999), 1e-4, 1.0))
    images, index = torch.rand(40, 784), torch.arange(20)
    with MatrixProducts() as in_step:
        step(images, index, True, torch.zeros(2))
    with MatrixProducts() as in_floor:
        matmul_floor(step, batch=20)()
    assert len(in_step.shapes) == 17  # 6 forward, 6 weight gradients, 5 input gradients
    assert sorted(in_floor.shapes) == sorted(in_step.shapes)


def test_the_paper_lines_time_all_five_paths(workdir: Path) -> None:
    seconds, steps = paper_steps(rounds=1)
    assert steps == 13  # the tiny training set: 256 images, 13 batches of 20, not 100
    assert set(seconds) == {"ours", "autograd", "floor", "floor+adam", "floor+adam+batch"}
    assert all(0 < s < 1 for s in seconds.values()), seconds


@pytest.mark.slow
def test_make_bench_runs_every_part_on_tiny_data(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(workdir.parent / "raw", workdir / RAW_ROOT / "MNIST" / "raw")
    bench.run(repeats=1)
    out = capsys.readouterr().out
    for line in (
        "dataloader (torchvision + DataLoader)",
        "speed-up over the DataLoader path",
        "rounds of 13 steps",  # the tiny training set's batches, not PAPER_STEPS
        "floor + Adam + the batch (gather, draw)",
        "ours / floor:",
        "train stage, 3 epochs",
        "of which",
    ):
        assert line in out, out


def test_on_a_gpu_mnist_vae_bench_times_the_gpus_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.commands import main
    from pipeline.tools import bench_cuda

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_cuda, "run", lambda *args: calls.append(("gpu", args)))
    monkeypatch.setattr(bench, "run", lambda *args: calls.append(("cpu", args)))
    main(["bench", "--repeats", "2", "--paper-epochs", "7"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["bench", "--repeats", "3"])
    assert calls == [("gpu", (2, 7)), ("cpu", (3,))]


def test_the_gpu_floor_counts_the_matrix_products_autograd_runs() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.tools.bench_cuda import matmul_flops_per_image

    model, batch = VAE(hidden_dim=8, latent_dim=3, hidden_layers=2, activation="tanh"), 5
    with FlopCounterMode(display=False) as counted:  # forward and backward, as torch counts them
        recon, kl = loss_terms(model, torch.rand(batch, 784))
        (recon.sum() + kl.sum()).backward()
    assert counted.get_total_flops() == batch * matmul_flops_per_image(model)
