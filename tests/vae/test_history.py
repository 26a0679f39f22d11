"""The training history: the printed line, the CSV's columns and the time left."""

from __future__ import annotations

from pipeline.vae.history import HISTORY_FIELDS, PACE_EPOCHS, Epoch, time_left


def test_the_time_left_follows_the_recent_epochs_and_ignores_one_paused_epoch() -> None:
    def row(epoch: int, seconds: float) -> Epoch:
        return Epoch(epoch, 0, 0, 0, 0, 0, 0, seconds, 0.001)

    resumed = [row(e, 100.0) for e in range(1, 11)]  # a previous process's epochs: not counted
    history = resumed + [row(e, 5.0) for e in range(11, 40)] + [row(40, 900.0)]  # one paused
    assert time_left(history, 10, 100) == ", 0:05:00 left"  # 60 epochs at 5 s
    history += [row(e, 2.0) for e in range(41, 41 + PACE_EPOCHS)]  # the machine sped up
    assert time_left(history, 10, 100) == ", 0:01:20 left"  # 40 epochs at 2 s
    assert time_left(history, 10, history[-1].epoch) == ""


def test_the_line_is_the_handouts_then_the_other_terms_and_the_csv_keeps_results_only() -> None:
    row = Epoch(10, 106.2150, 80.5, 25.7150, 105.4865, 79.0, 26.4865, 3.96, 0.001)
    assert row.line(10).startswith("Epoch [10/10] Loss: 106.2150  (recon 80.5000, KL 25.7150)")
    assert "test loss: 105.4865  [4.0 s]" in row.line(10)
    # seconds differ on every run and params.yaml sets the rate: neither goes into git's CSV
    assert "seconds" not in HISTORY_FIELDS and "lr" not in HISTORY_FIELDS
    assert HISTORY_FIELDS[:2] == ("epoch", "train_loss") and len(HISTORY_FIELDS) == 7


def test_a_row_is_built_by_name_from_the_loss_terms_and_declares_its_mlflow_keys() -> None:
    from pipeline.vae.history import MLFLOW_METRICS, with_terms
    from pipeline.vae.model import LOSS_TERMS

    row = with_terms(3, (80.0, 25.5), (79.0, 26.0), 1.5, 1e-3)
    assert (row.epoch, row.train_loss, row.test_loss, row.test_kl) == (3, 105.5, 105.0, 26.0)
    # every loss term has a column per split and an MLflow key; the epoch is the step, no metric
    for split in ("train", "test"):
        for term in (*LOSS_TERMS, "loss"):
            assert MLFLOW_METRICS[f"{split}_{term}"] == f"{split}/{term}"
    assert "epoch" not in MLFLOW_METRICS and MLFLOW_METRICS["seconds"] == "train/epoch_seconds"
