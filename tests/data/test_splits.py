"""The processed splits: preprocess, loading in [0, 1], identical bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data import mnist as data
from pipeline.data import splits
from pipeline.data.splits import preprocess


@pytest.mark.slow  # a fresh interpreter importing torch: 4-5 s of the quick loop
def test_preprocess_twice_gives_identical_bytes(tiny_raw: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    data.download_mnist(root, source=str(tiny_raw))
    preprocess(root, tmp_path / "first")
    again = "import sys; from pathlib import Path; from pipeline.data.splits import preprocess; "
    again += "preprocess(Path(sys.argv[1]), Path(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", again, root, tmp_path / "second"], check=True)
    for name in ("train.safetensors", "test.safetensors"):
        first, second = (tmp_path / run / name for run in ("first", "second"))
        assert first.read_bytes() == second.read_bytes(), name
    blob = (tmp_path / "first" / "train.safetensors").read_bytes()
    assert blob[8:9] == b"{"  # safetensors: header length, then its JSON; not a torch zip archive


def test_preprocess_tiny_raw_folder(tiny_raw: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    data.download_mnist(root, source=str(tiny_raw))
    counts = preprocess(root, tmp_path / "processed")
    x, y = splits.load_split(tmp_path / "processed" / "train.safetensors")
    assert x.shape == (64, 784) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    raw = data.read_idx(tiny_raw / "train-images-idx3-ubyte")
    assert torch.equal(x[3], torch.from_numpy(raw[3].reshape(-1).astype("float32")) / 255)
    assert y.tolist() == [i % 10 for i in range(64)]
    assert splits.load_split(tmp_path / "processed" / "test.safetensors")[0].shape == (32, 784)
    assert counts["train"]["0"] == 7 and counts["test"]["9"] == 3
    assert json.loads(json.dumps(counts)) == counts


def test_load_split_scales_to_unit_interval(tmp_path: Path) -> None:
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    splits.save_split(tmp_path / "s.safetensors", images, torch.tensor([7]))
    x, y = splits.load_split(tmp_path / "s.safetensors")
    assert x.dtype == torch.float32 and x.shape == (1, 4)
    assert torch.allclose(x, torch.tensor([[0.0, 1.0, 0.2, 0.4]]))
    assert y.tolist() == [7]
