"""Adam's step in a CUDA graph (cuda_graph.py): torch's fused Adam kernel over slices of the
parameters, so that it keeps the whole GPU busy (docs/speed.md)."""

from __future__ import annotations

import torch

# Elements of a parameter that one block of Adam's kernel updates: a multiple of the kernel's
# 4-element vectors (and of the CPU's 8 and 16), so every element takes the path it takes unsliced.
SLICE = 16_384


def sliced_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | SlicedAdam:
    """`optimizer` stepped over slices where it is the fused Adam of `make_optimizer` (no amsgrad,
    no decoupled weight decay, contiguous parameters); otherwise `optimizer` itself."""
    plain = type(optimizer) is not torch.optim.Adam or any(
        group.get("amsgrad")
        or group.get("decoupled_weight_decay")
        or not group.get("fused")
        or not all(p.is_contiguous() for p in group["params"])
        for group in optimizer.param_groups
    )
    return optimizer if plain else SlicedAdam(optimizer)


class SlicedAdam:
    """The step of a fused Adam, by the same CUDA kernel, over views of at most SLICE elements of
    each parameter, its gradient and its moments.

    The kernel gives each tensor's 65,536-element chunks a block each: the lab's ten parameters
    made 18 blocks for a GPU of 132 multiprocessors, 65 us of a 292 us step (H200, profiled).
    It is element-wise, and a slice boundary falls between its vectors (SLICE), so every weight
    goes through the same arithmetic: the bits of `step()` (tested on the CPU and the GPU).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # as torch's Adam: a group without gradients is left alone
                continue
            states = [self.state(p) for p in params]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            slices: list[list[torch.Tensor]] = [[], [], [], []]  # params, grads, moments
            counts: list[torch.Tensor] = []  # each slice reads its parameter's step
            for p, s, count in zip(params, states, steps, strict=True):
                tensors = (p, p.grad, s["exp_avg"], s["exp_avg_sq"])
                for of_kind, t in zip(slices, tensors, strict=True):
                    of_kind += t.view(-1).split(SLICE)
                counts += [count] * -(-p.numel() // SLICE)
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                *slices, [], counts, lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=group["maximize"],
            )  # fmt: skip

    def state(self, p: torch.Tensor) -> dict:
        """`p`'s Adam state, made as torch's Adam makes it (fused: the step a float32 tensor on
        the device) when it has none."""
        state = self.optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state
