"""Process-wide set-up, made once by every entry point (stages, commands, bench) before any work."""

from __future__ import annotations

import atexit
import gc
import logging
import os

import torch

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
    `training.flush_denormals` can still come later.
    """
    one = torch.ones(1)
    for name in MKL_VECTOR_MATH:
        getattr(torch, name)(one)
