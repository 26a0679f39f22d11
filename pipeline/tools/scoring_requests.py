"""What a scoring request to `mnist-vae serve` may hold: `check_request` parses and checks one
JSON body, and says in one short line what was expected when it refuses (BadRequest)."""

from __future__ import annotations

import reprlib
from typing import Any

import numpy as np
import orjson

from pipeline.config import ServeConfig
from pipeline.tracking import pyfunc
from pipeline.vae.model import IMAGE_DIM

MESSAGE_CHARS = 300  # an error message's length at most; input is echoed in EXCERPT_CHARS
EXCERPT_CHARS = 40
# MLflow's JSON forms of a tensor; its dataframe forms fail with this model's tensor signature
INPUT_KEYS = ("inputs", "instances")
PYTHON_TYPES = {"string": str, "long": int, "boolean": bool}  # MLflow's param types in JSON
PARAMS = {spec.name: PYTHON_TYPES[spec.dtype.name] for spec in pyfunc.PARAMS.params}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}
MAX_SEED = 2**63 - 1
VALUE_KINDS = {"U": "strings", "b": "booleans", "O": "nulls, mixed values or integers too large"}


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and one line that says what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def excerpt(value: object) -> str:
    """At most EXCERPT_CHARS characters of what the client sent: reprlib walks only the first
    levels and items of a value, so a deep or large one costs nothing to quote."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, EXCERPT_CHARS, EXCERPT_CHARS
    text = value if isinstance(value, str) else short.repr(value)
    return repr(text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else ""))


def check_request(
    body: bytes, settings: ServeConfig, latent_dim: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows and params of a JSON request, checked: an object with one of INPUT_KEYS (a list of
    rows) and optional `params` of PARAMS; no other key; the method's width (latent_dim to
    decode, 784 pixels otherwise); finite numbers, pixels in [0, 1]; at most max_rows rows and
    max_samples draws. Raises BadRequest naming what was expected."""
    try:
        request = orjson.loads(body)  # ten times json's speed on a batch of digits, and stricter
    except orjson.JSONDecodeError as exc:
        if body[exc.pos : exc.pos + 9].lstrip(b"-").startswith((b"NaN", b"Inf")) or (
            "infinity" in exc.msg
        ):
            raise BadRequest(400, "expected finite numbers, got NaN, Infinity or 1e400") from None
        near = excerpt(body[max(0, exc.pos - 10) : exc.pos + 10].decode("utf-8", "replace"))
        raise BadRequest(400, f"expected JSON: {exc.msg} at character {exc.pos} ({near})") from None
    shape = '{"inputs": [[...], ...], "params": {"method": ...}}'
    if not isinstance(request, dict):
        raise BadRequest(400, f"expected a JSON object {shape}, got {type(request).__name__}")
    unknown = sorted(set(request) - {*INPUT_KEYS, "params"})
    if unknown:
        raise BadRequest(400, f"unknown key {excerpt(unknown[0])}; expected {shape}")
    given = [key for key in INPUT_KEYS if key in request]
    if len(given) != 1:
        raise BadRequest(400, f"expected exactly one of {', '.join(INPUT_KEYS)}; got {len(given)}")
    params = checked_params(request.get("params", {}), settings)
    rows = request[given[0]]
    width = latent_dim if params["method"] == "decode" else IMAGE_DIM
    what = "latent vectors" if params["method"] == "decode" else "images of 784 pixels"
    return checked_rows(rows, width, what, settings.max_rows), params


def checked_params(params: object, settings: ServeConfig) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise BadRequest(400, f"expected params as an object, got {excerpt(params)}")
    for name, value in params.items():
        wanted = PARAMS.get(name)
        if wanted is None:
            raise BadRequest(400, f"unknown param {excerpt(name)}; expected {', '.join(PARAMS)}")
        # bool is an int in Python: `samples: true` is not a number of draws
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise BadRequest(
                400, f"param {name} must be {TYPE_NAMES[wanted]}, got {excerpt(value)}"
            )
    method = params.get("method", "decode")
    if method not in pyfunc.METHODS:
        raise BadRequest(400, f"method {excerpt(method)} is not one of {', '.join(pyfunc.METHODS)}")
    samples = params.get("samples", 1)
    if not 1 <= samples <= settings.max_samples:
        raise BadRequest(
            400, f"samples = {samples}: this server allows 1 to {settings.max_samples}"
        )
    if not 0 <= params.get("seed", 0) <= MAX_SEED:
        raise BadRequest(400, f"seed must be 0 to 2**63 - 1, got {excerpt(params['seed'])}")
    return {"method": method} | params


def checked_rows(rows: object, width: int, what: str, max_rows: int) -> np.ndarray:
    if not isinstance(rows, list) or not rows:
        raise BadRequest(400, f"expected a non-empty list of {what}, got {excerpt(rows)}")
    if len(rows) > max_rows:
        raise BadRequest(400, f"{len(rows)} rows: this server takes at most {max_rows} a request")
    try:
        array = np.asarray(rows)
    except (ValueError, TypeError):  # ragged rows
        raise BadRequest(400, f"expected rows of {width} numbers ({what}); rows differ") from None
    if array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] != width:
        got = VALUE_KINDS.get(array.dtype.kind, f"shape {array.shape}")
        raise BadRequest(400, f"expected {what}: rows of {width} numbers, got {got}")
    with np.errstate(over="ignore"):  # 1e39 is no float32: it becomes inf, refused below
        array = array.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise BadRequest(400, f"expected finite numbers; row {row} has inf or a number too large")
    if width == IMAGE_DIM and (array.min() < 0 or array.max() > 1):
        low, high = float(array.min()), float(array.max())
        raise BadRequest(
            400, f"expected pixels in [0, 1] (divide uint8 by 255), got {low:g} to {high:g}"
        )
    return array
