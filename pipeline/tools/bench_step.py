"""`make bench`'s paper lines: a step of the paper's shape (pipeline/presets/burda2015.yaml:
784-200-200-50 tanh, batch 20, binarised) timed five ways, and the rounds that time them.

- ours:             fast_step.py's step;
- autograd:         the reference step (model.py, autograd, fused Adam);
- floor:            the step's 17 matrix products alone (6 forward, 6 weight gradients, 5 input
                    gradients) into buffers allocated once;
- floor+adam:       those products, then the fused Adam kernel over the flat parameters (Adam's
                    memory traffic, which no step can skip);
- floor+adam+batch: and before them the step's own gather and Bernoulli draw of its batch: what
                    any step of this kind must do, all but the element-wise work and bias sums.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from pipeline.config import load_params_with, read_preset
from pipeline.data.splits import load_split
from pipeline.paths import TRAIN_SPLIT
from pipeline.vae.fast_step import FastStep
from pipeline.vae.step import autograd_step
from pipeline.vae.training import vae_and_optimizer

TARGET_PAPER_OVER_FLOOR = 2.0  # the paper's step against its matrix products alone
# The paper's step is timed in short rounds, the paths in turn, so that each of them meets the
# same spells of a VM whose speed varies from one minute to the next.
PAPER_STEPS = 100  # steps a round times, per path
PAPER_ROUNDS = 10  # rounds per repeat


def best_of_rounds(epochs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Each callable's best time in seconds over `rounds` rounds, the callables in turn."""
    for epoch in epochs.values():
        epoch()  # warm-up: allocator, kernels, file cache
    best = dict.fromkeys(epochs, float("inf"))
    for _ in range(rounds):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def matmul_floor(step: FastStep, batch: int) -> Callable[[], None]:
    """The matrix products of one `step` on a batch of `batch`, without anything around them."""
    layers = [*step.encoder, step.heads, *step.decoder]
    weights, grads = [layer.weight for layer in layers], [layer.weight_grad for layer in layers]
    outputs = [torch.empty(batch, w.shape[0]) for w in weights]
    inputs = [torch.rand(batch, w.shape[1]) for w in weights]
    input_grads = [torch.empty(batch, w.shape[1]) for w in weights]

    def products() -> None:
        for w, g, x, y, dx in zip(weights, grads, inputs, outputs, input_grads, strict=True):
            torch.mm(x, w.t(), out=y)  # forward
            torch.mm(y.t(), x, out=g)  # the weight's gradient
            if dx is not input_grads[0]:  # no gradient on the images
                torch.mm(y, w, out=dx)

    return products


def paper_steps(rounds: int) -> tuple[dict[str, float], int]:
    """Seconds a step of the paper's shape takes along each of the five paths (best round), and
    the steps a round times (PAPER_STEPS, or fewer where the training set has fewer batches)."""
    params = load_params_with(read_preset("burda2015"), "preset burda2015")
    shape, cfg = params.model, params.train
    images, _ = load_split(TRAIN_SPLIT)
    batches = torch.randperm(len(images)).split(cfg.batch_size)[:PAPER_STEPS]
    terms = torch.zeros(2)

    def steps(step: Callable[..., None]) -> Callable[[], None]:
        return lambda: [step(images, index, True, terms) for index in batches]

    ours, with_adam, with_batch = (
        FastStep(*vae_and_optimizer(shape, cfg, images)) for _ in range(3)
    )
    floor, floor_of_adam, floor_of_batch = (
        matmul_floor(step, cfg.batch_size) for step in (ours, with_adam, with_batch)
    )

    def floor_and_adam() -> None:
        floor_of_adam()
        with_adam.adam()

    def floor_adam_and_batch(index: torch.Tensor) -> None:
        with_batch.batch(images, index, binarize=True)
        floor_of_batch()
        with_batch.adam()

    best = best_of_rounds(
        {
            "ours": steps(ours),
            "autograd": steps(partial(autograd_step, *vae_and_optimizer(shape, cfg, images))),
            "floor": lambda: [floor() for _ in batches],
            "floor+adam": lambda: [floor_and_adam() for _ in batches],
            "floor+adam+batch": lambda: [floor_adam_and_batch(index) for index in batches],
        },
        rounds,
    )
    return {name: seconds / len(batches) for name, seconds in best.items()}, len(batches)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_paper_lines(seconds: dict[str, float], rounds: int, steps: int) -> None:
    """The five paths in milliseconds, and ours and autograd against the floor and the rest."""
    ms = {name: value * 1e3 for name, value in seconds.items()}
    floor = ms["floor"]
    print(
        f"the paper's step (784-200-200-50 tanh, batch 20, binarised), best of {rounds} rounds "
        f"of {steps} steps:"
    )
    print(f"  ours (fast_step.py)                        {ms['ours']:6.3f} ms")
    print(f"  autograd (model.py, fused Adam)            {ms['autograd']:6.3f} ms")
    print(f"  floor: its 17 matrix products alone        {floor:6.3f} ms")
    print(
        f"  floor + Adam (the products, Adam's kernel) {ms['floor+adam']:6.3f} ms  "
        f"{ms['floor+adam'] / floor:.2f}x floor"
    )
    print(
        f"  floor + Adam + the batch (gather, draw)    {ms['floor+adam+batch']:6.3f} ms  "
        f"{ms['floor+adam+batch'] / floor:.2f}x floor: all but the element-wise work"
    )
    over_floor = ms["ours"] / floor
    print(
        f"  ours / floor: {over_floor:.2f}x (target <= {TARGET_PAPER_OVER_FLOOR}x) "
        f"{verdict(over_floor <= TARGET_PAPER_OVER_FLOOR)}; ours / (floor + Adam + batch): "
        f"{ms['ours'] / ms['floor+adam+batch']:.2f}x; autograd / floor: "
        f"{ms['autograd'] / floor:.2f}x; autograd / ours: {ms['autograd'] / ms['ours']:.2f}x"
    )
