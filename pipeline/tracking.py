"""MLflow: where runs go, what a training run records, and how later stages find that run."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import safetensors
import torch
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import serving
from pipeline.config import Params
from pipeline.errors import Interrupted, PipelineError
from pipeline.figures import loss_curves
from pipeline.files import write_json
from pipeline.model import VAE
from pipeline.training import Epoch

SERVER_TIMEOUT_S = 10  # connect + read; well inside the 30 s the user is promised


class TrackingError(PipelineError):
    pass


def store_root(cwd: Path | None = None) -> Path:
    """The repository that owns the default MLflow store.

    `dvc exp run --queue` runs stages in copies under <repo>/.dvc/tmp/exps/; their runs must land
    in <repo>'s store, not in the copy that is deleted afterwards.
    """
    root = (cwd or Path.cwd()).resolve()
    if ".dvc" in root.parts:
        root = Path(*root.parts[: root.parts.index(".dvc")])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail in one line, within SERVER_TIMEOUT_S, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S).close()
    except (OSError, urllib.error.URLError) as exc:  # refused, unknown host, timeout, HTTP error
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {SERVER_TIMEOUT_S} s"
        elif isinstance(reason, Exception):
            reason = str(reason) or type(reason).__name__
        raise TrackingError(
            f"MLflow tracking server {uri} did not answer ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to use the local store"
        ) from None


def connect(experiment: str) -> str:
    """Point MLflow at the store, check that it answers, and return the experiment's id."""
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except Exception as exc:  # SQLAlchemy's or MLflow's: the store itself is unusable
        raise store_error(uri, exc) from None
    if found is not None:
        return found.experiment_id
    # Only the default local store gets an explicit artifact folder; a server decides its own.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (store_root() / "mlruns").as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel experiment
        return mlflow.get_experiment_by_name(experiment).experiment_id


def store_error(uri: str, exc: Exception) -> TrackingError:
    """One line for a store that cannot be opened: not a database, locked, or refusing."""
    text = str(exc)
    if "database is locked" in text:
        return TrackingError(
            f"the MLflow store {uri} is locked by another process; wait for it to finish, "
            "or use a tracking server (MLFLOW_TRACKING_URI) for parallel runs"
        )
    if "file is not a database" in text or "no such table" in text:
        path = uri.removeprefix("sqlite:///")
        return TrackingError(
            f"{path} is not an MLflow database; move it away (a new store is created on the next "
            "run) or set MLFLOW_TRACKING_URI to your store"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return TrackingError(f"the MLflow store {uri} cannot be used ({first[:200]})")


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def run_tags(device: torch.device) -> dict[str, str]:
    tags = {**git_tags(), "torch.version": torch.__version__, "device": str(device)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


@contextmanager
def training_run(
    run_id: str | None, experiment_id: str, params: Params, device: torch.device
) -> Iterator[str]:
    """Continue the run `run_id`, or start one with the params and tags; yield its id."""
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run:
        if run_id is None:
            mlflow.log_params(params.flat())
            mlflow.set_tags(run_tags(device))
        try:
            yield run.info.run_id
        except Interrupted:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))  # resumable, not failed
            raise


def log_epoch(row: Epoch, grid: np.ndarray | None) -> None:
    """The epoch's metrics (step = epoch), after its grid of digits when there is one.

    The grid is written before the metrics, and synchronously (mlflow.log_image defaults to a
    queue): a step with metrics then always has its grid, even after kill -9, which is what
    resuming relies on. The queue would also cost up to 1 s at exit, joined once per run.
    """
    if grid is not None:
        mlflow.log_image(grid, key="generated", step=row.epoch, synchronous=True)
    values = asdict(row)
    metrics = {
        f"{split}/{term}": values[f"{split}_{term}"]
        for split in ("train", "test")
        for term in ("loss", "recon", "kl")
    }
    metrics["train/epoch_seconds"] = row.seconds
    mlflow.log_metrics(metrics, step=row.epoch)


def unlogged(run_id: str, history: list[Epoch]) -> list[Epoch]:
    """The epochs of `history` whose metrics are not in the run (checkpointed, then killed)."""
    logged = logged_steps(run_id, "train/loss")
    return [row for row in history if row.epoch not in logged]


def log_trained_model(model: VAE, history: list[Epoch], weights: Path) -> None:
    """What the end of training adds to the run: the curves, the model, the weights file."""
    mlflow.log_figure(loss_curves([asdict(row) for row in history]), "figures/loss_curves.png")
    log_vae_model(weights, model.latent_dim)
    mlflow.log_artifact(str(weights), "weights")


def log_vae_model(weights: Path, latent_dim: int) -> None:
    """Log the whole VAE as the run's MLflow model: decode, encode, reconstruct and score.

    Logged from code with this package as its code and the weights in safetensors: loading it
    unpickles nothing and needs nothing from this repository.
    """
    package = Path(__file__).resolve().parent
    example = np.random.default_rng(0).standard_normal((2, latent_dim)).astype(np.float32)
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package / "mlflow_model.py"),
        artifacts={"weights": str(weights)},
        code_paths=[str(package)],
        signature=serving.signature(),
        input_example=(example, {"method": "decode"}),
        metadata={"latent_dim": latent_dim, "image_dim": 784, "methods": list(serving.METHODS)},
        # Declared, not inferred: inference loads the model in a subprocess (seconds).
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}",
            f"numpy=={np.__version__}",
        ],
    )


def write_run_info(path: Path, run_id: str, experiment_id: str) -> None:
    write_json(path, {"run_id": run_id, "experiment_id": experiment_id})


def read_run_info(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrackingError(f"{path}: not found; run `dvc repro train` first") from None


@contextmanager
def attached_run(experiment: str, run_info: Path) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
    """The MLflow run that trained the model and True; or, when this store does not have it
    (outputs restored from a DVC cache made elsewhere), a new run tagged with its id and False."""
    experiment_id = connect(experiment)
    trained_in = read_run_info(run_info)["run_id"]
    if run_exists(trained_in):
        with mlflow.start_run(run_id=trained_in) as run:
            yield run, True
        return
    tags = {"trained_in_run": trained_in}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        print(
            f"MLflow run {trained_in} (from {run_info}) is not in {tracking_uri()}; "
            f"logging to new run {run.info.run_id}, tagged trained_in_run={trained_in}"
        )
        yield run, False


def flatten_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """{"a": 1, "b": {"c": 2}} -> {"prefix/a": 1, "prefix/b/c": 2}, the form MLflow logs."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}/{key}"))
        else:
            flat[f"{prefix}/{key}"] = float(value)
    return flat
