"""The whole VAE as an MLflow pyfunc model: one URI decodes, encodes, reconstructs and scores.

`predict(data, params={"method": ...})`:
- decode (the default): latent vectors (n, latent) -> images (n, 784) in [0, 1];
- encode: images (n, 784) in [0, 1] -> posterior means (n, latent), followed by the
  log-variances (n, 2 * latent) when `logvar` is true;
- reconstruct: images -> the decoded posterior means (n, 784);
- score: images -> the negative ELBO of each image in nats, averaged over `samples` draws of z
  seeded with `seed`, so a score is repeatable: high for images unlike MNIST digits.

The model is logged from code (`model_code.py`, no pickle) with this package as its code and the
weights as a safetensors artifact, so loading it needs neither this repository nor an unverified
pickle.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import safetensors
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from pipeline.config import SCORE_SAMPLES
from pipeline.data.weights import load_vae
from pipeline.vae.model import IMAGE_DIM, VAE, loss_terms

METHODS = ("decode", "encode", "reconstruct", "score")
DEFAULT_METHOD = "decode"  # what a request without params asks for, as older clients do
PARAMS = ParamSchema(
    [
        ParamSpec("method", "string", DEFAULT_METHOD),
        ParamSpec("samples", "long", 1),  # score: draws of z per image
        ParamSpec("seed", "long", 0),  # score: the draws' seed
        ParamSpec("logvar", "boolean", False),  # encode: also return the log-variances
    ]
)


def signature() -> ModelSignature:
    """Float32 arrays of any width in and out: the width depends on the method."""
    array = Schema([TensorSpec(np.dtype(np.float32), (-1, -1))])
    return ModelSignature(inputs=array, outputs=array, params=PARAMS)


def invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def as_batch(data: object, width: int, what: str) -> torch.Tensor:
    array = np.asarray(data, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != width:
        raise invalid(f"expected {what} of shape (n, {width}), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise invalid(f"expected finite {what}")
    return torch.from_numpy(array)


@torch.no_grad()
def run_method(model: VAE, data: object, params: dict) -> np.ndarray:
    method = params.get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise invalid(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "decode":
        return model.decode(as_batch(data, model.latent_dim, "latent vectors")).numpy()
    images = as_batch(data, IMAGE_DIM, "images")
    if images.min() < 0 or images.max() > 1:
        raise invalid("expected images with pixel values in [0, 1] (divide uint8 pixels by 255)")
    mu, logvar = model.encode(images)
    if method == "encode":
        return torch.cat([mu, logvar], 1).numpy() if params.get("logvar") else mu.numpy()
    if method == "reconstruct":
        return model.decode(mu).numpy()
    samples = int(params.get("samples", 1))
    if not 1 <= samples <= SCORE_SAMPLES:
        raise invalid(f"samples = {samples}: use 1 to {SCORE_SAMPLES} draws per image")
    generator = torch.Generator().manual_seed(int(params.get("seed", 0)))
    total = torch.zeros(len(images))
    for _ in range(samples):
        recon, kl = loss_terms(model, images, generator)
        total += recon + kl
    return (total / samples).numpy()


class VAEModel(PythonModel):
    """pyfunc wrapper; the weights come from the `weights` artifact (safetensors)."""

    def load_context(self, context) -> None:
        self.model = load_vae(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        return run_method(self.model, model_input, params or {})


def log_vae_model(weights: Path, latent_dim: int) -> None:
    """Log the whole VAE as the run's MLflow model: decode, encode, reconstruct and score.

    Logged from code with this package as its code and the weights in safetensors: loading it
    unpickles nothing and needs nothing from this repository.
    """
    package = Path(__file__).resolve().parent.parent
    example = np.random.default_rng(0).standard_normal((2, latent_dim)).astype(np.float32)
    mlflow.pyfunc.log_model(
        name="model",
        python_model=str(package / "tracking" / "model_code.py"),
        artifacts={"weights": str(weights)},
        code_paths=[str(package)],
        signature=signature(),
        input_example=(example, {"method": "decode"}),
        metadata={"latent_dim": latent_dim, "image_dim": 784, "methods": list(METHODS)},
        # Declared, not inferred: inference loads the model in a subprocess (seconds).
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}",
            f"numpy=={np.__version__}",
        ],
    )
