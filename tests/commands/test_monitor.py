"""`mnist-vae monitor`: its refusals (fast, exit 2), then a tiny registered model's reference
profile, report and MLflow run, and an older model without a profile (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import commands
from pipeline.data.splits import load_split
from pipeline.paths import TEST_SPLIT
from pipeline.tracking import reference


def monitor(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`mnist-vae monitor ARGS` in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        commands.main(["monitor", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def npy(folder: Path, rows: int, width: int = 784) -> str:
    path = folder / f"batch-{rows}x{width}.npy"
    np.save(path, np.random.default_rng(0).random((rows, width), dtype=np.float32))
    return str(path)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "--input is required"),
        (["--input", "nowhere.png"], "nowhere.png: not a folder of PNGs nor a .npy file"),
        (["--input", "{npy}", "--last", "5"], "--last and --since read a request log"),
        (["--input", "log.jsonl", "--last", "0"], "--last 0: ask for at least one request"),
        (["--input", "{small}"], "5 images; the monitor needs at least 20"),
        (["--input", "{wide}"], "shape (30, 100); expected (n, 784)"),
        (["--input", "{npy}", "--alpha", "1.5"], "monitor.alpha"),
        (["--input", "log.jsonl"], "log.jsonl: no such request log"),
        (["--input", "{nan}"], "NaN or infinite values"),
    ],
)
def test_bad_input_exits_2_in_one_line(
    args: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    files = {"npy": npy(tmp_path, 30), "small": npy(tmp_path, 5), "wide": npy(tmp_path, 30, 100)}
    files["nan"] = str(tmp_path / "nan.npy")
    np.save(files["nan"], np.full((30, 784), np.nan, dtype=np.float32))
    code, _, err = monitor(capsys, *(a.format(**files) for a in args))
    assert code == 2
    assert said in one_line(err)


@pytest.mark.slow
def test_a_model_outside_mlflow_exits_2_in_one_line(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = monitor(capsys, "--model", str(tmp_path), "--input", npy(tmp_path, 30))
    assert code == 2 and "no such model" in one_line(err)


@pytest.fixture
def tiny(registered: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(registered)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{registered / 'mlflow.db'}")
    return registered


def tiny_test_images(folder: Path) -> np.ndarray:
    return load_split(folder / TEST_SPLIT)[0].numpy()


@pytest.mark.slow
def test_evaluate_logs_a_profile_the_served_model_computes_again_bit_for_bit(tiny: Path) -> None:
    logged = reference.load_profile(reference.resolve("models:/mnist-vae@champion"))
    images = tiny_test_images(tiny)
    assert len(logged.indices) == len(images) // 2  # a seeded half: the rest stays unseen
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    again = reference.profile_images(
        reference.model_predict(model), images[logged.indices], logged.samples, logged.seed
    )
    assert np.array_equal(again.scores, logged.scores)
    assert np.array_equal(again.means, logged.means)


@pytest.mark.slow
def test_a_report_is_written_and_logged_under_the_models_run(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    batch = tmp_path / "inverted.npy"
    np.save(batch, 1.0 - tiny_test_images(tiny))
    out = tmp_path / "report"
    code, printed, _ = monitor(capsys, "--input", str(batch), "--out", str(out))
    assert code == 1, printed  # inverted digits: drift
    assert "DRIFT at alpha 0.04" in printed  # params.yaml's monitor.alpha
    report = json.loads((out / "report.json").read_text())
    assert report["drift"] and report["verdict"]["images"] == len(tiny_test_images(tiny))
    assert report["worst"][0]["reference_percentile"] == 100.0
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    version = MlflowClient().get_model_version_by_alias("mnist-vae", "champion")
    (run,) = MlflowClient().search_runs(
        [mlflow.get_run(version.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{version.run_id}'",
    )
    assert run.data.tags["monitor.model_version"] == str(version.version)
    assert run.data.tags["monitor.decision"] == "drift" and run.data.metrics["drift"] == 1.0
    logged = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "monitoring")}
    assert logged == {"monitoring/report.json", "monitoring/report.png"}
    version = MlflowClient().get_model_version("mnist-vae", version.version)
    assert version.tags["monitor.last_run"] == run.info.run_id
    assert version.tags["monitor.last_decision"] == "drift"


@pytest.mark.slow
def test_a_model_without_a_profile_says_how_to_make_one(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    version = MlflowClient().get_model_version_by_alias("mnist-vae", "champion")
    artifacts = Path(mlflow.get_run(version.run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / reference.ARTIFACT_DIR)  # as a model evaluated before the monitor
    batch = tmp_path / "digits.npy"
    np.save(batch, tiny_test_images(tiny))
    code, _, err = monitor(capsys, "--input", str(batch), "--no-log", "--out", str(tmp_path))
    assert code == 2
    assert "has no reference profile" in one_line(err) and "--make-reference" in err
    assert not (tmp_path / "report.json").exists()
    code, printed, _ = monitor(capsys, "--make-reference")
    half = len(tiny_test_images(tiny)) // 2
    assert code == 0 and f"logged a reference profile of {half} test images" in printed
    code, printed, _ = monitor(capsys, "--input", str(batch), "--no-log", "--out", str(tmp_path))
    assert code in (0, 1) and (tmp_path / "report.json").is_file()


@pytest.mark.slow
def test_an_out_that_cannot_be_written_exits_2_and_keeps_the_last_report(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    batch = tmp_path / "digits.npy"
    np.save(batch, tiny_test_images(tiny))
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    code, _, err = monitor(capsys, "--input", str(batch), "--no-log", "--out", str(taken))
    assert code == 2 and f"--out {taken}: cannot write the report" in one_line(err)
    assert taken.read_text() == "mine"
    out = tmp_path / "report"
    code, _, _ = monitor(capsys, "--input", str(batch), "--no-log", "--out", str(out))
    first = (out / "report.json").read_text()
    assert code in (0, 1) and (out / "report.png").stat().st_mode & 0o777 == 0o600
    code, _, _ = monitor(
        capsys, "--input", str(batch), "--no-log", "--alpha", "0.01", "--out", str(out)
    )
    assert (out / "report.json").read_text() != first  # replaced whole
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".report")) == []
