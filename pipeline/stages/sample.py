"""DVC stage `sample`: the pictures the lab asks for, as PNG files for DVC and in the MLflow run."""

from __future__ import annotations

import csv

import mlflow

from pipeline import runtime
from pipeline.config import Params, load_params
from pipeline.data.files import atomic_path
from pipeline.data.mnist import load_split
from pipeline.errors import reports_errors
from pipeline.paths import FIGURES, RUN_INFO, TEST_SPLIT, TRAIN_HISTORY, WEIGHTS
from pipeline.tracking import runs as tracking
from pipeline.vae.figures import draw_all
from pipeline.vae.model import load_vae


def read_history() -> list[dict]:
    with TRAIN_HISTORY.open() as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def run_sampling(params: Params) -> list[str]:
    model = load_vae(WEIGHTS)
    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(model, images, labels, read_history(), params.sample)
    for name, fig in drawn.items():
        with atomic_path(FIGURES / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    with tracking.attached_run(params.mlflow.experiment, RUN_INFO):
        for name in drawn:
            mlflow.log_artifact(str(FIGURES / f"{name}.png"), "figures")
    return list(drawn)


@reports_errors
def main() -> None:
    runtime.start()
    names = run_sampling(load_params())
    print(f"wrote {len(names)} figures to {FIGURES}/: {', '.join(names)}")


if __name__ == "__main__":
    main()
