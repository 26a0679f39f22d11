"""`python -m pipeline <command>`: what users do with trained models.

promote   move @champion to the candidate (or --version N) when it is better
generate  draw new digits with any MLflow model URI (models:/mnist-vae@champion, runs:/...)
score     score a folder of PNGs or a .npy file: negative ELBO and latent means per image, as CSV
report    Markdown: params and metrics against a git revision, the lab's curve, the registry
stack     run PostgreSQL, an S3 store and an MLflow server on 127.0.0.1 until Ctrl-C
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torchvision.utils import save_image

from pipeline import runtime
from pipeline.commands import scoring
from pipeline.commands.report import render
from pipeline.config import load_params
from pipeline.errors import PipelineError, first_line, reports_errors
from pipeline.tools import stack
from pipeline.tracking import registry
from pipeline.tracking import runs as tracking


def promote(args: argparse.Namespace) -> None:
    params = load_params()
    tracking.connect(params.mlflow.experiment)
    print(registry.promote(MlflowClient(), params.registry, args.version, args.dry_run, args.force))


def load_model(uri: str) -> mlflow.pyfunc.PyFuncModel:
    store = tracking.tracking_uri()
    tracking.check_reachable(store)
    mlflow.set_tracking_uri(store)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        raise PipelineError(f"cannot load model {uri} from {store}: {first_line(exc)}") from None


def generate(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    latent_dim = int(model.metadata.metadata["latent_dim"])
    z = np.random.default_rng(args.seed).standard_normal((args.n, latent_dim)).astype(np.float32)
    images = torch.from_numpy(np.asarray(model.predict(z), dtype=np.float32))
    nrow = max(1, round(args.n**0.5))
    save_image(images.reshape(-1, 1, 28, 28), args.output, nrow=nrow, padding=2, pad_value=1.0)
    print(f"wrote {args.n} digits from {args.model} to {args.output}")


def score(args: argparse.Namespace) -> None:
    names, images = scoring.read_images(Path(args.input))
    model = load_model(args.model)
    rows = scoring.score_images(model, names, images, args.batch_size, args.samples, args.seed)
    scoring.write_csv(Path(args.output), rows)
    print(f"scored {len(rows)} images from {args.input} with {args.model}: {args.output}")


def report_markdown(args: argparse.Namespace) -> None:
    params = load_params()
    text, passed = render(params, args.rev)
    print(text, end="")
    if args.check and not passed:
        if params.train.schedule == "burda":
            raise PipelineError("this run does not reproduce Burda et al.'s row (see the report)")
        raise PipelineError("the training loss is outside the lab's tolerance (see the report)")


def serve_stack(args: argparse.Namespace) -> None:
    stack.serve(args.root, args.mlflow_port, args.s3_port, args.postgres_port)


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
    s = commands.add_parser("score", help="negative ELBO and latent means per image, as CSV")
    s.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    s.add_argument("--input", required=True, help="a folder of 28x28 PNGs, or a .npy file")
    s.add_argument("-o", "--output", default="scores.csv")
    s.add_argument("--samples", type=int, default=16, help="draws of z per image")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=500)
    s.set_defaults(run=score)
    r = commands.add_parser("report", help="Markdown: this run against a git revision")
    r.add_argument("--rev", default="HEAD", help="the git revision to compare with (HEAD, main)")
    r.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the lab's curve (or the paper's row) does not hold",
    )
    r.set_defaults(run=report_markdown)
    t = commands.add_parser("stack", help="a team's stack on 127.0.0.1, until Ctrl-C")
    t.add_argument("--root", type=Path, default=Path(".stack"), help="its data, keys and logs")
    t.add_argument("--mlflow-port", type=int, default=5000)
    t.add_argument("--s3-port", type=int, default=8333)
    t.add_argument("--postgres-port", type=int, default=5433)
    t.set_defaults(run=serve_stack)
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
