"""The lab handout's training curve (lab_curve.json) and the CI tolerance a run must keep to it."""

from __future__ import annotations

import json
from pathlib import Path

LAB = json.loads((Path(__file__).parent / "lab_curve.json").read_text())
CURVE, TOLERANCE = LAB["epochs"], LAB["tolerance"]


def gaps(losses: list[float]) -> list[float]:
    """How far each epoch's training loss is from the lab's, for the epochs both have."""
    return [abs(ours - lab) for lab, ours in zip(CURVE, losses, strict=False)]


def within_tolerance(losses: list[float]) -> bool:
    """All the lab's epochs, every one within `each_epoch` of its loss and the last within
    `final`."""
    distance = gaps(losses)
    return (
        len(losses) == len(CURVE)
        and max(distance) <= TOLERANCE["each_epoch"]
        and distance[-1] <= TOLERANCE["final"]
    )
