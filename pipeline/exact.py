"""Exact mode: the same bytes from training, evaluation and the figures on any x86 CPU.

Set in the environment before torch (or numpy) loads, so `pipeline/__init__.py` applies it: every
entry point imports the package first. On by default; `MNIST_VAE_EXACT=0` turns it off.

- `MKL_CBWR=COMPATIBLE`: oneMKL's one code branch that it promises on every x86 vendor (its AVX2
  and AVX-512 branches run on Intel only and fall back elsewhere); fp32 `nn.Linear` is its sgemm.
- `MKL_NUM_THREADS=2`, `OMP_NUM_THREADS=2`: the thread counts pinned, whatever the machine has
  or asks for: oneMKL splits a large sgemm between threads in a way that changes its sums (the
  evaluation's 800-row products gave other bytes on 2 threads than on 1), so every machine must
  split alike.
- `ATEN_CPU_CAPABILITY=avx2`: torch's vectorised kernels as on an AVX2 CPU, also on AVX-512 ones.
- `OPENBLAS_CORETYPE=Haswell`: numpy's OpenBLAS (the figures' arithmetic) as on an AVX2 CPU.

What it cannot promise: the same bytes on a GPU, on another torch or oneMKL release, or on ARM.
"""

from __future__ import annotations

import os
import sys
import warnings

SWITCH = "MNIST_VAE_EXACT"
SETTINGS = {
    "MKL_CBWR": "COMPATIBLE",
    "MKL_NUM_THREADS": "2",
    "OMP_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "OPENBLAS_CORETYPE": "Haswell",
}


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def apply() -> None:
    """Set exact mode's environment when it is on (before torch loads; later it is too late)."""
    if enabled():
        if "torch" in sys.modules:
            warnings.warn(
                "exact mode: torch was imported before pipeline, so its thread count is not "
                "pinned; import pipeline first for the same bytes on every CPU",
                stacklevel=2,
            )
        os.environ.update(SETTINGS)


def recorded() -> dict[str, str]:
    """What a run records: whether exact mode was on, and each setting as this process has it."""
    return {"exact_mode": str(enabled()).lower()} | {
        f"env.{name}": os.environ.get(name, "") for name in SETTINGS
    }
