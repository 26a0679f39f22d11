"""The training loop: the whole training set in one tensor, each epoch a permutation in batches.

Nothing per-item runs in the hot loop and nothing waits on the device until the epoch ends: each
batch's loss terms stay on the device and are read once per epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import partial

import torch
from tqdm import tqdm

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import NonFiniteLoss
from pipeline.runtime import StopRequest
from pipeline.vae import cuda_graph
from pipeline.vae.cuda_graph import GraphedSteps
from pipeline.vae.fast_step import FastStep
from pipeline.vae.history import Epoch, with_terms
from pipeline.vae.model import LOSS_TERMS, VAE, init_output_bias
from pipeline.vae.step import autograd_step, summed_terms


def make_optimizer(
    model: VAE,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    v0: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam, as the lab; fused: one kernel per step instead of a Python loop over the parameters.

    `v0` is where the second-moment estimate starts: 0 in Adam, 1 in Burda et al.'s code, which
    keeps the first steps small. Adam only fills a parameter's state when it has none, so a
    state given here is the one it uses.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, fused=True)
    if v0:
        for p in model.parameters():
            optimizer.state[p] = {
                "step": torch.zeros((), device=p.device),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.full_like(p, v0),
            }
    return optimizer


# model.* params that set the initial weights rather than the network; every other one is an
# argument of VAE, so a param added to params.yaml but not to model.py fails here, loudly.
INITIALISATION_PARAMS = ("output_bias",)


def build_vae(shape: ModelConfig) -> VAE:
    """The untrained network that params.yaml's `model` section describes."""
    args = {k: v for k, v in asdict(shape).items() if k not in INITIALISATION_PARAMS}
    return VAE(**args)


def vae_and_optimizer(
    shape: ModelConfig, cfg: TrainConfig, train_x: torch.Tensor
) -> tuple[VAE, torch.optim.Optimizer]:
    """The VAE `shape` describes, on `train_x`'s device (its output bias the logit of the mean
    training pixel when `shape.output_bias` asks), and Adam with `cfg`'s settings."""
    model = build_vae(shape).to(train_x.device)
    if shape.output_bias == "data_mean":
        init_output_bias(model, train_x.mean(dim=0))
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    return model, make_optimizer(model, cfg.lr, betas, cfg.adam_eps, cfg.adam_v0)


BURDA_STAGES = 8


def learning_rate(schedule: str, lr: float, epoch: int) -> float:
    """The learning rate of `epoch` (1-based). constant: `lr`. burda: Burda et al.'s stage i
    (0..7) runs 3^i epochs at lr * 10^(-i/7), rounded as their code rounds it (lr = 1e-3: 1e-3,
    7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4); epochs after the 3,280th stay at
    stage 7's rate."""
    if schedule == "constant":
        return lr
    return lr * round(10 ** (1 - schedule_stage(epoch) / 7), 1) / 10


def schedule_stage(epoch: int) -> int:
    """The stage (0..7) of Burda et al.'s schedule that `epoch` (1-based) belongs to."""
    stage, last_epoch = 0, 1
    while epoch > last_epoch and stage < BURDA_STAGES - 1:
        stage += 1
        last_epoch += 3**stage
    return stage


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate, in place where it is a tensor."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a captured step reads it from the device
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    batch_size: int,
    binarize: bool,
    epoch: int,
    epochs: int,
    stop: StopRequest | None = None,
    fast: bool = False,
    graphed: GraphedSteps | None = None,
    forward: Callable[..., torch.Tensor] = summed_terms,
) -> tuple[float, ...]:
    """One pass over `images` in a random order; returns the mean of each of LOSS_TERMS per image.

    `fast` takes the hand-written step of fast_step.py instead of autograd's; `graphed` replays
    the autograd step from its CUDA graph; `forward` is the autograd step's (`forward_of`).
    `stop` is checked before each batch: an interrupted epoch is dropped whole.
    """
    model.train()
    order = torch.randperm(len(images), device=images.device)
    check = stop.check if stop is not None else (lambda: None)
    if graphed is not None:
        sums = graphed.epoch(order, check)
    else:
        batches = order.split(batch_size)
        sums = torch.zeros(len(batches), len(LOSS_TERMS), device=images.device)  # per batch
        if fast:
            step = FastStep(model, optimizer)
        else:
            step = partial(autograd_step, model, optimizer, forward=forward)
        progress = tqdm(
            batches, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not sys.stderr.isatty()
        )
        for i, index in enumerate(progress):
            check()
            step(images, index, binarize, sums[i])
        if fast:
            step.write_back()
    losses = sums.sum(dim=1)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = bad[0, 0].item()
        raise NonFiniteLoss(
            f"loss became {losses[first].item()} at epoch {epoch}, batch {first + 1} of "
            f"{len(sums)}; lower train.lr or check the data. The last good checkpoint and "
            "outputs are kept"
        )
    return tuple((sums.sum(dim=0) / len(images)).tolist())


@torch.no_grad()
def evaluate_loss(
    model: VAE, images: torch.Tensor, batch_size: int = 1000, seed: int = 0
) -> tuple[float, ...]:
    """The mean of each of LOSS_TERMS per image, with its own seeded noise so training's RNG is
    untouched."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(seed)
    sums = torch.zeros(len(LOSS_TERMS), device=images.device)
    for x in images.split(batch_size):
        sums += summed_terms(model, x, generator=generator)
    return tuple((sums / len(images)).tolist())


def fit(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    *,
    first_epoch: int,
    epochs: int,
    batch_size: int,
    binarize: bool,
    stop: StopRequest | None = None,
    lr_at: Callable[[int], float] | None = None,
    fast: bool = False,
    cuda_graphs: str = "off",
    forward: Callable[..., torch.Tensor] = summed_terms,
) -> Iterator[Epoch]:
    """Train epochs `first_epoch`..`epochs`, yielding each one's history row as it ends;
    `lr_at(epoch)`, when given, sets the learning rate of each epoch; `fast` as in
    `train_epoch`; `cuda_graphs` is train.cuda_graphs (the step captured once, before the first
    epoch, after any checkpoint is loaded); `forward` is train.compile's (`forward_of`)."""
    graphed = None
    if first_epoch <= epochs and cuda_graph.use_cuda_graphs(cuda_graphs, train_images.device):
        step = partial(autograd_step, forward=forward)
        graphed = cuda_graph.capture(
            step, model, optimizer, train_images, batch_size, binarize, cuda_graphs
        )
    for epoch in range(first_epoch, epochs + 1):
        if lr_at is not None:
            lr = lr_at(epoch)  # as scheduled: a graphed step's device copy reads back in float32
            set_learning_rate(optimizer, lr)
        else:
            lr = float(optimizer.param_groups[0]["lr"])
        start = time.perf_counter()
        train = train_epoch(
            model, optimizer, train_images, batch_size, binarize, epoch, epochs, stop, fast,
            graphed, forward,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        test = evaluate_loss(model, test_images)
        yield with_terms(epoch, train, test, seconds, lr)
