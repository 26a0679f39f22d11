"""`mnist-vae monitor`: a batch of images against the reference profile of the model that is asked
to judge it; a decision, its evidence (report.json) and a picture (report.png), logged to MLflow as
a run nested under the monitored model's run."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np

from pipeline.data.files import write_json
from pipeline.errors import PipelineError
from pipeline.tracking import reference, store
from pipeline.vae.drift import Verdict, compare
from pipeline.vae.drift_report import drift_report

MIN_IMAGES = 20  # fewer cannot tell anything from the reference at any usual alpha
LOG_SUFFIXES = (".jsonl", ".jsonl.1")  # serve's request log and its rotated copy


@dataclass(frozen=True)
class Batch:
    names: list[str]
    images: np.ndarray  # (n, 784) float32 in [0, 1]
    source: str  # what was read, for the report
    models: list[str]  # for a request log: the models that answered it


def read_batch(source: Path, last: int | None, since: str | None) -> Batch:
    """A folder of PNGs, a .npy file, or `mnist-vae serve`'s request log (.jsonl)."""
    from pipeline.commands.scoring import read_images
    from pipeline.tools.request_log import read_requests

    if source.name.endswith(LOG_SUFFIXES):
        logged = read_requests(source, last, since)
        window = f", last {last} requests" if last else f", since {since}" if since else ""
        repeats = f", {logged.repeats} repeated images left out" if logged.repeats else ""
        described = f"{source} ({logged.requests} requests{window}{repeats})"
        return Batch(logged.names, logged.images, described, logged.models)
    if last is not None or since is not None:
        raise PipelineError(f"--last and --since read a request log (.jsonl), not {source}")
    names, images = read_images(source)
    return Batch(names, images, str(source), [])


def check_size(batch: Batch) -> None:
    if len(batch.images) < MIN_IMAGES:
        raise PipelineError(
            f"{batch.source}: {len(batch.images)} images; the monitor needs at least {MIN_IMAGES}"
            " (a few hundred to see a shift that touches a few percent of them)"
        )


@dataclass(frozen=True)
class Result:
    model: reference.Resolved
    batch: Batch
    verdict: Verdict
    profile: reference.Profile  # the reference's
    found: reference.Profile  # the batch's
    worst: np.ndarray  # row numbers, highest score first
    reconstructions: np.ndarray

    def describe_model(self) -> str:
        version = f"version {self.model.version}, " if self.model.version else ""
        return f"{self.model.uri} ({version}run {self.model.run_id[:8]})"

    def as_dict(self) -> dict:
        ref = self.profile.scores
        return {
            "drift": self.verdict.drift,
            "summary": self.verdict.summary(),
            "model": asdict(self.model),
            "input": self.batch.source,
            "served_by": self.batch.models,
            "worst": [
                {
                    "name": self.batch.names[i],
                    "score": float(self.found.scores[i]),
                    "reference_percentile": float((ref < self.found.scores[i]).mean() * 100),
                }
                for i in self.worst
            ],
            "verdict": self.verdict.as_dict(),
        }


def monitor(model_uri: str, batch: Batch, alpha: float, worst_inputs: int) -> Result:
    """The verdict on `batch`, with what the report shows. An alias is resolved once: a promotion
    meanwhile cannot make the batch scored by one version and compared with another's profile."""
    check_size(batch)
    store.check_reachable(store.tracking_uri())
    mlflow.set_tracking_uri(store.tracking_uri())
    model = reference.resolve(model_uri)
    profile = reference.load_profile(model)
    pyfunc = store.load_model(model.uri)
    found = reference.profile_images(
        reference.model_predict(pyfunc), batch.images, profile.samples, profile.seed
    )
    if found.means.shape[1] != profile.means.shape[1]:
        raise PipelineError(f"{model.uri}: its reference profile is of another latent size")
    verdict = compare(profile.scores, profile.means, found.scores, found.means, alpha)
    worst = np.argsort(found.scores)[::-1][:worst_inputs]
    shown = batch.images[worst]
    reconstructions = np.asarray(
        pyfunc.predict(shown, params={"method": "reconstruct"}), dtype=np.float32
    )
    return Result(model, batch, verdict, profile, found, worst, reconstructions)


def write_report(result: Result, out: Path) -> tuple[Path, Path]:
    """report.png and report.json in `out`, 0600 (they show clients' inputs): written in a new
    folder beside it that then takes its place, so `out` holds one whole report or the last."""
    fig = drift_report(
        result.verdict, result.profile.scores, result.profile.means, result.found.scores,
        result.found.means, result.batch.images[result.worst], result.reconstructions,
        f"{result.describe_model()} on {result.batch.source}",
    )  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise PipelineError(
            f"--out {out}: cannot write the report there ({exc.strerror})"
        ) from None
    try:
        fig.savefig(staging / "report.png", format="png", dpi=90)
        write_json(staging / "report.json", result.as_dict())
        for path in staging.iterdir():
            path.chmod(0o600)
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError(
            f"--out {out}: cannot write the report there ({exc.strerror})"
        ) from None
    return out / "report.png", out / "report.json"


def log_report(result: Result, files: tuple[Path, Path]) -> str:
    """A run nested under the monitored model's run, with the report and tags that name the model
    version, and the version's tags `monitor.last_run` and `monitor.last_decision`; the run's id."""
    verdict, model = result.verdict, result.model
    experiment = mlflow.get_run(model.run_id).info.experiment_id
    tags = {
        "mlflow.parentRunId": model.run_id,
        "monitor.model_uri": model.uri,
        "monitor.model_version": model.version or "",
        "monitor.decision": "drift" if verdict.drift else "no drift",
    }
    which = f"v{model.version}" if model.version else model.run_id[:8]
    name = f"monitor {which}: {verdict.images} images"
    with mlflow.start_run(experiment_id=experiment, run_name=name, tags=tags) as run:
        mlflow.log_params({"alpha": verdict.alpha, "input": result.batch.source[:500]})
        mlflow.log_metrics(
            {
                "drift": float(verdict.drift),
                "images": verdict.images,
                "share_above_p99": verdict.share_above,
                "tests_flagged": sum(t.flagged for t in verdict.tests),
                "smallest_p_holm": min(t.p_holm for t in verdict.tests),
            }
            | {f"p_holm/{t.name}": t.p_holm for t in verdict.tests}
        )
        for path in files:
            mlflow.log_artifact(str(path), "monitoring")
    if model.version:  # the registry's version page shows the last verdict and where it is
        client, name = mlflow.MlflowClient(), model.name
        client.set_model_version_tag(name, model.version, "monitor.last_run", run.info.run_id)
        client.set_model_version_tag(
            name, model.version, "monitor.last_decision", tags["monitor.decision"]
        )
    return run.info.run_id


def make_reference(model_uri: str) -> str:
    """A reference profile for a model evaluated before the monitor existed, from data/processed's
    test set with params.yaml's settings, logged to its run (needs the right to write it)."""
    from pipeline.config import load_params
    from pipeline.data.splits import load_test_set
    from pipeline.paths import TEST_SPLIT

    params = load_params()
    mlflow.set_tracking_uri(store.tracking_uri())
    model = reference.resolve(model_uri)
    pyfunc = store.load_model(model.uri)
    binarize = params.data.binarize == "dynamic"
    images, _ = load_test_set(TEST_SPLIT, binarize, params.data.binarize_seed, "cpu")
    profile = reference.make_profile(
        reference.model_predict(pyfunc), images.numpy(), params.evaluate
    )
    with mlflow.start_run(run_id=model.run_id):
        reference.log_profile(profile)
    n = len(profile.indices)
    return f"logged a reference profile of {n} test images to run {model.run_id[:8]}"
