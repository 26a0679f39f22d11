"""Slow: the whole pipeline through `dvc repro` on real MNIST, in a fresh copy of the repository."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import data
from pipeline.data import raw_dir
from pipeline.paths import EVAL_METRICS, FIGURES, RAW_ROOT, TEST_SPLIT, TRAIN_HISTORY, TRAIN_SPLIT

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# The lab handout's training loss per epoch and its tolerances: a copy of
# shared/reference/lab_curve.json, so that CI does not depend on shared/.
LAB_CURVE = [
    164.3748,
    121.282,
    114.5211,
    111.6053,
    109.8342,
    108.6767,
    107.8205,
    107.1637,
    106.691,
    106.2222,
]  # noqa: E501
EACH_EPOCH_TOLERANCE, FINAL_TOLERANCE = 1.5, 1.0


def copy_working_tree(dest: Path) -> Path:
    """A fresh git repository holding the working tree's files (committed or not, never ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        ["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    repo = copy_working_tree(tmp_path_factory.mktemp("pipeline"))
    result = dvc(repo, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return repo, result.stdout


def test_every_stage_ran(reproduced: tuple[Path, str]) -> None:
    _, output = reproduced
    for stage in ("download", "preprocess", "train", "evaluate", "sample"):
        assert f"Running stage '{stage}'" in output


def test_raw_files_are_the_canonical_ones(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    data.verify_all(raw_dir(repo / RAW_ROOT))


def test_processed_tensors(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    train_x, train_y = data.load_split(repo / TRAIN_SPLIT)
    test_x, _ = data.load_split(repo / TEST_SPLIT)
    assert train_x.shape == (60000, 784) and test_x.shape == (10000, 784)
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    assert sorted(set(train_y.tolist())) == list(range(10))


def test_training_reproduces_the_lab_curve(reproduced: tuple[Path, str]) -> None:
    repo, output = reproduced
    with (repo / TRAIN_HISTORY).open() as f:
        measured = [float(row["train_loss"]) for row in csv.DictReader(f)]
    table = "\n".join(
        f"  epoch {epoch:2d}: measured {ours:9.4f}   lab {lab:9.4f}   diff {ours - lab:+.4f}"
        for epoch, (ours, lab) in enumerate(zip(measured, LAB_CURVE, strict=False), start=1)
    )
    report = f"training loss against the lab's curve:\n{table}"
    assert len(measured) == len(LAB_CURVE), report
    gaps = [abs(ours - lab) for ours, lab in zip(measured, LAB_CURVE, strict=True)]
    assert max(gaps) <= EACH_EPOCH_TOLERANCE, report
    assert abs(measured[-1] - LAB_CURVE[-1]) <= FINAL_TOLERANCE, report
    assert f"Epoch [10/10] Loss: {measured[-1]:.4f}" in output  # the handout's line


def test_evaluation_metrics_are_all_there(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    metrics = json.loads((repo / EVAL_METRICS).read_text())
    scalars = (
        "test_loss",
        "test_recon",
        "test_kl",
        "elbo",
        "log_px_iwae",
        "iwae_samples",
        "active_units",
        "latent_dim",
    )  # noqa: E501
    for key in scalars:
        assert isinstance(metrics[key], int | float), key
    assert metrics["iwae_samples"] == 128 and metrics["latent_dim"] == 20
    assert len(metrics["kl_per_dim"]) == 20 and len(metrics["activity_per_dim"]) == 20
    assert sorted(metrics["loss_per_class"]) == [str(d) for d in range(10)]
    assert metrics["log_px_iwae"] > metrics["elbo"]  # the IWAE bound is tighter than the ELBO
    assert 100 < metrics["test_loss"] < 110 and 0 < metrics["active_units"] <= 20


def test_figures_exist(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    names = (
        "generated",
        "reconstructions",
        "latent_space",
        "manifold",
        "interpolation",
        "training_curves",
    )  # noqa: E501
    for name in names:
        assert (repo / FIGURES / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_second_repro_changes_nothing(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    again = dvc(repo, "repro")
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = dvc(repo, "status")
    assert "up to date" in status.stdout, status.stdout
