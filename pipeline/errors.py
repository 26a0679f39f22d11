"""Expected failures: one line that says what happened and what to do, no traceback, non-zero exit.

Every error class of the package is here. Every entry point is wrapped in `reports_errors`: it
prints a PipelineError's message, and turns the expected failures that arrive as other exceptions
(an interruption, memory or disk running out) into the same one line. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from pipeline.paths import STACK_ROOT

F = TypeVar("F", bound=Callable[..., object])

SIZE_PARAMS = (
    "model.hidden_dim, model.hidden_layers, train.batch_size, evaluate.batch_size, "
    "evaluate.iwae_samples, sample.n_samples"
)


class PipelineError(Exception):
    """A failure the user can act on (bad input, missing file, unreachable server)."""

    exit_code = 1


class ConfigError(PipelineError):
    """A bad value in params.yaml."""

    exit_code = 2


class DataError(PipelineError):
    """A missing, corrupt or unobtainable MNIST file."""


class StaleOutputError(PipelineError):
    """An output that is missing, damaged, or in a format this version no longer writes."""


class NonFiniteLoss(PipelineError):
    """Training diverged: the loss became inf or NaN."""


class TrackingError(PipelineError):
    """An MLflow store or tracking server that cannot be used."""


class RegistryError(PipelineError):
    """A registered model, version or alias that is missing or cannot be compared."""


class StackError(PipelineError):
    """A server of the local team stack that cannot start."""


class Interrupted(PipelineError):
    """SIGINT (Ctrl-C) or SIGTERM; exits with 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}; " + (message or "no output was half-written: run it again")
        )


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_REFUSED = re.compile(r"endpoint (\S+) failed with error code (401|403)")


def already_exists(exc: Exception) -> bool:
    """Whether MLflow refused to make something because it exists (made meanwhile by a parallel
    run, or at an earlier start)."""
    return getattr(exc, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


def login_refusal(exc: BaseException) -> TrackingError | None:
    """One line for a tracking server that refused the login (401) or the user's rights (403),
    naming the server and the variables to set; None for anything else."""
    found = _REFUSED.search(str(exc))
    if found is None:
        return None
    endpoint, code = found.groups()
    server = os.environ.get("MLFLOW_TRACKING_URI", "the MLflow server")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "401":
        given = f"user {user!r} with this password" if user else "no login"
        return TrackingError(
            f"MLflow server {server} refused {given} (401 on {endpoint}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (make stack writes them to "
            f"{STACK_ROOT / 'writer.env'} and {STACK_ROOT / 'reader.env'}: source one)"
        )
    return TrackingError(
        f"MLflow server {server} does not let user {user!r} do this (403 on {endpoint}); use a "
        f"login with the right (the writer's: {STACK_ROOT / 'writer.env'}) or ask the server's "
        "admin for it"
    )


def explain(exc: BaseException) -> PipelineError | None:
    """The one-line PipelineError for an expected failure, or None for a bug."""
    if isinstance(exc, PipelineError):
        return exc
    refused = login_refusal(exc)
    if refused is not None:
        return refused
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    text = str(exc)
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        return PipelineError(
            f"out of memory ({first_line(exc)[:160]}); lower the sizes in params.yaml "
            f"({SIZE_PARAMS}) or free memory, then run it again"
        )
    full = [e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _DISK_FULL]
    if full:  # the first write that failed: later ones (closing the MLflow run) follow from it
        named = [e.filename for e in full if e.filename]
        where = f" writing {named[-1]}" if named else ""
        return PipelineError(f"no space left on the device{where}; {_FREE_SPACE}")
    if "database or disk is full" in text:  # SQLite, through SQLAlchemy and MLflow
        return PipelineError(f"no space left for the MLflow store (SQLite); {_FREE_SPACE}")
    return None


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised while handling, newest first."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


_FREE_SPACE = "free some space and run it again (training resumes from its last finished epoch)"


@contextlib.contextmanager
def failing_with(code: int):
    """Expected failures in the block exit with `code`: for a command whose exit 1 is an answer
    (`monitor`: drift found), bad input, unusable stores and bugs exit 2."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted by explain, as in reports_errors
        error = explain(exc)
        if isinstance(error, Interrupted):
            raise
        if error is None:  # a bug: its traceback, and still not the exit that is an answer
            traceback.print_exc()
            sys.exit(code)
        error.exit_code = code
        raise error from None


def reports_errors(main: F) -> F:
    """Run `main` with SIGTERM raising Interrupted; print an expected failure in one line on
    stderr and exit with its code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            return main(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - sorted into expected and bugs below
            error = explain(exc)
            if error is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]
