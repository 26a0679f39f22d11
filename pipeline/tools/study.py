"""The Optuna study behind `mnist-vae sweep`: its storage, with heartbeats and one retry, its
MLflow parent run, its summary and its winner."""

from __future__ import annotations

import os
import socket
import time
import warnings

import mlflow
import optuna
from matplotlib import pyplot
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.config import SweepConfig
from pipeline.errors import ConfigError, PipelineError, first_line
from pipeline.paths import STACK_ROOT
from pipeline.tracking import store

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RUN_ID = "mlflow_run_id"  # the MLflow run of a trial, or of the study (user attributes)
SETTLE_S = 2.0  # how long two workers that start together take to agree on the parent run
ELECTION_S = 60.0  # how long the others wait for the elected worker's parent run
CLAIM = "mlflow_run_claim"  # which worker makes the study's parent run (user attribute)


def storage_url(cfg: SweepConfig, given: str | None) -> str:
    """--storage, else `sweep.storage`, else optuna.db beside mlflow.db in the repository.

    A URL with a password is refused: on a command line `ps` shows it to every user, in
    params.yaml git keeps it. PostgreSQL's clients read it from the file PGPASSFILE names.
    """
    url = given or cfg.storage
    where = "--storage" if given else "sweep.storage in params.yaml"
    try:
        parsed = make_url(url) if url else None
    except ArgumentError:
        raise ConfigError(f"{where}: {shown(url)} is not a database URL") from None
    if parsed is not None and (parsed.password or "password" in parsed.query):
        raise ConfigError(
            f"{where} holds a password ({shown(url)}): drop it from the URL and put it in a 0600 "
            f"file named by PGPASSFILE (make stack writes {STACK_ROOT / 'pgpass'}; source "
            f"{STACK_ROOT / 'writer.env'})"
        )
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
    """A storage URL without its credentials (user, password, query)."""
    return url.split("@")[-1].split("?")[0]


def end_and_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial failed by the heartbeat (its worker was killed): end its MLflow run as FAILED and
    enqueue it once more (Optuna's RetryFailedTrialCallback)."""
    if trial.user_attrs.get(RUN_ID):
        MlflowClient().set_terminated(trial.user_attrs[RUN_ID], "FAILED")
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)


def parent_run(study: optuna.Study, experiment_id: str, cfg: SweepConfig) -> str:
    """The study's MLflow run, its id kept in the study. Workers that start together elect the
    one that makes it: each writes a claim, waits SETTLE_S for the others' writes, and the last
    claim written wins; the others wait for the winner's run. No run is made twice, so none is
    deleted: the team stack's writer may not delete runs."""
    found = study.user_attrs.get(RUN_ID)
    if found and store.has_run(found):
        return found
    earlier = study.user_attrs.get(CLAIM)
    if earlier and time.time() - float(earlier.rsplit(":", 1)[1]) < ELECTION_S:
        return elected_run(study, earlier)  # another worker is making it now
    claim = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
    study.set_user_attr(CLAIM, claim)
    time.sleep(SETTLE_S)
    winner = study.user_attrs.get(CLAIM)  # read from the storage, with the others' writes
    if winner != claim:
        return elected_run(study, winner)
    tags = {"optuna.study": study.study_name}
    with mlflow.start_run(experiment_id=experiment_id, run_name=study.study_name, tags=tags) as run:
        mlflow.log_params({f"space.{key}": value for key, value in space_of(cfg).items()})
    study.set_user_attr(RUN_ID, run.info.run_id)
    return run.info.run_id


def elected_run(study: optuna.Study, winner: str) -> str:
    """The parent run another worker's claim won, once it is made (it logs the space first)."""
    deadline = time.monotonic() + ELECTION_S
    while time.monotonic() < deadline:
        found = study.user_attrs.get(RUN_ID)
        if found and store.has_run(found):
            return found
        time.sleep(0.2)
    raise PipelineError(
        f"the worker that claimed study {study.study_name!r}'s MLflow run ({winner}) made none "
        f"within {ELECTION_S:.0f} s; run this worker again"
    )


def space_of(cfg: SweepConfig) -> dict[str, str]:
    """The searched space as the parent run's params: `space.<key>`, and the trials' length."""
    shown = {}
    for key, choice in cfg.space.items():
        if isinstance(choice, list):
            shown[key] = str(choice)
        else:
            shape = "log-uniform" if choice["log"] else "uniform"
            shown[key] = f"{shape} {choice['low']:g}..{choice['high']:g}"
    return shown | {"epochs": str(cfg.epochs)}


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
