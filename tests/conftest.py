"""Shared fixtures; the functions behind them are in the `helpers` package."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Before anything imports pipeline: the suite runs with exact mode off (oneMKL's compatible branch
# makes the big products 2-3x slower). tests/test_exact.py and the e2e pipeline switch it on.
os.environ.setdefault("MNIST_VAE_EXACT", "0")

import pytest

from helpers.repo import copy_working_tree, dvc
from helpers.workdir import make_workdir, tiny_mnist, write_params
from pipeline.data import mnist as data


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
def mlflow_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An empty, migrated MLflow SQLite store: copying it is much faster than creating one.

    Kept between runs in pytest's cache (.pytest_cache), one per MLflow release: its migrations
    take about two seconds of every run otherwise."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    kept = cache.mkdir("mlflow-template") / f"mlflow-{mlflow.__version__}.db" if cache else None
    if kept is not None and kept.exists():
        shutil.copy(kept, path)
        return path
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    if kept is not None:
        writing = kept.with_suffix(f".{os.getpid()}")
        shutil.copy(path, writing)
        writing.replace(kept)  # another run finds it whole or not at all
    return path


@pytest.fixture
def set_params():
    """`set_params(folder, train={"lr": 0.01})` writes a tiny-model params.yaml into `folder`."""
    return write_params


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path) -> Path:
    """`make_workdir` as the working directory, with no outside tracking URI."""
    work = make_workdir(tmp_path, mlflow_template)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fresh copy of the repository after `make repro`'s `dvc repro --force-downstream` on real
    MNIST, and what it printed.

    In exact mode, as make repro: the model is then the same bytes on every x86 CPU, so checks
    that draw on it once (the monitor passing one clean batch, which a model trained otherwise
    would fail in about 4% of trainings) hold everywhere if they held here. Exact mode off made
    it about 40 s faster."""
    repo = copy_working_tree(tmp_path_factory.mktemp("pipeline"))
    result = dvc(repo, "repro", "--force-downstream", MNIST_VAE_EXACT="1")  # as make repro
    assert result.returncode == 0, result.stdout + result.stderr
    return repo, result.stdout


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """A folder whose store has a tiny trained, evaluated model as models:/mnist-vae@champion
    (trained once per test module that asks for it)."""
    import torch

    from pipeline.config import load_params
    from pipeline.stages import train as train_stage
    from pipeline.stages.evaluate import run_evaluation

    work = make_workdir(tmp_path_factory.mktemp("registered"), mlflow_template)
    write_params(work, train={"epochs": 1})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(work)
        threads = torch.get_num_threads()
        train_stage.train(load_params())
        run_evaluation(load_params())  # the first model evaluated becomes @champion
        torch.set_num_threads(threads)
    return work
