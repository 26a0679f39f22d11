import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torchvision.utils import make_grid

from helpers import FIGURE_NAMES
from pipeline.config import load_params
from pipeline.paths import EVAL_BREAKDOWN, EVAL_METRICS, FIGURES, RUN_INFO
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation
from pipeline.stages.sample import read_history, run_sampling
from pipeline.vae.evaluation import (
    active_units,
    elbo_terms,
    evaluate,
    iwae_log_likelihood,
    posterior_means,
)
from pipeline.vae.figures import draw_all
from pipeline.vae.grids import digit_grid
from pipeline.vae.model import VAE, loss_terms, reconstruction_loss


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


def constant_decoder_with_the_prior_as_posterior(latent_dim: int = 2) -> VAE:
    """A model whose decoder ignores z and whose encoder returns the prior: then q(z|x) is the
    exact posterior, every importance weight equals p(x), and every k gives log p(x) exactly."""
    torch.manual_seed(0)
    model = VAE(hidden_dim=8, latent_dim=latent_dim)
    with torch.no_grad():
        for layer in (model.to_mu, model.to_logvar):
            layer.weight.zero_()
            layer.bias.zero_()
        model.decoder[0].weight.zero_()
    return model.eval()


def test_iwae_is_exact_when_the_posterior_is_exact() -> None:
    model = constant_decoder_with_the_prior_as_posterior()
    images = (torch.rand(6, 784) > 0.5).float()
    logits = model.decoder(torch.zeros(1, 2))  # the same for every z
    log_px = -reconstruction_loss(logits.expand(6, -1), images)
    for k in (1, 7, 100):
        estimate = iwae_log_likelihood(model, images, k, 4, torch.Generator().manual_seed(k))
        torch.testing.assert_close(estimate, log_px, rtol=0, atol=1e-3)


def log_px_by_integration(model: VAE, x: torch.Tensor) -> tuple[float, float, float]:
    """log p(x) for a 1-D latent by quadrature over z, and the posterior's mean and std."""
    z = torch.linspace(-10, 10, 20001).unsqueeze(1)
    log_joint = -reconstruction_loss(model.decoder(z), x.expand(len(z), -1))
    log_joint += torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 0])
    log_px = torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])
    posterior = torch.softmax(log_joint, 0)
    mean = (posterior * z[:, 0]).sum()
    std = ((posterior * (z[:, 0] - mean) ** 2).sum()).sqrt()
    return log_px.item(), mean.item(), std.item()


@torch.no_grad()
def test_iwae_matches_log_px_integrated_over_a_1d_latent() -> None:
    torch.manual_seed(1)
    model = VAE(hidden_dim=16, latent_dim=1).eval()
    model.decoder[0].weight.mul_(4.0)  # a decoder that depends strongly on z
    for z0 in (-1.0, 0.3, 1.5):
        x = torch.bernoulli(model.decode(torch.tensor([[z0]])))
        log_px, mean, std = log_px_by_integration(model, x)
        # q(z|x): the posterior's mean, 1.5 times its spread (importance sampling wants q wider)
        model.to_mu.weight.zero_(), model.to_mu.bias.fill_(mean)
        model.to_logvar.weight.zero_(), model.to_logvar.bias.fill_(2 * math.log(1.5 * std))
        draws = [
            iwae_log_likelihood(model, x, 5000, 1, torch.Generator().manual_seed(s)).item()
            for s in range(4)
        ]
        assert abs(sum(draws) / 4 - log_px) < 0.02, (z0, draws, log_px)
        recon, kl = elbo_terms(model, x.expand(2000, -1), 500, torch.Generator().manual_seed(9))
        elbo = -(recon + kl).mean().item()
        assert elbo < log_px - 0.01  # q is not the posterior: a strictly looser bound


def test_iwae_chunks_samples_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = trained_tiny_model()
    whole = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    monkeypatch.setattr("pipeline.vae.evaluation.ROWS_PER_CHUNK", 16 * 5)  # chunks of 5 samples
    chunked = iwae_log_likelihood(model, images, 12, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(whole, chunked, atol=1e-4)


def test_evaluate_is_repeatable_and_counts_active_units_with_its_threshold() -> None:
    model, images = trained_tiny_model()
    labels = torch.arange(len(images)) % 10
    first = evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=0)
    assert evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=0) == first
    reseeded = evaluate(model, images, labels, k=5, batch_size=16, threshold=0.01, seed=1)
    assert reseeded["log_px_iwae"] != first["log_px_iwae"]
    activity = sorted(first["activity_per_dim"].values())
    middle = (activity[1] + activity[2]) / 2
    halved = evaluate(model, images, labels, k=5, batch_size=16, threshold=middle, seed=0)
    assert halved["active_units"] == 2 and first["active_units"] == 4
    assert list(first) == [
        "test_loss", "test_recon", "test_kl", "elbo", "log_px_iwae", "log_px_iwae_se",
        "iwae_samples", "active_units", "latent_dim", "kl_per_dim", "activity_per_dim",
        "loss_per_class",
    ]  # fmt: skip
    assert first["elbo"] == -first["test_loss"] < first["log_px_iwae"] < 0
    assert (first["iwae_samples"], first["latent_dim"]) == (5, 4)


def test_activity_is_the_population_variance_and_must_exceed_the_threshold() -> None:
    mu = torch.tensor([[0.0, 0.0, 3.0], [2.0, 1.0, 3.0], [0.0, 0.0, 3.0], [2.0, 1.0, 3.0]])
    count, activity = active_units(mu)  # Burda et al.'s threshold, 0.01, by default
    assert activity.tolist() == [1.0, 0.25, 0.0] and count == 2
    assert active_units(mu, threshold=1.0)[0] == 0  # a unit must exceed it
    assert active_units(mu, threshold=0.5)[0] == 1


def test_active_units_counts_dimensions_the_encoder_uses() -> None:
    model = VAE(hidden_dim=32, latent_dim=6)
    with torch.no_grad():
        model.to_mu.weight.mul_(20.0)
        model.to_mu.weight[[1, 4]] = 0.0  # dimensions 1 and 4 ignore the input
    mu, _ = posterior_means(model, torch.rand(200, 784), batch_size=64)
    count, activity = active_units(mu, threshold=0.01)
    assert count == 4
    assert activity[1] == 0 and activity[4] == 0 and (activity[[0, 2, 3, 5]] > 0.01).all()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_breakdowns_match_a_hand_computed_case() -> None:
    # Encoder: fixed mu = (1, 0, 2) and logvar = (0, log 2, 0) for every image, so each
    # dimension's KL is -(1 + logvar - mu^2 - exp(logvar)) / 2 = 0.5, (1 - log 2) / 2 and 2.
    # Decoder: every logit 0.5 whatever z, so BCE is 784 softplus(0.5) for a blank image and
    # 784 softplus(-0.5) for a white one.
    model = VAE(hidden_dim=4, latent_dim=3)
    with torch.no_grad():
        for layer in (model.to_mu, model.to_logvar, model.decoder[2]):
            layer.weight.zero_()
        model.to_mu.bias.copy_(torch.tensor([1.0, 0.0, 2.0]))
        model.to_logvar.bias.copy_(torch.tensor([0.0, math.log(2.0), 0.0]))
        model.decoder[2].bias.fill_(0.5)
    images = torch.cat([torch.zeros(3, 784), torch.ones(2, 784)])
    labels = torch.tensor([0, 0, 0, 1, 1])
    metrics = evaluate(model, images, labels, k=4, batch_size=2, threshold=0.01, seed=0)

    kl_dims = [0.5, (1 - math.log(2.0)) / 2, 2.0]
    assert list(metrics["kl_per_dim"].values()) == pytest.approx(kl_dims)
    blank, white = 784 * math.log1p(math.exp(0.5)), 784 * math.log1p(math.exp(-0.5))
    assert metrics["loss_per_class"] == pytest.approx(
        {"0": blank + sum(kl_dims), "1": white + sum(kl_dims)}
    )
    assert metrics["test_kl"] == pytest.approx(sum(kl_dims))
    assert metrics["test_recon"] == pytest.approx((3 * blank + 2 * white) / 5)
    assert metrics["active_units"] == 0  # every image gets the same mu
    assert list(metrics["activity_per_dim"].values()) == [0.0, 0.0, 0.0]


def train_tiny() -> str:
    torch.set_num_threads(1)
    train_stage.train(load_params())
    return json.loads(RUN_INFO.read_text())["run_id"]


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
    assert run.data.metrics["test/log_px_iwae"] == pytest.approx(metrics["log_px_iwae"])
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
    assert len(tagged) == 1 and "test/log_px_iwae" in tagged[0].data.metrics


def test_sample_writes_every_figure_as_a_png_and_logs_it(workdir: Path) -> None:
    run_id = train_tiny()
    names = run_sampling(load_params())
    expected_sizes = {
        "generated": (510, 440),
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


@pytest.mark.parametrize(
    ("count", "nrow", "scale"), [(64, 8, 1), (16, 8, 3), (10, 4, 2), (3, 8, 1)]
)
def test_digit_grids_match_torchvisions_make_grid(count: int, nrow: int, scale: int) -> None:
    images = torch.rand(count, 784, generator=torch.Generator().manual_seed(count))
    expected = make_grid(images.view(-1, 1, 28, 28), nrow=nrow, padding=2, pad_value=1.0)
    expected = expected.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    expected = (expected.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    grid = digit_grid(images, nrow, scale)
    assert grid.shape == expected.shape and (grid == expected).all()


def test_every_figure_has_a_title_and_the_latent_plot_shows_ten_classes(workdir: Path) -> None:
    train_tiny()
    from pipeline.data.mnist import load_split
    from pipeline.paths import TEST_SPLIT, WEIGHTS
    from pipeline.vae.model import load_vae

    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(load_vae(WEIGHTS), images, labels, read_history(), load_params().sample)
    for name, fig in drawn.items():
        assert all(ax.get_title() for ax in fig.axes), name
    latent = drawn["latent_space"].axes[0]
    assert [t.get_text() for t in latent.get_legend().get_texts()] == [str(d) for d in range(10)]
    assert latent.get_xlabel().startswith("PC 1") and latent.get_ylabel().startswith("PC 2")


def grid_cells(figure, rows: int, cols: int) -> torch.Tensor:
    """The 28x28 cells of the digit grid a figure shows, as (rows, cols, 784) in [0, 1]."""
    picture = torch.from_numpy(figure.axes[0].images[0].get_array()[..., 0].copy()).float() / 255
    cells = [
        picture[2 + 30 * r : 30 + 30 * r, 2 + 30 * c : 30 + 30 * c].reshape(-1)
        for r in range(rows)
        for c in range(cols)
    ]
    return torch.stack(cells).reshape(rows, cols, 784)


def test_the_reconstructions_figure_shows_test_digits_over_their_reconstructions(
    workdir: Path, set_params
) -> None:
    from pipeline.data.mnist import load_split
    from pipeline.paths import TEST_SPLIT, WEIGHTS
    from pipeline.vae.model import load_vae

    set_params(workdir, train={"epochs": 15, "lr": 0.01})  # long enough to tell digits apart
    train_tiny()
    images, labels = load_split(TEST_SPLIT)
    cfg = load_params().sample
    drawn = draw_all(load_vae(WEIGHTS), images, labels, read_history(), cfg)
    originals, reconstructed = grid_cells(drawn["reconstructions"], 2, cfg.n_reconstructions)
    # The top row: test digits (as the grid's uint8 rounding shows them).
    distance_to_test_set = torch.cdist(originals, images)
    assert (distance_to_test_set.min(dim=1).values < 0.05).all()
    # The bottom row: not the originals, but each nearer its own original than the others are.
    distances = torch.cdist(reconstructed, originals)
    assert (distances.diagonal() > 1.0).all()
    others = (distances.sum(1) - distances.diagonal()) / (len(distances) - 1)
    assert (distances.diagonal() < others).float().mean() > 0.9


def test_dynamic_binarisation_evaluates_on_one_fixed_binary_test_set(
    workdir: Path, set_params
) -> None:
    from pipeline.data.mnist import binarize_once, load_split
    from pipeline.paths import TEST_SPLIT, WEIGHTS
    from pipeline.vae.model import load_vae

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


def size_bounds(bound: str) -> dict[str, dict[str, int]]:
    """Every bounded size in config.py at its smallest or largest accepted value (epochs: 1)."""
    import dataclasses
    import typing

    from pipeline.config import Params

    chosen = {}
    for section, kind in typing.get_type_hints(Params).items():
        for f in dataclasses.fields(kind):
            if f.metadata.get("at_most") is not None and f.name != "epochs":
                value = f.metadata["at_least"] if bound == "smallest" else f.metadata["at_most"]
                chosen.setdefault(section, {})[f.name] = value
    chosen["train"]["epochs"] = 1
    return chosen


@pytest.mark.parametrize(
    "bound",
    ["smallest", pytest.param("largest", marks=pytest.mark.slow)],  # largest: ~35 s
)
def test_every_size_bound_config_accepts_runs_through_every_stage(
    workdir: Path, set_params, bound: str
) -> None:
    import yaml

    from pipeline.config import ConfigError, parse_params

    bounds = size_bounds(bound)
    assert {key for values in bounds.values() for key in values} >= {
        "hidden_dim", "latent_dim", "batch_size", "iwae_samples", "n_samples", "manifold_size",
    }  # fmt: skip
    set_params(workdir, **bounds)
    params = load_params()
    # Each bound is where validation stops: one step beyond it is refused.
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in bounds.items():
        for key, value in values.items():
            if key == "epochs":
                continue
            beyond = yaml.safe_load(yaml.safe_dump(raw))
            beyond[section][key] = value - 1 if bound == "smallest" else value + 1
            with pytest.raises(ConfigError, match=f"{section}.{key} = "):
                parse_params(beyond)
    train_stage.train(params)
    metrics = run_evaluation(params)
    assert math.isfinite(metrics["test_loss"]) and math.isfinite(metrics["log_px_iwae"])
    assert set(run_sampling(params)) == FIGURE_NAMES


def test_promote_refuses_a_candidate_evaluated_unlike_the_champion(
    workdir: Path, set_params
) -> None:
    from pipeline.tracking import registry
    from pipeline.tracking.registry import RegistryError

    run_evaluation_after_training()  # grey levels: the champion
    set_params(workdir, data={"binarize": "dynamic"})
    run_evaluation_after_training()  # binarised: the candidate, easier to score
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    cfg = load_params().registry
    with pytest.raises(RegistryError) as refused:
        registry.promote(client, cfg, dry_run=True)
    assert str(refused.value).startswith(
        "v2 and champion v1 were evaluated differently (pixels 'dynamic, seed 0' vs 'grey'): "
        "their test_loss cannot be compared."
    )
    forced = registry.promote(client, cfg, force=True)
    assert forced.startswith("promote v2 to @champion: forced; test_loss")
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == "2"
