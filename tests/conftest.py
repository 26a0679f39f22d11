"""Shared fixtures: tiny synthetic MNIST files, so fast tests never touch the real data set."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import mnist as data

REPO_ROOT = Path(__file__).resolve().parent.parent


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
            data.write_idx(folder / name, array)
            blob = (folder / name).read_bytes()
            reference[name] = {
                "md5": hashlib.md5(blob).hexdigest(),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
                "count": n,
            }
    return reference


@pytest.fixture
def tiny_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of tiny IDX files, with mnist.py's reference digests swapped for theirs."""
    folder = tmp_path / "tiny"
    monkeypatch.setattr(data, "FILES", tiny_mnist(folder))
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run a stage in a workdir are marked `stage`: `make mutants` leaves them out."""
    for item in items:
        if "workdir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stage)


@pytest.fixture(scope="session")
def session_threads() -> int:
    """torch's thread count when the session started (requested first, by the autouse below)."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def restore_torch_threads(session_threads: int):
    """Tests that pin torch's thread count (for comparable runs) must not pin the next test's."""
    import torch

    yield
    torch.set_num_threads(session_threads)


@pytest.fixture(scope="session", autouse=True)
def started_runtime() -> None:
    """What every entry point does first (tests call the stages' functions, not their mains)."""
    from pipeline import runtime

    runtime.start()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store: copying it is much faster than creating one."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def set_params():
    """`set_params(folder, train={"lr": 0.01})` writes a tiny-model params.yaml into `folder`."""
    return write_params


def write_params(folder: Path, **overrides: dict) -> dict:
    """params.yaml for a tiny, fast model; `overrides` maps a section to the keys it changes.

    It starts from the lab's committed params.yaml, not the workspace's: `dvc exp run` leaves an
    experiment's params applied there.
    """
    import yaml

    from helpers import committed_params

    params = yaml.safe_load(committed_params())
    params["model"].update(hidden_dim=32, latent_dim=4)
    params["train"].update(epochs=3, batch_size=32, device="cpu")
    params["evaluate"].update(iwae_samples=8, batch_size=64)
    for section, values in overrides.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def make_workdir(folder: Path, mlflow_template: Path) -> Path:
    """A repository-like folder with tiny processed data, params.yaml and its own MLflow store."""
    import shutil

    import torch

    from pipeline.paths import TEST_SPLIT, TRAIN_SPLIT

    work = folder / "work"
    work.mkdir()
    tiny_mnist(folder / "raw", n_train=256, n_test=64)
    for split, path in (("train", TRAIN_SPLIT), ("t10k", TEST_SPLIT)):
        images = data.read_idx(folder / "raw" / f"{split}-images-idx3-ubyte")
        labels = data.read_idx(folder / "raw" / f"{split}-labels-idx1-ubyte")
        data.save_split(
            work / path, torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
        )
    write_params(work)
    shutil.copy(mlflow_template, work / "mlflow.db")
    return work


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path) -> Path:
    """`make_workdir` as the working directory, with no outside tracking URI."""
    work = make_workdir(tmp_path, mlflow_template)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fresh copy of the repository after `dvc repro` on real MNIST, and what it printed."""
    from helpers import copy_working_tree, dvc

    repo = copy_working_tree(tmp_path_factory.mktemp("pipeline"))
    result = dvc(repo, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return repo, result.stdout
