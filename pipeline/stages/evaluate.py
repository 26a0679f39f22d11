"""DVC stage `evaluate`: test-set metrics for DVC and for the MLflow run that trained the model,
which the registry then holds as a new @candidate version with its drift monitor's reference
profile."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipeline import runtime
from pipeline.config import Params, load_params
from pipeline.data.files import write_json
from pipeline.data.splits import load_test_set
from pipeline.data.weights import load_vae
from pipeline.errors import reports_errors
from pipeline.paths import EVAL_BREAKDOWN, EVAL_METRICS, TEST_SPLIT, WEIGHTS
from pipeline.tracking import reference, registry, runs
from pipeline.vae.evaluation import BREAKDOWNS, SCALAR_METRICS, evaluate


def run_evaluation(params: Params) -> dict:
    cfg, data = params.evaluate, params.data
    registry.check_metric(params.registry)
    device = runtime.pick_device(params.train.device)  # IWAE at k = 5,000 is slow on a CPU
    model = load_vae(WEIGHTS, device)
    with runs.attached_run(params.mlflow.experiment, WEIGHTS) as (run, attached):
        binarize = data.binarize == "dynamic"  # the same test set that training reported on
        images, labels = load_test_set(TEST_SPLIT, binarize, data.binarize_seed, device)
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
        write_json(EVAL_METRICS, headline)
        write_json(EVAL_BREAKDOWN, {key: metrics[key] for key in BREAKDOWNS})
        runs.log_evaluation(metrics, step=params.train.epochs)
        print(runs.describe_results(metrics))
        if attached:
            profile = reference.make_profile(
                reference.vae_predict(model), images.cpu().numpy(), cfg
            )
            reference.log_profile(profile)  # what `mnist-vae monitor` compares a batch with
            basis = registry.comparison_basis(params, TEST_SPLIT)
            run_id = run.info.run_id
            print(registry.register_evaluated(MlflowClient(), params, run_id, headline, basis))
        else:
            print("not registered: the model's MLflow run is not in this store")
    return metrics


@reports_errors
def main() -> None:
    runtime.start()
    run_evaluation(load_params())


if __name__ == "__main__":
    main()
