"""The training step recorded once in a CUDA graph and replayed (`train.cuda_graphs`).

On a GPU a step of the lab's small network is dozens of tiny kernels, each launched from Python:
the launches, not the arithmetic, set the pace. A CUDA graph records the step's kernels once and
replays them with one launch. What it records is `training.autograd_step` itself (model.py's loss,
autograd's gradients, fused Adam), so the arithmetic is the reference path's; what changes is where
a step finds what differs from one step to the next, since a replay reads the same memory:

- its batch: the epoch's permutation lies in one resident (batches, batch_size) tensor, and the
  step gathers row `counter`, a device tensor the step then increments;
- its noise (dynamic binarisation and the reparameterisation's eps): the default CUDA generator,
  which PyTorch registers with every graph, so each replay draws the numbers the eager step would;
- its learning rate: a device tensor in Adam's group (fused, `capturable=True`), which the staged
  schedule refills between epochs: no new capture;
- its loss terms: written into row `counter` of the epoch's per-batch table.

An epoch's last, smaller batch (60,000 = 468 x 128 + 96) runs the same step eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import ConfigError

WARM_UP_STEPS = 3  # eager steps on a side stream before capture, as torch.cuda.graph asks


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let a captured step run `optimizer`: capturable mode, the learning rate a device tensor."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ConfigError(
                f"train.cuda_graphs: {type(optimizer).__name__} has no capturable mode; "
                "set train.cuda_graphs to off"
            )
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


class GraphedSteps:
    """An epoch of `step(images, index, binarize, terms)` with its full batches as graph replays.

    `step` is training.autograd_step bound to its model and optimizer; `state` lists every tensor
    the step updates (the parameters and the optimizer's state), put back as they were after the
    warm-up steps that capture needs, so the graphed run starts where the eager one would.
    """

    def __init__(
        self,
        step: Callable[..., None],
        state: Callable[[], list[torch.Tensor]],
        images: torch.Tensor,
        batch_size: int,
        binarize: bool,
        n_terms: int,
    ) -> None:
        self.step, self.images, self.binarize = step, images, binarize
        self.full = len(images) // batch_size  # batches of batch_size: the replays
        device = images.device
        order = torch.arange(self.full * batch_size, device=device)
        self.batches = order.view(self.full, batch_size)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        n_batches = -(-len(images) // batch_size)
        self.sums = torch.zeros(n_batches, n_terms, device=device)  # per batch, as train_epoch's
        self.terms = torch.zeros(n_terms, device=device)
        self.graph = self.capture(state) if self.full else None

    def recorded_step(self) -> None:
        index = self.batches.index_select(0, self.counter).view(-1)
        self.step(self.images, index, self.binarize, self.terms)
        self.sums.index_copy_(0, self.counter, self.terms.unsqueeze(0))
        self.counter.add_(1)

    def capture(self, state: Callable[[], list[torch.Tensor]]) -> torch.cuda.CUDAGraph:
        device = self.images.device
        before = [t.clone() for t in state()]
        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_STEPS):
                self.counter.zero_()
                self.recorded_step()
        torch.cuda.current_stream(device).wait_stream(side)
        after = state()  # the warm-up created the optimizer's state where it had none
        with torch.no_grad():
            for i, tensor in enumerate(after):
                tensor.copy_(before[i]) if i < len(before) else tensor.zero_()
        torch.cuda.set_rng_state(rng, device)
        self.counter.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.recorded_step()
        return graph

    def epoch(self, order: torch.Tensor, check: Callable[[], None]) -> torch.Tensor:
        """Train on `images` in `order` (a permutation); `check` runs before each batch. Returns
        the per-batch sums of the loss terms (overwritten by the next epoch)."""
        cut = self.full * len(self.batches[0]) if self.full else 0
        self.batches.copy_(order[:cut].view_as(self.batches))
        self.counter.zero_()
        for _ in range(self.full):
            check()
            self.graph.replay()
        if cut < len(order):
            check()
            self.step(self.images, order[cut:], self.binarize, self.sums[self.full])
        return self.sums
