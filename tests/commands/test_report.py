"""`python -m pipeline report`: the Markdown that CI prints after the tests."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.commands import report
from pipeline.config import load_params
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation


def write_history(path: Path, losses: list[float]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss"])
        writer.writerows([epoch, loss] for epoch, loss in enumerate(losses, start=1))
    return path


@pytest.mark.parametrize(
    ("shift", "verdict"), [(0.0, "PASS"), (1.4, "FAIL"), (-0.9, "PASS"), (1.6, "FAIL")]
)
def test_the_lab_curve_section_applies_the_ci_tolerance(
    tmp_path: Path, shift: float, verdict: str
) -> None:
    lab = report.lab_curve.CURVE
    # shift the last epoch (tolerance 1.0) or, for 1.6, every epoch (tolerance 1.5)
    losses = [x + (shift if shift > 1.5 or i == 9 else 0) for i, x in enumerate(lab)]
    text, passed = report.lab_curve_section(write_history(tmp_path / "h.csv", losses))
    assert passed == (verdict == "PASS")
    assert f"**{verdict}**" in text
    assert f"| 10 | {lab[9]:.2f} | {losses[9]:.2f} | {losses[9] - lab[9]:+.2f} |" in text


def test_a_short_run_fails_the_lab_curve(tmp_path: Path) -> None:
    text, passed = report.lab_curve_section(write_history(tmp_path / "h.csv", [164.4, 121.3]))
    assert not passed and "(2 epochs, not 10)" in text


def test_the_registry_section_marks_a_pair_evaluated_differently(workdir: Path, set_params) -> None:
    assert report.registry_section(load_params()).startswith("`mnist-vae` has no @candidate")
    train_stage.train(load_params())
    run_evaluation(load_params())
    assert report.registry_section(load_params()) == "v1 is both @candidate and @champion."
    set_params(workdir, data={"binarize": "dynamic"})
    train_stage.train(load_params())
    run_evaluation(load_params())
    text = report.registry_section(load_params())
    assert "| @candidate | v2 |" in text and "dynamic, seed 0 pixels" in text
    assert "Not comparable: evaluated differently (pixels 'dynamic, seed 0' vs 'grey')" in text
    assert "minus champion" not in text


def test_without_a_store_the_report_says_what_to_run(workdir: Path) -> None:
    (workdir / "mlflow.db").unlink()
    text, passed = report.render(load_params(), "HEAD")
    assert "No MLflow store here: run `make repro`" in text
    assert not (workdir / "mlflow.db").exists()  # looking did not create one
    assert "No `plots/train_history.csv`: run `make repro` first." in text and not passed


@pytest.mark.parametrize(
    ("epochs", "log_px", "verdict"),
    [(3280, -87.5, "YES"), (3280, -87.9, "NO"), (121, -86.8, "NO")],
)
def test_the_paper_section_puts_the_papers_row_beside_this_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int, log_px: float, verdict: str
) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's store
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text(json.dumps({"epochs": epochs}))
    evaluated = {"log_px_iwae": log_px, "log_px_iwae_se": 0.25, "active_units": 20}
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(evaluated))
    text, passed = report.paper_section()
    assert passed == (verdict == "YES")
    assert "| Burda et al. (2016), Table 1 | 86.76 | 19 | 3280 |" in text
    assert f"| this run | {-log_px:.2f} ± 0.25 | 20 | {epochs} |" in text
    assert f"**{verdict}**" in text
    assert ("not the paper's row" in text) == (epochs != 3280)
    assert "This run: no MLflow store here." in text
