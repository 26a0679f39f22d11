"""The training step recorded once in a CUDA graph and replayed (`train.cuda_graphs`).

On a GPU a step of the lab's small network is dozens of tiny kernels, each launched from Python:
the launches, not the arithmetic, set the pace. A CUDA graph records the step's kernels once and
replays them with one launch. What it records is vae/step.py's `autograd_step` itself (model.py's
loss, autograd's gradients, fused Adam), so the arithmetic is the reference path's; what changes
is where a step finds what differs from one step to the next, since a replay reads the same memory:

- its batch: the epoch's permutation lies in one resident (batches, batch_size) tensor, and the
  step gathers row `counter`, a device tensor the step then increments;
- its noise (dynamic binarisation and the reparameterisation's eps): the default CUDA generator,
  which PyTorch registers with every graph, so each replay draws the numbers the eager step would;
- its learning rate: a device tensor in Adam's group (fused, `capturable=True`), which the staged
  schedule refills between epochs: no new capture;
- Adam's kernel over slices of the parameters (sliced_adam.py), so that it keeps the GPU busy;
- its loss terms: written into row `counter` of the epoch's per-batch table.

An epoch's last, smaller batch (60,000 = 468 x 128 + 96) has a graph of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from pipeline.errors import ConfigError, first_line
from pipeline.vae.model import LOSS_TERMS
from pipeline.vae.sliced_adam import sliced_adam

WARM_UP_STEPS = 3  # eager steps on a side stream before capture, as torch.cuda.graph asks


def use_cuda_graphs(setting: str, device: torch.device) -> bool:
    """train.cuda_graphs: `auto` captures the step in a CUDA graph on a GPU, `on` insists (a
    one-line error on the CPU), `off` launches every kernel of every step (the eager reference)."""
    if device.type == "cuda":
        return setting != "off"
    if setting == "on":
        raise ConfigError(
            f"train.cuda_graphs = on needs a CUDA device, and the device is {device.type};"
            " set train.cuda_graphs to auto or off"
        )
    return False


def capture(
    step: Callable[..., None],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    batch_size: int,
    binarize: bool,
    setting: str,
) -> GraphedSteps | None:
    """`step(model, optimizer, ...)` (vae/step.py's `autograd_step`) recorded in CUDA graphs, with
    Adam stepped by `sliced_adam`; None, saying why, when `auto` finds it cannot be captured (`on`
    refuses in one line)."""
    try:
        make_capturable(optimizer, images.device)
        state = partial(step_state, model, optimizer)
        bound = partial(step, model, sliced_adam(optimizer))
        return GraphedSteps(bound, state, images, batch_size, binarize)
    except (RuntimeError, ConfigError) as exc:
        # A capture that fails inside the step ends with "a previous error during capture":
        # name the error the step hit.
        why = first_line(exc.__context__ if isinstance(exc.__context__, RuntimeError) else exc)
        if setting == "on":
            raise ConfigError(
                f"train.cuda_graphs = on: the training step could not be captured in a CUDA "
                f"graph ({why}); set train.cuda_graphs to off"
            ) from None
        print(f"train.cuda_graphs auto: eager steps, since the step could not be captured ({why})")
        return None


def step_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step updates: the parameters, then the optimizer's state."""
    tensors = list(model.parameters())
    for p in model.parameters():
        tensors += [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return tensors


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let a captured step run `optimizer`: capturable mode, the learning rate a device tensor."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ConfigError(
                f"train.cuda_graphs: {type(optimizer).__name__} has no capturable mode; "
                "set train.cuda_graphs to off"
            )
        group["capturable"] = True
        # A new tensor on the device, also where the group holds one: a captured step reads a CPU
        # tensor's value once, at capture, so a schedule could not change it afterwards.
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def restore(tensors: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """Put `tensors` back to `before`; those beyond it (the optimizer's state, which a warm-up
    creates where there was none) to zero, as a fresh Adam starts."""
    with torch.no_grad():
        for i, tensor in enumerate(tensors):
            if i < len(before):
                tensor.copy_(before[i])
            else:
                tensor.zero_()


class GraphedSteps:
    """An epoch of `step(images, index, binarize, terms)` as CUDA graph replays: one graph for the
    full batches, one for the smaller last batch when there is one.

    `step` is vae/step.py's `autograd_step` bound to its model and its Adam; `state` lists every
    tensor the step updates (the parameters and the optimizer's state), put back as they were
    after the warm-up steps that capture needs, so the graphed run starts where the eager one
    would. The warm-up and the capture run on one stream: autograd ties each parameter's gradient
    accumulator to the stream it was made on, and a capture may not wait on another stream.
    """

    def __init__(
        self,
        step: Callable[..., None],
        state: Callable[[], list[torch.Tensor]],
        images: torch.Tensor,
        batch_size: int,
        binarize: bool,
    ) -> None:
        self.step, self.images, self.binarize = step, images, binarize
        self.full, tail = divmod(len(images), batch_size)
        device = images.device
        self.batches = torch.zeros(self.full, batch_size, dtype=torch.long, device=device)
        self.tail = torch.arange(tail, device=device)  # the last batch's images
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.sums = torch.zeros(self.full + (tail > 0), len(LOSS_TERMS), device=device)  # per batch
        self.terms = torch.zeros(len(LOSS_TERMS), device=device)
        self.stream = torch.cuda.Stream(device)
        recorded = [(self.full_step, self.full), (self.last_step, tail)]
        self.graphs = self.capture([steps for steps, count in recorded if count], state)

    def full_step(self) -> None:
        index = self.batches.index_select(0, self.counter).view(-1)
        self.step(self.images, index, self.binarize, self.terms)
        self.sums.index_copy_(0, self.counter, self.terms.unsqueeze(0))
        self.counter.add_(1)

    def last_step(self) -> None:
        self.step(self.images, self.tail, self.binarize, self.sums[self.full])

    def capture(
        self, steps: list[Callable[[], None]], state: Callable[[], list[torch.Tensor]]
    ) -> list[torch.cuda.CUDAGraph]:
        device = self.images.device
        # Detached: a clone of a parameter would tie its gradient accumulator to this stream.
        before = [t.detach().clone() for t in state()]
        rng = torch.cuda.get_rng_state(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(self.stream):
                for _ in range(WARM_UP_STEPS):
                    for step in steps:
                        self.counter.zero_()
                        step()
        finally:  # also after a failed warm-up, which `auto` follows with eager steps
            torch.cuda.current_stream(device).wait_stream(self.stream)
            restore(state(), before)
            torch.cuda.set_rng_state(rng, device)
        del before
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        untouched = generator.clone_state()
        graphs, pool = [], None
        try:
            for step in steps:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                    step()
                graphs.append(graph)
                pool = graph.pool()  # the graphs run one after the other: they share memory
        except RuntimeError:
            # A failed capture leaves the generator expecting one: give it back its state.
            generator.graphsafe_set_state(untouched)
            raise
        return graphs

    def epoch(self, order: torch.Tensor, check: Callable[[], None]) -> torch.Tensor:
        """Train on `images` in `order` (a permutation); `check` runs before each batch. Returns
        the per-batch sums of the loss terms (overwritten by the next epoch)."""
        cut = self.batches.numel()
        self.batches.copy_(order[:cut].view_as(self.batches))
        self.tail.copy_(order[cut:])
        self.counter.zero_()
        for _ in range(self.full):
            check()
            self.graphs[0].replay()
        if len(self.tail):
            check()
            self.graphs[-1].replay()
        return self.sums
