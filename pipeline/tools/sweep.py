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
from functools import partial

import mlflow
import optuna
import torch
from mlflow.entities import RunStatus
from optuna.trial import TrialState

from pipeline import runtime
from pipeline.config import Params, with_values
from pipeline.data.splits import binarize_once, load_split
from pipeline.errors import ConfigError, Interrupted
from pipeline.paths import TRAIN_SPLIT
from pipeline.tools.study import (
    FINISHED,
    RUN_ID,
    best_command,
    open_study,
    parent_run,
    storage_url,
    summarise,
)
from pipeline.tracking import store
from pipeline.vae import step, training


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """One value for each param of `sweep.space`: a list is a choice, a range {low, high, log}
    a float, or an int for an int param (typed_space has typed both ends as the param's)."""
    chosen = {}
    for key, choice in space.items():
        if isinstance(choice, list):
            chosen[key] = trial.suggest_categorical(key, choice)
        elif isinstance(choice["low"], int) and isinstance(choice["high"], int):
            chosen[key] = trial.suggest_int(key, choice["low"], choice["high"], log=choice["log"])
        else:
            chosen[key] = trial.suggest_float(key, choice["low"], choice["high"], log=choice["log"])
    return chosen


class Surplus(Exception):
    """A trial started by two workers racing for the study's last place: the later one yields."""


def surplus(study: optuna.Study, trial: optuna.Trial, wanted: int) -> bool:
    """Whether the study already has `wanted` trials finished or under way before this one."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return sum(t.number < trial.number or t.state in FINISHED for t in trials) >= wanted


class Objective:
    """One trial: train on the training images but the held-out ones, score those every epoch."""

    def __init__(self, params: Params, parent: str, experiment_id: str, wanted: int) -> None:
        self.params, self.parent = params, parent
        self.experiment_id, self.wanted = experiment_id, wanted
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
        chosen = suggest(trial, self.params.sweep.space)
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
        # What the sweep does not search is params.yaml's, as in the winner's retraining.
        trial_params = with_values(self.params, chosen)
        cfg, shape = trial_params.train, trial_params.model
        torch.manual_seed(cfg.seed + trial.number)
        model, optimizer = training.vae_and_optimizer(shape, cfg, self.train_x)
        fast = step.use_fast_step(cfg.step, model, optimizer, self.train_x)
        epochs = training.fit(
            model, optimizer, self.train_x, self.held_out, first_epoch=1,
            epochs=self.params.sweep.epochs, batch_size=cfg.batch_size,
            binarize=self.binarize, stop=stop,
            lr_at=partial(training.learning_rate, cfg.schedule, cfg.lr),
            fast=fast,
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


def run(
    params: Params, study_name: str, trials: int, storage: str | None, best: bool, apply: bool
) -> None:
    cfg = params.sweep
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
