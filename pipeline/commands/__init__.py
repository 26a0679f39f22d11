"""`mnist-vae <command>` (or `python -m pipeline <command>`): what people do around the pipeline:
promote and use trained models, watch them for drift, report on a run, the paper's protocol, the
team stack, the bench."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from pathlib import Path

from pipeline.config import ServeConfig
from pipeline.errors import Interrupted, PipelineError, explain, failing_with, reports_errors

# Each command imports what it uses when it runs, so that `mnist-vae --help` and a usage error
# answer at once instead of after loading torch, torchvision and MLflow. Every command that runs
# loads torch first (`runtime.start` settles oneMKL before anything computes).


def promote(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.tracking import registry, store

    params = load_params()
    store.connect(params.mlflow.experiment)
    print(registry.promote(MlflowClient(), params.registry, args.version, args.dry_run, args.force))


def generate(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from torchvision.utils import save_image

    from pipeline.tracking import store

    if args.n < 1:
        raise PipelineError(f"-n {args.n}: ask for at least one digit")
    model = store.load_model(args.model)
    latent_dim = int(model.metadata.metadata["latent_dim"])
    z = np.random.default_rng(args.seed).standard_normal((args.n, latent_dim)).astype(np.float32)
    images = torch.from_numpy(np.asarray(model.predict(z), dtype=np.float32))
    nrow = max(1, round(args.n**0.5))
    save_image(images.reshape(-1, 1, 28, 28), args.output, nrow=nrow, padding=2, pad_value=1.0)
    print(f"wrote {args.n} digits from {args.model} to {args.output}")


def score(args: argparse.Namespace) -> None:
    from pipeline.commands import scoring
    from pipeline.data.files import write_csv
    from pipeline.tracking import store

    names, images = scoring.read_images(Path(args.input))
    model = store.load_model(args.model)
    rows = scoring.score_images(model, names, images, args.batch_size, args.samples, args.seed)
    write_csv(Path(args.output), rows, list(rows[0]))
    print(f"scored {len(rows)} images from {args.input} with {args.model}: {args.output}")


def monitor(args: argparse.Namespace) -> None:
    """Exit 0: no drift; 1: drift; 2: anything else (bad input, a model without a reference, an
    unusable store, a bug), so that a failure is never read as drift."""
    from pipeline.commands import monitoring
    from pipeline.config import load_params_with

    with failing_with(2):
        if args.make_reference:
            print(monitoring.make_reference(args.model))
            return
        if args.input is None:
            raise PipelineError("--input is required: a folder of PNGs, a .npy or a request log")
        if args.last is not None and args.last < 1:
            raise PipelineError(f"--last {args.last}: ask for at least one request")
        overrides = {} if args.alpha is None else {"monitor.alpha": args.alpha}
        cfg = load_params_with(overrides, "the flags").monitor
        batch = monitoring.read_batch(Path(args.input), args.last, args.since)
        result = monitoring.monitor(args.model, batch, cfg.alpha, cfg.worst_inputs)
        files = monitoring.write_report(result, Path(args.out))
        print(f"{result.describe_model()} on {batch.source}: {result.verdict.summary()}")
        print(f"report: {files[0]} and {files[1]}", flush=True)
        if not args.no_log:
            try:
                run_id = monitoring.log_report(result, files)
                print(f"logged to MLflow run {run_id}, under the model's run")
            except Exception as exc:  # noqa: BLE001 - the decision stands; say why it is not logged
                error = explain(exc)
                if error is None or result.verdict.drift is False:
                    raise  # no drift, but not logged: the job failed (exit 2)
                print(f"error: not logged to MLflow: {error}", file=sys.stderr)
    if result.verdict.drift:
        sys.exit(1)


def serve(args: argparse.Namespace) -> None:
    from pipeline.config import load_params_with
    from pipeline.tools.serve import serve

    flags = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServeConfig)}
    overrides = {f"serve.{key}": value for key, value in flags.items() if value is not None}
    settings = load_params_with(overrides, "the flags").serve
    url = f"http://127.0.0.1:{args.port}/invocations"

    def ready() -> None:
        print(f"serving {args.model} on {url} with {settings.workers} workers", flush=True)

    # Ctrl-C or SIGTERM is how a server is stopped: uvicorn hands the signal on once its workers
    # have stopped, and it ends here rather than as an error.
    with contextlib.suppress(Interrupted, KeyboardInterrupt):
        serve(args.model, args.port, settings, ready)
    print("stopped", flush=True)


def loadtest(args: argparse.Namespace) -> None:
    from pipeline.config import load_params
    from pipeline.tools.loadtest import run

    if args.requests < 1:
        raise PipelineError(f"--requests {args.requests}: ask for at least one")
    serve = load_params().serve
    workers, handler = args.workers or serve.workers, args.handler or serve.handler
    print(run(args.model, workers, handler, args.requests))


def print_report(args: argparse.Namespace) -> None:
    from pipeline.commands.report import render
    from pipeline.config import load_params

    params = load_params()
    text, passed = render(params, args.rev)
    print(text, end="")
    if args.check and not passed:
        if params.train.schedule == "burda":
            raise PipelineError("this run does not reproduce Burda et al.'s row (see the report)")
        raise PipelineError("the training loss is outside the lab's tolerance (see the report)")


def paper(args: argparse.Namespace) -> None:
    """Burda et al.'s protocol as a DVC experiment: the preset, with the lengths asked for."""
    from pipeline.config import load_params_with, read_preset
    from pipeline.runtime import run_in_foreground

    overrides = read_preset("burda2015") | {"train.epochs": args.epochs}
    overrides["evaluate.iwae_samples"] = args.k
    load_params_with(overrides, "preset burda2015")  # refused here, before DVC starts
    command = [sys.executable, "-m", "dvc", "exp", "run", "-n", args.name]
    command += [f"-S{key}={value}" for key, value in overrides.items()]
    print(" ".join(["dvc", *command[3:]]), flush=True)
    sys.exit(run_in_foreground(command))


def explore(args: argparse.Namespace) -> None:
    from pipeline.commands.latent import Explorer
    from pipeline.data.splits import load_split
    from pipeline.paths import TEST_SPLIT
    from pipeline.tracking import store

    model = store.load_model(args.model)  # a wrong URI fails here, before Gradio loads
    width = int(model.metadata.metadata.get("image_dim", 0))
    if width != 784:
        raise PipelineError(f"{args.model} is not an MNIST VAE (images of {width} pixels, not 784)")
    from pipeline.commands.explore import TEST_DIGITS, build

    images, labels = load_split(TEST_SPLIT)
    explorer = Explorer(model, images[:TEST_DIGITS].numpy(), labels[:TEST_DIGITS].numpy())
    title = f"{store.describe_model(args.model)}, {explorer.latent_dim} latent units"
    print(f"exploring {title} on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    build(explorer, title).launch(
        server_name=args.host, server_port=args.port, share=False, quiet=True
    )


def sweep(args: argparse.Namespace) -> None:
    from pipeline.config import load_params
    from pipeline.tools.sweep import run

    params = load_params()
    study = args.study or params.sweep.study
    run(params, study, args.trials or params.sweep.trials, args.storage, args.best, args.apply)


def stack(args: argparse.Namespace) -> None:
    from pipeline.tools.stack import serve

    serve(args.root, args.mlflow_port, args.s3_port, args.postgres_port)


def drift_power(args: argparse.Namespace) -> None:
    from pipeline.tools.drift_power import run

    run(args.model, args.batches, args.power_batches, args.alpha, args.seed)


def bench(args: argparse.Namespace) -> None:
    import torch

    if torch.cuda.is_available():  # the GPU's paths (train.cuda_graphs, train.compile)
        from pipeline.tools.bench_cuda import run as run_on_gpu

        return run_on_gpu(args.repeats, args.paper_epochs)
    from pipeline.tools.bench import run

    run(args.repeats)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="mnist-vae",
        description="Use, promote and report on the MNIST VAE the pipeline trains.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    r.add_argument("--check", action="store_true", help="exit 1 unless the lab's curve holds")
    r.set_defaults(run=print_report)
    e = commands.add_parser("paper", help="Burda et al.'s protocol as a DVC experiment")
    e.add_argument("--name", default="burda2015", help="the DVC experiment's (and run's) name")
    e.add_argument("--epochs", type=int, default=3280, help="the paper trains 3,280")
    e.add_argument("--k", type=int, default=5000, help="IWAE samples for the test NLL")
    e.set_defaults(run=paper)
    x = commands.add_parser("explore", help="a page to play with a model, on 127.0.0.1")
    x.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    x.add_argument("--host", default="127.0.0.1", help="where it listens (only this machine)")
    x.add_argument("--port", type=int, default=7860)
    x.set_defaults(run=explore)
    w = commands.add_parser("sweep", help="join an Optuna study: trials as MLflow child runs")
    w.add_argument("--study", help="the study's name (default: sweep.study)")
    w.add_argument("--trials", type=int, help="finished trials to stop at (default: sweep.trials)")
    w.add_argument("--storage", help="postgresql+psycopg://... (default: sweep.storage)")
    w.add_argument("--best", action="store_true", help="print the dvc exp run of the best trial")
    w.add_argument("--apply", action="store_true", help="run it: retrain the best at full length")
    w.set_defaults(run=sweep)
    m = commands.add_parser("monitor", help="is a batch what the model was evaluated on? 0/1/2")
    m.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    m.add_argument("--input", help="a folder of PNGs, a .npy, or serve's request log (.jsonl)")
    m.add_argument("--last", type=int, help="a request log's last N requests")
    m.add_argument(
        "--since", help="a request log's since 30m, 2h, 1d, or a time (UTC unless given)"
    )
    m.add_argument("--alpha", type=float, help="the false-alarm rate (default: monitor.alpha)")
    m.add_argument("--out", default="monitor-report", help="the folder for report.png/.json")
    m.add_argument("--no-log", action="store_true", help="write the report, log nothing")
    m.add_argument(
        "--make-reference", action="store_true", help="profile the test set for an older model"
    )
    m.set_defaults(run=monitor)
    v = commands.add_parser("serve", help="a registered model over MLflow's /invocations")
    v.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    v.add_argument("--port", type=int, default=5001, help="on 127.0.0.1 (only this machine)")
    for field in dataclasses.fields(ServeConfig):  # a flag per key of params.yaml's serve section
        choices = typing.get_args(typing.get_type_hints(ServeConfig)[field.name]) or None
        kind = str if choices else typing.get_type_hints(ServeConfig)[field.name]
        flag = "--" + field.name.replace("_", "-")
        v.add_argument(flag, type=kind, choices=choices, help=f"default: serve.{field.name}")
    v.set_defaults(run=serve)
    o = commands.add_parser("loadtest", help="a bounded load test of `serve` on 127.0.0.1")
    o.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    o.add_argument("--workers", type=int, help="the server's (default: serve.workers)")
    o.add_argument("--handler", choices=["direct", "mlflow"], help="default: serve.handler")
    o.add_argument("--requests", type=int, default=200, help="per method, batch and clients")
    o.set_defaults(run=loadtest)
    t = commands.add_parser("stack", help="PostgreSQL, S3 and MLflow on 127.0.0.1 until Ctrl-C")
    t.add_argument("--root", type=Path, default=Path(".stack"), help="its data, keys and logs")
    t.add_argument("--mlflow-port", type=int, default=5000)
    t.add_argument("--s3-port", type=int, default=8333)
    t.add_argument("--postgres-port", type=int, default=5433)
    t.set_defaults(run=stack)
    d = commands.add_parser("drift-power", help="measure monitor's false alarms and power")
    d.add_argument("--model", default="models:/mnist-vae@champion", help="an MLflow model URI")
    d.add_argument("--batches", type=int, default=1000, help="per false-alarm cell")
    d.add_argument("--power-batches", type=int, default=100, help="per power cell")
    d.add_argument("--alpha", type=float, help="the power's (default: monitor.alpha)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=drift_power)
    b = commands.add_parser(
        "bench",
        help="time the lab's epoch, the paper's step and the train stage (on a GPU: "
        "eager, graphed and compiled)",
    )
    b.add_argument("--repeats", type=int, default=5, help="rounds; each path keeps its best")
    b.add_argument(
        "--paper-epochs", type=int, default=50, help="on a GPU: the paper's protocol's epochs"
    )
    b.set_defaults(run=bench)
    return root


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from pipeline import runtime  # after the arguments: --help and usage errors need no torch

    runtime.start()
    args.run(args)
