"""Copies of the repository, git, DVC, MLflow stores and servers in subprocesses; the pipeline's
command line in this process."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tools.servers import stop, watch

REPO_ROOT = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
FIGURE_NAMES = {
    "generated",
    "reconstructions",
    "latent_space",
    "manifold",
    "interpolation",
    "training_curves",
}


def committed(path: str) -> str:
    """The file as committed at HEAD; the working tree's copy outside a git checkout."""
    shown = subprocess.run(
        ["git", "show", f"HEAD:{path}"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else (REPO_ROOT / path).read_text()


@functools.cache  # one `git show` a session, not one a workdir: HEAD stays put while tests run
def committed_params() -> str:
    """The lab's params.yaml: `dvc exp run` leaves an experiment's params in the working tree."""
    return committed("params.yaml")


def copy_working_tree(dest: Path) -> Path:
    """A fresh git repository holding the working tree's code (committed or not, never ignored)
    with the lab's committed params.yaml, whatever experiment the workspace holds."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / "params.yaml").write_text(committed_params())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    git_commit(dest, "copy of the working tree")
    return dest


def environment(**extra: str) -> dict[str, str]:
    """This interpreter's bin first (stage commands call `python`), no outside tracking URI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # `dvc exp run` commits: a machine without a git identity must still work.
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "test")
        env.setdefault(f"GIT_{role}_EMAIL", "test@localhost")
    return {**env, **extra}


def dvc(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=1800,
    )


def python_m(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m ARGS` in `cwd` with this interpreter, output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


COMMAND_TIMEOUT_S = 300  # as python_m's


def pipeline_command(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in `cwd` with `env` (and no outside tracking URI), run in this
    process: a new interpreter spends about 3 s importing torch and MLflow again. Its exit code,
    stdout and stderr as a fresh interpreter would show them: MLflow's log lines, other loggers'
    warnings, and warnings under Python's default filters. The working folder, the environment
    and MLflow's tracking URI (commands set it) are restored after."""
    import mlflow.tracking._tracking_service.utils as tracking_uri_state

    from pipeline.commands import main

    out, err = io.StringIO(), io.StringIO()
    stderr_log = logging.StreamHandler(err)  # Python's last-resort handler, in a fresh process
    stderr_log.setLevel(logging.WARNING)

    def timed_out(signum: int, frame: object) -> None:
        raise TimeoutError(f"mnist-vae {' '.join(args)} still ran after {COMMAND_TIMEOUT_S} s")

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        patch.chdir(cwd)
        patch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so that the undo restores it
        patch.delenv("MLFLOW_TRACKING_URI")  # as environment(): none from outside
        patch.setattr(tracking_uri_state, "_tracking_uri", None)
        for key, value in env.items():
            patch.setenv(key, value)
        warnings.resetwarnings()  # Python's defaults: shown, except these categories
        for quiet in (
            DeprecationWarning,
            PendingDeprecationWarning,
            ImportWarning,
            ResourceWarning,
        ):
            warnings.filterwarnings("ignore", category=quiet)
        previous_alarm = signal.signal(signal.SIGALRM, timed_out)
        logging.getLogger().addHandler(stderr_log)
        signal.alarm(COMMAND_TIMEOUT_S)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(list(args))
                    code = 0
                except SystemExit as exited:  # read as the interpreter does: None is 0, text 1
                    code = exited.code if isinstance(exited.code, int) else int(bool(exited.code))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_alarm)
            logging.getLogger().removeHandler(stderr_log)
        for warning in caught:
            err.write(warnings.formatwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            ))  # fmt: skip
    return subprocess.CompletedProcess(["mnist-vae", *args], code, out.getvalue(), err.getvalue())


def status_of(url: str, login: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET of `url`, with a basic-auth `login` (user, password) if given."""
    request = urllib.request.Request(url)
    if login:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def experiments_search(tracking_uri: str) -> str:
    """A read any logged-in user may make on the stack's MLflow server."""
    return f"{tracking_uri}/api/2.0/mlflow/experiments/search?max_results=5"


def login_statuses(tracking_uri: str, keys: dict[str, str]) -> dict[str, int]:
    """That read's status as the writer and the reader with their passwords in `keys`, and with no
    login: LOGINS_WORK when the server knows its users."""
    search = experiments_search(tracking_uri)
    logins = {role: (role, keys[f"{role}_password"]) for role in ("writer", "reader")}
    return {role: status_of(search, login) for role, login in logins.items()} | {
        "anonymous": status_of(search)
    }


LOGINS_WORK = {"writer": 200, "reader": 200, "anonymous": 401}


def still_running(servers: dict[str, subprocess.Popen]) -> list[str]:
    return [name for name, process in servers.items() if process.poll() is None]


@dataclass(frozen=True)
class FirstStart:
    """What the team stack's first start on a new root left (tests/servers/conftest.py): its keys,
    and an experiment, a run and an artifact (in PostgreSQL and S3) that a second start must find
    again."""

    root: Path
    keys: dict[str, str]
    experiment_id: str
    run_id: str


def store(repo: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def grid_steps(client: MlflowClient, run_id: str, key: str = "generated") -> list[int]:
    """The steps of the run's `key` images (`generated` grids), one entry per PNG logged."""
    paths = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    prefix = f"images/{key}+step+"
    return sorted(int(p.removeprefix(prefix).split("+")[0]) for p in paths if p.startswith(prefix))


def start_server(command: list[str], **env: str) -> subprocess.Popen:
    """A server in a session of its own, so that `stop_server` also stops its workers, and
    watched, so that it stops if the tests end without stopping it."""
    server = subprocess.Popen(
        command,
        env=environment(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watch(server.pid)
    return server


def stop_server(server: subprocess.Popen) -> None:
    stop(server)


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def git_commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    # --allow-empty: in exact mode a rerun often changes nothing git tracks
    subprocess.run([*GIT, "commit", "--allow-empty", "-qm", message], cwd=repo, check=True)
