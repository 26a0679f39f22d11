"""DVC outputs that DVC can trust: the same values give the same bytes, and old formats say what
to do instead of raising a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.data import mnist as data
from pipeline.data.files import StaleOutputError, read_tensors
from pipeline.paths import TRAIN_HISTORY, TRAIN_METRICS, WEIGHTS
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import train as train_stage
from pipeline.stages.preprocess import preprocess
from pipeline.vae.model import VAE, load_vae, save_vae

WRITE_IN_A_FRESH_PROCESS = """
import sys, torch
from pipeline.data.files import write_tensors
tensors = {f"w{i}": torch.arange(i * 10, dtype=torch.float32) for i in range(6)}
metadata = {f"key{i}": i for i in range(8)}
write_tensors(sys.argv[1], tensors | {"labels": torch.arange(5)}, metadata)
"""


def test_tensor_files_are_byte_identical_across_processes(tmp_path: Path) -> None:
    # safetensors writes a metadata map of several keys in hash order, which changes from one
    # process to the next; write_tensors must not depend on it.
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    exec(WRITE_IN_A_FRESH_PROCESS.replace("sys.argv[1]", repr(str(paths[0]))))  # this process
    command = [sys.executable, "-c", WRITE_IN_A_FRESH_PROCESS, str(paths[1])]
    subprocess.run(command, check=True)  # another process: another hash seed
    assert len({path.read_bytes() for path in paths}) == 1
    tensors, metadata = read_tensors(paths[0], "rebuild")
    assert metadata == {f"key{i}": i for i in range(8)}
    assert torch.equal(tensors["w3"], torch.arange(30, dtype=torch.float32))


def test_preprocess_twice_gives_identical_bytes(tiny_raw: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    data.download_mnist(root, source=str(tiny_raw))
    preprocess(root, tmp_path / "first")
    again = (
        "import sys; from pathlib import Path; from pipeline.stages.preprocess import preprocess; "
    )
    again += "preprocess(Path(sys.argv[1]), Path(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", again, root, tmp_path / "second"], check=True)
    for name in ("train.safetensors", "test.safetensors"):
        first, second = (tmp_path / run / name for run in ("first", "second"))
        assert first.read_bytes() == second.read_bytes(), name
    blob = (tmp_path / "first" / "train.safetensors").read_bytes()
    assert blob[8:9] == b"{"  # safetensors: header length, then its JSON; not a torch zip archive


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


def test_weights_round_trip_with_their_sizes(tmp_path: Path) -> None:
    model = VAE(hidden_dim=12, latent_dim=3)
    umask = os.umask(0o022)
    try:
        save_vae(model, tmp_path / "vae.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "vae.safetensors").stat().st_mode) == 0o644  # not private
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert (loaded.hidden_dim, loaded.latent_dim) == (12, 3)
    z = torch.randn(4, 3)
    assert torch.equal(loaded.decode(z), model.eval().decode(z))


def test_an_old_pt_output_names_the_file_and_the_command(tmp_path: Path) -> None:
    old = tmp_path / "train.pt"
    torch.save({"images": torch.zeros(1, 28, 28, dtype=torch.uint8)}, old)
    with pytest.raises(StaleOutputError) as raised:
        data.load_split(tmp_path / "train.safetensors")
    assert str(raised.value) == (
        f"{old} is in the old torch.save format, which this version no longer reads; "
        f"run `dvc repro preprocess` to write {tmp_path / 'train.safetensors'}"
    )
    # Given the old file itself: not unpickled, named, and the command that rewrites it.
    with pytest.raises(StaleOutputError, match=r"train\.pt: not a safetensors file .*dvc repro"):
        data.load_split(old)


@pytest.mark.parametrize("damage", ["truncated", "hostile pickle"])
def test_a_damaged_weights_file_is_refused_without_unpickling(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "vae.safetensors"
    save_vae(VAE(hidden_dim=8, latent_dim=2), path)
    marker = tmp_path / "pwned"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:

        class Hostile:
            def __reduce__(self):
                return (Path.touch, (marker,))

        torch.save(Hostile(), path)
    with pytest.raises(StaleOutputError, match=r"vae\.safetensors: not a safetensors file"):
        load_vae(path)
    assert not marker.exists()


def test_a_stage_given_old_outputs_prints_one_line(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    # The train stage of an older version wrote models/vae.pt; evaluate must say what to do.
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hidden_dim": 32, "latent_dim": 4}, WEIGHTS.with_suffix(".pt"))
    (WEIGHTS.parent / "mlflow_run.json").write_text('{"run_id": "x", "experiment_id": "0"}')
    with pytest.raises(SystemExit) as exited:
        evaluate_stage.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: models/vae.pt is in the old torch.save format, which this version no longer "
        "reads; run `dvc repro train` to write models/vae.safetensors"
    ]
