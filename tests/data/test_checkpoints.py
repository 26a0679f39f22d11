"""What an interrupted run says it keeps."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.checkpoints import kept
from pipeline.vae.history import Epoch


def rows(n: int) -> list[Epoch]:
    return [Epoch(e, 0, 0, 0, 0, 0, 0, 1.0, 0.001) for e in range(1, n + 1)]


def test_an_interrupted_run_names_the_epochs_it_keeps_and_how_to_go_on() -> None:
    path = Path("checkpoints/train.pt")
    assert kept(rows(0), path, "r1") == "no epoch had finished; MLflow run r1 is marked KILLED"
    assert kept(rows(1), path, "r1") == (
        "epoch 1 is kept in checkpoints/train.pt and MLflow run r1 is marked KILLED: run the "
        "same command again to resume"
    )
    assert kept(rows(3), path, "r1").startswith("epochs 1-3 are kept in checkpoints/train.pt ")
