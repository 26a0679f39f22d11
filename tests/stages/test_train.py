"""The train stage: every epoch in MLflow, identical reruns, resuming, failures in one line."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers.repo import grid_steps, store
from helpers.workdir import trained_run_id
from pipeline import runtime
from pipeline.config import load_params
from pipeline.data import splits
from pipeline.data.mnist import REFERENCE
from pipeline.data.splits import load_split
from pipeline.data.weights import load_vae
from pipeline.errors import PipelineError, TrackingError
from pipeline.paths import (
    CHECKPOINT,
    TRAIN_HISTORY,
    TRAIN_METRICS,
    TRAIN_SPLIT,
    WEIGHTS,
)
from pipeline.stages import train as train_stage
from pipeline.tracking import runs
from pipeline.vae import fast_step, training
from pipeline.vae import step as vae_step
from pipeline.vae.fast_step import FastStep


def test_train_twice_gives_identical_weights_history_and_metrics(workdir: Path, set_params) -> None:
    set_params(workdir, train={"epochs": 2})
    outputs = []
    for _ in range(2):
        torch.set_num_threads(1)
        train_stage.train(load_params())
        outputs.append([path.read_bytes() for path in (WEIGHTS, TRAIN_HISTORY, TRAIN_METRICS)])
    assert outputs[0] == outputs[1]
    header = TRAIN_HISTORY.read_text().splitlines()[0]
    assert "seconds" not in header  # timings vary run to run: they belong to MLflow
    assert json.loads(TRAIN_METRICS.read_text())["epochs"] == 2


METRICS = (
    "train/loss",
    "train/recon",
    "train/kl",
    "test/loss",
    "test/recon",
    "test/kl",
    "train/epoch_seconds",
    "train/lr",
)


class Crash(Exception):
    pass


def run_train() -> dict:
    torch.set_num_threads(1)  # same thread count for every run compared
    train_stage.train(load_params())
    return json.loads(TRAIN_METRICS.read_text())


def client() -> MlflowClient:
    return store(Path.cwd())  # the workdir fixture makes the test's repo the working directory


def test_a_run_logs_every_epoch_the_grids_and_a_model_that_loads_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # System metrics: one sample a tenth of a second here (MLflow's default: every 10 s).
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    final = run_train()
    run_id = trained_run_id()
    run = client().get_run(run_id)
    for key in METRICS:
        assert [m.step for m in client().get_metric_history(run_id, key)] == [1, 2, 3], key
    assert run.data.metrics["train/loss"] == pytest.approx(final["train_loss"])
    assert run.data.params["model.hidden_dim"] == "32" and run.data.params["train.lr"] == "0.001"
    assert run.data.tags["device"] == "cpu" and "git.commit" in run.data.tags
    assert run.data.tags["torch.version"] == torch.__version__
    assert grid_steps(client(), run_id) == [0, 1, 2, 3]  # step 0: the untrained decoder
    assert grid_steps(client(), run_id, "reconstructions") == [0, 1, 2, 3]
    grid = client().download_artifacts(run_id, "images")
    pictures = [Image.open(png) for png in Path(grid).glob("generated+step+0+*.png")]
    assert {(p.size, p.mode) for p in pictures} == {((3 * 242, 3 * 242), "L")}  # 8x8 digits,
    # three times their size, grey
    pngs = list(Path(grid).glob("*.png"))
    assert len(pngs) == 8 and {zlib_level(png.read_bytes()) for png in pngs} == {0}  # fastest
    assert client().list_artifacts(run_id, "figures") == []  # the sample stage draws figures

    # Runs people can tell apart: a name, a description, the data, the machine's load.
    assert run.info.run_name == "h32-z4-e3"
    assert run.data.tags["mlflow.note.content"].startswith(
        "VAE on MNIST (grey-level pixels): encoder 784-32-4, decoder 4-32-784 (relu); 3 epochs"
    )
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["mnist-test", "mnist-train"]
    canonical = REFERENCE["files"]["train-images-idx3-ubyte"]["md5"]  # of the MNIST file
    assert inputs["mnist-train"].dataset.digest == canonical
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
    results = [key for key in run.data.metrics if not key.startswith("system/")]
    assert sorted(results) == sorted(METRICS)

    # The logged model is the whole VAE; called as before (no params) it decodes latent vectors.
    mlflow.set_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    z = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    images = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(z)
    assert images.shape == (7, 784) and images.min() >= 0 and images.max() <= 1
    vae = load_vae(WEIGHTS)
    expected = vae.decode(torch.from_numpy(z)).detach().numpy()
    np.testing.assert_allclose(images, expected, atol=1e-6)

    rows = TRAIN_HISTORY.read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_recon,train_kl,test_loss")
    assert len(rows) == 4
    kept = torch.load(CHECKPOINT, weights_only=True)  # kept: a longer run can extend it
    assert (kept["epoch"], kept["epochs"], kept["run_id"]) == (3, 3, run_id)


def zlib_level(png: bytes) -> int:
    """The FLEVEL of a PNG's zlib stream: 0 for zlib's levels 0-1, 1 for 2-5, 2 for 6 (Pillow's
    default), 3 for 7-9."""
    at = 8  # after the signature: chunks of length, type, data and CRC
    while png[at + 4 : at + 8] != b"IDAT":
        at += 12 + int.from_bytes(png[at : at + 4], "big")
        assert at < len(png), "no IDAT chunk"
    return png[at + 9] >> 6  # the zlib header's second byte (FLG)


def mlflow_queue_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("MLflowAsync")}


def test_an_epochs_grid_is_stored_before_its_metrics_and_without_a_queue(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resume re-logs the epochs whose metrics are missing. So metrics in the store must mean the
    # grid is there too, even when the process dies right after them: no queue holds it back.
    queues = mlflow_queue_threads()

    def die(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(mlflow, "log_metrics", die)
    with pytest.raises(Crash):
        run_train()
    run_id = torch.load(CHECKPOINT, weights_only=True)["run_id"]
    assert grid_steps(client(), run_id) == [0, 1]
    assert mlflow_queue_threads() == queues


def test_thread_settings_do_not_leak_between_tests(session_threads: int) -> None:
    # Runs right after a test that pinned 1 thread: the conftest fixture restored the count.
    assert torch.get_num_threads() == session_threads


def test_two_threads_give_identical_runs(workdir: Path) -> None:
    # The setting on these machines (docs/pipeline.md): torch's two threads split oneMKL's vector
    # math (exp of a 128x20 tensor), which `runtime.start()` settles before either thread calls.
    outputs = []
    for _ in range(2):
        torch.set_num_threads(2)
        train_stage.train(load_params())
        outputs.append((TRAIN_METRICS.read_bytes(), WEIGHTS.read_bytes()))
    assert outputs[0] == outputs[1]


def test_a_long_run_logs_pictures_at_its_first_epochs_then_spread_out_and_at_its_last() -> None:
    assert all(runs.pictured(epoch, 100) for epoch in range(1, 101))  # the lab's 10 too
    pictured = [epoch for epoch in range(1, 3281) if runs.pictured(epoch, 3280)]  # the paper's
    assert pictured[:11] == [*range(1, 11), 33] and pictured[-2:] == [3267, 3280]
    assert len(pictured) == 10 + 99 + 1


def test_a_run_skips_the_pictures_of_unpictured_epochs(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, set_params
) -> None:
    set_params(workdir, train={"epochs": 5})
    monkeypatch.setattr(runs, "FIRST_PICTURED", 1)
    monkeypatch.setattr(runs, "PICTURED_EPOCHS", 2)  # every 3rd epoch of 5
    run_train()
    run_id = trained_run_id()
    assert grid_steps(client(), run_id) == [0, 1, 3, 5]
    assert grid_steps(client(), run_id, "reconstructions") == [0, 1, 3, 5]
    steps = [m.step for m in client().get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_ends(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uninterrupted = run_train()
    uninterrupted_weights = WEIGHTS.read_bytes()

    log_epoch = runs.log_epoch

    def crash_after_epoch_2(row, *args):
        if row["epoch"] == 2:
            raise Crash  # after epoch 2's checkpoint, before its metrics reach MLflow
        log_epoch(row, *args)

    monkeypatch.setattr(runs, "log_epoch", crash_after_epoch_2)
    with pytest.raises(Crash):
        run_train()
    assert torch.load(CHECKPOINT, weights_only=True)["epoch"] == 2
    crashed_run = torch.load(CHECKPOINT, weights_only=True)["run_id"]

    monkeypatch.setattr(runs, "log_epoch", log_epoch)
    resumed = run_train()
    assert resumed == uninterrupted
    assert WEIGHTS.read_bytes() == uninterrupted_weights  # the same weights, byte for byte
    assert trained_run_id() == crashed_run
    steps = [m.step for m in client().get_metric_history(crashed_run, "train/loss")]
    assert steps == [1, 2, 3]  # epoch 2 logged on resume, and only once
    tags = client().get_run(crashed_run).data.tags
    resumed_tags = {key: value for key, value in tags.items() if key.startswith("resumed")}
    assert resumed_tags == {"resumed_at_epoch_3": f"git unknown, torch {torch.__version__}, cpu"}


def test_a_stale_checkpoint_of_other_params_is_not_resumed(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, set_params
) -> None:
    log_epoch = runs.log_epoch
    monkeypatch.setattr(runs, "log_epoch", lambda row, *a: (_ for _ in ()).throw(Crash))
    with pytest.raises(Crash):
        run_train()
    crashed_run = torch.load(CHECKPOINT, weights_only=True)["run_id"]
    monkeypatch.setattr(runs, "log_epoch", log_epoch)
    set_params(workdir, train={"lr": 0.002})
    resumed = run_train()
    assert "ignoring checkpoint" in capsys.readouterr().err
    assert trained_run_id() != crashed_run  # a new run, not resumed
    CHECKPOINT.unlink(missing_ok=True)
    assert run_train() == resumed  # same as a run that never saw the stale checkpoint


def spy_on_training_batches(
    monkeypatch: pytest.MonkeyPatch, step: str, change: Callable[[int, torch.Tensor], None]
) -> None:
    """After the n-th training batch's loss terms, call `change(n, images, terms)` (terms on the
    autograd path: the per-image recon; on the fast path: the batch's [recon, KL] sums)."""
    calls = iter(range(1, 10**6))
    if step == "fast":
        forward, check = FastStep.forward, fast_step.differs_from_autograd
        checking = []  # the probe batch that proves the step covers the model is not training

        def spy(self, buffers, x, terms):
            forward(self, buffers, x, terms)
            if not checking:
                change(next(calls), x, terms)

        def checked(*args):
            checking.append(True)
            try:
                return check(*args)
            finally:
                checking.clear()

        monkeypatch.setattr(FastStep, "forward", spy)
        monkeypatch.setattr(fast_step, "differs_from_autograd", checked)
        return
    loss_terms = vae_step.loss_terms

    def spy(model, x, generator=None, eps=None):
        recon, kl = loss_terms(model, x, generator, eps)
        if generator is None:  # a training step (the per-epoch test loss passes a generator)
            change(next(calls), x, recon)
        return recon, kl

    monkeypatch.setattr(vae_step, "loss_terms", spy)


@pytest.mark.parametrize("step", ["fast", "autograd"])
@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_training_consumes_the_pixels_data_binarize_asks_for(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, set_params, binarize: str, step: str
) -> None:
    set_params(workdir, data={"binarize": binarize}, train={"epochs": 2, "step": step})
    consumed = []
    spy_on_training_batches(monkeypatch, step, lambda n, x, _: consumed.append(x.clone()))
    run_train()
    grey, _ = load_split(TRAIN_SPLIT)
    epochs = [torch.cat(consumed[:8]), torch.cat(consumed[8:])]  # 256 images, 32 a batch
    assert [len(e) for e in epochs] == [256, 256]
    if binarize == "none":  # the grey images themselves, in a new order each epoch
        for epoch in epochs:
            assert torch.equal(epoch.sum(1).sort().values, grey.sum(1).sort().values)
        assert not torch.equal(epochs[0], epochs[1])
    else:  # a fresh Bernoulli(pixel) sample of every image in every epoch
        for epoch in epochs:
            assert set(epoch.unique().tolist()) == {0.0, 1.0}
            assert abs(epoch.mean().item() - grey.mean().item()) < 0.01
        assert epochs[0].sum() != epochs[1].sum()


def test_burdas_protocol_trains_its_network_on_the_first_images_with_its_schedule(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, set_params, capsys: pytest.CaptureFixture
) -> None:
    set_params(
        workdir,
        data={"binarize": "dynamic", "holdout": 56},
        model={"hidden_layers": 2, "activation": "tanh", "output_bias": "data_mean"},
        train={"epochs": 5, "batch_size": 4, "schedule": "burda", "adam_beta1": 0.99,
               "adam_eps": 1e-4, "adam_v0": 1.0},
    )  # fmt: skip
    trained_on = []
    train_epoch = training.train_epoch

    def spy(model, optimizer, images, *args, **kwargs):
        trained_on.append(images.clone())
        return train_epoch(model, optimizer, images, *args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", spy)
    run_train()
    grey, _ = load_split(TRAIN_SPLIT)
    assert all(torch.equal(images, grey[:200]) for images in trained_on)  # 256 - 56 held out
    run_id = trained_run_id()
    rates = [m.value for m in client().get_metric_history(run_id, "train/lr")]
    assert rates == pytest.approx([1e-3, 7.2e-4, 7.2e-4, 7.2e-4, 5.2e-4])  # stages 0, 1, 2
    model = load_vae(WEIGHTS)
    assert (model.hidden_layers, model.activation) == (2, "tanh")
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("Epoch [4/5]") and lines[3].endswith(" left")  # with the time left
    assert lines[4].startswith("Epoch [5/5]") and lines[4].endswith("lr 0.00052")

    set_params(workdir, data={"holdout": 256})
    with pytest.raises(PipelineError, match="data.holdout = 256 leaves no image to train on"):
        run_train()


@pytest.mark.parametrize("step", ["fast", "autograd"])
def test_a_nan_loss_stops_with_epoch_and_batch_and_keeps_the_last_checkpoint(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, set_params, step: str
) -> None:
    set_params(workdir, train={"step": step})
    WEIGHTS.parent.mkdir(parents=True)
    WEIGHTS.write_bytes(b"previous outputs")

    def nan_in_epoch_2(n: int, x: torch.Tensor, terms: torch.Tensor) -> None:
        if n == 8 + 3:  # 8 batches an epoch
            terms[0] = float("nan")

    spy_on_training_batches(monkeypatch, step, nan_in_epoch_2)
    with pytest.raises(training.NonFiniteLoss, match=r"loss became nan at epoch 2, batch 3 of 8"):
        run_train()
    assert torch.load(CHECKPOINT, weights_only=True)["epoch"] == 1
    assert WEIGHTS.read_bytes() == b"previous outputs"
    assert not TRAIN_METRICS.exists()


def test_an_unreachable_tracking_server_fails_fast_before_training(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(
        TrackingError,
        match=rf"MLflow tracking server http://127.0.0.1:{port} did not answer \(.*refused",
    ):
        run_train()
    assert not CHECKPOINT.exists() and not WEIGHTS.exists()


def test_training_flushes_subnormals_before_it_loads_any_data(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    load_split = splits.load_split
    monkeypatch.setattr(runtime, "flush_denormals", lambda: calls.append("flush"))
    monkeypatch.setattr(
        splits, "load_split", lambda *args: calls.append("load") or load_split(*args)
    )
    run_train()
    assert calls[:2] == ["flush", "load"]


def train_process(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.train"], cwd=cwd, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(
    workdir: Path, tmp_path: Path, set_params
) -> None:
    set_params(workdir, train={"epochs": 12})
    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference)
    assert train_process(reference).wait(timeout=300) == 0

    process = train_process(workdir)
    for line in process.stdout:
        if line.startswith("Epoch [3/12]"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(CHECKPOINT, weights_only=True)["epoch"]
    assert 3 <= killed_at < 12

    resumed = train_process(workdir)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0
    assert f"resuming after epoch {killed_at}" in output
    assert TRAIN_METRICS.read_text() == (reference / TRAIN_METRICS).read_text()
    run_id = trained_run_id()
    steps = [m.step for m in client().get_metric_history(run_id, "test/loss")]
    assert steps == list(range(1, 13))
    # A step's grid may be logged twice: by the killed process and again on resume.
    assert set(grid_steps(client(), run_id)) == set(range(0, 13))
    assert client().get_run(run_id).info.status == "FINISHED"


def test_a_checkpoint_whose_mlflow_run_is_gone_resumes_in_a_new_run(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, mlflow_template
) -> None:
    # Also what a checkpoint carried to another clone, with its own store, does.
    fresh = run_train()
    log_epoch = runs.log_epoch
    monkeypatch.setattr(runs, "log_epoch", lambda row, *a, **k: (_ for _ in ()).throw(Crash))
    with pytest.raises(Crash):
        run_train()
    crashed_run = torch.load(CHECKPOINT, weights_only=True)["run_id"]
    monkeypatch.setattr(runs, "log_epoch", log_epoch)
    shutil.copy(mlflow_template, workdir / "mlflow.db")  # the store was replaced meanwhile
    assert run_train() == fresh
    assert f"its run {crashed_run} is not in this store" in capsys.readouterr().out
    run = client().get_run(trained_run_id())
    assert run.data.tags["continues_run"] == crashed_run
    steps = [m.step for m in client().get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3]  # epoch 1 from the checkpoint, then the two it trained


def test_a_finished_run_extended_to_more_epochs_ends_where_a_run_that_long_ends(
    workdir: Path, capsys: pytest.CaptureFixture, set_params
) -> None:
    set_params(workdir, train={"epochs": 4})
    longer = run_train()
    longer_weights = WEIGHTS.read_bytes()
    CHECKPOINT.unlink()
    set_params(workdir, train={"epochs": 2})
    run_train()
    short_run = trained_run_id()
    set_params(workdir, train={"epochs": 4})
    assert run_train() == longer
    assert WEIGHTS.read_bytes() == longer_weights
    message = "continuing checkpoints/train.pt (epoch 2 of a 2-epoch run) to 4 epochs"
    assert message in capsys.readouterr().out
    run = client().get_run(trained_run_id())
    assert run.info.run_id != short_run and run.data.tags["continues_run"] == short_run
    assert run.data.params["train.epochs"] == "4"
    steps = [m.step for m in client().get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    assert grid_steps(client(), run.info.run_id) == [2, 3, 4]  # no untrained model to draw


def test_a_checkpoint_longer_than_the_run_asked_for_is_not_resumed(
    workdir: Path, capsys: pytest.CaptureFixture, set_params
) -> None:
    first = run_train()  # 3 epochs
    assert run_train() == first  # the same length again: trained afresh, not taken from it
    set_params(workdir, train={"epochs": 2})
    run_train()
    assert "it holds 3 epochs and train.epochs is 2" in capsys.readouterr().out
    assert json.loads(TRAIN_METRICS.read_text())["epochs"] == 2
