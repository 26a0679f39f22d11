"""The reference profile `mnist-vae monitor` compares a batch with: what an evaluated model makes of
test digits it never trained on, logged with the model's MLflow run as safetensors (no pickle).

A profile is each reference image's score (the negative ELBO in nats, `samples` seeded draws of z,
as the pyfunc model's `score` computes it) and posterior mean. The reference is a seeded half of the
test set at most (`evaluate.reference_images`); the other half is never profiled, so that clean
batches drawn from it measure the monitor's false-alarm rate honestly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import EvaluateConfig
from pipeline.data.files import read_tensors, write_tensors
from pipeline.errors import PipelineError, RegistryError, first_line
from pipeline.tracking import pyfunc, store
from pipeline.vae.model import VAE

ARTIFACT_DIR = "monitoring"
ARTIFACT = f"{ARTIFACT_DIR}/reference.safetensors"
CHUNK = 1000  # images per predict call: the profile and a monitored batch are scored alike

Predict = Callable[[np.ndarray, dict], np.ndarray]  # a pyfunc model's predict(data, params)


@dataclass(frozen=True)
class Profile:
    scores: np.ndarray  # (n,) negative ELBO per image, nats
    means: np.ndarray  # (n, latent) posterior means
    indices: np.ndarray  # (n,) which test images; for a monitored batch, empty
    samples: int  # draws of z per score
    seed: int


def split_test_set(n_test: int, wanted: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the reference images (at most half the test set) and of the held-out rest.

    Seeded and shuffled, not the first half: MNIST's first 5,000 test digits come from other
    writers than its last 5,000 (LeCun et al.), so the halves in order are not alike."""
    order = np.random.default_rng(seed).permutation(n_test)
    n = min(wanted, n_test // 2)
    return np.sort(order[:n]), np.sort(order[n:])


def profile_images(predict: Predict, images: np.ndarray, samples: int, seed: int) -> Profile:
    """Scores and posterior means of `images` (n, 784), in chunks of CHUNK, each seeded alike."""
    scores, means = [], []
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        scoring = {"method": "score", "samples": samples, "seed": seed}
        scores.append(np.asarray(predict(chunk, scoring), dtype=np.float32))
        means.append(np.asarray(predict(chunk, {"method": "encode"}), dtype=np.float32))
    empty = np.zeros(0, dtype=np.int64)
    return Profile(np.concatenate(scores), np.concatenate(means), empty, samples, seed)


def make_profile(predict: Predict, test_images: np.ndarray, cfg: EvaluateConfig) -> Profile:
    """The profile of a seeded half (at most) of the test set (n, 784), as params.yaml's evaluate
    section sizes it: evaluate's and `monitor --make-reference`'s alike."""
    indices, _ = split_test_set(len(test_images), cfg.reference_images, cfg.seed)
    profile = profile_images(predict, test_images[indices], cfg.reference_samples, cfg.seed)
    return replace(profile, indices=indices)


def vae_predict(model: VAE) -> Predict:
    """A trained VAE scored exactly as its logged pyfunc model scores (`pyfunc.run_method`)."""
    model = model.cpu()
    return lambda data, params: pyfunc.run_method(model, data, params)


def model_predict(model: mlflow.pyfunc.PyFuncModel) -> Predict:
    return lambda data, params: model.predict(data, params=params)


def log_profile(profile: Profile) -> None:
    """The profile as `monitoring/reference.safetensors` in the active run's artifacts."""
    tensors = {
        "scores": torch.from_numpy(profile.scores),
        "means": torch.from_numpy(profile.means),
        "indices": torch.from_numpy(profile.indices),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reference.safetensors"
        write_tensors(path, tensors, {"samples": profile.samples, "seed": profile.seed})
        mlflow.log_artifact(str(path), ARTIFACT_DIR)


@dataclass(frozen=True)
class Resolved:
    uri: str  # pinned: an alias becomes the version it names now, so that one run uses one model
    run_id: str
    version: str | None  # the registry's, when the URI names one
    name: str | None = None  # the registered model's, with the version


def resolve(model_uri: str) -> Resolved:
    """The model a URI names now: `models:/NAME@ALIAS` and `models:/NAME/N` through the registry,
    any other form MLflow reads (`runs:/ID/model`, `models:/m-ID`, a stage) through its MLmodel."""
    from mlflow.models import get_model_info

    try:
        version = store.registry_version(model_uri)
        if version is None:
            run_id = get_model_info(model_uri).run_id
            if not run_id:
                raise PipelineError(
                    f"{model_uri}: not logged by an MLflow run, where a reference profile is "
                    "kept; give models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"
                )
            return Resolved(model_uri, run_id, None)
    except (MlflowException, OSError) as exc:
        if isinstance(exc, MlflowException):
            store.reraise_refusal(exc)
        raise RegistryError(f"{model_uri}: no such model ({first_line(exc)[:200]})") from None
    pinned = f"models:/{version.name}/{version.version}"
    return Resolved(pinned, version.run_id, str(version.version), version.name)


def load_profile(model: Resolved) -> Profile:
    """The reference profile logged with the model's run; one line when it has none."""
    rebuild = f"mnist-vae monitor --model {model.uri} --make-reference"
    try:
        found = MlflowClient().list_artifacts(model.run_id, ARTIFACT_DIR)
    except MlflowException as exc:
        store.reraise_refusal(exc)
        raise RegistryError(
            f"{model.uri}: its run's artifacts cannot be listed ({first_line(exc)})"
        ) from None
    if ARTIFACT not in {f.path for f in found}:
        raise RegistryError(
            f"{model.uri} (run {model.run_id[:8]}) has no reference profile ({ARTIFACT}): it was "
            f"evaluated before the monitor existed; make one with `{rebuild}` (it profiles "
            "data/processed's test set)"
        )
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=model.run_id, artifact_path=ARTIFACT, dst_path=folder
            )
        except MlflowException as exc:
            store.reraise_refusal(exc)
            raise RegistryError(
                f"{model.uri}: its reference profile cannot be downloaded ({first_line(exc)})"
            ) from None
        tensors, meta = read_tensors(path, rebuild)
    try:
        return Profile(
            tensors["scores"].numpy(),
            tensors["means"].numpy(),
            tensors["indices"].numpy(),
            int(meta["samples"]),
            int(meta["seed"]),
        )
    except (KeyError, TypeError, ValueError):
        raise RegistryError(
            f"{model.uri}: its reference profile is damaged; run `{rebuild}`"
        ) from None
