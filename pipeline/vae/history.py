"""The training history: one row per epoch, the line the train stage prints, the time left."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, fields
from datetime import timedelta


@dataclass
class Epoch:
    """One row of the training history: per-image means over the train and test sets."""

    epoch: int
    train_loss: float
    train_recon: float
    train_kl: float
    test_loss: float
    test_recon: float
    test_kl: float
    seconds: float
    lr: float

    def line(self, epochs: int) -> str:
        """The handout's line, then the terms it did not print."""
        return (
            f"Epoch [{self.epoch}/{epochs}] Loss: {self.train_loss:.4f}  "
            f"(recon {self.train_recon:.4f}, KL {self.train_kl:.4f})  "
            f"test loss: {self.test_loss:.4f}  [{self.seconds:.1f} s]"
        )


# The columns of plots/train_history.csv: results only. Seconds differ on every run, so they go to
# MLflow, not into a file that git tracks; so does the learning rate, which params.yaml sets.
HISTORY_FIELDS = tuple(f.name for f in fields(Epoch) if f.name not in ("seconds", "lr"))

PACE_EPOCHS = 20  # the recent epochs whose pace the time left assumes


def time_left(history: list[Epoch], first_new: int, epochs: int) -> str:
    """ ", H:MM:SS left" at the median pace of the last epochs this process trained (a median:
    one epoch slowed by a paused process or a busy machine does not move it); "" after the last."""
    done, remaining = history[first_new:], epochs - history[-1].epoch
    if not remaining:
        return ""
    seconds = statistics.median(row.seconds for row in done[-PACE_EPOCHS:]) * remaining
    return f", {timedelta(seconds=round(seconds))} left"
