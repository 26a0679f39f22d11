"""The whole VAE as an MLflow pyfunc model: four methods from one URI, and `mnist-vae score`."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from helpers.repo import environment
from helpers.workdir import make_workdir, trained_run_id, write_params
from pipeline import __main__ as cli
from pipeline.config import load_params
from pipeline.data.splits import load_split
from pipeline.data.weights import load_vae, save_vae
from pipeline.paths import TEST_SPLIT, WEIGHTS
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation
from pipeline.vae.model import VAE, loss_terms


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path
) -> Iterator[tuple[mlflow.pyfunc.PyFuncModel, Path]]:
    """A tiny VAE trained long enough to know its blobs, registered, loaded through pyfunc
    (made once: the tests only read it)."""
    work = make_workdir(tmp_path_factory.mktemp("served"), mlflow_template)
    write_params(work, train={"epochs": 15, "lr": 0.01})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(work)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        train_stage.train(load_params())
        run_evaluation(load_params())  # the first model evaluated becomes @champion
        torch.set_num_threads(threads)
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        yield mlflow.pyfunc.load_model("models:/mnist-vae@champion"), work


def test_the_four_methods_are_the_vaes(served) -> None:
    model, work = served
    vae = load_vae(work / WEIGHTS)
    images = load_split(work / TEST_SPLIT)[0][:6]
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        mu, logvar = vae.encode(images)
        np.testing.assert_allclose(model.predict(z), vae.decode(torch.from_numpy(z)), atol=1e-6)
        encoded = model.predict(images.numpy(), params={"method": "encode"})
        np.testing.assert_allclose(encoded, mu, atol=1e-6)
        both = model.predict(images.numpy(), params={"method": "encode", "logvar": True})
        np.testing.assert_allclose(both, torch.cat([mu, logvar], 1), atol=1e-6)
        reconstructed = model.predict(images.numpy(), params={"method": "reconstruct"})
        np.testing.assert_allclose(reconstructed, vae.decode(mu), atol=1e-6)
        scores = model.predict(images.numpy(), params={"method": "score", "samples": 3})
        generator = torch.Generator().manual_seed(0)
        draws = [sum(loss_terms(vae, images, generator)) for _ in range(3)]
        np.testing.assert_allclose(scores, sum(draws) / 3, rtol=1e-5)
    assert model.metadata.metadata["latent_dim"] == 4


def test_scores_tell_digits_from_noise_and_rotated_digits(served) -> None:
    model, work = served
    images = load_split(work / TEST_SPLIT)[0][:32].numpy()
    noise = np.random.default_rng(0).uniform(size=images.shape).astype(np.float32)
    rotated = np.rot90(images.reshape(-1, 28, 28), axes=(1, 2)).reshape(-1, 784).copy()
    params = {"method": "score", "samples": 8, "seed": 1}
    digits, noisy, turned = (model.predict(x, params=params) for x in (images, noise, rotated))
    assert np.array_equal(digits, model.predict(images, params=params))  # seeded: repeatable
    assert digits.mean() < turned.mean() and digits.mean() + 100 < noisy.mean()
    assert (digits < noisy).all()


def test_encode_then_decode_resembles_the_digit(served) -> None:
    model, work = served
    images, labels = (t.numpy() for t in load_split(work / TEST_SPLIT))
    again = model.predict(model.predict(images, params={"method": "encode"}))
    # Tiny digits of one class differ only by noise: the nearest test digit is of the same class.
    distances = np.linalg.norm(again[:, None] - images[None], axis=2)
    assert (labels[distances.argmin(axis=1)] == labels).mean() > 0.9


@pytest.mark.parametrize(
    ("data", "params", "message"),
    [
        (np.zeros((2, 784)), None, r"expected latent vectors of shape \(n, 4\), got shape"),
        (np.zeros((2, 4)), {"method": "score"}, r"expected images of shape \(n, 784\)"),
        (np.full((2, 784), 255.0), {"method": "encode"}, r"pixel values in \[0, 1\]"),
        (np.zeros((2, 4)), {"method": "sample"}, r"method 'sample' is not one of decode"),
    ],
)
def test_wrong_input_gets_one_clear_error(served, data, params, message) -> None:
    model, _ = served
    with pytest.raises(MlflowException, match=message):
        model.predict(data.astype(np.float32), params=params)


def test_score_writes_one_row_per_image_from_pngs_and_npy(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, work = served
    images = load_split(work / TEST_SPLIT)[0][:5].numpy()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        pixels = (image.reshape(28, 28) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"digit{i}.png")
    np.save(tmp_path / "digits.npy", (images * 255).round().astype(np.uint8))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    for source in (folder, tmp_path / "digits.npy"):
        output = tmp_path / f"{source.stem}.csv"
        argv = ["pipeline", "score", "--input", str(source), "-o", str(output), "--samples", "2"]
        monkeypatch.setattr(sys, "argv", argv)
        cli.main()
        with output.open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 5 and list(rows[0]) == ["file", "score", "z0", "z1", "z2", "z3"]
        expected = model.predict(
            np.stack(
                [
                    np.asarray(Image.open(folder / f"digit{i}.png"), np.float32).reshape(784) / 255
                    for i in range(5)
                ]
            ),  # fmt: skip
            params={"method": "score", "samples": 2},
        )
        np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-5)
    assert rows[0]["file"] == "digits.npy[0]"


@pytest.mark.slow  # a fresh interpreter: seconds
def test_the_readme_snippet_loads_the_champion_from_any_folder(served, tmp_path: Path) -> None:
    _, workdir = served
    snippet = (
        "import mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-vae@champion')\n"
        "print(model.predict(np.zeros((3, 4), dtype=np.float32)).shape)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = environment(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    env["PYTHONPATH"] = ""  # nothing from this repository on the path but the model's own code
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "(3, 784)"
    assert not (elsewhere / "mlflow.db").exists()


def test_the_registry_describes_the_methods(served) -> None:
    _, workdir = served
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    version = client.get_model_version_by_alias("mnist-vae", "champion")
    run_id = trained_run_id(workdir)
    for text in (client.get_registered_model("mnist-vae").description, version.description):
        assert all(method in text for method in ("decode", "encode", "reconstruct", "score"))
    assert version.description.startswith(f"Trained in run {run_id}; test_loss ")
    assert os.path.basename(version.source).startswith("m-")  # the logged model's own URI


def test_a_model_logged_before_the_package_had_layers_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path
) -> None:
    # What `tracking.log_vae_model` logged until 2026-12-02: its entry point imported the VAE's
    # pyfunc class from `pipeline.serving`, a module that has moved since.
    entry = tmp_path / "mlflow_model.py"
    entry.write_text(
        "from mlflow.models import set_model\n\nfrom pipeline.serving import VAEModel\n\n"
        "set_model(VAEModel())\n"
    )
    weights = tmp_path / "vae.safetensors"
    save_vae(VAE(16, 3), weights)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")  # migrated already: seconds saved
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts={"weights": str(weights)},
            pip_requirements=["torch"],  # declared: inferring them loads the model in a subprocess
        )
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.predict(np.zeros((2, 3), np.float32)).shape == (2, 784)
