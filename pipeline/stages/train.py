"""DVC stage `train`: fit the VAE, record every epoch in MLflow, write weights, metrics, plots."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import torch

from pipeline import paths, runtime
from pipeline.config import Params, load_params
from pipeline.data.checkpoints import fingerprint, kept, resume_or_start, save_checkpoint
from pipeline.data.files import write_csv, write_json
from pipeline.data.splits import load_test_set, training_images
from pipeline.data.weights import save_vae
from pipeline.errors import Interrupted, reports_errors
from pipeline.tracking import runs, store
from pipeline.vae import grids, step, training
from pipeline.vae.cuda_graph import use_cuda_graphs
from pipeline.vae.history import HISTORY_FIELDS, time_left
from pipeline.vae.model import VAE


def train(params: Params) -> None:
    runtime.flush_denormals()  # first: torch's worker threads copy it when they start
    cfg, shape, data = params.train, params.model, params.data
    device = runtime.pick_device(cfg.device)
    experiment_id = store.connect(params.mlflow.experiment)  # fails fast, before any training
    torch.manual_seed(cfg.seed)
    train_x = training_images(paths.TRAIN_SPLIT, data.holdout, device)
    binarize = data.binarize == "dynamic"
    test_x, _ = load_test_set(paths.TEST_SPLIT, binarize, data.binarize_seed, device)
    model, optimizer = training.vae_and_optimizer(shape, cfg, train_x)
    fast = step.use_fast_step(cfg.step, model, optimizer, train_x)
    use_cuda_graphs(cfg.cuda_graphs, device)  # `on` without a GPU fails here, at once
    forward = step.forward_of(cfg.compile, device)  # likewise
    key = fingerprint(params, paths.TRAIN_SPLIT)
    history, run_id, previous_run = resume_or_start(
        paths.CHECKPOINT, key, cfg.epochs, model, optimizer, store.has_run
    )
    latents = grids.fixed_latents(model.latent_dim, cfg.seed, device)
    pictures = partial(grids.training_pictures, model, latents, test_x[: grids.SHOWN_DIGITS])

    run = runs.training_run(run_id, experiment_id, params, device, history, pictures, previous_run)
    with runtime.stop_requests() as stop, run as run_id:
        epochs = training.fit(
            model, optimizer, train_x, test_x, first_epoch=len(history) + 1, epochs=cfg.epochs,
            batch_size=cfg.batch_size, binarize=binarize, stop=stop,
            lr_at=partial(training.learning_rate, cfg.schedule, cfg.lr),
            fast=fast, cuda_graphs=cfg.cuda_graphs, forward=forward,
        )  # fmt: skip
        first_new = len(history)
        try:
            for row in epochs:
                history.append(row)
                save_checkpoint(
                    paths.CHECKPOINT, key, model, optimizer, history, run_id, cfg.epochs
                )
                left = time_left(history, first_new, cfg.epochs)
                print(f"{row.line(cfg.epochs)}  lr {row.lr:.2g}{left}", flush=True)
                runs.log_epoch(asdict(row), pictures, cfg.epochs)
        except Interrupted as interrupted:
            message = kept(history, paths.CHECKPOINT, run_id)
            raise Interrupted(interrupted.signum, message) from None
        write_outputs(model, history)
    print(f"MLflow run {run_id} in {store.tracking_uri()}")


def write_outputs(model: VAE, history: list) -> None:
    save_vae(model, paths.WEIGHTS)
    final = asdict(history[-1])  # the training terms: the test set's numbers are evaluate's
    terms = {key: final[key] for key in HISTORY_FIELDS if key.startswith("train_")}
    write_json(paths.TRAIN_METRICS, terms | {"epochs": final["epoch"]})
    write_csv(paths.TRAIN_HISTORY, [asdict(row) for row in history], HISTORY_FIELDS)
    runs.log_trained_model(paths.WEIGHTS, model.latent_dim)


@reports_errors
def main() -> None:
    runtime.start()
    train(load_params())


if __name__ == "__main__":
    main()
