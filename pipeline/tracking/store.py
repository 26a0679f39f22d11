"""The MLflow store: which one (a local SQLite file or a server), whether it answers, and one-line
errors when it cannot be used."""

from __future__ import annotations

import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from pipeline.errors import TrackingError, already_exists, first_line, login_refusal

SERVER_TIMEOUT_S = 10  # connect + read; well inside the 30 s the user is promised
# The registered model's description (the registry, and the team stack, which imports no torch).
DESCRIPTION = (
    "MNIST VAE (the lab's network): predict(data, params={'method': ...}) with method "
    "decode (default; latent vectors (n, latent) -> images (n, 784) in [0, 1]), encode (images -> "
    "posterior means, and log-variances with logvar=true), reconstruct (images -> images) or "
    "score (images -> negative ELBO per image in nats, averaged over `samples` seeded draws; "
    "high for images unlike digits)."
)


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


def request_timeout() -> int:
    """SERVER_TIMEOUT_S, or MLflow's own MLFLOW_HTTP_REQUEST_TIMEOUT when it is shorter (a value
    MLflow cannot use is left for MLflow to refuse)."""
    try:
        asked = MLFLOW_HTTP_REQUEST_TIMEOUT.get()
    except ValueError:
        return SERVER_TIMEOUT_S
    return asked if 0 < asked < SERVER_TIMEOUT_S else SERVER_TIMEOUT_S


def check_reachable(uri: str) -> None:
    """Fail in one line, within `request_timeout()`, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    timeout = request_timeout()
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (OSError, urllib.error.URLError) as exc:  # refused, unknown host, timeout, HTTP error
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout} s"
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
        with one_opener_at_a_time(uri):
            found = mlflow.get_experiment_by_name(experiment)
    except Exception as exc:  # SQLAlchemy's or MLflow's: the store itself is unusable
        raise store_error(uri, exc) from None
    if found is not None:
        return found.experiment_id
    # A SQLite store gets the repository's mlruns/: MLflow's default, ./mlruns, would be a queue
    # worker's copy of the repository, deleted afterwards. A server decides its own.
    location = (store_root() / "mlruns").as_uri() if sqlite_path(uri) else None
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except MlflowException as exc:
        if not already_exists(exc):
            raise store_error(uri, exc) from None
        return mlflow.get_experiment_by_name(experiment).experiment_id


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store's URI (`sqlite:///mlflow.db?timeout=20` too)."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextmanager
def one_opener_at_a_time(uri: str) -> Iterator[None]:
    """Open a SQLite store one process at a time: queue workers started together (`dvc queue
    start -j 2`) on a store that does not exist yet would each create its tables, and all but one
    fail ('table ... already exists'). The lock is an flock on the store's folder: closing a
    descriptor of the database file itself would drop this process's SQLite (POSIX) locks on it."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def store_error(uri: str, exc: Exception) -> TrackingError:
    """One line for a store that cannot be opened: not a database, locked, or refusing."""
    refused = login_refusal(exc)
    if refused is not None:
        return refused
    text = str(exc)
    if "database is locked" in text:
        return TrackingError(
            f"the MLflow store {uri} is locked by another process; wait for it to finish, "
            "or use a tracking server (MLFLOW_TRACKING_URI) for parallel runs"
        )
    if "file is not a database" in text or "no such table" in text:
        return TrackingError(
            f"{sqlite_path(uri)} is not an MLflow database; move it away (a new store is created "
            "on the next run) or set MLFLOW_TRACKING_URI to your store"
        )
    return TrackingError(f"the MLflow store {uri} cannot be used ({first_line(exc)[:200]})")


def reraise_refusal(exc: MlflowException) -> None:
    """Raise the one-line refusal when a server refused the login or the right, so that an
    `except MlflowException` meant for "not found" does not take a 401 or 403 for it."""
    refused = login_refusal(exc)
    if refused is not None:
        raise refused from None


def run_status(run_id: str) -> str | None:
    """The run's status (FINISHED, KILLED, ...), or None when the store does not have it."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException as exc:
        reraise_refusal(exc)
        return None


def has_run(run_id: str) -> bool:
    return run_status(run_id) is not None


def load_model(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """A logged or registered model (`models:/mnist-vae@champion`, `runs:/...`) from the store."""
    store = tracking_uri()
    check_reachable(store)
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        reraise_refusal(exc)
        raise TrackingError(f"cannot load model {uri} from {store}: {first_line(exc)}") from None


def download_model(uri: str, folder: Path) -> str:
    """A logged or registered model's files, downloaded into `folder`; their local path."""
    from mlflow.artifacts import download_artifacts

    store = tracking_uri()
    check_reachable(store)
    mlflow.set_tracking_uri(store)
    try:
        return download_artifacts(artifact_uri=uri, dst_path=str(folder))
    except (MlflowException, OSError) as exc:
        reraise_refusal(exc)
        raise TrackingError(f"cannot load model {uri} from {store}: {first_line(exc)}") from None


def registry_version(uri: str) -> ModelVersion | None:
    """The registry version `models:/NAME@ALIAS` or `models:/NAME/N` names now; None for any other
    form of URI (`runs:/`, `models:/m-ID`, a stage). MlflowException when the registry has none."""
    if not uri.startswith("models:/"):
        return None
    name, at, alias = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    if at:
        return client.get_model_version_by_alias(name, alias)
    name, _, number = name.rpartition("/")
    return client.get_model_version(name, number) if name and number.isdigit() else None


def describe_model(uri: str) -> str:
    """A model URI with the registry version it resolves to: `models:/mnist-vae@champion
    (version 3, run 5f0c...)`; other URIs as they are."""
    try:
        version = registry_version(uri)
    except MlflowException:
        return uri
    return f"{uri} (version {version.version}, run {version.run_id[:8]})" if version else uri
