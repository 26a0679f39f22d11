"""The MLflow store: a new SQLite store opened by several processes at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers.repo import environment, store

# Each process says it is ready once it has imported MLflow, waits for the go file, then opens
# the store as a train stage does first: the three meet on it within milliseconds.
OPEN_AT_THE_SIGNAL = """
import time
from pathlib import Path
from pipeline.tracking import store
print("ready", flush=True)
while not Path("go").exists():
    time.sleep(0.001)
print(store.connect("mnist-vae"))
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_together_create_it_once(tmp_path: Path) -> None:
    # `dvc queue start -j 2` in a fresh clone: the stages' first MLflow calls meet on no store.
    command = [sys.executable, "-c", OPEN_AT_THE_SIGNAL]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    workers = [
        subprocess.Popen(command, cwd=tmp_path, env=environment(), **pipes) for _ in range(3)
    ]
    try:
        assert [worker.stdout.readline() for worker in workers] == ["ready\n"] * 3
        (tmp_path / "go").touch()
        results = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0, 0], results
    (experiment_id,) = {out.strip() for out, _ in results}
    assert store(tmp_path).get_experiment(experiment_id).name == "mnist-vae"


def test_a_queue_workers_copy_creates_the_experiment_with_its_artifacts_in_the_repository(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.tracking.store import connect

    copy = workdir / ".dvc" / "tmp" / "exps" / "tmp1234"  # where `dvc queue start` runs stages
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    experiment = store(workdir).get_experiment(connect("mnist-vae"))
    assert experiment.artifact_location == (workdir / "mlruns").as_uri()
    assert not (copy / "mlflow.db").exists()
