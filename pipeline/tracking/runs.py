"""MLflow: where runs go, what a training run records, and how later stages find that run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import safetensors
import torch
import yaml
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.data.files import hash_file, read_tensors, write_json
from pipeline.data.mnist import FILES as CANONICAL
from pipeline.errors import Interrupted, PipelineError, first_line
from pipeline.paths import TEST_SPLIT, TRAIN_SPLIT
from pipeline.tracking import pyfunc as serving
from pipeline.vae.model import VAE
from pipeline.vae.training import Epoch

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
    return TrackingError(f"the MLflow store {uri} cannot be used ({first_line(exc)[:200]})")


# Files DVC rewrites as the pipeline runs: changing them does not make the code dirty.
DVC_OWNED = ("dvc.lock", "metrics", "plots", "figures")


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    excluded = [f":(exclude){path}" for path in DVC_OWNED]
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def data_version(lock: Path = Path("dvc.lock")) -> str:
    """The processed data's hash as dvc.lock records it ("unknown" outside a DVC run)."""
    try:
        outs = yaml.safe_load(lock.read_text())["stages"]["preprocess"]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "unknown"
    return next((out["md5"] for out in outs if out["path"] == "data/processed"), "unknown")


def run_tags(device: torch.device) -> dict[str, str]:
    tags = {**git_tags(), "torch.version": torch.__version__, "device": str(device)}
    tags |= {"data.version": data_version(), "dvc.stage": "train"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def run_name(params: Params) -> str:
    """The DVC experiment's name, else what the run is: h400-z20-e10 (-dyn: binarised pixels)."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    model, train = params.model, params.train
    layers = f"x{model.hidden_layers}" if model.hidden_layers > 1 else ""
    name = f"h{model.hidden_dim}{layers}-z{model.latent_dim}-e{train.epochs}"
    return name + ("-dyn" if params.data.binarize == "dynamic" else "")


def describe_training(params: Params) -> str:
    """The run's description (MLflow's note): what was trained, in a sentence."""
    m, t = params.model, params.train
    pixels = "dynamically binarised" if params.data.binarize == "dynamic" else "grey-level"
    hidden = "-".join([str(m.hidden_dim)] * m.hidden_layers)
    schedule = "Burda et al.'s staged schedule from" if t.schedule == "burda" else "constant"
    return (
        f"VAE on MNIST ({pixels} pixels): encoder 784-{hidden}-{m.latent_dim}, decoder "
        f"{m.latent_dim}-{hidden}-784 ({m.activation}); {t.epochs} epochs, batch "
        f"{t.batch_size}, Adam lr {schedule} {t.lr}, seed {t.seed}."
    )


def log_datasets(train_file: Path, test_file: Path) -> None:
    """MNIST train and test as the run's dataset inputs, named by their canonical digests."""
    for name, path, canonical in (
        ("mnist-train", train_file, "train-images-idx3-ubyte"),
        ("mnist-test", test_file, "t10k-images-idx3-ubyte"),
    ):
        tensors, _ = read_tensors(path, "dvc repro preprocess")
        with warnings.catch_warnings():  # MLflow registers local files under two names
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                tensors["images"].numpy(),
                targets=tensors["labels"].numpy(),
                source=str(Path(path).resolve()),
                name=name,
                digest=CANONICAL[canonical]["md5"],
            )
        mlflow.log_input(dataset, context="training" if name == "mnist-train" else "testing")


def run_status(run_id: str) -> str | None:
    """The run's status (FINISHED, KILLED, ...), or None when the store does not have it."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


@contextmanager
def training_run(
    run_id: str | None, experiment_id: str, params: Params, device: torch.device
) -> Iterator[str]:
    """Continue the run `run_id`, or start one with the params and tags; yield its id."""
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name(params),
        description=None if run_id else describe_training(params),
        log_system_metrics=True,  # CPU, memory (and GPU when present) beside the curves
    ) as run:
        if run_id is None:
            mlflow.log_params(params.flat())
            mlflow.set_tags(run_tags(device))
            log_datasets(TRAIN_SPLIT, TEST_SPLIT)
        try:
            yield run.info.run_id
        except Interrupted:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))  # resumable, not failed
            raise


def log_pictures(step: int, pictures: dict[str, np.ndarray]) -> None:
    """Images for the UI's step slider, written synchronously (mlflow.log_image defaults to a
    queue, whose join costs up to 1 s at exit and which kill -9 would lose)."""
    for key, picture in pictures.items():
        mlflow.log_image(picture, key=key, step=step, synchronous=True)


def log_epoch(row: Epoch, pictures: dict[str, np.ndarray] | None) -> None:
    """The epoch's metrics (step = epoch), after its pictures when there are any.

    The pictures come first: a step with metrics then always has them, even after kill -9,
    which is what resuming relies on.
    """
    if pictures:
        log_pictures(row.epoch, pictures)
    values = asdict(row)
    metrics = {
        f"{split}/{term}": values[f"{split}_{term}"]
        for split in ("train", "test")
        for term in ("loss", "recon", "kl")
    }
    metrics["train/epoch_seconds"] = row.seconds
    metrics["train/lr"] = row.lr
    mlflow.log_metrics(metrics, step=row.epoch)


def unlogged(run_id: str, history: list[Epoch]) -> list[Epoch]:
    """The epochs of `history` whose metrics are not in the run (checkpointed, then killed)."""
    logged = logged_steps(run_id, "train/loss")
    return [row for row in history if row.epoch not in logged]


def log_trained_model(model: VAE, weights: Path) -> None:
    """What the end of training adds to the run: the model and its weights file (the curves
    are the run's metrics; the sample stage adds the figures)."""
    log_vae_model(weights, model.latent_dim)
    mlflow.log_artifact(str(weights), "weights")


def log_vae_model(weights: Path, latent_dim: int) -> None:
    """Log the whole VAE as the run's MLflow model: decode, encode, reconstruct and score.

    Logged from code with this package as its code and the weights in safetensors: loading it
    unpickles nothing and needs nothing from this repository.
    """
    package = Path(__file__).resolve().parent.parent
    example = np.random.default_rng(0).standard_normal((2, latent_dim)).astype(np.float32)
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package / "tracking" / "model_code.py"),
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
    status = run_status(trained_in)
    if status is not None:
        with mlflow.start_run(run_id=trained_in) as run:
            try:
                yield run, True
            except BaseException:
                mlflow.end_run(status)  # a failed evaluation does not make training fail
                raise
        return
    tags = {"trained_in_run": trained_in}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        print(
            f"MLflow run {trained_in} (from {run_info}) is not in {tracking_uri()}; "
            f"logging to new run {run.info.run_id}, tagged trained_in_run={trained_in}"
        )
        yield run, False


def file_digest(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()[:16]


def log_evaluation(metrics: dict, results: str, step: int) -> None:
    """Evaluate's part of the run: two test-set results at the last epoch's step, beside the
    test curves (whose last step already holds the test loss and its terms), the breakdowns as
    tables and the results in the description."""
    reported = ("log_px_iwae", "log_px_iwae_se", "active_units")
    results_now = {f"test/{key}": metrics[key] for key in reported}
    mlflow.log_metrics(results_now, step=step)
    units = range(len(metrics["kl_per_dim"]))
    with warnings.catch_warnings():  # pandas 3 deprecation raised inside MLflow's log_table
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        log_tables(metrics, units)
    mlflow.log_dict(metrics, "evaluation/metrics.json")
    note = mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("mlflow.note.content")
    training = (note or "").split("\n\n")[0]
    mlflow.set_tag("mlflow.note.content", f"{training}\n\n{results}".strip())


def log_tables(metrics: dict, units: range) -> None:
    mlflow.log_table(
        {
            "unit": [f"z{d}" for d in units],
            "kl": list(metrics["kl_per_dim"].values()),
            "activity": list(metrics["activity_per_dim"].values()),
        },
        artifact_file="evaluation/latent_units.json",
    )
    per_class = metrics["loss_per_class"]
    mlflow.log_table(
        {"digit": list(per_class), "loss": list(per_class.values())},
        artifact_file="evaluation/loss_per_class.json",
    )


def flatten_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """{"a": 1, "b": {"c": 2}} -> {"prefix/a": 1, "prefix/b/c": 2}, the form MLflow logs."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}/{key}"))
        else:
            flat[f"{prefix}/{key}"] = float(value)
    return flat
