"""A training run in MLflow: started or continued, one step per epoch, pictures, the model, and the
evaluate and sample stages attaching their results to the run that trained the model."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import Params
from pipeline.data.files import hash_file
from pipeline.errors import Interrupted, TrackingError
from pipeline.paths import TEST_SPLIT, TRAIN_SPLIT
from pipeline.tracking.provenance import (
    describe_training,
    log_datasets,
    run_name,
    run_tags,
    this_process,
)
from pipeline.tracking.pyfunc import log_vae_model
from pipeline.tracking.store import connect, tracking_uri
from pipeline.vae.evaluation import SCALAR_METRICS
from pipeline.vae.history import MLFLOW_METRICS


def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


@contextmanager
def training_run(
    run_id: str | None,
    experiment_id: str,
    params: Params,
    device: torch.device,
    history: list,
    draw_pictures: Callable[[], dict[str, np.ndarray]],
    previous_run: str | None = None,
) -> Iterator[str]:
    """Start a run with the params, tags, datasets and the untrained model's pictures (step 0),
    or continue the run `run_id`: tag the code and machine it resumes with, and log the epochs of
    `history` (dataclass rows) it lacks. A new run with a `history` takes over `previous_run`'s
    epochs: it logs them and names that run.
    Yield the run's id; an interruption ends the run as KILLED (resumable, not failed)."""
    rows = [asdict(row) for row in history]
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
            if history:  # no untrained model to draw at step 0: the epochs come from a checkpoint
                mlflow.set_tag("continues_run", previous_run)
                log_missing_epochs(run.info.run_id, rows, draw_pictures, params.train.epochs)
            else:
                log_pictures(0, draw_pictures())
        else:
            mlflow.set_tag(f"resumed_at_epoch_{len(history) + 1}", this_process(device))
            log_missing_epochs(run_id, rows, draw_pictures, params.train.epochs)
        try:
            yield run.info.run_id
        except Interrupted:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise


# zlib's level for the pictures' PNGs (Pillow's default is 6): they are written inside the training
# loop, and level 1 encodes the lab's grids in a third to half the time, for a third more bytes.
PNG_COMPRESS_LEVEL = 1


def log_pictures(step: int, pictures: dict[str, np.ndarray]) -> None:
    """Images for the UI's step slider, written synchronously (mlflow.log_image defaults to a
    queue, whose join delays the exit and which kill -9 would lose)."""
    for key, picture in pictures.items():
        image = Image.fromarray(picture)
        image.encoderinfo = {"compress_level": PNG_COMPRESS_LEVEL}  # Pillow's save reads it
        mlflow.log_image(image, key=key, step=step, synchronous=True)


# A long run's pictures: its first 10 epochs, then about 100 spread over it (the paper's 3,280
# epochs would otherwise leave 6,560 images in the store; 1,022 of them measured 43 MB).
FIRST_PICTURED, PICTURED_EPOCHS = 10, 100


def pictured(epoch: int, epochs: int) -> bool:
    """Whether epoch `epoch` of a run of `epochs` logs pictures: every epoch of a run of up to
    100; in a longer one the first 10, every k-th so that about 100 do, and the last."""
    every = -(-epochs // PICTURED_EPOCHS)
    return epoch <= FIRST_PICTURED or epoch % every == 0 or epoch == epochs


def log_epoch(
    row: dict, draw_pictures: Callable[[], dict[str, np.ndarray]] | None, epochs: int
) -> None:
    """One epoch's history row (an `Epoch` as a dict) as its MLFLOW_METRICS at step = epoch,
    after its pictures when `draw_pictures` is given and the epoch is `pictured`.

    The pictures come first: a step with metrics then always has them, even after kill -9,
    which is what resuming relies on.
    """
    if draw_pictures and pictured(row["epoch"], epochs):
        log_pictures(row["epoch"], draw_pictures())
    metrics = {key: row[name] for name, key in MLFLOW_METRICS.items()}
    mlflow.log_metrics(metrics, step=row["epoch"])


def log_missing_epochs(
    run_id: str,
    history: list[dict],
    draw_pictures: Callable[[], dict[str, np.ndarray]],
    epochs: int,
) -> None:
    """Log the epochs that were checkpointed but not logged (the process was killed between).

    The model in hand is the last epoch's: only that epoch's pictures can be drawn again.
    """
    logged = logged_steps(run_id, "train/loss")
    for row in history:
        if row["epoch"] not in logged:
            log_epoch(row, draw_pictures if row is history[-1] else None, epochs)


# The tag that ties a run to the weights file it trained: evaluate and sample find the run by it.
# (No run id in a DVC output: it would change dvc.lock on every run, and differ between clones.)
WEIGHTS_TAG = "weights_sha256"


def weights_digest(weights: Path) -> str:
    try:
        return hash_file(weights, hashlib.sha256()).hexdigest()
    except FileNotFoundError:
        raise TrackingError(f"{weights}: not found; run `dvc repro train` first") from None


def log_trained_model(weights: Path, latent_dim: int) -> None:
    """What the end of training adds to the run: the whole VAE as its MLflow model, the weights
    file and its SHA-256 as a tag (the curves are the run's metrics; sample adds the figures)."""
    log_vae_model(weights, latent_dim)
    mlflow.log_artifact(str(weights), "weights")
    mlflow.set_tag(WEIGHTS_TAG, weights_digest(weights))


def training_run_of(
    weights: Path, experiment_ids: list[str] | None = None, client: MlflowClient | None = None
):
    """The latest run that trained these exact weights (by `WEIGHTS_TAG`) in `experiment_ids`
    (every experiment of the store when None), or None. Identical weights from two runs (exact
    mode makes that the rule) are one model."""
    client = client or MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiment_ids,
        f"tags.{WEIGHTS_TAG} = '{weights_digest(weights)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def log_figures(paths: Iterable[Path]) -> None:
    """The sample stage's PNG files, under `figures/` in the run's artifacts."""
    for path in paths:
        mlflow.log_artifact(str(path), "figures")


@contextmanager
def attached_run(experiment: str, weights: Path) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
    """The MLflow run that trained `weights` and True; or, when this store has none (outputs
    restored from a DVC cache made elsewhere), a new run tagged with the weights' digest and
    False."""
    experiment_id = connect(experiment)
    trained = training_run_of(weights, [experiment_id])
    if trained is not None:
        with mlflow.start_run(run_id=trained.info.run_id) as run:
            try:
                yield run, True
            except BaseException:
                mlflow.end_run(trained.info.status)  # a failed evaluation does not fail training
                raise
        return
    digest = weights_digest(weights)
    tags = {f"evaluated_{WEIGHTS_TAG}": digest}
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        print(
            f"no MLflow run in {tracking_uri()} trained {weights} (sha256 {digest[:16]}...); "
            f"logging to new run {run.info.run_id}, tagged evaluated_{WEIGHTS_TAG}"
        )
        yield run, False


def describe_results(metrics: dict) -> str:
    """The evaluation in a sentence: printed by the stage and kept in the run's description."""
    return (
        f"Test set: loss {metrics['test_loss']:.2f} nats (reconstruction "
        f"{metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}), log p(x) >= "
        f"{metrics['log_px_iwae']:.2f} ± {metrics['log_px_iwae_se']:.2f} (IWAE, k = "
        f"{metrics['iwae_samples']}), "
        f"{metrics['active_units']} of {metrics['latent_dim']} latent units active."
    )


def log_evaluation(metrics: dict, step: int) -> None:
    """Evaluate's part of the run: every one of SCALAR_METRICS as `evaluate/<name>` at the last
    epoch's step (beside training's `test/` curves, which score one noise draw per image), the
    breakdowns as tables and the results in the description."""
    logged = {f"evaluate/{key}": metrics[key] for key in SCALAR_METRICS}
    mlflow.log_metrics(logged, step=step)
    units = range(len(metrics["kl_per_dim"]))
    with warnings.catch_warnings():  # pandas 3 deprecation raised inside MLflow's log_table
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        log_tables(metrics, units)
    mlflow.log_dict(metrics, "evaluation/metrics.json")
    note = mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get("mlflow.note.content")
    training = (note or "").split("\n\n")[0]
    results = describe_results(metrics)
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
