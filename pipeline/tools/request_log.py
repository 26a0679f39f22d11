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
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import sys
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


@contextlib.contextmanager
def locked(path: Path):
    """The log's exclusive lock (a `.lock` file beside it), held for the block; a reader that may
    not create it (another user's log) reads without it."""
    try:
        held = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except PermissionError:
        yield
        return
    with held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when `held` closes
        yield


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
        with locked(self.path):
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.half:
                os.replace(self.path, rotated(self.path))
                size = 0
            # 0600: the log holds what clients sent. One write: no half line from this process.
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "r+b") as log:
                if size and os.pread(descriptor, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a writer died mid-line: its part stays a line of its own
                log.write(line)


@dataclass(frozen=True)
class Logged:
    names: list[str]  # one per image: the request's time and the row
    images: np.ndarray  # (n, 784) float32
    requests: int
    models: list[str]  # the models that answered them, as logged
    repeats: int  # images sent again (score then encode, a health check): counted once


WINDOW = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """`30m`, `2h`, `1d` back from now, or an ISO 8601 time (UTC when it names no zone)."""
    found = WINDOW.match(text.strip())
    if found:
        try:
            return now - dt.timedelta(seconds=float(found[1]) * UNITS[found[2]])
        except OverflowError:
            return dt.datetime.min.replace(tzinfo=dt.timezone.utc)  # before any request
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PipelineError(
            f"--since {text!r}: give a window (30m, 2h, 1d) or an ISO time (2026-12-04T09:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def read_requests(path: Path, last: int | None = None, since: str | None = None) -> Logged:
    """The images of the logged image requests (encode, reconstruct, score), oldest first: the
    last `last` requests, or those since `since`, or all the log and its rotated copy hold. An
    image sent more than once counts once: the monitor's tests take the images as independent."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such request log; set serve.request_log and serve")
    parts = [rotated(path), path] if path.name.endswith(".jsonl") else [path]
    with locked(parts[-1]):  # no rotation between reading the two files
        texts = [(part, part.read_bytes()) for part in parts if part.is_file()]
    records = [record for part, text in texts for record in parse_lines(part, text)]
    records = [r for r in records if r["method"] in IMAGE_METHODS]
    if since is not None:
        cutoff = parse_since(since, dt.datetime.now(dt.timezone.utc))
        records = [r for r in records if r["moment"] >= cutoff]
    if last is not None:
        records = records[-last:] if last > 0 else []
    if not records:
        raise PipelineError(f"{path}: no image requests (encode, reconstruct, score) in that range")
    names, images, seen = [], [], set()
    for record in records:
        for i, row in enumerate(record["rows"]):
            digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                names.append(f"{record['time']} row {i}")
                images.append(row)
    repeats = sum(len(r["rows"]) for r in records) - len(images)
    models = sorted({describe(record["model"]) for record in records})
    return Logged(names, np.stack(images), len(records), models, repeats)


REQUIRED = ("time", "model", "method", "params", "inputs")


def parse_lines(path: Path, text: bytes) -> list[dict]:
    """The log's records; a line a crashed writer left unfinished is skipped (stderr says how many),
    a file with no record at all is refused in one line."""
    lines = text.split(b"\n")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = orjson.loads(line)
            missing = [key for key in REQUIRED if key not in record]
            if missing:
                raise KeyError(missing[0])
            moment = dt.datetime.fromisoformat(record["time"])
            rows = decode_array(record["inputs"])
            records.append(record | {"rows": rows, "moment": moment})
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
            damaged.append(number)
    if damaged and not records:
        raise PipelineError(
            f"{path}:{damaged[0]}: not a request logged by mnist-vae serve; give its request_log"
        )
    if damaged:
        print(f"warning: {path}: {len(damaged)} damaged lines skipped (line {damaged[0]}, ...)",
              file=sys.stderr)  # fmt: skip
    return records


def describe(model: dict) -> str:
    version = f" version {model['version']}" if model.get("version") else ""
    return f"{model.get('uri')}{version}"


def check_log(path: Path) -> None:
    """A request log `monitor` can read (.jsonl) that this user can write, before any worker
    starts; one line naming serve.request_log otherwise."""
    if not path.name.endswith(".jsonl"):
        raise PipelineError(f"serve.request_log {path}: name it *.jsonl (what monitor reads)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    except OSError as exc:
        raise PipelineError(
            f"serve.request_log {path}: cannot be written ({exc.strerror}); choose another file"
        ) from None


def served_model(model_uri: str) -> dict[str, Any]:
    """The served model as the request log names it: URI, registry version and run, when the
    store can say (a URI it cannot resolve is logged as it is)."""
    from pipeline.tracking.reference import resolve

    try:
        model = resolve(model_uri)
    except PipelineError:
        return {"uri": model_uri, "version": None, "run_id": None}
    return {"uri": model_uri, "version": model.version, "run_id": model.run_id}
