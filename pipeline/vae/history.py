"""The training history: one row per epoch, the line the train stage prints, the time left."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta

from pipeline.vae.model import LOSS_TERMS


def metric(mlflow_key: str, in_csv: bool = True, **default: float):
    """A column of the history: its MLflow metric, and whether plots/train_history.csv has it
    (`default=...` for a column added later, so that older rows still make an Epoch).
    Seconds differ on every run, so they go to MLflow and not into a file git tracks; so does the
    learning rate, which params.yaml sets."""
    return field(metadata={"mlflow": mlflow_key, "csv": in_csv}, **default)


@dataclass
class Epoch:
    """One row of the training history: per-image means over the train and test sets. A field
    added here is logged to MLflow and written to the CSV from this declaration."""

    epoch: int = field(metadata={"csv": True})  # MLflow's step
    train_loss: float = metric("train/loss")
    train_recon: float = metric("train/recon")
    train_kl: float = metric("train/kl")
    test_loss: float = metric("test/loss")
    test_recon: float = metric("test/recon")
    test_kl: float = metric("test/kl")
    seconds: float = metric("train/epoch_seconds", in_csv=False)
    lr: float = metric("train/lr", in_csv=False)

    def line(self, epochs: int) -> str:
        """The handout's line, then the terms it did not print."""
        return (
            f"Epoch [{self.epoch}/{epochs}] Loss: {self.train_loss:.4f}  "
            f"(recon {self.train_recon:.4f}, KL {self.train_kl:.4f})  "
            f"test loss: {self.test_loss:.4f}  [{self.seconds:.1f} s]"
        )


HISTORY_FIELDS = tuple(f.name for f in fields(Epoch) if f.metadata["csv"])  # the CSV's columns
MLFLOW_METRICS = {f.name: f.metadata["mlflow"] for f in fields(Epoch) if "mlflow" in f.metadata}


def with_terms(
    epoch: int,
    train: Sequence[float],
    test: Sequence[float],
    seconds: float,
    lr: float,
    **others: float,
) -> Epoch:
    """The row of `epoch` from each split's mean loss terms, in LOSS_TERMS order (the loss is
    their sum, the negative ELBO), and `others`: Epoch's other fields, by name."""
    by_name = {}
    for split, means in (("train", train), ("test", test)):
        terms = dict(zip(LOSS_TERMS, means, strict=True))
        by_name |= {f"{split}_{term}": value for term, value in terms.items()}
        by_name[f"{split}_loss"] = sum(means)
    return Epoch(epoch=epoch, seconds=seconds, lr=lr, **by_name, **others)


PACE_EPOCHS = 20  # the recent epochs whose pace the time left assumes


def time_left(history: list[Epoch], first_new: int, epochs: int) -> str:
    """ ", H:MM:SS left" at the median pace of the last epochs this process trained (a median:
    one epoch slowed by a paused process or a busy machine does not move it); "" after the last."""
    done, remaining = history[first_new:], epochs - history[-1].epoch
    if not remaining:
        return ""
    seconds = statistics.median(row.seconds for row in done[-PACE_EPOCHS:]) * remaining
    return f", {timedelta(seconds=round(seconds))} left"
