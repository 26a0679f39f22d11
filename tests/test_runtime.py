"""Process set-up: every entry point starts the runtime first; device, denormals."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import runtime
from pipeline.errors import PipelineError

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


STAGES = tuple(yaml.safe_load((PACKAGE.parent / "dvc.yaml").read_text())["stages"])


LIBRARY_MODULES = sorted(
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if p.stem != "__init__"
)


SPY_ON_EXP_AND_LOG = (
    "import sys, torch\n"
    "calls = []\n"
    "for name in ('exp', 'log'):\n"
    "    def spy(x, name=name, real=getattr(torch, name)):\n"
    "        calls.append((name, x.numel()))\n"
    "        return real(x)\n"
    "    setattr(torch, name, spy)\n"
)


def run_probe(code: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SPY_ON_EXP_AND_LOG + code], capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow  # fresh interpreters that import torch, MLflow and Gradio: 8 s of the quick loop
def test_importing_changes_nothing_global_and_runtime_start_settles_exp_and_log() -> None:
    # Importing every module runs no vector math and leaves the umask alone. Then
    # pytorch/pytorch#188792 (see pipeline/runtime.py), which cannot be triggered on demand: the
    # workaround makes oneMKL serve exp and log (the vector-math functions the model and
    # evaluation call) first on a single element, which stays on one thread.
    modules = ", ".join(f"pipeline.{name}" for name in LIBRARY_MODULES)
    code = (
        f"import os\nmask = os.umask(0o22)\nimport {modules}\nprint(calls, os.umask(mask))\n"
        "from pipeline import runtime\nruntime.start()\nprint(calls)\n"
    )
    assert run_probe(code).splitlines() == ["[] 18", "[('exp', 1), ('log', 1)]"]


class Started(Exception):
    pass


def subcommands() -> list[str]:
    """Every `mnist-vae` command, with the arguments it requires (a placeholder each)."""
    from pipeline import commands

    (chooser,) = [
        a for a in commands.parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return [
        " ".join([name] + [f"{a.option_strings[0]} x" for a in sub._actions if a.required])
        for name, sub in chooser.choices.items()
    ]


COMMANDS = subcommands()


@pytest.mark.parametrize(
    "entry", [*(f"stages.{s}" for s in STAGES), *(f"commands {c}" for c in COMMANDS)]
)
def test_every_entry_point_starts_the_runtime_first(
    entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In an empty folder (no params.yaml, no data) anything done before the start would fail.
    monkeypatch.chdir(tmp_path)
    entry, *command = entry.split()  # "commands score --input x": the command and its argv
    monkeypatch.setattr(sys, "argv", ["mnist-vae", *command])
    monkeypatch.setattr(runtime, "start", lambda: (_ for _ in ()).throw(Started))
    with pytest.raises(Started):
        importlib.import_module(f"pipeline.{entry}").main()


def test_the_device_is_cuda_only_when_asked_and_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("cuda")
    assert runtime.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("auto") == torch.device("cpu")
    with pytest.raises(PipelineError) as refused:
        runtime.pick_device("cuda")
    assert str(refused.value) == (
        "train.device = 'cuda' but no CUDA device is available; use auto or cpu"
    )


def test_flush_denormals_treats_subnormals_as_zero() -> None:
    try:
        runtime.flush_denormals()
        assert (torch.full((4,), 1e-30) * 1e-10).count_nonzero() == 0  # 1e-40 is subnormal
    finally:
        torch.set_flush_denormal(False)
    assert (torch.full((4,), 1e-30) * 1e-10).count_nonzero() == 4


def test_flush_denormals_reaches_the_worker_threads_torch_starts_later() -> None:
    # A fresh process: the flag belongs to each thread, and this process's workers already run.
    probe = (
        "import torch\n"
        "from pipeline.runtime import flush_denormals\n"
        "torch.set_num_threads(2)\n"
        "flush_denormals()\n"
        "x = torch.full((1 << 20,), 1e-30) * 1e-10\n"  # 1e-40, subnormal unless flushed
        "print(int(x.count_nonzero()))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0"


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="train.device = 'cuda' but no CUDA device"):
        runtime.pick_device("cuda")
    assert runtime.pick_device("auto") == torch.device("cpu")


CHILD = """
import signal, sys, time
def stop(signum, frame):
    print("child: stopped cleanly", flush=True)
    sys.exit(255)  # as DVC does when the stage it runs was stopped
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(30)
"""


def test_ctrl_c_leaves_the_stopping_to_the_child_and_exits_130() -> None:
    parent = (
        "import sys; from pipeline.runtime import run_in_foreground; "
        f"sys.exit(run_in_foreground([sys.executable, '-c', {CHILD!r}]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", parent],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which Ctrl-C signals as a whole
    )
    assert process.stdout.readline() == "ready\n"
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert (out, err, process.returncode) == ("child: stopped cleanly\n", "", 130)
