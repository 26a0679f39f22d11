import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import FIGURE_NAMES
from pipeline.config import load_params
from pipeline.evaluation import active_units, elbo_terms, iwae_log_likelihood, posterior_means
from pipeline.figures import draw_all
from pipeline.model import VAE, loss_terms
from pipeline.paths import EVAL_METRICS, FIGURES, RUN_INFO
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation
from pipeline.stages.sample import read_history, run_sampling


def trained_tiny_model() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    model = VAE(hidden_dim=32, latent_dim=4)
    images = (torch.rand(48, 784) > 0.7).float() * torch.rand(48, 784)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        recon, kl = loss_terms(model.train(), images)
        optimizer.zero_grad()
        (recon + kl).sum().backward()
        optimizer.step()
    return model.eval(), images


def mean_iwae(model: VAE, images: torch.Tensor, k: int, seeds: range) -> float:
    values = [
        iwae_log_likelihood(model, images, k, 16, torch.Generator().manual_seed(s)).mean().item()
        for s in seeds
    ]
    return sum(values) / len(values)


def mean_elbo(model: VAE, images: torch.Tensor, seeds: range) -> float:
    values = []
    for s in seeds:
        recon, kl = elbo_terms(model, images, 16, torch.Generator().manual_seed(s))
        values.append(-(recon + kl).mean().item())
    return sum(values) / len(values)


def test_iwae_bounds_the_elbo_and_tightens_with_k() -> None:
    model, images = trained_tiny_model()
    seeds = range(20)
    elbo = mean_elbo(model, images, seeds)
    bounds = [mean_iwae(model, images, k, seeds) for k in (1, 5, 50)]
    assert abs(bounds[0] - elbo) < 0.005 * abs(elbo)  # k = 1: the ELBO, in expectation
    assert elbo < bounds[1] < bounds[2]  # a bound above the ELBO that tightens as k grows
    assert bounds[0] < bounds[1]


def test_iwae_chunks_samples_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = trained_tiny_model()
    whole = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    monkeypatch.setattr("pipeline.evaluation.ROWS_PER_CHUNK", 16 * 5)  # chunks of 5 samples
    chunked = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_active_units_counts_dimensions_the_encoder_uses() -> None:
    model = VAE(hidden_dim=32, latent_dim=6)
    with torch.no_grad():
        model.to_mu.weight.mul_(20.0)
        model.to_mu.weight[[1, 4]] = 0.0  # dimensions 1 and 4 ignore the input
    mu, _ = posterior_means(model, torch.rand(200, 784), batch_size=64)
    count, activity = active_units(mu, threshold=0.01)
    assert count == 4
    assert activity[1] == 0 and activity[4] == 0 and (activity[[0, 2, 3, 5]] > 0.01).all()


def train_tiny() -> str:
    torch.set_num_threads(1)
    train_stage.train(load_params())
    return json.loads(RUN_INFO.read_text())["run_id"]


def test_evaluate_logs_to_the_run_that_trained_the_model(workdir: Path) -> None:
    run_id = train_tiny()
    metrics = run_evaluation(load_params())
    assert json.loads(EVAL_METRICS.read_text()) == metrics
    for key in ("test_loss", "test_recon", "test_kl", "log_px_iwae", "active_units"):
        assert key in metrics
    assert metrics["iwae_samples"] == 8 and len(metrics["kl_per_dim"]) == 4
    assert set(metrics["loss_per_class"]) == {str(d) for d in range(10)}
    assert metrics["log_px_iwae"] >= metrics["elbo"] - 1.0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["eval/test_loss"] == pytest.approx(metrics["test_loss"])
    assert run.data.metrics["eval/kl_per_dim/z03"] == pytest.approx(metrics["kl_per_dim"]["z03"])
    # the first model ever evaluated is both @candidate and @champion
    for alias in ("candidate", "champion"):
        assert client.get_model_version_by_alias("mnist-vae", alias).run_id == run_id


def test_evaluate_falls_back_to_a_new_tagged_run(workdir: Path, capsys) -> None:
    train_tiny()
    RUN_INFO.write_text(json.dumps({"run_id": "0123456789abcdef0123456789abcdef"}))
    run_evaluation(load_params())
    said = capsys.readouterr().out
    assert (
        "MLflow run 0123456789abcdef0123456789abcdef (from models/mlflow_run.json) is not in"
        in said
    )
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(load_params().mlflow.experiment)
    tagged = client.search_runs(
        [experiment.experiment_id], "tags.trained_in_run = '0123456789abcdef0123456789abcdef'"
    )
    assert len(tagged) == 1 and "eval/test_loss" in tagged[0].data.metrics


def test_sample_writes_every_figure_as_a_png_and_logs_it(workdir: Path) -> None:
    run_id = train_tiny()
    names = run_sampling(load_params())
    expected_sizes = {
        "generated": (510, 450),
        "latent_space": (700, 600),
        "manifold": (800, 800),
        "training_curves": (1300, 380),
    }
    for name in names:
        with Image.open(FIGURES / f"{name}.png") as image:
            assert image.format == "PNG"
            image.load()  # a truncated file fails here
            if name in expected_sizes:
                assert image.size == expected_sizes[name], name
    assert set(names) == FIGURE_NAMES
    logged = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").list_artifacts(run_id, "figures")
    assert {a.path for a in logged} >= {f"figures/{name}.png" for name in names}


def test_every_figure_has_a_title_and_the_latent_plot_shows_ten_classes(workdir: Path) -> None:
    train_tiny()
    from pipeline.data import load_split
    from pipeline.model import load_vae
    from pipeline.paths import TEST_SPLIT, WEIGHTS

    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(load_vae(WEIGHTS), images, labels, read_history(), load_params().sample)
    for name, fig in drawn.items():
        assert all(ax.get_title() for ax in fig.axes), name
    latent = drawn["latent_space"].axes[0]
    assert [t.get_text() for t in latent.get_legend().get_texts()] == [str(d) for d in range(10)]
    assert latent.get_xlabel().startswith("PC 1") and latent.get_ylabel().startswith("PC 2")


def test_dynamic_binarisation_trains_and_evaluates_on_binary_pixels(
    workdir: Path, set_params
) -> None:
    from pipeline.data import binarize_once, load_split
    from pipeline.paths import TEST_SPLIT

    images, _ = load_split(TEST_SPLIT)
    once = binarize_once(images, seed=0)
    assert set(once.unique().tolist()) <= {0.0, 1.0} and torch.equal(once, binarize_once(images, 0))
    assert abs(once.mean().item() - images.mean().item()) < 0.01  # Bernoulli(pixel) keeps the mean

    grey = run_evaluation_after_training()
    set_params(workdir, data={"binarize": "dynamic"})
    binary = run_evaluation_after_training()
    assert binary["test_loss"] != grey["test_loss"]
    assert all(v == v for v in binary["loss_per_class"].values())  # finite, not NaN


def run_evaluation_after_training() -> dict:
    train_tiny()
    return run_evaluation(load_params())


def test_a_later_model_becomes_candidate_but_not_champion(workdir: Path, set_params) -> None:
    first = train_tiny()
    run_evaluation(load_params())
    set_params(workdir, train={"seed": 1})
    second = train_tiny()
    run_evaluation(load_params())
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_model_version_by_alias("mnist-vae", "candidate").run_id == second
    assert client.get_model_version_by_alias("mnist-vae", "champion").run_id == first
