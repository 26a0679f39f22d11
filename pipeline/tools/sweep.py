"""`mnist-vae sweep`: an Optuna study that any number of workers share through one storage, every
trial a child run of the study's MLflow run, and the winner retrained by DVC.

A trial trains for `sweep.epochs` on the training split without its last `sweep.holdout_images`
images, and its objective is the negative ELBO on those held-out images, reported every epoch to
the pruner; the test set is never looked at. Trials write no DVC outputs and register no model:
`--best` prints the `dvc exp run` that retrains the winner at full length, evaluated on the test
set and registered like any other model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import mlflow
import optuna
import torch
from matplotlib import pyplot
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from pipeline import runtime
from pipeline.config import Params, SweepConfig
from pipeline.data.splits import binarize_once, load_split
from pipeline.errors import ConfigError, Interrupted, PipelineError, first_line
from pipeline.paths import TRAIN_SPLIT
from pipeline.tracking import store
from pipeline.vae import training
from pipeline.vae.model import VAE

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RUN_ID = "mlflow_run_id"  # the MLflow run of a trial, or of the study (user attributes)
SETTLE_S = 2.0  # how long two workers that start together take to agree on the parent run


def storage_url(cfg: SweepConfig, given: str | None) -> str:
    """--storage, else `sweep.storage`, else optuna.db beside mlflow.db in the repository."""
    url = given or cfg.storage
    return url or f"sqlite:///{store.store_root() / 'optuna.db'}"


def open_study(name: str, url: str, cfg: SweepConfig, create: bool = True) -> optuna.Study:
    """Create or join the study (only join it unless `create`); a worker silent for 2 heartbeats
    has its trial failed, and the trial is retried once with the same params."""
    # Heartbeats and the figures are "experimental" in Optuna 4-5, and what this module needs.
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
            heartbeat_interval=cfg.heartbeat_seconds,
            grace_period=2 * cfg.heartbeat_seconds,
            heartbeat_stale_trial_callback=end_and_retry,
        )
    except Exception as exc:  # SQLAlchemy's: unknown driver, refused, bad password
        raise PipelineError(
            f"Optuna storage {shown(url)} cannot be used: {first_line(exc)[:160]}; "
            "check --storage (make stack prints the URL) and that the server runs"
        ) from None
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup, n_warmup_steps=0)
        if cfg.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    if not create:
        names = optuna.get_all_study_names(storage)
        if name not in names:
            raise PipelineError(
                f"no study {name!r} in {shown(url)}; its studies: {', '.join(names) or 'none'}"
            )
    return optuna.create_study(
        study_name=name, storage=storage, direction="minimize", pruner=pruner, load_if_exists=True
    )


def shown(url: str) -> str:
    """A storage URL without its credentials."""
    return url.split("@")[-1] if "@" in url else url


def end_and_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial failed by the heartbeat (its worker was killed): end its MLflow run as FAILED and
    enqueue it once more (Optuna's RetryFailedTrialCallback)."""
    if trial.user_attrs.get(RUN_ID):
        MlflowClient().set_terminated(trial.user_attrs[RUN_ID], "FAILED")
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)


def parent_run(study: optuna.Study, experiment_id: str, cfg: SweepConfig) -> str:
    """The study's MLflow run, its id kept in the study. Workers that start together may both
    make one: each waits SETTLE_S for the others' writes, and all keep the last one written."""
    found = study.user_attrs.get(RUN_ID)
    if found and store.has_run(found):
        return found
    tags = {"optuna.study": study.study_name}
    with mlflow.start_run(experiment_id=experiment_id, run_name=study.study_name, tags=tags) as run:
        mlflow.log_params({f"space.{key}": value for key, value in space_of(cfg).items()})
    study.set_user_attr(RUN_ID, run.info.run_id)
    time.sleep(SETTLE_S)
    kept = study.user_attrs[RUN_ID]  # read from the storage, with the other workers' writes
    if kept != run.info.run_id:
        MlflowClient().delete_run(run.info.run_id)
    return kept


def space_of(cfg: SweepConfig) -> dict[str, str]:
    return {
        "lr": f"log-uniform {cfg.lr_low:g}..{cfg.lr_high:g}",
        "hidden_dim": str(cfg.hidden_dims),
        "latent_dim": str(cfg.latent_dims),
        "batch_size": str(cfg.batch_sizes),
        "epochs": str(cfg.epochs),
    }


def suggest(trial: optuna.Trial, cfg: SweepConfig) -> dict:
    return {
        "train.lr": trial.suggest_float("train.lr", cfg.lr_low, cfg.lr_high, log=True),
        "model.hidden_dim": trial.suggest_categorical("model.hidden_dim", cfg.hidden_dims),
        "model.latent_dim": trial.suggest_categorical("model.latent_dim", cfg.latent_dims),
        "train.batch_size": trial.suggest_categorical("train.batch_size", cfg.batch_sizes),
    }


class Surplus(Exception):
    """A trial started by two workers racing for the study's last place: the later one yields."""


def surplus(study: optuna.Study, trial: optuna.Trial, wanted: int) -> bool:
    """Whether the study already has `wanted` trials finished or under way before this one."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.number < trial.number or t.state in FINISHED for t in trials) >= wanted


class Objective:
    """One trial: train on the training images but the held-out ones, score those every epoch."""

    def __init__(self, params: Params, parent: str, experiment_id: str, wanted: int) -> None:
        self.params, self.parent, self.experiment_id, self.wanted = (
            params,
            parent,
            experiment_id,
            wanted,
        )
        self.device = runtime.pick_device(params.train.device)
        images, _ = load_split(TRAIN_SPLIT, self.device)
        cut = len(images) - params.sweep.holdout_images
        if cut < 1:
            raise ConfigError(f"sweep.holdout_images leaves no image to train on: {len(images)}")
        self.binarize = params.data.binarize == "dynamic"
        held_out = images[cut:]
        if self.binarize:
            held_out = binarize_once(held_out.cpu(), params.data.binarize_seed).to(self.device)
        self.train_x, self.held_out = images[:cut], held_out

    def __call__(self, trial: optuna.Trial) -> float:
        if surplus(trial.study, trial, self.wanted):
            raise Surplus(f"trial {trial.number}: the study has {self.wanted} under way")
        chosen = suggest(trial, self.params.sweep)
        with (
            runtime.stop_requests() as stop,
            mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=f"{trial.study.study_name}-t{trial.number}",
                parent_run_id=self.parent,
                tags={"optuna.study": trial.study.study_name, "optuna.trial": str(trial.number)},
            ) as run,
        ):
            trial.set_user_attr(RUN_ID, run.info.run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            mlflow.log_params(chosen | {"sweep.epochs": self.params.sweep.epochs})
            try:
                return self.train(trial, chosen, stop)
            except optuna.TrialPruned:
                mlflow.set_tag("pruned_at_epoch", str(trial.user_attrs["epochs_done"]))
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
                raise
            except Interrupted:
                mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
                raise

    def train(self, trial: optuna.Trial, chosen: dict, stop: runtime.StopRequest) -> float:
        torch.manual_seed(self.params.train.seed + trial.number)
        model = VAE(chosen["model.hidden_dim"], chosen["model.latent_dim"]).to(self.device)
        optimizer = training.make_optimizer(model, chosen["train.lr"])
        epochs = training.fit(
            model, optimizer, self.train_x, self.held_out, first_epoch=1,
            epochs=self.params.sweep.epochs, batch_size=chosen["train.batch_size"],
            binarize=self.binarize, stop=stop,
        )  # fmt: skip
        for row in epochs:  # fit's "test" terms are the held-out images' here
            metrics = {"train/loss": row.train_loss, "heldout/loss": row.test_loss}
            mlflow.log_metrics(metrics | {"heldout/kl": row.test_kl}, step=row.epoch)
            trial.report(row.test_loss, row.epoch)
            trial.set_user_attr("epochs_done", row.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {row.epoch}")
        return row.test_loss


def work(study: optuna.Study, objective: Objective, wanted: int, pause: float) -> None:
    """Run trials until the study has `wanted` finished ones. While the rest are under way in
    other workers, wait: one of them may die, and its trial come back to be run again."""
    while True:
        optuna.storages.fail_stale_trials(study)  # trials whose worker stopped beating
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(state in FINISHED for state in states)
        if finished >= wanted:
            return
        if finished + states.count(TrialState.RUNNING) >= wanted:
            time.sleep(pause)
            continue
        study.optimize(objective, n_trials=1, catch=(Surplus,), gc_after_trial=False)


def summarise(study: optuna.Study, parent: str) -> str:
    """Record the best trial so far and the study's figures in the parent run; one line."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    client = MlflowClient()
    if not complete:
        return f"study {study.study_name}: {len(finished)} trials finished, none complete yet"
    best = study.best_trial
    client.log_metric(parent, "best/heldout_loss", best.value, step=len(finished))
    for key, value in {"best.trial": best.number, **best.params}.items():
        client.set_tag(parent, f"best.{key}" if key != "best.trial" else key, str(value))
    figures = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history}
    if len(complete) >= 2:
        figures["param_importances"] = optuna.visualization.matplotlib.plot_param_importances
    for name, plot in figures.items():
        axes = plot(study)
        if name == "optimization_history":
            axes.set_ylabel("held-out loss (negative ELBO, nats)")
        axes.figure.tight_layout()  # Optuna's layout cuts the params' names off
        client.log_figure(parent, axes.figure, f"study/{name}.png")
        pyplot.close(axes.figure)
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    return (
        f"study {study.study_name}: {len(finished)} trials finished ({pruned} pruned); best "
        f"trial {best.number}, held-out loss {best.value:.2f}: {best.params}"
    )


def best_command(study: optuna.Study) -> list[str]:
    """The `dvc exp run` that retrains the best trial's params at full length."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise PipelineError(f"study {study.study_name} has no complete trial yet; run the sweep")
    best = study.best_trial
    command = ["dvc", "exp", "run", "-n", f"{study.study_name}-t{best.number}"]
    return command + [f"-S{key}={value}" for key, value in sorted(best.params.items())]


def run(
    params: Params, study_name: str, trials: int, storage: str | None, best: bool, apply: bool
) -> None:
    cfg = params.sweep
    if cfg.lr_low >= cfg.lr_high:
        raise ConfigError(
            f"sweep.lr_low = {cfg.lr_low} must be below sweep.lr_high = {cfg.lr_high}"
        )
    study = open_study(study_name, storage_url(cfg, storage), cfg, create=not (best or apply))
    if best or apply:
        command = best_command(study)
        print(" ".join(command), flush=True)
        if apply:
            sys.exit(subprocess.run([sys.executable, "-m", *command], env=os.environ).returncode)
        return
    runtime.flush_denormals()
    experiment_id = store.connect(params.mlflow.experiment)
    parent = parent_run(study, experiment_id, cfg)
    work(study, Objective(params, parent, experiment_id, trials), trials, cfg.heartbeat_seconds)
    print(summarise(study, parent))
