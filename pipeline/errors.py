"""Expected failures: reported in one line with what to do, no traceback, non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """A failure the user can act on (bad input, missing file, unreachable server)."""

    exit_code = 1


class ConfigError(PipelineError):
    """A bad value in params.yaml."""

    exit_code = 2


def reports_errors(main: F) -> F:
    """Turn a PipelineError escaping `main` into one line on stderr and its exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]
