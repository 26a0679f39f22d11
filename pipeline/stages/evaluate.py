"""DVC stage `evaluate`: test-set metrics for DVC and for the MLflow run that trained the model."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline import runtime
from pipeline.config import Params, load_params
from pipeline.data.files import write_json
from pipeline.data.mnist import binarize_once, load_split
from pipeline.errors import ConfigError, reports_errors
from pipeline.paths import EVAL_BREAKDOWN, EVAL_METRICS, RUN_INFO, TEST_SPLIT, WEIGHTS
from pipeline.tracking import registry
from pipeline.tracking import runs as tracking
from pipeline.vae.evaluation import SCALAR_METRICS, evaluate
from pipeline.vae.model import load_vae
from pipeline.vae.training import pick_device

BREAKDOWNS = ("kl_per_dim", "activity_per_dim", "loss_per_class")


def comparison_basis(params: Params) -> dict[str, str]:
    """What makes two evaluations comparable: the same test images, pixels and estimators."""
    binarize = params.data.binarize
    pixels = f"dynamic, seed {params.data.binarize_seed}" if binarize == "dynamic" else "grey"
    return {
        "eval.test_data": tracking.file_digest(TEST_SPLIT),
        "eval.pixels": pixels,
        "eval.metrics": f"negative ELBO (1 sample); IWAE k = {params.evaluate.iwae_samples}",
    }


def describe_results(metrics: dict) -> str:
    return (
        f"Test set: loss {metrics['test_loss']:.2f} nats (reconstruction "
        f"{metrics['test_recon']:.2f} + KL {metrics['test_kl']:.2f}), log p(x) >= "
        f"{metrics['log_px_iwae']:.2f} ± {metrics['log_px_iwae_se']:.2f} (IWAE, k = "
        f"{metrics['iwae_samples']}), "
        f"{metrics['active_units']} of {metrics['latent_dim']} latent units active."
    )


def run_evaluation(params: Params) -> dict:
    cfg = params.evaluate
    if params.registry.metric not in SCALAR_METRICS:
        raise ConfigError(
            f"registry.metric = {params.registry.metric!r} is not an evaluate metric; "
            f"use one of: {', '.join(SCALAR_METRICS)}"
        )
    with tracking.attached_run(params.mlflow.experiment, RUN_INFO) as (run, attached):
        device = pick_device(params.train.device)  # IWAE at k = 5,000 is minutes on a CPU
        model = load_vae(WEIGHTS, device)
        images, labels = load_split(TEST_SPLIT)
        if params.data.binarize == "dynamic":  # the same binarised test set training reported on
            images = binarize_once(images, params.data.binarize_seed)
        images, labels = images.to(device), labels.to(device)
        metrics = evaluate(
            model,
            images,
            labels,
            k=cfg.iwae_samples,
            batch_size=cfg.batch_size,
            threshold=cfg.active_unit_threshold,
            seed=cfg.seed,
        )
        headline = {key: metrics[key] for key in SCALAR_METRICS}
        breakdown = {key: metrics[key] for key in BREAKDOWNS}
        write_json(EVAL_METRICS, headline)
        write_json(EVAL_BREAKDOWN, breakdown)
        tracking.log_evaluation(metrics, describe_results(metrics), step=params.train.epochs)
        if attached:
            basis = comparison_basis(params)
            client = MlflowClient()
            print(registry.register_evaluated(client, params, run.info.run_id, headline, basis))
        else:
            print("not registered: the model's MLflow run is not in this store")
    return metrics


@reports_errors
def main() -> None:
    runtime.start()
    metrics = run_evaluation(load_params())
    print(
        f"test loss {metrics['test_loss']:.4f} (recon {metrics['test_recon']:.4f}, "
        f"KL {metrics['test_kl']:.4f}); log p(x) >= {metrics['log_px_iwae']:.4f} "
        f"± {metrics['log_px_iwae_se']:.4f} "
        f"(IWAE, k = {metrics['iwae_samples']}); "
        f"{metrics['active_units']} of {metrics['latent_dim']} latent units active"
    )


if __name__ == "__main__":
    main()
