"""Slow: two sweep workers share one Optuna study through the team stack's PostgreSQL; one is
killed with kill -9 in the middle of a trial, and the study still ends with the trials asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers.repo import environment
from helpers.workdir import make_workdir, write_params
from pipeline.tools.stack import Stack

pytestmark = pytest.mark.slow
SWEEP = {
    "trials": 4,  # to finish, the killed trial's retry among them
    "epochs": 40,  # a few seconds a trial on the tiny data: time to kill one mid-way
    "holdout_images": 64,
    "pruner": "none",
    "heartbeat_seconds": 1,
    "space": {
        "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "model.hidden_dim": [16, 32],
        "model.latent_dim": [4],
        "train.batch_size": [32],
    },
}


def worker(work: Path, stack: Stack) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "sweep", "--study", "shared"]
    command += ["--storage", stack.optuna_uri]
    env = environment(MLFLOW_TRACKING_URI=stack.tracking_uri)
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, text=True)


def test_two_workers_share_a_study_and_a_killed_trial_is_failed_and_retried(
    stack: Stack, tmp_path: Path, mlflow_template: Path
) -> None:
    work = make_workdir(tmp_path, mlflow_template)
    write_params(work, sweep=SWEEP)
    first, second = worker(work, stack), worker(work, stack)
    study = None
    # one storage, so one connection pool: a new one every poll ran PostgreSQL out of connections
    storage = optuna.storages.RDBStorage(stack.optuna_uri)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:  # the first's trial, under way
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            continue
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker", "").endswith(f":{first.pid}") and (
                trial.user_attrs.get("epochs_done", 0) >= 1
            ):
                victim = trial.number
    assert victim is not None, "the first worker never ran a trial"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert second.wait(timeout=600) == 0, second.stdout.read()

    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == SWEEP["trials"]  # exactly the trials asked for, the retry among them
    assert trials[victim].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[victim].params

    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("mnist-vae")
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.study` = 'shared'")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    killed = client.get_run(trials[victim].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED"
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + SWEEP["trials"] + 1  # and the failed one
