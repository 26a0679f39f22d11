"""`make bench`: one training epoch three ways, on the same model and machine, in one run.

- ours:      the train stage's loop (one tensor on the device, a permutation sliced into batches);
- dataloader: the idiomatic path (torchvision MNIST + ToTensor + DataLoader(128, shuffle=True));
- floor:     the same forward and backward matrix products on one resident batch, with no
             optimizer step and no data work: what no data pipeline can beat.

Each path runs one warm-up epoch; then the three take turns for `--repeats` rounds, so a drift in
the machine's speed touches them alike, and each keeps its best epoch. Run it on an idle machine:
another heavy process on these cores makes every ratio meaningless.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipeline import runtime
from pipeline.config import load_params
from pipeline.data import load_split
from pipeline.errors import reports_errors
from pipeline.model import VAE, loss_terms
from pipeline.paths import RAW_ROOT, TRAIN_SPLIT
from pipeline.training import flush_denormals, make_optimizer, train_epoch

TARGET_SPEEDUP, TARGET_OVER_FLOOR = 3.5, 1.5


def best_of_rounds(epochs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for epoch in epochs.values():
        epoch()  # warm-up: allocator, kernels, file cache
    best = dict.fromkeys(epochs, float("inf"))
    for _ in range(rounds):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            epoch()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def dataloader_epoch(model: VAE, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    model.train()
    for x, _ in loader:
        recon, kl = loss_terms(model, x.view(len(x), -1))
        loss = recon.sum() + kl.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def floor_epoch(model: VAE, batch: torch.Tensor, n_batches: int) -> None:
    for _ in range(n_batches):
        recon, kl = loss_terms(model, batch)
        model.zero_grad(set_to_none=True)
        (recon.sum() + kl.sum()).backward()


@reports_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runtime.start()
    flush_denormals()  # as the train stage does, for all three paths alike
    params = load_params()
    hidden, latent = params.model.hidden_dim, params.model.latent_dim
    batch_size = params.train.batch_size
    torch.manual_seed(params.train.seed)

    images, _ = load_split(TRAIN_SPLIT)
    n_batches = -(-len(images) // batch_size)
    ours_model = VAE(hidden, latent)
    ours_optimizer = make_optimizer(ours_model, params.train.lr)
    dataset = datasets.MNIST(RAW_ROOT, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    idiomatic_model = VAE(hidden, latent)
    idiomatic_optimizer = torch.optim.Adam(idiomatic_model.parameters(), lr=params.train.lr)
    floor_model = VAE(hidden, latent)
    best = best_of_rounds(
        {
            "dataloader": lambda: dataloader_epoch(idiomatic_model, idiomatic_optimizer, loader),
            "ours": lambda: train_epoch(
                ours_model, ours_optimizer, images, batch_size, False, 1, 1
            ),
            "floor": lambda: floor_epoch(floor_model, images[:batch_size], n_batches),
        },
        args.repeats,
    )
    idiomatic, ours, floor = best["dataloader"], best["ours"], best["floor"]
    speedup, over_floor = idiomatic / ours, ours / floor
    print(
        f"one epoch, hidden {hidden}, latent {latent}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}:"
    )
    print(f"  dataloader (torchvision + DataLoader) {idiomatic:6.2f} s")
    print(f"  ours (one tensor, sliced)             {ours:6.2f} s")
    print(f"  floor (forward and backward only)     {floor:6.2f} s")
    print(
        f"  speed-up over the DataLoader path: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) "
        f"{'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'}"
    )
    print(
        f"  ours / floor: {over_floor:.2f}x (target <= {TARGET_OVER_FLOOR}x) "
        f"{'ok' if over_floor <= TARGET_OVER_FLOOR else 'MISSED'}"
    )
    # No loop over the same model can beat the floor, so this bounds the speed-up from above.
    print(f"  the floor itself is {idiomatic / floor:.2f}x faster than the DataLoader path")


if __name__ == "__main__":
    main()
