"""DVC stage `evaluate`: test-set metrics for DVC and for the MLflow run that trained the model."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import registry, runtime, tracking
from pipeline.config import Params, load_params
from pipeline.data import binarize_once, load_split
from pipeline.errors import ConfigError, reports_errors
from pipeline.evaluation import SCALAR_METRICS, evaluate
from pipeline.files import write_json
from pipeline.model import load_vae
from pipeline.paths import EVAL_METRICS, RUN_INFO, TEST_SPLIT, WEIGHTS


def run_evaluation(params: Params) -> dict:
    cfg = params.evaluate
    if params.registry.metric not in SCALAR_METRICS:
        raise ConfigError(
            f"registry.metric = {params.registry.metric!r} is not an evaluate metric; "
            f"use one of: {', '.join(SCALAR_METRICS)}"
        )
    with tracking.attached_run(params.mlflow.experiment, RUN_INFO) as (run, attached):
        model = load_vae(WEIGHTS)
        images, labels = load_split(TEST_SPLIT)
        if params.data.binarize == "dynamic":  # the same binarised test set training reported on
            images = binarize_once(images, params.data.binarize_seed)
        metrics = evaluate(
            model,
            images,
            labels,
            k=cfg.iwae_samples,
            batch_size=cfg.batch_size,
            threshold=cfg.active_unit_threshold,
            seed=cfg.seed,
        )
        write_json(EVAL_METRICS, metrics)
        mlflow.log_metrics(tracking.flatten_metrics(metrics, "eval"))
        mlflow.log_dict(metrics, "evaluation/metrics.json")
        if attached:
            print(registry.register_evaluated(MlflowClient(), params, run.info.run_id, metrics))
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
        f"(IWAE, k = {metrics['iwae_samples']}); "
        f"{metrics['active_units']} of {metrics['latent_dim']} latent units active"
    )


if __name__ == "__main__":
    main()
