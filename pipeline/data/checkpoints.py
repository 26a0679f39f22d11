"""Resuming: a checkpoint after every epoch, and the MLflow run that a restarted process continues.

A checkpoint holds the model, the optimizer, the RNG states, the history and the run id. It is
resumed only when it was made with the same params and training data (its fingerprint) and its
MLflow run is still in the store (the caller says which runs it knows); otherwise training starts
over. Checkpoints are working state,
not DVC outputs, so they stay in torch's format, read back with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.config import Params
from pipeline.data.files import atomic_path, hash_file
from pipeline.errors import first_line
from pipeline.vae.model import VAE
from pipeline.vae.training import Epoch


class Resumed(NamedTuple):
    history: list[Epoch]  # the epochs already trained (empty when starting over)
    run_id: str | None  # the MLflow run to continue; None starts a new one


def fingerprint(params: Params, data_file: Path) -> str:
    """Identifies what a checkpoint was trained on: params and the exact training data."""
    config = {
        "model": asdict(params.model),
        "train": asdict(params.train),
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


def save_checkpoint(
    path: Path,
    key: str,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    history: list[Epoch],
    run_id: str,
) -> None:
    state = {
        "fingerprint": key,
        "epoch": history[-1].epoch if history else 0,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
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
    model: VAE,
    optimizer: torch.optim.Optimizer,
    run_exists: Callable[[str], bool],
) -> Resumed:
    """Load a usable checkpoint into `model`, `optimizer` and the RNGs, or start afresh."""
    state = load_checkpoint(path, key)
    if state is None:
        return Resumed([], None)
    if not run_exists(state["run_id"]):
        print(f"ignoring checkpoint {path}: its MLflow run {state['run_id']} is not in the store")
        return Resumed([], None)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    history = [Epoch(**row) for row in state["history"]]
    print(f"resuming after epoch {len(history)} from {path} (MLflow run {state['run_id']})")
    return Resumed(history, state["run_id"])


def kept(history: list[Epoch], path: Path, run_id: str) -> str:
    """What an interrupted run keeps, and how to go on."""
    if not history:
        return f"no epoch had finished; MLflow run {run_id} is marked KILLED"
    return (
        f"epochs 1-{len(history)} are kept in {path} and MLflow run {run_id} is marked "
        "KILLED: run the same command again to resume"
    )
