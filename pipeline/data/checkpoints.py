"""Resuming: a checkpoint after every epoch, and the MLflow run that a restarted process continues.

A checkpoint holds the model, the optimizer, the RNG states, the history, the run id and the
length it was trained for. It is resumed when it was made with the same params and training data
(its fingerprint, which leaves out how long and by which step path: `train.epochs`, `train.step`,
`train.cuda_graphs`, `train.compile`) and holds fewer epochs than asked for. So a run that
stopped goes on, and a finished run is extended to more epochs. It continues its MLflow run when
that run is in the store (the caller says which runs it knows) and was started for the same
length; otherwise a new run gets the epochs so far and goes on, which is also how a checkpoint
carried to another clone (another store) resumes.
Checkpoints are working state, not DVC outputs, so they stay in torch's format, read back with
`weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.config import Params
from pipeline.data.files import atomic_path, hash_file
from pipeline.errors import first_line
from pipeline.vae.history import Epoch
from pipeline.vae.model import VAE


class Resumed(NamedTuple):
    history: list[Epoch]  # the epochs already trained (empty when starting over)
    run_id: str | None  # the MLflow run to continue; None starts a new one
    previous_run: str | None = None  # the run whose epochs a new run takes over


def fingerprint(params: Params, data_file: Path) -> str:
    """Identifies what a checkpoint was trained on: params and the exact training data, but not
    for how many epochs (a longer run continues a shorter one) nor by which step path (they
    compute the same)."""
    paths = ("epochs", "step", "cuda_graphs", "compile")
    train = {k: v for k, v in asdict(params.train).items() if k not in paths}
    config = {
        "model": asdict(params.model),
        "train": train,
        "binarize": params.data.binarize,
        "holdout": params.data.holdout,
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    return hash_file(data_file, digest).hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def portable(optimizer_state: dict) -> dict:
    """The optimizer's settings as any device resumes them: a CUDA-graphed run holds its learning
    rate as a GPU tensor and Adam in capturable mode (vae/cuda_graph.py), how it ran, not what it
    learnt; the run that resumes sets both again if it captures."""
    for group in optimizer_state["param_groups"]:
        group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return optimizer_state


def save_checkpoint(
    path: Path,
    key: str,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    history: list[Epoch],
    run_id: str,
    epochs: int,
) -> None:
    """Write the state after `history`'s last epoch of a run of `epochs`, atomically."""
    state = {
        "fingerprint": key,
        "epoch": history[-1].epoch if history else 0,
        "epochs": epochs,
        "model": model.state_dict(),
        "optimizer": portable(optimizer.state_dict()),
        "rng": rng_state(),
        "history": [asdict(row) for row in history],
        "run_id": run_id,
    }
    buffer = io.BytesIO()  # written in one call, so a full disk is an OSError naming the file
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at `path` if it was made with the same params and data, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # damaged or hostile: never unpickled, kept aside for a look
        damaged = path.with_name(path.name + ".damaged")
        os.replace(path, damaged)
        print(
            f"warning: checkpoint {path} is unreadable ({first_line(exc)[:120]}); moved it to "
            f"{damaged} and starting over",
            file=sys.stderr,
        )
        return None
    if state.get("fingerprint") != key:
        print(f"ignoring checkpoint {path}: it was made with other params or data", file=sys.stderr)
        return None
    return state


def resume_or_start(
    path: Path,
    key: str,
    epochs: int,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    run_exists: Callable[[str], bool],
) -> Resumed:
    """Load a usable checkpoint into `model`, `optimizer` and the RNGs, or start afresh."""
    state = load_checkpoint(path, key)
    if state is None:
        return Resumed([], None)
    done, run_id = state["epoch"], state["run_id"]
    if done >= epochs:
        print(f"not resuming {path}: it holds {done} epochs and train.epochs is {epochs}")
        return Resumed([], None)
    columns = {f.name for f in fields(Epoch)}
    if any(set(row) != columns for row in state["history"]):
        print(
            f"ignoring checkpoint {path}: its history has other columns than Epoch's now",
            file=sys.stderr,
        )
        return Resumed([], None)
    # Same params, but model.py may have changed its weights (a change that keeps every weight's
    # name and shape, such as another loss, is not seen here and resumes).
    saved, now = state["model"], model.state_dict()
    if saved.keys() != now.keys() or any(saved[k].shape != now[k].shape for k in now):
        print(
            f"ignoring checkpoint {path}: its weights are another network's than model.py's",
            file=sys.stderr,
        )
        return Resumed([], None)
    model.load_state_dict(saved)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    history = [Epoch(**row) for row in state["history"]]
    if state.get("epochs") != epochs:  # its run's params name another length
        print(
            f"continuing {path} (epoch {done} of a {state.get('epochs')}-epoch run) to {epochs} "
            f"epochs in a new MLflow run, which first logs the {done} so far from run {run_id}"
        )
        return Resumed(history, None, run_id)
    if not run_exists(run_id):
        print(
            f"resuming after epoch {done} from {path} in a new MLflow run: its run {run_id} "
            "is not in this store (the epochs so far are copied into the new one)"
        )
        return Resumed(history, None, run_id)
    print(f"resuming after epoch {done} from {path} (MLflow run {run_id})")
    return Resumed(history, run_id)


def kept(history: list[Epoch], path: Path, run_id: str) -> str:
    """What an interrupted run keeps, and how to go on."""
    if not history:
        return f"no epoch had finished; MLflow run {run_id} is marked KILLED"
    epochs = "epoch 1 is" if len(history) == 1 else f"epochs 1-{len(history)} are"
    return (
        f"{epochs} kept in {path} and MLflow run {run_id} is marked KILLED: run the same "
        "command again to resume"
    )
