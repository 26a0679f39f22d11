"""DVC stage `train`: fit the VAE, record every epoch in MLflow, write weights, metrics, plots."""

from __future__ import annotations

import csv
from dataclasses import asdict

import matplotlib.pyplot as plt
import mlflow
import torch

from pipeline import tracking
from pipeline.config import Params, load_params
from pipeline.data import binarize_once, load_split
from pipeline.errors import reports_errors
from pipeline.figures import digit_grid, loss_curves
from pipeline.files import atomic_path, write_json
from pipeline.model import VAE, save_vae
from pipeline.paths import (
    CHECKPOINT,
    RUN_INFO,
    TEST_SPLIT,
    TRAIN_HISTORY,
    TRAIN_METRICS,
    TRAIN_SPLIT,
    WEIGHTS,
)
from pipeline.training import (
    HISTORY_FIELDS,
    Epoch,
    fingerprint,
    fit,
    flush_denormals,
    load_checkpoint,
    make_optimizer,
    pick_device,
    set_rng_state,
)

GRID_SIZE = 64  # the digits decoded from the same latent vectors after every epoch


def log_epoch(row: Epoch, model: VAE, fixed_z: torch.Tensor, grid: bool = True) -> None:
    """The epoch's metrics, and (when `model` is the epoch's model) its grid of digits."""
    if grid:
        # Written before the metrics, and synchronously (mlflow.log_image defaults to a queue):
        # a step with metrics then always has its grid, even after kill -9, which is what resume
        # checks. The queue would also cost up to 1 s at exit, joined once per run.
        with torch.no_grad():
            mlflow.log_image(
                digit_grid(model.eval().decode(fixed_z), nrow=8),
                key="generated",
                step=row.epoch,
                synchronous=True,
            )
    values = asdict(row)
    metrics = {
        f"{split}/{term}": values[f"{split}_{term}"]
        for split in ("train", "test")
        for term in ("loss", "recon", "kl")
    }
    metrics["train/epoch_seconds"] = row.seconds
    mlflow.log_metrics(metrics, step=row.epoch)


def write_outputs(history: list[Epoch], model: VAE, run_id: str, experiment_id: str) -> None:
    save_vae(model, WEIGHTS)
    tracking.write_run_info(RUN_INFO, run_id, experiment_id)
    final = asdict(history[-1])
    write_json(
        TRAIN_METRICS,
        {key: final[key] for key in HISTORY_FIELDS if key not in ("epoch", "seconds")}
        | {"epochs": final["epoch"]},
    )
    with atomic_path(TRAIN_HISTORY) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(row) for row in history)


def train(params: Params) -> None:
    flush_denormals()  # first: the worker threads started by the first parallel op inherit it
    model_cfg, cfg = params.model, params.train
    device = pick_device(cfg.device)
    experiment_id = tracking.connect(params.mlflow.experiment)  # fails fast, before any training
    torch.manual_seed(cfg.seed)
    train_x, _ = load_split(TRAIN_SPLIT, device)
    test_x, _ = load_split(TEST_SPLIT, device)
    binarize = params.data.binarize == "dynamic"
    if binarize:
        test_x = binarize_once(test_x, params.data.binarize_seed)

    model = VAE(model_cfg.hidden_dim, model_cfg.latent_dim).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    key = fingerprint(
        {"model": asdict(model_cfg), "train": asdict(cfg), "binarize": params.data.binarize},
        TRAIN_SPLIT,
    )
    state = load_checkpoint(CHECKPOINT, key)
    if state is not None and not tracking.run_exists(state["run_id"]):
        gone = state["run_id"]
        print(f"ignoring checkpoint {CHECKPOINT}: its MLflow run {gone} is not in the store")
        state = None
    history: list[Epoch] = []
    run_id = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        history = [Epoch(**row) for row in state["history"]]
        run_id = state["run_id"]
        print(f"resuming after epoch {len(history)} from {CHECKPOINT} (MLflow run {run_id})")
    fixed_z = torch.randn(
        GRID_SIZE, model_cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)
    ).to(device)

    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run:
        run_id = run.info.run_id
        if state is None:
            mlflow.log_params(params.flat())
            mlflow.set_tags(tracking.run_tags(device))
        # Epochs checkpointed but not logged (the process was killed in between).
        logged = tracking.logged_steps(run_id, "train/loss")
        for row in history:
            if row.epoch not in logged:  # the model in hand is the last epoch's: only its grid
                log_epoch(row, model, fixed_z, grid=row.epoch == len(history))
        history = fit(
            model,
            optimizer,
            train_x,
            test_x,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            binarize=binarize,
            checkpoint=CHECKPOINT,
            key=key,
            run_id=run_id,
            history=history,
            on_epoch=lambda row: log_epoch(row, model, fixed_z),
        )
        write_outputs(history, model, run_id, experiment_id)
        curves = loss_curves([asdict(row) for row in history])
        mlflow.log_figure(curves, "figures/loss_curves.png")
        plt.close(curves)
        tracking.log_generator(model.generator(), model_cfg.latent_dim)
        mlflow.log_artifact(str(WEIGHTS), "weights")
    CHECKPOINT.unlink(missing_ok=True)
    print(f"MLflow run {run_id} in {tracking.tracking_uri()}")


@reports_errors
def main() -> None:
    train(load_params())


if __name__ == "__main__":
    main()
