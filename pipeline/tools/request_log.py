"""What `mnist-vae serve` was asked and answered, for `mnist-vae monitor` (`serve.request_log`).

One JSON line per checked request: its time (UTC), the model (URI, registry version, run), the
method and params, and the input rows and predictions as base64 of little-endian float32 with
their shape (exact, and a third of the size of the numbers written out). Every worker appends to
the same file under an exclusive `flock`; when a line would take the file past half of
`serve.request_log_bytes`, the file becomes `<name>.1` (replacing the older one) and a new one
starts, so the two together stay within the bound.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.errors import PipelineError

IMAGE_METHODS = ("encode", "reconstruct", "score")  # the methods whose inputs are images


def encode_array(array: np.ndarray) -> dict:
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(data.shape), "float32": base64.b64encode(data.tobytes()).decode()}


def decode_array(value: dict) -> np.ndarray:
    raw = base64.b64decode(value["float32"], validate=True)
    return np.frombuffer(raw, dtype="<f4").reshape(value["shape"]).astype(np.float32)


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RequestLog:
    """Appends one request a line; safe for several processes (see the module's docstring)."""

    def __init__(self, path: str | Path, max_bytes: int, model: dict[str, Any]) -> None:
        self.path, self.half, self.model = Path(path), max_bytes // 2, model
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, method: str, params: dict, rows: np.ndarray, outputs: Any) -> None:
        record = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "model": self.model,
            "method": method,
            "params": params,
            "inputs": encode_array(rows),
            "outputs": None if outputs is None else encode_array(np.asarray(outputs)),
        }
        line = orjson.dumps(record) + b"\n"
        if len(line) > self.half:
            logging.getLogger(__name__).warning(
                "request of %d bytes not logged: over half of serve.request_log_bytes", len(line)
            )
            return
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when `held` closes
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.half:
                os.replace(self.path, rotated(self.path))
            # 0600: the log holds what clients sent. One write: no half line from this process.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "ab") as log:
                log.write(line)


@dataclass(frozen=True)
class Logged:
    names: list[str]  # one per image: the request's time and the row
    images: np.ndarray  # (n, 784) float32
    requests: int
    models: list[str]  # the models that answered them, as logged


WINDOW = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """`30m`, `2h`, `1d` back from now, or an ISO 8601 time (UTC when it names no zone)."""
    found = WINDOW.match(text.strip())
    if found:
        return now - dt.timedelta(seconds=float(found[1]) * UNITS[found[2]])
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PipelineError(
            f"--since {text!r}: give a window (30m, 2h, 1d) or an ISO time (2026-12-04T09:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def read_requests(path: Path, last: int | None = None, since: str | None = None) -> Logged:
    """The images of the logged image requests (encode, reconstruct, score), oldest first: the
    last `last` requests, or those since `since`, or all the log and its rotated copy hold."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such request log; set serve.request_log and serve")
    records = []
    for part in (rotated(path), path):
        if part.is_file():
            records += parse_lines(part)
    records = [r for r in records if r["method"] in IMAGE_METHODS]
    if since is not None:
        cutoff = parse_since(since, dt.datetime.now(dt.timezone.utc))
        records = [r for r in records if dt.datetime.fromisoformat(r["time"]) >= cutoff]
    if last is not None:
        records = records[-last:] if last > 0 else []
    if not records:
        raise PipelineError(f"{path}: no image requests (encode, reconstruct, score) in that range")
    names, images = [], []
    for record in records:
        rows = record["rows"]
        names += [f"{record['time']} row {i}" for i in range(len(rows))]
        images.append(rows)
    models = sorted({describe(record["model"]) for record in records})
    return Logged(names, np.concatenate(images), len(records), models)


def parse_lines(path: Path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    if lines[-1]:  # a line cut short by a crash mid-write: the rest is whole
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = orjson.loads(line)
            records.append(record | {"rows": decode_array(record["inputs"])})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PipelineError(
                f"{path}:{number}: not a request logged by mnist-vae serve; give its request_log"
            ) from None
    return records


def describe(model: dict) -> str:
    version = f" version {model['version']}" if model.get("version") else ""
    return f"{model.get('uri')}{version}"
