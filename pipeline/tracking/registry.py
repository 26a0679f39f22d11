"""The MLflow model registry: every evaluated model becomes a version; the best one is @champion.

Versions carry their evaluation metrics as tags (`metric.<name>`), so a promotion compares
numbers the registry itself holds. Aliases, not the deprecated stages, mark the roles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params, RegistryConfig
from pipeline.errors import ConfigError, RegistryError, already_exists
from pipeline.tracking.provenance import file_digest, git_tags
from pipeline.tracking.store import DESCRIPTION, reraise_refusal
from pipeline.vae.evaluation import SCALAR_METRICS

CANDIDATE, CHAMPION = "candidate", "champion"
HEADLINE = ("test_loss", "log_px_iwae")  # in a version's description


def check_metric(cfg: RegistryConfig) -> None:
    """`registry.metric` must be one of the numbers evaluate writes."""
    if cfg.metric not in SCALAR_METRICS:
        raise ConfigError(
            f"registry.metric = {cfg.metric!r} is not an evaluate metric; "
            f"use one of: {', '.join(SCALAR_METRICS)}"
        )


def comparison_basis(params: Params, test_file: Path) -> dict[str, str]:
    """What makes two evaluations comparable: the same test images, pixels and estimators."""
    binarize = params.data.binarize
    pixels = f"dynamic, seed {params.data.binarize_seed}" if binarize == "dynamic" else "grey"
    return {
        "eval.test_data": file_digest(test_file),
        "eval.pixels": pixels,
        "eval.metrics": f"negative ELBO (1 sample); IWAE k = {params.evaluate.iwae_samples}",
    }


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def register(
    client: MlflowClient, name: str, run_id: str, metrics: dict, tags: dict[str, str]
) -> ModelVersion:
    """Make the run's model a version of `name` (once per run), tag it, and alias it @candidate."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        reraise_refusal(exc)
        try:
            client.create_registered_model(name, description=DESCRIPTION)
        except MlflowException as exc:
            if not already_exists(exc):  # else made by an experiment evaluated in parallel
                raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
    else:  # through the logged model's own URI (MLflow 3 keeps it outside the run's artifacts)
        model_id = client.get_run(run_id).outputs.model_outputs[-1].model_id
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)
        version = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            model_id=model_id,
            description=f"Trained in run {run_id}; {summary}. {DESCRIPTION}",
        )
    numbers = {f"metric.{k}": str(v) for k, v in metrics.items() if isinstance(v, int | float)}
    for key, value in {**numbers, **tags, "evaluated": "true"}.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return client.get_model_version(name, version.version)


def register_evaluated(
    client: MlflowClient, params: Params, run_id: str, metrics: dict, basis: dict[str, str]
) -> str:
    """Register the run's model as @candidate; the first model ever evaluated is also @champion.

    `basis` (tags `eval.*`) records how it was evaluated: promotion compares like with like.
    Returns what was done, as one line.
    """
    recipe = {key: asdict(getattr(params, key)) for key in ("data", "model", "train")}
    tags = {"params_hash": params_hash(recipe), "git.commit": git_tags()["git.commit"], **basis}
    version = register(client, params.registry.model_name, run_id, metrics, tags)
    said = f"registered as {version.name} version {version.version} (@{CANDIDATE})"
    if not has_champion(client, version.name):
        said += "; " + promote(client, params.registry)
    return said


def basis_differences(candidate: ModelVersion, champion: ModelVersion) -> list[str]:
    """How two versions' evaluations differ, as `key: candidate's vs champion's`."""
    keys = sorted(k for k in {**candidate.tags, **champion.tags} if k.startswith("eval."))
    return [
        f"{key.removeprefix('eval.')} {candidate.tags.get(key, '?')!r} vs "
        f"{champion.tags.get(key, '?')!r}"
        for key in keys
        if candidate.tags.get(key) != champion.tags.get(key)
    ]


def has_champion(client: MlflowClient, name: str) -> bool:
    try:
        client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        reraise_refusal(exc)
        return False
    return True


def _version(client: MlflowClient, name: str, version: str | None, alias: str) -> ModelVersion:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        reraise_refusal(exc)
        raise RegistryError(
            f"registered model '{name}' not found in the MLflow registry; run `dvc repro evaluate`"
            " to register a model first"
        ) from None
    try:
        if version is None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        reraise_refusal(exc)
        what = f"version {version}" if version else f"alias @{alias}"
        raise RegistryError(f"'{name}' has no {what}; see the versions in `mlflow ui`") from None


def metric_of(version: ModelVersion, metric: str) -> float:
    value = version.tags.get(f"metric.{metric}")
    if version.tags.get("evaluated") != "true" or value is None:
        raise RegistryError(
            f"version {version.version} of '{version.name}' was never evaluated (no tag "
            f"metric.{metric}); run `dvc repro evaluate` on it first"
        )
    return float(value)


@dataclass
class Decision:
    promote: bool
    candidate: ModelVersion
    champion: ModelVersion | None
    reason: str


def decide(
    client: MlflowClient, cfg: RegistryConfig, version: str | None = None, force: bool = False
) -> Decision:
    """Whether the candidate (or `version`) should become @champion, and why."""
    candidate = _version(client, cfg.model_name, version, CANDIDATE)
    new = metric_of(candidate, cfg.metric)
    if not has_champion(client, cfg.model_name):
        return Decision(True, candidate, None, f"first champion ({cfg.metric} {new:.4f})")
    champion = client.get_model_version_by_alias(cfg.model_name, CHAMPION)
    if champion.version == candidate.version:
        return Decision(
            False, candidate, champion, f"version {candidate.version} is already champion"
        )
    differences = basis_differences(candidate, champion)
    if differences and not force:
        raise RegistryError(
            f"v{candidate.version} and champion v{champion.version} were evaluated differently "
            f"({'; '.join(differences)}): their {cfg.metric} cannot be compared. Evaluate both "
            "the same way, or pass --force to promote anyway"
        )
    old = metric_of(champion, cfg.metric)
    gain = old - new if cfg.direction == "minimize" else new - old
    comparison = (
        f"{cfg.metric} {new:.4f} vs champion v{champion.version}'s {old:.4f} "
        f"({cfg.direction}, improvement {gain:+.4f}, required > {cfg.min_improvement})"
    )
    if force:
        return Decision(True, candidate, champion, f"forced; {comparison}")
    return Decision(gain > cfg.min_improvement, candidate, champion, comparison)


def promote(
    client: MlflowClient,
    cfg: RegistryConfig,
    version: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> str:
    """Apply the decision (unless `dry_run`) and return it as one line."""
    decision = decide(client, cfg, version, force)
    name, number = cfg.model_name, decision.candidate.version
    verdict = f"promote v{number} to @{CHAMPION}" if decision.promote else f"keep @{CHAMPION}"
    if decision.champion is not None and not decision.promote:
        verdict += f" on v{decision.champion.version}"
        if decision.champion.version != number:
            verdict += f", v{number} not promoted"
    if dry_run:
        return f"dry run: would {verdict}: {decision.reason}"
    if decision.promote:
        previous = decision.champion.version if decision.champion else "none"
        client.set_model_version_tag(name, number, "previous_champion", previous)
        client.set_model_version_tag(name, number, "promotion_reason", decision.reason)
        client.set_registered_model_alias(name, CHAMPION, number)
    return f"{verdict}: {decision.reason}"
