"""`mnist-vae monitor`: a batch of images against the reference profile of the model that is asked
to judge it; a decision, its evidence (report.json) and a picture (report.png), logged to MLflow as
a run nested under the monitored model's run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from pipeline.data.files import atomic_path, write_json
from pipeline.errors import PipelineError
from pipeline.tracking import reference, store
from pipeline.vae.drift import Verdict, compare
from pipeline.vae.drift_figure import drift_report

MIN_IMAGES = 20  # fewer cannot tell anything from the reference at any usual alpha


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

    if source.suffix == ".jsonl" or source.name.endswith(".jsonl.1"):
        logged = read_requests(source, last, since)
        window = f", last {last} requests" if last else f", since {since}" if since else ""
        described = f"{source} ({logged.requests} requests{window})"
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


def monitor(model_uri: str, batch: Batch, alpha: float, worst_inputs: int) -> dict:
    """The verdict on `batch` with everything the report shows, as one JSON-able dict."""
    check_size(batch)
    model = store.load_model(model_uri)
    ref = reference.load_profile(model_uri)
    predict = reference.model_predict(model)
    found = reference.profile_images(predict, batch.images, ref.samples, ref.seed)
    if found.means.shape[1] != ref.means.shape[1]:
        raise PipelineError(f"{model_uri}: its reference profile is of another latent size")
    verdict = compare(ref.scores, ref.means, found.scores, found.means, alpha)
    order = np.argsort(found.scores)[::-1][:worst_inputs]
    worst = batch.images[order]
    recon = np.asarray(model.predict(worst, params={"method": "reconstruct"}), dtype=np.float32)
    return {
        "model": store.describe_model(model_uri),
        "input": batch.source,
        "served_by": batch.models,
        "verdict": verdict,
        "worst": [
            {
                "name": batch.names[i],
                "score": float(found.scores[i]),
                "reference_percentile": float((ref.scores < found.scores[i]).mean() * 100),
            }
            for i in order
        ],
        "arrays": (ref, found, worst, recon),
    }


def write_report(result: dict, out: Path) -> tuple[Path, Path]:
    """report.json (the decision and every test) and report.png in `out`, each atomically."""
    verdict: Verdict = result["verdict"]
    ref, found, worst, recon = result["arrays"]
    fig = drift_report(
        verdict, ref.scores, ref.means, found.scores, found.means, worst, recon,
        f"{result['model']} on {result['input']}",
    )  # fmt: skip
    picture, text = out / "report.png", out / "report.json"
    with atomic_path(picture) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    summary = {key: value for key, value in result.items() if key not in ("verdict", "arrays")}
    write_json(text, {"drift": verdict.drift, "summary": verdict.summary()} | summary | {
        "verdict": verdict.as_dict()
    })  # fmt: skip
    return picture, text


def log_report(model_uri: str, verdict: Verdict, files: tuple[Path, Path], source: str) -> str:
    """A run nested under the monitored model's run, with the report, its figures and tags that
    name the model version; its id."""
    run_id, version = reference.run_of(model_uri)
    experiment = mlflow.get_run(run_id).info.experiment_id
    tags = {
        "mlflow.parentRunId": run_id,
        "monitor.model_uri": model_uri,
        "monitor.model_version": version or "",
        "monitor.decision": "drift" if verdict.drift else "no drift",
    }
    name = f"monitor {'v' + version if version else run_id[:8]}: {verdict.images} images"
    with mlflow.start_run(experiment_id=experiment, run_name=name, tags=tags) as run:
        mlflow.log_params({"alpha": verdict.alpha, "input": source[:500]})
        flagged = sum(t.flagged for t in verdict.tests)
        mlflow.log_metrics(
            {
                "drift": float(verdict.drift),
                "images": verdict.images,
                "share_above_p99": verdict.share_above,
                "tests_flagged": flagged,
                "smallest_p_holm": min(t.p_holm for t in verdict.tests),
            }
            | {f"p_holm/{t.name}": t.p_holm for t in verdict.tests}
        )
        for path in files:
            mlflow.log_artifact(str(path), "monitoring")
    return run.info.run_id


def make_reference(model_uri: str) -> str:
    """A reference profile for a model evaluated before the monitor existed, from data/processed's
    test set with params.yaml's settings, logged to its run (needs the right to write it)."""
    from pipeline.config import load_params
    from pipeline.data.splits import load_test_set
    from pipeline.paths import TEST_SPLIT

    params = load_params()
    model = store.load_model(model_uri)
    run_id, _ = reference.run_of(model_uri)
    binarize = params.data.binarize == "dynamic"
    images, _ = load_test_set(TEST_SPLIT, binarize, params.data.binarize_seed, "cpu")
    cfg = params.evaluate
    profile = reference.make_profile(
        reference.model_predict(model), images.numpy(),
        cfg.reference_images, cfg.reference_samples, cfg.seed,
    )  # fmt: skip
    with mlflow.start_run(run_id=run_id):
        reference.log_profile(profile)
    return f"logged a reference profile of {len(profile.indices)} test images to run {run_id[:8]}"
