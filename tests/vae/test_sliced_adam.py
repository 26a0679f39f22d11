"""The CUDA graph's Adam (vae/sliced_adam.py): torch's fused kernel over slices gives the bits of
Adam's own step, and an Adam it does not cover steps itself. Run on the CPU's fused kernel."""

from __future__ import annotations

import pytest
import torch

from pipeline.vae import sliced_adam, training
from pipeline.vae import step as vae_step
from pipeline.vae.cuda_graph import step_state
from pipeline.vae.model import VAE


def adam_of(model: VAE, setting: str) -> torch.optim.Optimizer:
    """make_optimizer's Adam, or one with weight decay and maximize in a second group, the
    decoder's last bias frozen and the logvar head in a third group that gets no gradients."""
    if setting != "groups":
        return training.make_optimizer(model, 1e-3, v0=1.0 if setting == "burda-v0" else 0.0)
    model.decoder[-1].bias.requires_grad_(False)
    head = list(model.to_logvar.parameters())
    for p in head:
        p.requires_grad_(False)
    decoder = [p for p in model.decoder.parameters()]
    rest = [p for p in model.parameters() if all(p is not q for q in head + decoder)]
    groups = [{"params": rest}, {"params": decoder, "weight_decay": 0.1, "maximize": True}]
    return torch.optim.Adam(groups + [{"params": head}], lr=1e-3, fused=True)


@pytest.mark.parametrize("setting", ["fresh-adam", "burda-v0", "groups"])
def test_sliced_adam_gives_the_bits_of_adams_own_step(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    # 96: a multiple of the CPU kernel's vectors, as SLICE is (a slice boundary inside a vector
    # would round that vector's elements the other way); the 8x784 weights in 66 slices
    monkeypatch.setattr(sliced_adam, "SLICE", 96)
    images, index = torch.rand(40, 784), torch.arange(32)
    runs = []
    for sliced in (False, True):
        torch.manual_seed(0)
        model = VAE(hidden_dim=8, latent_dim=2)
        optimizer = adam_of(model, setting)
        adam = sliced_adam.sliced_adam(optimizer) if sliced else optimizer
        for _ in range(3):
            vae_step.autograd_step(model, adam, images, index, False, torch.zeros(2))
        runs.append(step_state(model, optimizer))
    assert isinstance(adam, sliced_adam.SlicedAdam)
    assert len(runs[0]) == len(runs[1]) > len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_an_adam_the_kernel_does_not_cover_steps_itself() -> None:
    model = VAE(hidden_dim=8, latent_dim=2)
    strided = torch.nn.Parameter(torch.zeros(4, 6).t())  # a view that is not contiguous
    for optimizer in (
        torch.optim.Adam(model.parameters(), amsgrad=True, fused=True),
        torch.optim.Adam(model.parameters()),  # foreach, not fused
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.Adam([strided], fused=True),
    ):
        assert sliced_adam.sliced_adam(optimizer) is optimizer
