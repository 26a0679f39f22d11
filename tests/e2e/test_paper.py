"""Slow: `make paper`, Burda et al.'s protocol, in its short form (2 epochs, k = 20)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.repo import environment, git_commit, store
from pipeline.data.weights import load_vae
from pipeline.paths import EVAL_METRICS, TRAIN_METRICS, WEIGHTS

pytestmark = pytest.mark.slow


def test_the_short_paper_preset_runs_burdas_protocol_as_a_dvc_experiment(
    reproduced: tuple[Path, str], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    git_commit(repo, "the lab's results")
    short = ["PAPER_NAME=burda-short", "PAPER_EPOCHS=2", "PAPER_K=20", "INSTALLED="]
    result = subprocess.run(
        ["make", "paper", *short], cwd=repo, env=environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'download'" not in result.stdout  # the data come from DVC's cache
    assert "Epoch [2/2]" in result.stdout and " left" in result.stdout  # progress with an ETA

    # The experiment's outputs are in the workspace: Burda's network, epochs and evaluation.
    assert json.loads((repo / TRAIN_METRICS).read_text())["epochs"] == 2
    model = load_vae(repo / WEIGHTS)
    assert (model.hidden_dim, model.hidden_layers, model.activation, model.latent_dim) == (
        200, 2, "tanh", 50,
    )  # fmt: skip
    metrics = json.loads((repo / EVAL_METRICS).read_text())
    assert 0 < metrics["log_px_iwae_se"] < 1 and metrics["active_units"] <= 50
    # Dynamically binarised pixels: about 111 nats after 2 epochs at k = 20 (measured).
    assert -115 < metrics["log_px_iwae"] < -105

    client = store(repo)
    experiment = client.get_experiment_by_name("mnist-vae")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'burda-short'")
    assert run.data.params["train.schedule"] == "burda"
    assert run.data.tags["dvc.exp_name"] == "burda-short"
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert rates == pytest.approx([1e-3, 7.2e-4])  # stage 0 is one epoch, stage 1 three
