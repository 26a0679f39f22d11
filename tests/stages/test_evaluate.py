"""The evaluate stage: metrics for DVC, the training run in MLflow, the registry."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers.workdir import run_evaluation_after_training, train_tiny
from pipeline.config import load_params
from pipeline.paths import EVAL_BREAKDOWN, EVAL_METRICS, WEIGHTS
from pipeline.stages.evaluate import run_evaluation
from pipeline.tracking.runs import WEIGHTS_TAG, weights_digest
from pipeline.vae.evaluation import SCALAR_METRICS, elbo_terms


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_evaluate_logs_to_the_run_that_trained_the_model(workdir: Path) -> None:
    run_id = train_tiny()
    metrics = run_evaluation(load_params())
    headline = json.loads(EVAL_METRICS.read_text())
    assert list(headline) == ["test_loss", "test_recon", "test_kl", "log_px_iwae",
                              "log_px_iwae_se", "active_units"]  # fmt: skip
    assert all(headline[key] == metrics[key] for key in headline)
    breakdown = json.loads(EVAL_BREAKDOWN.read_text())
    assert breakdown == {key: metrics[key] for key in ("kl_per_dim", "activity_per_dim",
                                                       "loss_per_class")}  # fmt: skip
    assert metrics["test_loss"] == pytest.approx(metrics["test_recon"] + metrics["test_kl"])
    assert metrics["elbo"] == -metrics["test_loss"]
    assert metrics["test_kl"] == pytest.approx(sum(metrics["kl_per_dim"].values()), rel=1e-5)
    assert metrics["iwae_samples"] == 8 and len(metrics["kl_per_dim"]) == 4
    assert set(metrics["loss_per_class"]) == {str(d) for d in range(10)}
    # 64 test images in equal shares of the ten digits (6 or 7 each): the mean of the class means
    # is close to the overall mean, which a per-class loss without its class mask would equal
    per_class = list(metrics["loss_per_class"].values())
    assert min(per_class) < metrics["test_loss"] < max(per_class)
    assert metrics["log_px_iwae"] > metrics["elbo"]  # k = 8 is tighter than the ELBO
    assert 0 <= metrics["active_units"] <= 4
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["evaluate/log_px_iwae"] == pytest.approx(metrics["log_px_iwae"])
    assert {f"evaluate/{key}" for key in SCALAR_METRICS} <= set(run.data.metrics)  # all of them
    results = sorted(key for key in run.data.metrics if not key.startswith("system/"))
    assert len(results) <= 20 and not any("per_dim" in key or "class" in key for key in results)
    units = json.loads(Path(client.download_artifacts(run_id, "evaluation/latent_units.json"))
                       .read_text())  # fmt: skip
    assert units["columns"] == ["unit", "kl", "activity"] and len(units["data"]) == 4
    assert units["data"][3][1] == pytest.approx(metrics["kl_per_dim"]["z03"])
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("VAE on MNIST") and f"loss {metrics['test_loss']:.2f} nats" in note
    # the first model ever evaluated is both @candidate and @champion
    for alias in ("candidate", "champion"):
        assert client.get_model_version_by_alias("mnist-vae", alias).run_id == run_id


def test_evaluate_falls_back_to_a_new_tagged_run(workdir: Path, capsys) -> None:
    # No run in this store trained these weights (outputs restored from a cache made elsewhere)
    run_id = train_tiny()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    client.set_tag(run_id, WEIGHTS_TAG, "trained-other-weights")
    run_evaluation(load_params())
    digest = weights_digest(WEIGHTS)
    said = capsys.readouterr().out
    assert "no MLflow run in sqlite:///" in said
    assert f"trained models/vae.safetensors (sha256 {digest[:16]}...); logging to new run" in said
    experiment = client.get_experiment_by_name(load_params().mlflow.experiment)
    tagged = client.search_runs(
        [experiment.experiment_id], f"tags.evaluated_{WEIGHTS_TAG} = '{digest}'"
    )
    assert len(tagged) == 1 and "evaluate/log_px_iwae" in tagged[0].data.metrics
    assert "evaluate/log_px_iwae" not in client.get_run(run_id).data.metrics


def test_dynamic_binarisation_evaluates_on_one_fixed_binary_test_set(
    workdir: Path, set_params
) -> None:
    from pipeline.data.splits import binarize_once, load_split
    from pipeline.data.weights import load_vae
    from pipeline.paths import TEST_SPLIT, WEIGHTS

    images, _ = load_split(TEST_SPLIT)
    once = binarize_once(images, seed=0)
    assert set(once.unique().tolist()) == {0.0, 1.0} and torch.equal(once, binarize_once(images, 0))
    assert abs(once.mean().item() - images.mean().item()) < 0.01  # Bernoulli(pixel) keeps the mean

    set_params(workdir, data={"binarize": "dynamic", "binarize_seed": 3})
    binary = run_evaluation_after_training()
    seed = load_params().evaluate.seed
    recon, kl = elbo_terms(load_vae(WEIGHTS), binarize_once(images, 3), 64, generator(seed))
    assert binary["test_loss"] == pytest.approx((recon + kl).mean().item(), rel=1e-6)
    assert all(math.isfinite(v) for v in binary["loss_per_class"].values())


def test_a_later_model_becomes_candidate_but_not_champion(workdir: Path, set_params) -> None:
    first = train_tiny()
    run_evaluation(load_params())
    set_params(workdir, train={"seed": 1})
    second = train_tiny()
    run_evaluation(load_params())
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_model_version_by_alias("mnist-vae", "candidate").run_id == second
    assert client.get_model_version_by_alias("mnist-vae", "champion").run_id == first
