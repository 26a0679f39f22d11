"""Files the stages write: atomic (a reader never sees half a file, a failure keeps the old one),
and tensors in safetensors (the same values give the same bytes; loading runs no code)."""

from __future__ import annotations

import csv
import errno
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from pipeline.errors import StaleOutputError, first_line

METADATA_KEY = "pipeline"  # safetensors' metadata is a map of strings; ours is one JSON string


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # Created with mode 0o666 so the process umask applies, as for any file the user writes.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # name the file the user knows
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def hash_file(path: Path | str, digest: Any) -> Any:
    """Feed the file at `path` into the hashlib object `digest`, a megabyte at a time."""
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_csv(path: Path | str, rows: list[dict], fields: list[str] | tuple[str, ...]) -> None:
    """Rows as CSV with the columns `fields` (other keys of a row are left out), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv_numbers(path: Path | str) -> list[dict[str, float]]:
    """The rows of a CSV file of numbers, as floats."""
    with Path(path).open() as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def write_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write `tensors` and a JSON-able `metadata` dict to a safetensors file, atomically.

    The metadata goes in as a single sorted JSON string: safetensors writes a metadata map with
    several keys in hash order, which differs from one process to the next.
    """
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(cpu, metadata=header))  # save_file would make the file private


def read_tensors(
    path: Path | str, rebuild: str, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a file written by `write_tensors`.

    `rebuild` is the command that writes the file again; every failure names the file and it.
    """
    path = Path(path)
    if not path.is_file():
        old = path.with_suffix(".pt")
        if old.is_file():
            raise StaleOutputError(
                f"{old} is in the old torch.save format, which this version no longer reads; "
                f"run `{rebuild}` to write {path}"
            )
        raise StaleOutputError(f"{path}: not found; run `{rebuild}`")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            metadata = json.loads((f.metadata() or {})[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise StaleOutputError(
            f"{path}: not a safetensors file written by this pipeline ({first_line(exc)}); "
            f"run `{rebuild}` to write it again"
        ) from None
    return tensors, metadata
