"""Slow: DVC experiments and queues, a DVC remote round trip, and a real MLflow tracking server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers.repo import (
    dvc,
    git_commit,
    grid_steps,
    python_m,
    start_server,
    stop_server,
    store,
    wait_for,
)
from helpers.workdir import trained_run_id
from pipeline.config import load_params
from pipeline.paths import EVAL_METRICS, FIGURES, TRAIN_SPLIT, WEIGHTS
from pipeline.stages import train as train_stage
from pipeline.tools.servers import free_port

pytestmark = pytest.mark.slow

# Small experiments: a narrow network on the first 10,000 training digits, in batches of 32 (313
# steps an epoch, so that the latent units are in use); what is tested is DVC and MLflow, not the
# model, and the full lab network made each experiment 20 s longer.
SMALL = ["-S", "model.hidden_dim=64", "-S", "evaluate.iwae_samples=8", "-S", "data.holdout=50000"]
SMALL += ["-S", "train.batch_size=32"]


@pytest.fixture(scope="module")
def baseline(reproduced: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reproduced repository with its results committed and a store of its own."""
    repo = tmp_path_factory.mktemp("experiments") / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    shutil.rmtree(repo / "mlruns")
    (repo / "mlflow.db").unlink()
    git_commit(repo, "baseline results")
    return repo


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params and metrics."""
    result = dvc(repo, "exp", "show", "--json")
    assert result.returncode == 0, result.stderr
    found = {}
    for commit in json.loads(result.stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: m["data"] for path, m in (data.get("metrics") or {}).items()},
                }
    return found


def runs_of(repo: Path, exp_name: str) -> list:
    client = store(repo)
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs([experiment.experiment_id], f"tags.`dvc.exp_name` = '{exp_name}'")


def test_two_queued_experiments_run_in_parallel_into_one_store_one_run_each(
    baseline: Path,
) -> None:
    # First in this module: the two workers' stages meet on a store that does not exist yet.
    # (`dvc exp run` without the queue, its data from DVC's cache: tests/e2e/test_paper.py.)
    for latent in (4, 8):
        sizes = ["-S", "train.epochs=1", "-S", f"model.latent_dim={latent}"]
        queued = dvc(baseline, "exp", "run", "--queue", *SMALL, *sizes)
        assert queued.returncode == 0, queued.stderr
    started = dvc(baseline, "queue", "start", "-j", "2")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 900
    while "Queued" in (status := dvc(baseline, "queue", "status").stdout) or "Running" in status:
        assert time.monotonic() < deadline, f"the queue did not finish in 900 s:\n{status}"
        time.sleep(1)  # `dvc queue status` itself takes about 2 s
    assert "Failed" not in status, status
    shown = experiments(baseline)
    for latent in (4, 8):
        (name, exp), *_ = [
            (n, e) for n, e in shown.items() if e["params"]["model"]["latent_dim"] == latent
        ]
        assert exp["params"]["train"]["epochs"] == 1  # -S reached params.yaml and the stage
        assert exp["metrics"]["metrics/train.json"]["epochs"] == 1
        assert 0 < exp["metrics"]["metrics/evaluate.json"]["active_units"] <= latent, status
        # One MLflow run an experiment, tagged with its name, in the repository's store (not
        # the deleted copy's): train, evaluate and sample log to it.
        runs = runs_of(baseline, name)
        assert len(runs) == 1, name
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["model.latent_dim"] == str(latent)
        assert "train/loss" in run.data.metrics and "evaluate/log_px_iwae" in run.data.metrics
        assert store(baseline).list_artifacts(run.info.run_id, "figures")
    assert not list((baseline / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))


def test_dvc_push_then_pull_into_a_fresh_clone_restores_everything(
    reproduced: tuple[Path, str], tmp_path: Path
) -> None:
    repo = tmp_path / "origin"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    assert dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "remote")).returncode == 0
    git_commit(repo, "results and a remote")
    pushed = dvc(repo, "push")
    assert pushed.returncode == 0, pushed.stderr

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    pulled = dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stderr
    assert "Running stage" not in pulled.stdout + pulled.stderr
    for path in (TRAIN_SPLIT, WEIGHTS, EVAL_METRICS, FIGURES / "manifold.png"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert (clone / "data/raw/MNIST/raw/train-images-idx3-ubyte").stat().st_size == 47040016
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    assert not (clone / "mlflow.db").exists()  # nothing ran


@pytest.fixture
def mlflow_server(tmp_path: Path) -> str:
    """`mlflow server` on a free loopback port: SQLite backend, local artifact folder."""
    port = free_port()
    server = start_server(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
        + ["--artifacts-destination", str(tmp_path / "artifacts")],
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # as the stack's: no MLflow jobs, 7 s less
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server, seconds=120)
        yield url
    finally:
        stop_server(server)


def test_training_against_a_real_tracking_server(
    mlflow_server: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    train_stage.train(load_params())
    run_id = trained_run_id(tracking_uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    for key in ("train/loss", "test/kl"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3]
    assert grid_steps(client, run_id) == [0, 1, 2, 3]
    mlflow.set_tracking_uri(mlflow_server)
    z = np.zeros((2, 4), dtype=np.float32)
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(z).shape == (2, 784)
    assert not (workdir / "mlruns").exists()  # artifacts went to the server


def test_a_server_that_does_not_answer_is_reported_in_one_line(workdir: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        # MLflow's own request timeout bounds the wait when it is shorter than the 10 s default
        result = python_m(
            workdir,
            "pipeline.stages.train",
            MLFLOW_TRACKING_URI=url,
            MLFLOW_HTTP_REQUEST_TIMEOUT="1",
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {url} did not answer (no answer within 1 s); start it, "
        "or unset MLFLOW_TRACKING_URI to use the local store"
    ]
    assert not (workdir / WEIGHTS).exists()
