"""DVC stage `sample`: the pictures the lab asks for, as PNG files for DVC and in the MLflow run."""

from __future__ import annotations

from pipeline import runtime
from pipeline.config import Params, load_params
from pipeline.data.files import atomic_path, read_csv_numbers
from pipeline.data.splits import load_split
from pipeline.data.weights import load_vae
from pipeline.errors import reports_errors
from pipeline.paths import FIGURES, TEST_SPLIT, TRAIN_HISTORY, WEIGHTS
from pipeline.tracking import runs
from pipeline.vae.figures import draw_all


def run_sampling(params: Params) -> list[str]:
    model = load_vae(WEIGHTS)
    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(model, images, labels, read_csv_numbers(TRAIN_HISTORY), params.sample)
    for name, fig in drawn.items():
        with atomic_path(FIGURES / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    with runs.attached_run(params.mlflow.experiment, WEIGHTS):
        runs.log_figures(FIGURES / f"{name}.png" for name in drawn)
    return list(drawn)


@reports_errors
def main() -> None:
    runtime.start()
    names = run_sampling(load_params())
    print(f"wrote {len(names)} figures to {FIGURES}/: {', '.join(names)}")


if __name__ == "__main__":
    main()
