"""`make bench` (`mnist-vae bench`): the lab's epoch five ways, the paper's step five ways, and
the real train stage.

The lab's shape (params.yaml), one epoch each:
- dataloader: the idiomatic path (torchvision MNIST + ToTensor + DataLoader(128, shuffle=True));
- ours:       the train stage's loop (one tensor on the device, a permutation sliced into batches,
              the step train.step picks: fast_step.py on the CPU);
- autograd:   the same loop with the reference step (model.py, autograd, fused Adam);
- floor:      autograd's forward and backward on one resident batch, with no optimizer step and
              no data work;
- floor+adam: the floor plus the optimizer step, so the gap between autograd and the floor splits
              into what the data costs and what Adam costs.

The paper's step, five ways: pipeline/tools/bench_step.py.

Each path runs one warm-up epoch; then they take turns for `--repeats` rounds, so a drift in the
machine's speed touches them alike, and each keeps its best epoch. Last, `python -m
pipeline.stages.train` runs with params.yaml in a scratch folder whose MLflow store already exists:
its logged epoch seconds against ours, and its wall time outside the epochs, of which a fresh
interpreter's imports are timed alone. Run it on an idle
machine: another heavy process on these cores makes every ratio meaningless.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# torchvision and MLflow are imported where they are used: time_exact_mode's fresh interpreters
# import this module for lab_epoch_seconds alone, and would wait for both.
import torch
from torch.utils.data import DataLoader

from pipeline.config import load_params
from pipeline.data.splits import load_split
from pipeline.exact import SETTINGS, SWITCH
from pipeline.paths import PROCESSED, RAW_ROOT, TRAIN_SPLIT
from pipeline.runtime import flush_denormals
from pipeline.tools.bench_step import (
    PAPER_ROUNDS,
    best_of_rounds,
    paper_steps,
    print_paper_lines,
    verdict,
)
from pipeline.vae.model import VAE, loss_terms
from pipeline.vae.step import use_fast_step
from pipeline.vae.training import train_epoch, vae_and_optimizer

# ours against the DataLoader path and the floor; the stage's epochs against ours; the stage's
# time outside its epochs (imports, the store, pictures, checkpoints, the model) in seconds.
TARGET_SPEEDUP, TARGET_OVER_FLOOR = 2.5, 1.2
TARGET_STAGE_EPOCH, TARGET_OUTSIDE_S = 1.1, 5.0


def dataloader_epoch(model: VAE, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    model.train()
    for x, _ in loader:
        recon, kl = loss_terms(model, x.view(len(x), -1))
        loss = recon.sum() + kl.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def floor_epoch(
    model: VAE, batch: torch.Tensor, n_batches: int, optimizer: torch.optim.Optimizer | None = None
) -> None:
    for _ in range(n_batches):
        recon, kl = loss_terms(model, batch)
        model.zero_grad(set_to_none=True)
        (recon.sum() + kl.sum()).backward()
        if optimizer is not None:
            optimizer.step()


def time_start_up() -> float:
    """Wall seconds a fresh interpreter takes to import the train stage and make an optimizer
    (torch.optim imports torch._dynamo on first use): the part of the stage's time outside its
    epochs that belongs to the libraries."""
    code = "import torch; from pipeline.stages import train; "
    code += "torch.optim.Adam([torch.zeros(1, requires_grad=True)])"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def time_train_stage() -> tuple[float, list[float]]:
    """Run the train stage as `dvc repro` does, in a scratch folder with this repository's
    params.yaml and data; return its wall seconds and the epoch seconds it logged to MLflow."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        work = Path(scratch)
        (work / PROCESSED).parent.mkdir(parents=True, exist_ok=True)
        (work / PROCESSED).symlink_to(PROCESSED.resolve())
        shutil.copy("params.yaml", work)
        create_store = "from pipeline import config; from pipeline.tracking import store; "
        create_store += "store.connect(config.load_params().mlflow.experiment)"
        subprocess.run([sys.executable, "-c", create_store], cwd=work, env=env, check=True)
        start = time.perf_counter()
        command = [sys.executable, "-m", "pipeline.stages.train"]
        subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        run_id = run.info.run_id
        logged = client.get_metric_history(run_id, "train/epoch_seconds")
        return wall, [metric.value for metric in sorted(logged, key=lambda m: m.step)]


def lab_epoch_seconds(repeats: int) -> list[float]:
    """The train stage's epoch (params.yaml, the step train.step picks) `repeats` times after a
    warm-up, in this process: what `time_exact_mode` runs in a fresh interpreter per mode."""
    params = load_params()
    images, _ = load_split(TRAIN_SPLIT)
    model, optimizer = vae_and_optimizer(params.model, params.train, images)
    fast = use_fast_step(params.train.step, model, optimizer, images)
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        train_epoch(model, optimizer, images, params.train.batch_size, False, 1, 1, fast=fast)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def time_exact_mode(repeats: int) -> dict[str, float]:
    """The lab's epoch with exact mode on and off (pipeline/exact.py: set before torch loads, so
    a fresh interpreter each), taking turns; the best epoch of each."""
    code = "from pipeline.tools import bench; print(min(bench.lab_epoch_seconds(2)))"
    best = {"on": float("inf"), "off": float("inf")}
    for _ in range(max(1, repeats // 2)):
        for mode, switch in (("on", "1"), ("off", "0")):
            env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
            env[SWITCH] = switch
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
            )
            best[mode] = min(best[mode], float(out.stdout.split()[-1]))
    return best


def run(repeats: int = 5) -> None:
    """Time the lab's five paths, the paper's five and the train stage; print the figures and
    the targets."""
    flush_denormals()  # as the train stage does, for every path alike
    params = load_params()
    hidden, latent = params.model.hidden_dim, params.model.latent_dim
    batch_size = params.train.batch_size
    torch.manual_seed(params.train.seed)

    images, _ = load_split(TRAIN_SPLIT)
    n_batches = -(-len(images) // batch_size)
    new_model = partial(vae_and_optimizer, params.model, params.train, images)
    ours_model, ours_optimizer = new_model()
    autograd_model, autograd_optimizer = new_model()
    fast = use_fast_step(params.train.step, ours_model, ours_optimizer, images)
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(RAW_ROOT, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    idiomatic_model, _ = new_model()
    idiomatic_optimizer = torch.optim.Adam(idiomatic_model.parameters(), lr=params.train.lr)
    floor_model, _ = new_model()
    stepped_model, stepped_optimizer = new_model()
    best = best_of_rounds(
        {
            "dataloader": lambda: dataloader_epoch(idiomatic_model, idiomatic_optimizer, loader),
            "ours": lambda: train_epoch(
                ours_model, ours_optimizer, images, batch_size, False, 1, 1, fast=fast
            ),
            "autograd": lambda: train_epoch(
                autograd_model, autograd_optimizer, images, batch_size, False, 1, 1
            ),
            "floor": lambda: floor_epoch(floor_model, images[:batch_size], n_batches),
            "floor+adam": lambda: floor_epoch(
                stepped_model, images[:batch_size], n_batches, stepped_optimizer
            ),
        },
        repeats,
    )
    idiomatic, ours, autograd, floor, stepped = (
        best[k] for k in ("dataloader", "ours", "autograd", "floor", "floor+adam")
    )
    speedup, over_floor = idiomatic / ours, ours / floor
    paper, steps_a_round = paper_steps(PAPER_ROUNDS * repeats)
    stage_wall, stage_epochs = time_train_stage()
    stage_epoch, outside = min(stage_epochs), stage_wall - sum(stage_epochs)
    start_up = min(time_start_up() for _ in range(min(3, repeats)))
    exact = time_exact_mode(repeats)
    print(
        f"one epoch, hidden {hidden}, latent {latent}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, best of {repeats}:"
    )
    print(f"  dataloader (torchvision + DataLoader)  {idiomatic:6.2f} s")
    print(f"  ours (one tensor, sliced, step {'fast' if fast else 'autograd'})  {ours:6.2f} s")
    print(f"  the same with the autograd step        {autograd:6.2f} s")
    print(f"  floor (autograd forward and backward)  {floor:6.2f} s")
    print(f"  floor + Adam step                      {stepped:6.2f} s")
    print(
        f"  speed-up over the DataLoader path: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) "
        f"{verdict(speedup >= TARGET_SPEEDUP)}"
    )
    print(
        f"  ours / floor: {over_floor:.2f}x (target <= {TARGET_OVER_FLOOR}x) "
        f"{verdict(over_floor <= TARGET_OVER_FLOOR)}; ours / (floor + Adam step): "
        f"{ours / stepped:.2f}x; autograd step / ours: {autograd / ours:.2f}x"
    )
    # No loop over the same model can beat the floor, so this bounds the speed-up from above.
    print(f"  the floor itself is {idiomatic / floor:.2f}x faster than the DataLoader path")
    print(
        f"  exact mode (pipeline/exact.py), a fresh interpreter each: on {exact['on']:.2f} s, "
        f"off {exact['off']:.2f} s; on / off {exact['on'] / exact['off']:.2f}x"
    )
    print_paper_lines(paper, PAPER_ROUNDS * repeats, steps_a_round)
    print(f"train stage, {len(stage_epochs)} epochs, a store that exists: {stage_wall:.1f} s wall")
    stage_over_ours = stage_epoch / ours
    print(
        f"  epochs it logged: best {stage_epoch:.2f} s, median "
        f"{statistics.median(stage_epochs):.2f} s; best / ours {stage_over_ours:.2f}x "
        f"(target <= {TARGET_STAGE_EPOCH}x) {verdict(stage_over_ours <= TARGET_STAGE_EPOCH)}"
    )
    print(
        f"  outside its epochs: {outside:.1f} s (target <= {TARGET_OUTSIDE_S:.0f} s) "
        f"{verdict(outside <= TARGET_OUTSIDE_S)}; of which {start_up:.1f} s start Python and "
        "import torch, MLflow and torch._dynamo (best of up to 3, a fresh interpreter each)"
    )
