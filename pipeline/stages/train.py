"""DVC stage `train`: fit the VAE, record every epoch in MLflow, write weights, metrics, plots."""

from __future__ import annotations

import csv
from dataclasses import asdict
from datetime import timedelta

import torch

from pipeline import runtime
from pipeline.config import Params, load_params
from pipeline.data.checkpoints import fingerprint, resume_or_start, save_checkpoint
from pipeline.data.files import atomic_path, write_json
from pipeline.data.mnist import binarize_once, load_split
from pipeline.errors import ConfigError, Interrupted, reports_errors, stop_requests
from pipeline.paths import (
    CHECKPOINT,
    RUN_INFO,
    TEST_SPLIT,
    TRAIN_HISTORY,
    TRAIN_METRICS,
    TRAIN_SPLIT,
    WEIGHTS,
)
from pipeline.tracking import runs as tracking
from pipeline.tracking.runs import log_epoch
from pipeline.vae.grids import training_pictures
from pipeline.vae.model import VAE, init_output_bias, save_vae
from pipeline.vae.training import (
    HISTORY_FIELDS,
    Epoch,
    fit,
    flush_denormals,
    learning_rate,
    make_optimizer,
    pick_device,
)

GRID_SIZE, SHOWN_DIGITS = 64, 8  # generated and reconstructed digits in the run, each step


def write_outputs(history: list[Epoch], model: VAE, run_id: str, experiment_id: str) -> None:
    save_vae(model, WEIGHTS)
    tracking.write_run_info(RUN_INFO, run_id, experiment_id)
    final = asdict(history[-1])
    # The training terms only: the test set's numbers are evaluate's (metrics/evaluate.json).
    results = {key: final[key] for key in ("train_loss", "train_recon", "train_kl")}
    write_json(TRAIN_METRICS, results | {"epochs": final["epoch"]})
    with atomic_path(TRAIN_HISTORY) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(row) for row in history)


def kept(history: list[Epoch], run_id: str) -> str:
    """What an interrupted run keeps, and how to go on."""
    if not history:
        return f"no epoch had finished; MLflow run {run_id} is marked KILLED"
    return (
        f"epochs 1-{len(history)} are kept in {CHECKPOINT} and MLflow run {run_id} is marked "
        "KILLED: run the same command again to resume"
    )


def training_images(params: Params, device: torch.device) -> torch.Tensor:
    """The training split without its last `data.holdout` images."""
    images, _ = load_split(TRAIN_SPLIT, device)
    holdout = params.data.holdout
    if holdout >= len(images):
        raise ConfigError(
            f"data.holdout = {holdout} leaves no image to train on: {TRAIN_SPLIT} has "
            f"{len(images)}; hold out fewer"
        )
    return images[: len(images) - holdout]


def time_left(history: list[Epoch], first_new: int, epochs: int) -> str:
    """ ", H:MM:SS left" at the mean pace of the epochs this process trained; "" after the last."""
    done, remaining = history[first_new:], epochs - history[-1].epoch
    if not remaining:
        return ""
    seconds = sum(row.seconds for row in done) / len(done) * remaining
    return f", {timedelta(seconds=round(seconds))} left"


def train(params: Params) -> None:
    flush_denormals()  # first: the worker threads started by the first parallel op inherit it
    cfg, shape = params.train, params.model
    device = pick_device(cfg.device)
    experiment_id = tracking.connect(params.mlflow.experiment)  # fails fast, before any training
    torch.manual_seed(cfg.seed)
    train_x = training_images(params, device)
    test_x, _ = load_split(TEST_SPLIT)
    binarize = params.data.binarize == "dynamic"
    if binarize:  # on the CPU: the same binary test set whatever the device (evaluate's too)
        test_x = binarize_once(test_x, params.data.binarize_seed)
    test_x = test_x.to(device)
    model = VAE(shape.hidden_dim, shape.latent_dim, shape.hidden_layers, shape.activation)
    model = model.to(device)
    if shape.output_bias == "data_mean":
        init_output_bias(model, train_x.mean(dim=0))
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = make_optimizer(model, cfg.lr, betas, cfg.adam_eps, cfg.adam_v0)
    key = fingerprint(params, TRAIN_SPLIT)
    resumed = resume_or_start(CHECKPOINT, key, model, optimizer)
    history = resumed.history
    seeded = torch.Generator().manual_seed(cfg.seed)
    fixed_z = torch.randn(GRID_SIZE, model.latent_dim, generator=seeded).to(device)
    shown = test_x[:SHOWN_DIGITS]

    run = tracking.training_run(resumed.run_id, experiment_id, params, device)
    with stop_requests() as stop, run as run_id:
        if resumed.run_id is None:  # step 0: the untrained decoder
            tracking.log_pictures(0, training_pictures(model, fixed_z, shown))
        for row in tracking.unlogged(run_id, history):  # checkpointed, then killed before logging
            # The model in hand is the last epoch's: only its pictures can be drawn again.
            last = row == history[-1]
            log_epoch(row, training_pictures(model, fixed_z, shown) if last else None)
        epochs = fit(
            model,
            optimizer,
            train_x,
            test_x,
            first_epoch=len(history) + 1,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            binarize=binarize,
            stop=stop,
            lr_at=lambda epoch: learning_rate(cfg.schedule, cfg.lr, epoch),
        )
        first_new = len(history)
        try:
            for row in epochs:
                history.append(row)
                save_checkpoint(CHECKPOINT, key, model, optimizer, history, run_id)
                left = time_left(history, first_new, cfg.epochs)
                print(f"{row.line(cfg.epochs)}  lr {row.lr:.2g}{left}", flush=True)
                log_epoch(row, training_pictures(model, fixed_z, shown))
        except Interrupted as interrupted:
            raise Interrupted(interrupted.signum, kept(history, run_id)) from None
        write_outputs(history, model, run_id, experiment_id)
        tracking.log_trained_model(model, WEIGHTS)
    CHECKPOINT.unlink(missing_ok=True)
    print(f"MLflow run {run_id} in {tracking.tracking_uri()}")


@reports_errors
def main() -> None:
    runtime.start()
    train(load_params())


if __name__ == "__main__":
    main()
