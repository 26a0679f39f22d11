"""The registry: versions, @candidate and @champion, like-for-like promotion."""

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from helpers.workdir import run_evaluation_after_training
from pipeline.config import RegistryConfig, load_params
from pipeline.data.weights import save_vae
from pipeline.errors import RegistryError
from pipeline.tracking import registry
from pipeline.tracking.pyfunc import log_vae_model
from pipeline.vae.model import VAE


def test_promote_refuses_a_candidate_evaluated_unlike_the_champion(
    workdir: Path, set_params
) -> None:
    from pipeline.errors import RegistryError
    from pipeline.tracking import registry

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


CONFIG = RegistryConfig(
    model_name="vae", metric="test_loss", direction="minimize", min_improvement=0.5
)


@pytest.fixture(scope="session")
def store_with_runs(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
) -> tuple[Path, list[str]]:
    """A store with three runs that each logged a tiny VAE (made once; tests copy it)."""
    folder = tmp_path_factory.mktemp("registry-base")
    shutil.copy(mlflow_template, folder / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = mlflow.create_experiment(
        "registry", artifact_location=(folder / "mlruns").as_uri()
    )
    run_ids = []
    save_vae(VAE(hidden_dim=8, latent_dim=2), folder / "vae.safetensors")
    for _ in range(3):
        with mlflow.start_run(experiment_id=experiment) as run:
            log_vae_model(folder / "vae.safetensors", latent_dim=2)
            run_ids.append(run.info.run_id)
    return folder, run_ids


@pytest.fixture
def client(store_with_runs, tmp_path: Path) -> tuple[MlflowClient, list[str]]:
    base, run_ids = store_with_runs
    shutil.copy(base / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri), run_ids


def evaluated(client: MlflowClient, run_id: str, test_loss: float) -> int:
    tags = {"params_hash": "abc", "git.commit": "123"}
    return registry.register(
        client, "vae", run_id, {"test_loss": test_loss, "kl_per_dim": {}}, tags
    ).version


def test_a_registered_model_made_meanwhile_by_a_parallel_experiment_is_joined(
    client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two queued experiments evaluated at once: both look for the registered model, both miss it.
    from mlflow.exceptions import MlflowException

    client, run_ids = client
    evaluated(client, run_ids[0], 100.0)  # the other experiment's, made in between

    found, misses = client.get_registered_model, iter([True])

    def missed_once(name: str):  # as it was before the other experiment made it
        if next(misses, False):
            raise MlflowException(f"Registered Model with name={name} not found")
        return found(name)

    monkeypatch.setattr(client, "get_registered_model", missed_once)
    assert str(evaluated(client, run_ids[1], 99.0)) == "2"


def test_a_registered_model_that_cannot_be_made_is_not_taken_for_one_made_meanwhile(
    client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    client, run_ids = client

    def refused(name: str, **_):
        raise MlflowException(f"cannot write {name}", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(client, "create_registered_model", refused)
    with pytest.raises(MlflowException, match="cannot write vae"):
        evaluated(client, run_ids[0], 100.0)


def test_register_tags_the_version_and_aliases_it_candidate(client) -> None:
    client, runs = client
    version = registry.register(
        client,
        "vae",
        runs[0],
        {"test_loss": 101.5, "active_units": 18},
        {"params_hash": "abc", "git.commit": "123"},
    )
    assert version.version == 1 and version.run_id == runs[0]
    assert (
        version.tags["metric.test_loss"] == "101.5" and version.tags["metric.active_units"] == "18"
    )
    assert version.tags["params_hash"] == "abc" and version.tags["git.commit"] == "123"
    assert client.get_model_version_by_alias("vae", "candidate").version == 1


def test_registering_the_same_run_twice_makes_no_duplicate(client) -> None:
    client, runs = client
    assert evaluated(client, runs[0], 101.5) == evaluated(client, runs[0], 101.0) == 1
    assert len(client.search_model_versions("name = 'vae'")) == 1
    assert client.get_model_version("vae", "1").tags["metric.test_loss"] == "101.0"


def test_the_first_evaluated_model_becomes_champion(client) -> None:
    client, runs = client
    evaluated(client, runs[0], 104.0)
    said = registry.promote(client, CONFIG)
    assert said == "promote v1 to @champion: first champion (test_loss 104.0000)"
    champion = client.get_model_version_by_alias("vae", "champion")
    assert champion.version == 1 and champion.tags["previous_champion"] == "none"


def test_a_worse_candidate_is_not_promoted_and_says_why(client) -> None:
    client, runs = client
    evaluated(client, runs[0], 104.0)
    registry.promote(client, CONFIG)
    evaluated(client, runs[1], 103.8)  # better, but by less than min_improvement = 0.5
    said = registry.promote(client, CONFIG)
    assert said.startswith(
        "keep @champion on v1, v2 not promoted: test_loss 103.8000 vs champion v1's 104.0000"
    )
    assert "improvement +0.2000, required > 0.5" in said
    assert client.get_model_version_by_alias("vae", "champion").version == 1


def test_a_better_candidate_is_promoted_and_the_previous_champion_recorded(client) -> None:
    client, runs = client
    evaluated(client, runs[0], 104.0)
    registry.promote(client, CONFIG)
    evaluated(client, runs[1], 102.0)
    said = registry.promote(client, CONFIG)
    assert said.startswith("promote v2 to @champion: test_loss 102.0000 vs champion v1's 104.0000")
    champion = client.get_model_version_by_alias("vae", "champion")
    assert champion.version == 2 and champion.tags["previous_champion"] == "1"
    assert "improvement +2.0000" in champion.tags["promotion_reason"]


def test_maximize_direction(client) -> None:
    client, runs = client
    config = RegistryConfig("vae", "test_loss", "maximize", 0.0)
    evaluated(client, runs[0], 104.0)
    registry.promote(client, config)
    evaluated(client, runs[1], 102.0)
    assert registry.promote(client, config).startswith("keep @champion on v1, v2 not promoted")


def test_dry_run_changes_nothing_and_force_promotes_anyway(client) -> None:
    client, runs = client
    evaluated(client, runs[0], 104.0)
    assert registry.promote(client, CONFIG, dry_run=True).startswith("dry run: would promote v1")
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("vae", "champion")
    registry.promote(client, CONFIG)
    evaluated(client, runs[1], 110.0)
    said = registry.promote(client, CONFIG, dry_run=True)
    assert said.startswith("dry run: would keep @champion on v1, v2 not promoted")
    said = registry.promote(client, CONFIG, force=True)
    assert said.startswith("promote v2 to @champion: forced; test_loss 110.0000")
    assert client.get_model_version_by_alias("vae", "champion").version == 2


def test_explicit_version(client) -> None:
    client, runs = client
    evaluated(client, runs[0], 104.0)
    evaluated(client, runs[1], 103.0)
    assert registry.promote(client, CONFIG, version="1").startswith("promote v1 to @champion")


def test_errors_for_missing_registry_unknown_version_and_unevaluated_model(client) -> None:
    client, runs = client
    with pytest.raises(
        RegistryError, match=r"registered model 'vae' not found .* `dvc repro evaluate`"
    ):
        registry.promote(client, CONFIG)
    evaluated(client, runs[0], 104.0)
    with pytest.raises(RegistryError, match=r"'vae' has no version 7"):
        registry.promote(client, CONFIG, version="7")
    mlflow.register_model(f"runs:/{runs[2]}/model", "vae")  # registered, never evaluated
    with pytest.raises(RegistryError, match=r"version 2 of 'vae' was never evaluated"):
        registry.promote(client, CONFIG, version="2")
