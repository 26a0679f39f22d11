"""`mnist-vae report`: this workspace's run against a git revision, as Markdown.

In the spirit of a CML comment on a pull request: params and metrics that changed (DVC's own
diffs), the lab's curve beside this run's with the CI tolerance, the registry's candidate
against its champion, and where the figures are.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import Params
from pipeline.errors import TrackingError
from pipeline.paths import EVAL_METRICS, FIGURES, TRAIN_HISTORY, TRAIN_METRICS, WEIGHTS
from pipeline.tracking import registry
from pipeline.tracking.runs import training_run_of
from pipeline.tracking.store import tracking_uri
from pipeline.vae import lab as lab_curve

# Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016), Table 1:
# MNIST, one stochastic layer, VAE trained with k = 1. Done when within 1.0 nat (goal: 0.5).
PAPER = {"nll": 86.76, "active_units": 19, "epochs": 3280, "tolerance": 1.0}


def dvc_table(*args: str) -> str:
    """A `dvc ... --md` table, or a line saying there is nothing to show."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args, "--md"], capture_output=True, text=True
    )
    if result.returncode != 0:
        return f"(`dvc {' '.join(args)}` failed: {result.stderr.strip().splitlines()[-1:]})"
    rows = [line for line in result.stdout.strip().splitlines() if line.strip()]
    return "\n".join(rows) if len(rows) > 2 else "No changes."


def lab_curve_section(history_file: Path = TRAIN_HISTORY) -> tuple[str, bool]:
    """The lab's curve beside this run's, and whether it is within the CI tolerance."""
    if not history_file.is_file():
        return f"No `{history_file}`: run `make repro` first.", False
    with history_file.open() as f:
        ours = [float(row["train_loss"]) for row in csv.DictReader(f)]
    lab, tolerance = lab_curve.CURVE, lab_curve.TOLERANCE
    lines = ["| epoch | lab | this run | difference |", "| --- | --- | --- | --- |"]
    for epoch, (theirs, mine) in enumerate(zip(lab, ours, strict=False), start=1):
        lines.append(f"| {epoch} | {theirs:.2f} | {mine:.2f} | {mine - theirs:+.2f} |")
    passed = lab_curve.within_tolerance(ours)
    verdict = "PASS" if passed else "FAIL"
    lines.append(
        f"\nCI tolerance (every epoch within {tolerance['each_epoch']}, epoch {len(lab)} within "
        f"{tolerance['final']}): **{verdict}**"
        + ("" if len(ours) == len(lab) else f" ({len(ours)} epochs, not {len(lab)})")
    )
    return "\n".join(lines), passed


def paper_section() -> tuple[str, bool]:
    """The paper's row beside this run's (`make paper`), and whether it reproduces it."""
    if not (EVAL_METRICS.is_file() and TRAIN_METRICS.is_file()):
        return f"No `{EVAL_METRICS}`: run `make paper` first.", False
    evaluated = json.loads(EVAL_METRICS.read_text())
    epochs = json.loads(TRAIN_METRICS.read_text())["epochs"]
    nll, se = -evaluated["log_px_iwae"], evaluated["log_px_iwae_se"]
    full = epochs == PAPER["epochs"]
    passed = full and abs(nll - PAPER["nll"]) <= PAPER["tolerance"]
    lines = [
        "| | test NLL (IWAE) | active units | epochs |",
        "| --- | --- | --- | --- |",
        f"| Burda et al. (2016), Table 1 | {PAPER['nll']:.2f} | {PAPER['active_units']} | "
        f"{PAPER['epochs']} |",
        f"| this run | {nll:.2f} ± {se:.2f} | {evaluated['active_units']} | {epochs} |",
        f"\nThis run: {run_facts()}.",
        f"\nReproduced (full protocol, within {PAPER['tolerance']} nat): **"
        + ("YES" if passed else "NO")
        + "**"
        + ("" if full else f" ({epochs} of {PAPER['epochs']} epochs: not the paper's row)"),
    ]
    return "\n".join(lines), passed


def no_local_store(uri: str) -> bool:
    """A local SQLite store that does not exist: opening it would create an empty one."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()


def run_facts() -> str:
    """Which MLflow run, on what, and how long its epochs took; what the store still has."""
    uri = tracking_uri()
    if no_local_store(uri):
        return "no MLflow store here"
    try:
        client = MlflowClient(uri)
        trained = training_run_of(WEIGHTS, client=client)
        if trained is None:
            return "its MLflow run is not in this store"
        run_id = trained.info.run_id
        tags = client.get_run(run_id).data.tags
        seconds = sum(m.value for m in client.get_metric_history(run_id, "train/epoch_seconds"))
    except (MlflowException, TrackingError, OSError):
        return "its MLflow run is not in this store"
    return (
        f"MLflow run `{run_id}`, {tags.get('device', '?')}, torch "
        f"{tags.get('torch.version', '?')}, {timedelta(seconds=round(seconds))} in its epochs"
    )


def registry_section(params: Params) -> str:
    uri = tracking_uri()
    if no_local_store(uri):
        return "No MLflow store here: run `make repro` to train and register a model."
    client = MlflowClient(uri)
    cfg, name = params.registry, params.registry.model_name
    try:
        candidate = client.get_model_version_by_alias(name, registry.CANDIDATE)
        champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    except MlflowException:
        return f"`{name}` has no @candidate and @champion yet."
    if candidate.version == champion.version:
        return f"v{candidate.version} is both @candidate and @champion."
    lines = [
        f"| | version | {cfg.metric} | evaluated on |",
        "| --- | --- | --- | --- |",
    ]
    for role, version in (("candidate", candidate), ("champion", champion)):
        value = version.tags.get(f"metric.{cfg.metric}", "?")
        basis = version.tags.get("eval.pixels", "?")
        lines.append(f"| @{role} | v{version.version} | {value} | {basis} pixels |")
    differences = registry.basis_differences(candidate, champion)
    if differences:
        lines.append(f"\nNot comparable: evaluated differently ({'; '.join(differences)}).")
    else:
        new = float(candidate.tags.get(f"metric.{cfg.metric}", "nan"))
        old = float(champion.tags.get(f"metric.{cfg.metric}", "nan"))
        lines.append(
            f"\n{cfg.metric}: candidate minus champion {new - old:+.4f} ({cfg.direction})."
        )
    return "\n".join(lines)


def render(params: Params, rev: str) -> tuple[str, bool]:
    """The report, and whether the lab's curve (or, for `make paper`, the paper's row) holds."""
    if params.train.schedule == "burda":
        table, passed = paper_section()
        result = f"## Burda et al.'s result beside this run's\n\n{table}"
    else:
        curve, passed = lab_curve_section()
        result = f"## The lab's training loss beside this run's\n\n{curve}"
    figures = sorted(FIGURES.glob("*.png"))
    sections = [
        f"# MNIST VAE: the workspace against `{rev}`",
        f"## Params that changed\n\n{dvc_table('params', 'diff', rev)}",
        f"## Metrics that changed\n\n{dvc_table('metrics', 'diff', rev, '--precision', '4')}",
        result,
        f"## Registry: @candidate against @champion\n\n{registry_section(params)}",
        "## Figures\n\n"
        + ("\n".join(f"- `{path}`" for path in figures) or "None yet: run `make repro`.")
        + "\n\nCurves per experiment: `dvc plots diff "
        + rev
        + "` writes `dvc_plots/index.html`.",
    ]
    return "\n\n".join(sections) + "\n", passed
