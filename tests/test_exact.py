"""Exact mode (pipeline/exact.py): a short piece of the real training and evaluation gives the
same bytes natively and on an emulated CPU of the other vendor, and other bytes without it."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.exact import SETTINGS, SWITCH
from pipeline.paths import REPO_ROOT

PROBE = Path(__file__).parent / "helpers" / "exact_probe.py"
STEPS, IMAGES = 2, 192  # under qemu: about 80 s a run on a 2-core machine
# qemu-user's CPU models of the other vendor, both AVX2 (qemu emulates no AVX-512)
OTHER_VENDOR = {"GenuineIntel": "EPYC-Milan", "AuthenticAMD": "Haswell-v4"}

pytestmark = pytest.mark.slow


def vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":")[1].strip()
    return "unknown"


@pytest.fixture(scope="module")
def emulated_cpu() -> str:
    if platform.machine() != "x86_64" or vendor() not in OTHER_VENDOR:
        pytest.skip(f"exact mode is for x86 Intel and AMD CPUs; this is {platform.machine()}")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is missing: `make test` installs Debian's qemu-user as root")
    return OTHER_VENDOR[vendor()]


def probe(exact: bool, cpu: str | None = None, threads: int | None = None) -> dict:
    """The probe's digests; under `qemu-x86_64 -cpu cpu` when `cpu` is given."""
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
    env[SWITCH] = "1" if exact else "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # the venv's python by its own path, so that it finds its site-packages under qemu too
    command = [sys.executable, str(PROBE), str(STEPS), str(IMAGES)]
    if cpu:
        command = ["qemu-x86_64", "-cpu", cpu, *command]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_exact_mode_gives_the_same_bytes_on_the_other_vendors_cpu(emulated_cpu: str) -> None:
    native, emulated = probe(exact=True), probe(exact=True, cpu=emulated_cpu)
    assert native == emulated, f"native {native}, under qemu -cpu {emulated_cpu} {emulated}"
    assert native["cpu_capability"] == "AVX2"


def test_default_settings_give_other_bytes_on_the_other_vendors_cpu(emulated_cpu: str) -> None:
    # what makes the test above able to fail: without exact mode the bytes are the CPU's
    native, emulated = probe(exact=False), probe(exact=False, cpu=emulated_cpu)
    differ = [key for key in native if key.endswith(("weights", "evaluate"))]
    differ = [key for key in differ if native[key] != emulated[key]]
    assert differ, f"native and qemu -cpu {emulated_cpu} agree without exact mode: {native}"


def test_exact_mode_ignores_the_thread_count_asked_for() -> None:
    one, many = probe(exact=True, threads=1), probe(exact=True, threads=4)
    assert one == many and one["threads"] == int(SETTINGS["OMP_NUM_THREADS"])
