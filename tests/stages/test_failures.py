"""Failures of the stages: one line, the right exit code, nothing half-written, resumable."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.repo import store
from helpers.workdir import trained_run_id
from pipeline.config import load_params
from pipeline.paths import CHECKPOINT, TRAIN_METRICS, WEIGHTS
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import train as train_stage
from pipeline.tracking import runs


def test_a_stage_given_old_outputs_prints_one_line(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # The train stage of an older version wrote models/vae.pt; evaluate must say what to do.
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hidden_dim": 32, "latent_dim": 4}, WEIGHTS.with_suffix(".pt"))
    with pytest.raises(SystemExit) as exited:
        evaluate_stage.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: models/vae.pt is in the old torch.save format, which this version no longer "
        "reads; run `dvc repro train` to write models/vae.safetensors"
    ]


def run_main(module, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Call a stage's entry point as `python -m` would; its exit code and stderr lines."""
    with pytest.raises(SystemExit) as exited:
        module.main()
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def checkpoint_run_id() -> str:
    return torch.load(CHECKPOINT, weights_only=True)["run_id"]


def test_a_signal_during_training_keeps_the_finished_epochs_and_marks_the_run_killed(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, set_params
) -> None:
    set_params(workdir, train={"epochs": 4})
    log_epoch = runs.log_epoch

    def signal_after_epoch_2(row, *args):
        log_epoch(row, *args)
        if row["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would send it

    monkeypatch.setattr(runs, "log_epoch", signal_after_epoch_2)
    code, lines = run_main(train_stage, capsys)
    run_id = checkpoint_run_id()
    assert code == 128 + signal.SIGTERM
    assert lines == [
        f"error: interrupted by SIGTERM; epochs 1-2 are kept in {CHECKPOINT} and MLflow run "
        f"{run_id} is marked KILLED: run the same command again to resume"
    ]
    assert torch.load(CHECKPOINT, weights_only=True)["epoch"] == 2
    assert store(workdir).get_run(run_id).info.status == "KILLED"
    assert not WEIGHTS.exists() and not TRAIN_METRICS.exists()

    monkeypatch.setattr(runs, "log_epoch", log_epoch)
    train_stage.train(load_params())
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert trained_run_id() == run_id
    client = store(workdir)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]


@pytest.fixture
def small_disk(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The workdir on a 32 MB tmpfs of its own (root only); unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        shutil.copytree(workdir, mount / "work")
        monkeypatch.chdir(mount / "work")
        yield mount / "work"
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its filesystem is full."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_stops_training_in_one_line_and_the_next_run_resumes(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, set_params
) -> None:
    set_params(small_disk, train={"epochs": 4})
    log_epoch = runs.log_epoch
    filled = []

    def fill_after_epoch_2(row, *args):
        log_epoch(row, *args)
        if row["epoch"] == 2:
            filled.append(fill(small_disk))

    monkeypatch.setattr(runs, "log_epoch", fill_after_epoch_2)
    code, lines = run_main(train_stage, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: no space left on the device writing {CHECKPOINT}; ")
    assert lines[0].endswith("free some space and run it again (training resumes from its last "
                             "finished epoch)")  # fmt: skip
    assert torch.load(CHECKPOINT, weights_only=True)["epoch"] == 2  # whole, not half-written
    assert not [p for p in small_disk.rglob("*.tmp")]
    run_id = checkpoint_run_id()

    filled[0].unlink()
    monkeypatch.setattr(runs, "log_epoch", log_epoch)
    train_stage.train(load_params())
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert trained_run_id() == run_id
    steps = [m.step for m in store(small_disk).get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated", "hostile pickle"])
def test_a_damaged_checkpoint_is_set_aside_and_training_starts_over(
    workdir: Path, capsys: pytest.CaptureFixture, tmp_path: Path, damage: str
) -> None:
    CHECKPOINT.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    if damage == "truncated":
        CHECKPOINT.write_bytes(b"PK\x03\x04 not a whole zip")
    else:

        class Hostile:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"fingerprint": "x", "model": Hostile()}, CHECKPOINT)
    damaged = CHECKPOINT.read_bytes()
    train_stage.train(load_params())
    err = capsys.readouterr().err.splitlines()
    aside = CHECKPOINT.with_name("train.pt.damaged")
    assert [line for line in err if "warning" in line] == [
        line for line in err if line.startswith(f"warning: checkpoint {CHECKPOINT} is unreadable")
    ]
    assert any(line.endswith(f"moved it to {aside} and starting over") for line in err)
    assert aside.read_bytes() == damaged and not marker.exists()
    assert json.loads(TRAIN_METRICS.read_text())["epochs"] == 3  # trained from the start


def test_a_store_that_is_not_a_database_is_named(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    (workdir / "mlflow.db").write_text("not a database")
    code, lines = run_main(train_stage, capsys)
    assert code == 1
    assert lines == [
        f"error: {workdir / 'mlflow.db'} is not an MLflow database; move it away (a new store "
        "is created on the next run) or set MLFLOW_TRACKING_URI to your store"
    ]
    assert not CHECKPOINT.exists()


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("mlflow", "experiment", "", "mlflow.experiment = '' is not a usable MLflow name"),
        ("registry", "model_name", "a/b:c", "MLflow refuses '/' and ':' in names"),
        ("model", "hidden_dim", 10_000_000, "must be <= 4096 (25 MB of weights"),
        ("sample", "n_samples", 100_000_000, "must be <= 1024 (a 32x32 grid)"),
    ],
)
def test_names_and_sizes_that_cannot_work_are_refused_before_any_work(
    workdir: Path,
    capsys: pytest.CaptureFixture,
    section: str,
    key: str,
    value: object,
    message: str,
) -> None:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw[section][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    code, lines = run_main(train_stage, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0]
    assert not CHECKPOINT.exists() and not list(workdir.glob("mlruns"))


def test_an_interrupted_evaluation_says_so_in_one_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    train_stage.train(load_params())
    capsys.readouterr()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_stage, "evaluate", ctrl_c)
    code, lines = run_main(evaluate_stage, capsys)
    assert (code, lines) == (
        130,
        ["error: interrupted by SIGINT; no output was half-written: run it again"],
    )
    run_id = trained_run_id()
    assert store(workdir).get_run(run_id).info.status == "FINISHED"  # training did finish


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_stops_the_train_process_and_the_next_run_resumes(
    workdir: Path, set_params, signum: int, capsys: pytest.CaptureFixture
) -> None:
    set_params(workdir, train={"epochs": 12})  # the signal at epoch 2 of 12: 10 to spare
    command = [sys.executable, "-m", "pipeline.stages.train"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("Epoch [2/12]"):
            process.send_signal(signum)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"error: interrupted by {name}; epochs 1-")
    kept = torch.load(CHECKPOINT, weights_only=True)["epoch"]
    run_id = checkpoint_run_id()
    assert store(workdir).get_run(run_id).info.status == "KILLED"

    train_stage.train(load_params())  # the next run (in this process: no second interpreter)
    assert f"resuming after epoch {kept}" in capsys.readouterr().out
    assert store(workdir).get_run(run_id).info.status == "FINISHED"
    assert trained_run_id() == run_id


OUT_OF_MEMORY_DRIVER = """
import resource, sys
from pipeline.stages import evaluate
# A real allocation failure: cap this process's data segment a little above what it uses now.
used = int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (used + (300 << 20), resource.RLIM_INFINITY))
sys.argv = ["evaluate"]
evaluate.main()
"""


@pytest.mark.slow
def test_running_out_of_memory_in_a_real_process_is_one_line(workdir: Path, set_params) -> None:
    set_params(workdir, model={"hidden_dim": 4096}, train={"epochs": 1})
    train_stage.train(load_params())
    before = (workdir / WEIGHTS).read_bytes()
    # k = 10,000 draws: each chunk of 32,768 rows needs 0.5 GB of hidden units at width 4096
    set_params(workdir, model={"hidden_dim": 4096}, train={"epochs": 1},
               evaluate={"iwae_samples": 10_000})  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_DRIVER], capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (")
    assert "lower the sizes in params.yaml (model.hidden_dim, model.hidden_layers" in lines[0]
    assert (workdir / WEIGHTS).read_bytes() == before
    assert not (workdir / "metrics" / "evaluate.json").exists()


@pytest.mark.slow  # SQLite waits out its busy timeout first
def test_a_store_locked_by_another_process_is_named(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    import sqlite3

    holder = sqlite3.connect(workdir / "mlflow.db")
    holder.execute("BEGIN EXCLUSIVE")  # as a long write from another process would
    try:
        code, lines = run_main(train_stage, capsys)
    finally:
        holder.rollback()
        holder.close()
    assert code == 1
    assert lines == [
        f"error: the MLflow store sqlite:///{workdir / 'mlflow.db'} is locked by another "
        "process; wait for it to finish, or use a tracking server (MLFLOW_TRACKING_URI) for "
        "parallel runs"
    ]
