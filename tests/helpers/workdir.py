"""Tiny synthetic MNIST and a repository-like working folder, so fast tests never touch the real
data set."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from helpers.repo import committed_params
from pipeline.config import SAFE_LOADER
from pipeline.data import mnist
from pipeline.data.splits import save_split
from pipeline.paths import TEST_SPLIT, TRAIN_SPLIT


def tiny_mnist(folder: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict:
    """Write four small IDX files named like MNIST's; return digests in mnist.json's form."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    reference = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        # Blobby digits: a bright square whose position depends on the label, plus noise.
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = 2 + 2 * (label // 5) * 5, 2 + 4 * (label % 5)
            images[i, row : row + 8, col : col + 6] = 230
        for name, array in (
            (f"{split}-images-idx3-ubyte", images),
            (f"{split}-labels-idx1-ubyte", labels),
        ):
            mnist.write_idx(folder / name, array)
            blob = (folder / name).read_bytes()
            reference[name] = {
                "md5": hashlib.md5(blob).hexdigest(),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
                "count": n,
            }
    return reference


def write_params(folder: Path, **overrides: dict) -> dict:
    """params.yaml for a tiny, fast model; `overrides` maps a section to the keys it changes.

    It starts from the lab's committed params.yaml, not the workspace's: `dvc exp run` leaves an
    experiment's params applied there.
    """
    params = yaml.load(committed_params(), Loader=SAFE_LOADER)
    params["model"].update(hidden_dim=32, latent_dim=4)
    params["train"].update(epochs=3, batch_size=32, device="cpu")
    params["evaluate"].update(iwae_samples=8, batch_size=64)
    for section, values in overrides.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def make_workdir(folder: Path, mlflow_template: Path) -> Path:
    """A repository-like folder with tiny processed data, params.yaml and its own MLflow store."""
    work = folder / "work"
    work.mkdir()
    tiny_mnist(folder / "raw", n_train=256, n_test=64)
    for split, path in (("train", TRAIN_SPLIT), ("t10k", TEST_SPLIT)):
        images = mnist.read_idx(folder / "raw" / f"{split}-images-idx3-ubyte")
        labels = mnist.read_idx(folder / "raw" / f"{split}-labels-idx1-ubyte")
        save_split(work / path, torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()))
    write_params(work)
    shutil.copy(mlflow_template, work / "mlflow.db")
    return work


def train_tiny() -> str:
    """Run the train stage in the working folder on one thread; the MLflow run's id."""
    from pipeline.config import load_params
    from pipeline.stages import train as train_stage

    torch.set_num_threads(1)
    train_stage.train(load_params())
    return trained_run_id()


def run_evaluation_after_training() -> dict:
    """Train, then evaluate (which registers the model); evaluate's metrics."""
    from pipeline.config import load_params
    from pipeline.stages.evaluate import run_evaluation

    train_tiny()
    return run_evaluation(load_params())


def trained_run_id(repo: Path = Path("."), tracking_uri: str | None = None) -> str:
    """The MLflow run that trained `repo`'s models/vae.safetensors (found by its weights' tag)."""
    from mlflow.tracking import MlflowClient

    from pipeline.paths import WEIGHTS
    from pipeline.tracking.runs import training_run_of

    client = MlflowClient(tracking_uri or f"sqlite:///{(repo / 'mlflow.db').resolve()}")
    run = training_run_of(repo / WEIGHTS, client=client)
    assert run is not None, f"no run in {client.tracking_uri} trained {repo / WEIGHTS}"
    return run.info.run_id
