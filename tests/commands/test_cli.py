"""`mnist-vae`: one console script that lists every command, and the paper's preset as a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.repo import REPO_ROOT, committed_params
from pipeline import commands, runtime

COMMANDS = {
    "promote", "generate", "score", "report", "paper", "explore", "sweep", "stack", "bench",
    "serve", "loadtest", "monitor", "drift-power",
}  # fmt: skip


def test_the_console_script_lists_every_command() -> None:
    script = Path(sys.executable).parent / "mnist-vae"
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    # a command at 4 spaces; a long name's help wraps to a line of its own, indented further
    listed = {found[1] for line in shown.splitlines() if (found := re.match(r"    (\S+)", line))}
    assert listed == COMMANDS
    subparsers = commands.parser()._subparsers._group_actions[0].choices  # every one registered
    assert set(subparsers) == COMMANDS


def test_python_m_pipeline_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True
    )
    assert all(name in result.stdout for name in COMMANDS)


def test_make_targets_call_the_console_script() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in (
        "promote",
        "report",
        "paper",
        "explore",
        "sweep",
        "stack",
        "bench",
        "drift-power",
    ):
        assert f"\tmnist-vae {target}" in makefile, target
    assert "python -m pipeline" not in makefile


@pytest.fixture
def lab_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A folder with the lab's params.yaml; commands that would run are recorded, not run."""
    (tmp_path / "params.yaml").write_text(committed_params())
    monkeypatch.chdir(tmp_path)
    ran: list[list[str]] = []
    monkeypatch.setattr(runtime, "run_in_foreground", lambda cmd: ran.append(cmd) or 0)
    return ran


def test_paper_runs_the_preset_as_a_named_dvc_experiment(lab_repo: list[list[str]]) -> None:
    with pytest.raises(SystemExit) as done:
        commands.main(["paper", "--name", "burda-short", "--epochs", "4", "--k", "100"])
    assert done.value.code == 0
    (command,) = lab_repo
    assert command[:6] == [sys.executable, "-m", "dvc", "exp", "run", "-n"]
    assert command[6] == "burda-short"
    flags = dict(flag.removeprefix("-S").split("=", 1) for flag in command[7:])
    preset = yaml.safe_load((REPO_ROOT / "pipeline/presets/burda2015.yaml").read_text())
    assert set(flags) == set(preset)
    assert flags["train.epochs"] == "4" and flags["evaluate.iwae_samples"] == "100"
    assert flags["model.activation"] == "tanh" and flags["train.batch_size"] == "20"
    assert float(flags["train.adam_eps"]) == 1e-4


def test_paper_refuses_a_length_params_yaml_would_refuse_before_dvc_runs(
    lab_repo: list[list[str]], capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as refused:
        commands.main(["paper", "--epochs", "0"])
    assert refused.value.code == 2 and lab_repo == []
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: params.yaml with preset burda2015: train.epochs = 0 is out of range; must be >= 1"
    ]


def test_explore_with_a_model_that_does_not_exist_is_one_line_at_start(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as failed:
        commands.main(["explore", "--model", "models:/nope@champion", "--port", "1"])
    assert failed.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot load model models:/nope@champion from sqlite:///")
