"""`mnist-vae sweep`: an Optuna study whose trials are MLflow child runs, pruned per epoch, and
whose winner becomes a `dvc exp run`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import commands
from pipeline.config import load_params
from pipeline.errors import Interrupted
from pipeline.tools import study as study_of
from pipeline.tools import sweep
from pipeline.tracking import store

TINY = {
    "trials": 3,
    "epochs": 1,
    "holdout_images": 64,
    "pruner_startup": 1,
    "space": {
        "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "model.hidden_dim": [16, 32],
        "model.latent_dim": [4],
        "train.batch_size": [32],
    },
}


@pytest.fixture(autouse=True)
def one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """No other worker races for the parent run here: no need to wait for one."""
    monkeypatch.setattr(study_of, "SETTLE_S", 0.0)


@pytest.fixture
def study(workdir: Path, set_params):
    """A study of three one-epoch trials on the tiny data; the first two are enqueued: one that
    learns, then one whose rate barely moves the weights, which the median pruner stops."""
    set_params(workdir, sweep=TINY)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    created = study_of.open_study("tiny", url, load_params().sweep)
    created.enqueue_trial({"train.lr": 3e-3, "model.hidden_dim": 32, "model.latent_dim": 4,
                           "train.batch_size": 32})  # fmt: skip
    created.enqueue_trial({"train.lr": 1e-4, "model.hidden_dim": 16, "model.latent_dim": 4,
                           "train.batch_size": 32})  # fmt: skip
    return url


def run_sweep(url: str, *extra: str) -> None:
    commands.main(["sweep", "--study", "tiny", "--storage", url, *extra])


def test_three_trials_are_child_runs_of_one_parent_and_one_is_pruned(
    study: str, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    run_sweep(study)
    trials = study_of.open_study("tiny", study, load_params().sweep).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, trials[2].state]
    assert trials[2].state in study_of.FINISHED and len(trials) == 3  # exactly the three asked for
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    said = f"study tiny: 3 trials finished ({pruned} pruned); best trial "
    assert said in capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-vae")
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.study` = 'tiny'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: int(r.data.tags["optuna.trial"]),
    )
    assert [r.info.run_name for r in children] == ["tiny-t0", "tiny-t1", "tiny-t2"]
    assert [r.info.status for r in children[:2]] == ["FINISHED", "KILLED"]
    assert children[2].info.status == (
        "KILLED" if trials[2].state == TrialState.PRUNED else "FINISHED"
    )
    assert children[1].data.tags["pruned_at_epoch"] == "1"
    assert children[0].data.params["train.lr"] == "0.003"
    assert children[0].data.metrics["heldout/loss"] == pytest.approx(trials[0].value)
    assert parent.data.params["space.model.hidden_dim"] == "[16, 32]"
    assert parent.info.status == "FINISHED"

    parent = client.get_run(parent.info.run_id)  # the summary came after the search above
    assert parent.data.tags["best.trial"] == str(
        min(trials[::2], key=lambda t: t.value or 1e9).number
    )
    shown = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert "study/optimization_history.png" in shown
    assert not client.search_registered_models()  # trials register no model


def test_best_prints_the_dvc_experiment_that_retrains_the_winner(
    study: str, capsys: pytest.CaptureFixture
) -> None:
    run_sweep(study)
    capsys.readouterr()
    run_sweep(study, "--best")
    command = capsys.readouterr().out.strip().split()
    best = study_of.open_study("tiny", study, load_params().sweep).best_trial
    assert command[:5] == ["dvc", "exp", "run", "-n", f"tiny-t{best.number}"]
    chosen = dict(flag.removeprefix("-S").split("=") for flag in command[5:])
    assert chosen.keys() == best.params.keys()
    assert {key: float(value) for key, value in chosen.items()} == best.params


def test_an_unknown_study_or_one_without_a_complete_trial_has_no_best(
    workdir: Path, set_params, capsys: pytest.CaptureFixture
) -> None:
    set_params(workdir, sweep=TINY)
    with pytest.raises(SystemExit) as failed:
        run_sweep(f"sqlite:///{workdir / 'optuna.db'}", "--best")
    assert failed.value.code == 1
    assert capsys.readouterr().err.strip().endswith("; its studies: none")
    study_of.open_study("tiny", f"sqlite:///{workdir / 'optuna.db'}", load_params().sweep)
    with pytest.raises(SystemExit):
        run_sweep(f"sqlite:///{workdir / 'optuna.db'}", "--best")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: study tiny has no complete trial yet; run the sweep"
    )


def test_a_storage_that_cannot_be_used_is_one_line(
    workdir: Path, set_params, capsys: pytest.CaptureFixture
) -> None:
    set_params(workdir, sweep=TINY)
    with pytest.raises(SystemExit):
        run_sweep("postgresql+psycopg://u@127.0.0.1:9/none")
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: Optuna storage 127.0.0.1:9/none cannot be used: ")
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("where", ["--storage", "sweep.storage"])
def test_a_storage_url_with_a_password_is_refused_without_showing_it(
    workdir: Path, set_params, capsys: pytest.CaptureFixture, where: str
) -> None:
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:9/optuna"
    set_params(workdir, sweep=TINY | ({"storage": url} if where == "sweep.storage" else {}))
    with pytest.raises(SystemExit) as stopped:
        run_sweep(url) if where == "--storage" else commands.main(["sweep", "--study", "tiny"])
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith(f"error: {where}") and "PGPASSFILE" in error
    assert "s3cret" not in error


@pytest.mark.parametrize(
    "url, said",
    [
        ("postgresql+psycopg://postgres@127.0.0.1:9/optuna?password=s3cret", "holds a password"),
        ("postgres@127.0.0.1/optuna", "is not a database URL"),
    ],
)
def test_a_password_in_the_query_or_a_malformed_url_is_one_line(
    workdir: Path, set_params, capsys: pytest.CaptureFixture, url: str, said: str
) -> None:
    set_params(workdir, sweep=TINY)
    with pytest.raises(SystemExit):
        run_sweep(url)
    error = capsys.readouterr().err.strip()
    assert said in error and len(error.splitlines()) == 1 and "s3cret" not in error


def test_ctrl_c_marks_the_trial_and_its_run_then_stops_the_worker_in_one_line(
    study: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def interrupted_fit(*args, **kwargs):
        raise Interrupted(signal.SIGINT)  # what the stop request raises at the next batch
        yield

    monkeypatch.setattr(sweep.training, "fit", interrupted_fit)
    with pytest.raises(SystemExit) as stopped:
        run_sweep(study)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: interrupted by SIGINT; no output was half-written: run it again"
    )
    trial, waiting = study_of.open_study("tiny", study, load_params().sweep).get_trials()
    assert (trial.state, waiting.state) == (TrialState.FAIL, TrialState.WAITING)  # it stopped
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_a_dimension_added_to_the_space_in_params_yaml_is_searched_and_trained_with(
    workdir: Path, set_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = TINY["space"] | {"train.adam_beta1": [0.5], "model.activation": ["tanh"]}
    set_params(workdir, sweep=TINY | {"space": space, "trials": 1})
    built = []
    real = sweep.training.vae_and_optimizer

    def spy(shape, cfg, train_x):
        built.append((shape, cfg))
        return real(shape, cfg, train_x)

    monkeypatch.setattr(sweep.training, "vae_and_optimizer", spy)
    run_sweep(f"sqlite:///{workdir / 'optuna.db'}")
    ((shape, cfg),) = built
    assert (cfg.adam_beta1, shape.activation, shape.latent_dim) == (0.5, "tanh", 4)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    searched = study_of.open_study("tiny", url, load_params().sweep)
    assert searched.trials[0].params["train.adam_beta1"] == 0.5  # and so in --best's command


@pytest.fixture
def race(workdir: Path, set_params):
    """A study with no parent run yet, and the run another worker is about to make for it."""
    set_params(workdir, sweep=TINY)
    cfg = load_params().sweep
    study = study_of.open_study("race", f"sqlite:///{workdir / 'optuna.db'}", cfg)
    experiment_id = store.connect("mnist-vae")
    with mlflow.start_run(experiment_id=experiment_id) as winner:
        pass
    return study, cfg, experiment_id, winner


def test_a_worker_whose_claim_lost_waits_for_the_winners_run_and_makes_none(
    race, monkeypatch: pytest.MonkeyPatch
) -> None:
    race, cfg, experiment_id, winner = race

    def another_worker_claims_and_makes_its_run(seconds: float) -> None:
        race.set_user_attr(study_of.CLAIM, "other-host:1:0.0")
        race.set_user_attr(study_of.RUN_ID, winner.info.run_id)

    monkeypatch.setattr(study_of.time, "sleep", another_worker_claims_and_makes_its_run)
    assert study_of.parent_run(race, experiment_id, cfg) == winner.info.run_id
    runs = MlflowClient().search_runs([experiment_id])
    assert [run.info.run_id for run in runs] == [winner.info.run_id]


def test_a_worker_that_finds_a_fresh_claim_waits_for_that_workers_run(
    race, monkeypatch: pytest.MonkeyPatch
) -> None:
    race, cfg, experiment_id, winner = race
    race.set_user_attr(study_of.CLAIM, f"other-host:1:{time.time()}")  # making its run now

    def the_other_worker_finishes(seconds: float) -> None:
        race.set_user_attr(study_of.RUN_ID, winner.info.run_id)

    monkeypatch.setattr(study_of.time, "sleep", the_other_worker_finishes)
    assert study_of.parent_run(race, experiment_id, cfg) == winner.info.run_id
    assert race.user_attrs[study_of.CLAIM].startswith("other-host:")  # it never claimed
    assert len(MlflowClient().search_runs([experiment_id])) == 1
