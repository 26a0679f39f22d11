"""Slow: the whole pipeline through `dvc repro` on real MNIST, in a fresh copy of the repository."""

from __future__ import annotations

import csv
import json
import shutil
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import repo as helpers
from helpers.repo import (
    FIGURE_NAMES,
    dvc,
    grid_steps,
    pipeline_command,
    start_server,
    stop_server,
    store,
    wait_for,
)
from helpers.workdir import trained_run_id
from pipeline.config import load_params
from pipeline.data import mnist as data
from pipeline.data import splits
from pipeline.data.mnist import raw_dir
from pipeline.paths import (
    EVAL_METRICS,
    FIGURES,
    RAW_ROOT,
    TEST_SPLIT,
    TRAIN_HISTORY,
    TRAIN_SPLIT,
)
from pipeline.tools.servers import free_port
from pipeline.vae import training

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# The lab handout's training loss per epoch and its tolerances (a copy of
# shared/reference/lab_curve.json in the package, so that CI does not depend on shared/).
LAB = json.loads((REPO_ROOT / "pipeline" / "vae" / "lab_curve.json").read_text())
LAB_CURVE = LAB["epochs"]
EACH_EPOCH_TOLERANCE, FINAL_TOLERANCE = LAB["tolerance"]["each_epoch"], LAB["tolerance"]["final"]


def test_every_stage_ran(reproduced: tuple[Path, str]) -> None:
    repo, output = reproduced
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in output


def test_raw_files_are_the_canonical_ones(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    data.verify_all(raw_dir(repo / RAW_ROOT))


def test_processed_tensors(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    train_x, train_y = splits.load_split(repo / TRAIN_SPLIT)
    test_x, _ = splits.load_split(repo / TEST_SPLIT)
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


def test_the_autograd_step_reproduces_the_lab_curve_too(reproduced: tuple[Path, str]) -> None:
    # The stage ran the fast step (train.step: auto, on the CPU); model.py through autograd, the
    # reference, on the same data and seed stays within the same tolerances, and near the fast.
    repo, _ = reproduced
    with (repo / TRAIN_HISTORY).open() as f:
        fast = [float(row["train_loss"]) for row in csv.DictReader(f)]
    params = load_params(repo / "params.yaml")
    cfg, shape = params.train, params.model
    torch.manual_seed(cfg.seed)
    images, _ = splits.load_split(repo / TRAIN_SPLIT)
    test_images, _ = splits.load_split(repo / TEST_SPLIT)
    model = training.build_vae(shape)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = training.make_optimizer(model, cfg.lr, betas, cfg.adam_eps, cfg.adam_v0)
    rows = training.fit(
        model, optimizer, images, test_images[:500], first_epoch=1, epochs=cfg.epochs,
        batch_size=cfg.batch_size, binarize=False, fast=False,
    )  # fmt: skip
    autograd = [row.train_loss for row in rows]
    report = f"lab {LAB_CURVE}\nfast {fast}\nautograd {autograd}"
    assert max(abs(ours - lab) for ours, lab in zip(autograd, LAB_CURVE, strict=True)) <= (
        EACH_EPOCH_TOLERANCE
    ), report
    assert abs(autograd[-1] - LAB_CURVE[-1]) <= FINAL_TOLERANCE, report
    assert max(abs(a - b) for a, b in zip(autograd, fast, strict=True)) < 0.1, report


def test_evaluation_metrics_are_all_there(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    metrics = json.loads((repo / EVAL_METRICS).read_text())
    assert list(metrics) == [
        "test_loss", "test_recon", "test_kl", "log_px_iwae", "log_px_iwae_se", "active_units",
    ]  # fmt: skip
    breakdown = json.loads((repo / "reports/evaluate_breakdown.json").read_text())
    assert len(breakdown["kl_per_dim"]) == 20 and len(breakdown["activity_per_dim"]) == 20
    assert sorted(breakdown["loss_per_class"]) == [str(d) for d in range(10)]
    assert metrics["log_px_iwae"] > -metrics["test_loss"]  # tighter than the ELBO
    assert 100 < metrics["test_loss"] < 110 and 0 < metrics["active_units"] <= 20


def test_figures_exist(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    for name in FIGURE_NAMES:
        assert (repo / FIGURES / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_the_mlflow_store_holds_the_whole_run(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    client = store(repo)
    run_id = trained_run_id(repo)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/recon", "train/kl", "test/loss", "test/recon", "test/kl"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, 11)), key
    assert grid_steps(client, run_id) == list(
        range(0, 11)
    )  # the untrained decoder, then each epoch
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in FIGURE_NAMES}
    assert run.outputs.model_outputs  # the logged model
    evaluation = json.loads((repo / EVAL_METRICS).read_text())
    assert run.data.metrics["evaluate/log_px_iwae"] == pytest.approx(evaluation["log_px_iwae"])
    assert run.data.params["model.hidden_dim"] == "400"


def test_the_registry_has_the_evaluated_model_as_candidate(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    version = store(repo).get_model_version_by_alias("mnist-vae", "candidate")
    run_id = trained_run_id(repo)
    assert version.run_id == run_id and version.tags["evaluated"] == "true"
    assert float(version.tags["metric.test_loss"]) == pytest.approx(
        json.loads((repo / EVAL_METRICS).read_text())["test_loss"]
    )


@pytest.fixture(scope="session")
def champion(reproduced: tuple[Path, str]) -> Path:
    """The reproduced repository, whose first evaluated model is @champion."""
    repo, _ = reproduced
    result = pipeline_command(repo, "promote")
    assert result.returncode == 0, result.stderr
    # evaluate made the first model champion; promoting it again changes nothing
    assert result.stdout.startswith("keep @champion on v1: version 1 is already champion")
    return repo


def test_the_champion_loads_as_a_pyfunc_from_the_registry(champion: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{champion / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    z = np.random.default_rng(0).standard_normal((5, 20)).astype(np.float32)
    images = model.predict(z)  # as old clients call it: decode
    assert images.shape == (5, 784) and images.min() >= 0 and images.max() <= 1
    assert model.metadata.metadata["latent_dim"] == 20


def test_the_champion_scores_digits_far_below_noise_and_rotated_digits(champion: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{champion / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    digits = splits.load_split(champion / TEST_SPLIT)[0][:500].numpy()
    noise = np.random.default_rng(0).uniform(size=digits.shape).astype(np.float32)
    rotated = np.rot90(digits.reshape(-1, 28, 28), axes=(1, 2)).reshape(-1, 784).copy()
    params = {"method": "score", "samples": 4}
    scores = {name: model.predict(x, params=params) for name, x in
              (("digits", digits), ("noise", noise), ("rotated", rotated))}  # fmt: skip
    assert 80 < scores["digits"].mean() < 130  # the test loss, about 105 nats
    assert scores["noise"].min() > 3 * scores["digits"].max()
    assert scores["rotated"].mean() > scores["digits"].mean() + 30  # measured: 150 against 104
    reconstructed = model.predict(digits, params={"method": "reconstruct"})
    assert np.abs(reconstructed - digits).mean() < np.abs(rotated - digits).mean() / 2


def test_the_monitor_passes_clean_unseen_digits_and_flags_every_shift(
    champion: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 1,000 test digits the reference profile left out: as they are, under each shift
    of docs/monitoring.md, and with 10% of them shifted."""
    from pipeline.commands.monitoring import Batch, monitor
    from pipeline.tools.drift_power import SHIFTS
    from pipeline.tracking import reference

    monkeypatch.chdir(champion)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "models:/mnist-vae@champion"
    mlflow.set_tracking_uri(f"sqlite:///{champion / 'mlflow.db'}")
    indices = reference.load_profile(reference.resolve(uri)).indices
    images = splits.load_split(champion / TEST_SPLIT)[0].numpy()
    unseen = np.setdiff1d(np.arange(len(images)), indices)
    assert len(indices) == len(unseen) == 5000
    rng = np.random.default_rng(0)
    rows = rng.choice(unseen, 1000, replace=False)
    alpha = load_params(champion / "params.yaml").monitor.alpha

    def verdict(batch: np.ndarray):
        names = [str(i) for i in range(len(batch))]
        return monitor(uri, Batch(names, batch, "a batch", []), alpha, 8).verdict

    clean = verdict(images[rows])
    assert not clean.drift, clean.summary()
    for name, shift in SHIFTS.items():
        assert verdict(shift(images[rows], rng)).drift, name
    mixed = images[rows].copy()
    for i, shift in zip(range(0, 100, 20), SHIFTS.values(), strict=True):
        mixed[i : i + 20] = shift(mixed[i : i + 20], rng)  # 10%: 20 digits under each shift
    assert verdict(mixed).drift


def post(port: int, body: dict) -> np.ndarray:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.asarray(json.loads(response.read())["predictions"])


def test_mlflow_models_serve_answers_all_four_methods(champion: Path) -> None:
    port = free_port()
    server = start_server(
        ["mlflow", "models", "serve", "-m", "models:/mnist-vae@champion"]
        + ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        MLFLOW_TRACKING_URI=f"sqlite:///{champion / 'mlflow.db'}",
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, seconds=120)
        z = np.random.default_rng(1).standard_normal((3, 20)).round(4).tolist()
        images = post(port, {"inputs": z})  # no params: decode, as before
        assert images.shape == (3, 784) and images.min() >= 0 and images.max() <= 1
        digits = splits.load_split(champion / TEST_SPLIT)[0][:3].numpy().round(4).tolist()
        assert post(port, {"inputs": digits, "params": {"method": "encode"}}).shape == (3, 20)
        both = post(port, {"inputs": digits, "params": {"method": "encode", "logvar": True}})
        assert both.shape == (3, 40)
        again = post(port, {"inputs": digits, "params": {"method": "reconstruct"}})
        assert again.shape == (3, 784)
        scores = post(port, {"inputs": digits, "params": {"method": "score", "samples": 4}})
        assert scores.shape == (3,) and (scores > 0).all()
    finally:
        stop_server(server)


def test_generate_writes_a_grid_of_digits(champion: Path, tmp_path: Path) -> None:
    output = tmp_path / "digits.png"
    uri = "models:/mnist-vae@champion"
    result = pipeline_command(
        champion,
        "generate",
        "--model",
        uri,
        "-n",
        "64",
        "--seed",
        "0",
        "-o",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (8 * 30 + 2, 8 * 30 + 2)


def test_the_committed_lock_holds_for_the_data(reproduced: tuple[Path, str]) -> None:
    # Deterministic bytes: raw and processed data hash the same on every machine, so `dvc repro`
    # on a fresh clone leaves their entries in dvc.lock as committed.
    repo, _ = reproduced
    committed = yaml.safe_load(helpers.committed("dvc.lock"))["stages"]
    rebuilt = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("download", "preprocess"):
        assert rebuilt[stage]["outs"] == committed[stage]["outs"], stage


def test_a_comment_in_preprocess_reruns_it_and_nothing_downstream(
    reproduced: tuple[Path, str], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    module = repo / "pipeline" / "stages" / "preprocess.py"
    module.write_text(module.read_text() + "# a comment changes the code's hash, not its output\n")
    result = dvc(repo, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'preprocess'" in result.stdout
    for stage in ("download", "train", "evaluate", "sample"):
        assert f"Running stage '{stage}'" not in result.stdout, stage


def test_a_stage_that_fails_under_dvc_keeps_the_previous_outputs(
    reproduced: tuple[Path, str], tmp_path: Path
) -> None:
    # DVC deletes a stage's outputs before running it, unless they persist: the stage itself
    # replaces them, atomically, only when it succeeds.
    repo = tmp_path / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    outputs = ["models/vae.safetensors", "metrics/train.json"]
    outputs += ["plots/train_history.csv", "metrics/evaluate.json", "figures/manifold.png"]
    before = {name: (repo / name).read_bytes() for name in outputs}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["device"] = "tpu"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = dvc(repo, "repro")
    assert result.returncode != 0
    said = result.stdout + result.stderr
    assert "error: params.yaml: train.device = 'tpu' is not allowed; use one of" in said
    assert "Traceback" not in said
    assert {name: (repo / name).read_bytes() for name in outputs} == before


def test_the_report_shows_the_lab_curve_and_the_registry(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    result = pipeline_command(repo, "report", "--check")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("# MNIST VAE: the workspace against `HEAD`")
    assert "(every epoch within 1.5, epoch 10 within 1.0): **PASS**" in text
    assert "v1 is both @candidate and @champion." in text
    assert "- `figures/manifold.png`" in text


def test_second_repro_changes_nothing(reproduced: tuple[Path, str]) -> None:
    repo, _ = reproduced
    again = dvc(repo, "repro")
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = dvc(repo, "status")
    assert "up to date" in status.stdout, status.stdout
