import json
from pathlib import Path

import torch

from pipeline.data import mnist as data
from pipeline.stages.preprocess import preprocess


def test_preprocess_tiny_raw_folder(tiny_raw: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    data.download_mnist(root, source=str(tiny_raw))
    counts = preprocess(root, tmp_path / "processed")
    x, y = data.load_split(tmp_path / "processed" / "train.safetensors")
    assert x.shape == (64, 784) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    raw = data.read_idx(tiny_raw / "train-images-idx3-ubyte")
    assert torch.equal(x[3], torch.from_numpy(raw[3].reshape(-1).astype("float32")) / 255)
    assert y.tolist() == [i % 10 for i in range(64)]
    assert data.load_split(tmp_path / "processed" / "test.safetensors")[0].shape == (32, 784)
    assert counts["train"]["0"] == 7 and counts["test"]["9"] == 3
    assert json.loads(json.dumps(counts)) == counts
