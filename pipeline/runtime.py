"""Process set-up: what every entry point does first, the device, denormals, and stop requests."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.errors import Interrupted, PipelineError

# The float ops that torch hands to oneMKL's vector math (VML), from ATen/cpu/vml.h.
MKL_VECTOR_MATH = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp",
    "log", "log10", "log2", "sin", "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


def start() -> None:
    """Settle oneMKL's vector math; leave reporting store errors to the exceptions."""
    settle_mkl_vector_math()
    # MLflow's SQL store logs every database error with its traceback before raising it (nine
    # tracebacks for one full disk); the exception itself reaches `errors.reports_errors`.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Logging the model checks its input example by loading it back: MLflow announces that and
    # draws a progress bar for each file it copies. The stages' output keeps what people need.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop notices
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The interpreter's last garbage collection walks every object torch and MLflow created, about
    # half a second for nothing: every file is closed by then. Freezing them skips that walk.
    atexit.register(gc.freeze)


def settle_mkl_vector_math() -> None:
    """Let oneMKL choose each vector-math kernel on one thread, before torch's workers share a call.

    torch splits `exp` of a 128x20 tensor between its threads, and each calls oneMKL on its half.
    oneMKL 2024 (bundled with torch) picks a function's kernel on its first call. When two threads
    make that first call together, one of them can run the low-accuracy kernel on its whole half
    (pytorch/pytorch#188792). Here 24 of 260 fresh processes got such an `exp`: up to 634 ulps off,
    bit-for-bit oneMKL's AVX2 EP kernel, so they trained along another curve. With one call per
    function first: 0 of 380. One element never starts torch's worker threads, so
    `flush_denormals` can still come later.
    """
    one = torch.ones(1)
    for name in MKL_VECTOR_MATH:
        getattr(torch, name)(one)


def pick_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when present), cpu or cuda."""
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            "train.device = 'cuda' but no CUDA device is available; use auto or cpu"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def flush_denormals() -> None:
    """Treat subnormal floats as zero, on this thread and on the worker threads torch starts later.

    Adam's running mean for pixels that are nearly always 0 decays into subnormals (over 80K values
    after one epoch), which the CPU computes far more slowly. No digit of the lab's curve moves.
    Worker threads copy the setting when they start, so call this before torch's first parallel
    operation.
    """
    torch.set_flush_denormal(True)


class StopRequest:
    """Set by SIGINT or SIGTERM; the training loop calls `check()` where it can stop safely."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise Interrupted(signum)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While the block runs, SIGINT and SIGTERM only ask it to stop at its next `check()`."""
    request = StopRequest()
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_in_foreground(command: list[str]) -> int:
    """Run `command` and return its exit status as a shell reports it; 130 when Ctrl-C stopped it.

    Ctrl-C reaches the child as it reaches us (the terminal signals the whole foreground process
    group), so the child stops cleanly and says so; we only wait for it, and report the stop as
    130, as a shell would, where DVC reports 255 for its interrupted stage.
    `subprocess.run` would raise KeyboardInterrupt here, kill the child 0.25 s later and print a
    second error.
    """
    interrupted = []
    child = subprocess.Popen(command)
    # From here on Ctrl-C is the child's to act on: we only note it (SIG_IGN, set before Popen,
    # would be inherited, and Ctrl-C would not stop the child)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted and code:
        return 128 + signal.SIGINT
    return 128 - code if code < 0 else code  # killed by a signal: 128 + its number
