"""`python -m pipeline <command>`: what users do with trained models.

promote   move @champion to the candidate (or --version N) when it is better
generate  draw new digits with any MLflow model URI (models:/mnist-vae@champion, runs:/...)
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torchvision.utils import save_image

from pipeline import registry, runtime, tracking
from pipeline.config import load_params
from pipeline.errors import PipelineError, reports_errors


def promote(args: argparse.Namespace) -> None:
    params = load_params()
    tracking.connect(params.mlflow.experiment)
    print(registry.promote(MlflowClient(), params.registry, args.version, args.dry_run, args.force))


def generate(args: argparse.Namespace) -> None:
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"cannot load model {args.model} from {uri}: {exc}") from None
    latent_dim = model.metadata.get_input_schema().inputs[0].shape[-1]
    z = np.random.default_rng(args.seed).standard_normal((args.n, latent_dim)).astype(np.float32)
    images = torch.from_numpy(np.asarray(model.predict(z), dtype=np.float32))
    nrow = max(1, round(args.n**0.5))
    save_image(images.reshape(-1, 1, 28, 28), args.output, nrow=nrow, padding=2, pad_value=1.0)
    print(f"wrote {args.n} digits from {args.model} to {args.output}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    p = commands.add_parser("promote", help="move @champion to a better evaluated version")
    p.add_argument("--version", help="the version to consider (default: @candidate)")
    p.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    p.add_argument("--force", action="store_true", help="promote even if it is not better")
    p.set_defaults(run=promote)
    g = commands.add_parser("generate", help="write a grid of new digits to a PNG")
    g.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    g.add_argument("-n", type=int, default=64, help="how many digits")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-o", "--output", default="digits.png")
    g.set_defaults(run=generate)
    return root


@reports_errors
def main() -> None:
    args = parser().parse_args()
    runtime.start()
    if getattr(args, "n", 1) < 1:
        raise PipelineError(f"-n {args.n}: ask for at least one digit")
    args.run(args)


if __name__ == "__main__":
    main()
