"""`mnist-vae serve`: a registered model over MLflow's `/invocations` protocol, on 127.0.0.1.

MLflow's own scoring server (`mlflow.pyfunc.scoring_server`, FastAPI under uvicorn) answers; this
module puts a guard in front of it and runs it with uvicorn's workers. MLflow's server alone reads
any body into memory, has no bound on the rows or draws one request may ask for, accepts NaN, and
answers a bad request with the whole input echoed back. The guard, before MLflow sees a request:

- refuses a body over `serve.max_body_bytes` (413, unread when Content-Length says so), one that
  takes longer than `serve.timeout_seconds` to arrive (408), and any type but JSON (415);
- parses it and checks what `check_request` lists (400), within `serve.max_rows` and
  `serve.max_samples`;
- replaces any 4xx or 5xx body with one line of at most MESSAGE_CHARS characters, quoting at most
  EXCERPT_CHARS of the input.

A checked request is answered by the model's `predict` on the rows the guard parsed, written with
orjson (`serve.handler: direct`): MLflow's handler would parse them again through pandas and write
the answer with `json`, 30-40 ms of CPU around a 2 ms prediction of 32 digits (docs/serving.md);
`handler: mlflow` hands it to MLflow's handler instead. Connections beyond `serve.max_concurrency`
per worker get 503 from uvicorn at once; a prediction past `serve.timeout_seconds` gets 504. The
model is downloaded once, then each worker loads it from that folder with torch on cores / workers
threads. With `serve.request_log`, every checked request and its answer is kept for
`mnist-vae monitor` (tools/request_log.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.config import ServeConfig
from pipeline.errors import first_line
from pipeline.tools.request_log import RequestLog, check_log, served_model
from pipeline.tools.scoring_requests import MESSAGE_CHARS, BadRequest, check_request, excerpt
from pipeline.tracking.pyfunc import DEFAULT_METHOD

SETTINGS_ENV = "MNIST_VAE_SERVE_SETTINGS"  # how the parent hands the settings to its workers


def error_body(status: int, message: str) -> bytes:
    """MLflow's error shape, {"error_code", "message"}, with the message on one short line."""
    code = "INVALID_PARAMETER_VALUE" if status == 400 else HTTPStatus(status).name
    line = " ".join(message.split())[:MESSAGE_CHARS]
    return json.dumps({"error_code": code, "message": line}).encode()


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class Guard:
    """ASGI middleware in front of MLflow's scoring app: see the module's docstring."""

    def __init__(
        self,
        app: Any,
        settings: ServeConfig,
        model: Any,
        latent_dim: int,
        log: RequestLog | None = None,
    ) -> None:
        self.app, self.settings, self.model, self.latent_dim = app, settings, model, latent_dim
        self.log, self.log_failures = log, 0

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = one_line_errors(send)
        if scope["path"] != "/invocations" or scope["method"] != "POST":
            return await self.app(scope, receive, send)  # /ping, /health, /version; 404, 405
        try:
            check_content_type(scope)
            body = await asyncio.wait_for(
                read_body(scope, receive, self.settings.max_body_bytes),
                self.settings.timeout_seconds,
            )
            # In a thread: parsing 8 MiB must not stall the worker's other connections.
            rows, params = await asyncio.to_thread(
                check_request, body, self.settings, self.latent_dim
            )
            if self.settings.handler == "mlflow":
                await self.keep(rows, params, None)  # MLflow's handler answers: inputs only
                return await self.app(scope, replay(body, receive), send)
            predictions = await self.predict(rows, params)
        except BadRequest as refused:
            return await respond(send, refused.status, str(refused))
        except (asyncio.TimeoutError, TimeoutError):
            return await respond(send, 408, "the body took too long to arrive")
        await self.keep(rows, params, predictions)
        answer = orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)
        await send_json(send, 200, answer)

    async def keep(self, rows: np.ndarray, params: dict, predictions: Any) -> None:
        """The request in `serve.request_log`, when there is one (off by default). A log that
        cannot be written (a full disk) costs the log, not the client's answer."""
        if self.log is None:
            return
        method = params.get("method", DEFAULT_METHOD)
        try:
            await asyncio.to_thread(self.log.append, method, params, rows, predictions)
        except OSError as exc:
            self.log_failures += 1
            if self.log_failures in (1, 10, 100) or self.log_failures % 1000 == 0:
                logging.getLogger(__name__).warning(
                    "serve.request_log %s: %d requests not logged (%s)",
                    self.log.path,
                    self.log_failures,
                    exc.strerror or exc,
                )

    async def predict(self, rows: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """The model on the rows already checked, as MLflow's handler would answer, without
        parsing them again."""
        from mlflow.exceptions import MlflowException

        work = asyncio.to_thread(self.model.predict, rows, params=params)
        try:
            # A prediction past the limit is answered 504; its thread runs on to the end (a
            # thread cannot be stopped), which the bounds on rows and samples keep short.
            predictions = await asyncio.wait_for(work, self.settings.timeout_seconds)
        except (asyncio.TimeoutError, TimeoutError):
            limit = self.settings.timeout_seconds
            raise BadRequest(504, f"the prediction took longer than {limit:g} s") from None
        except MlflowException as exc:  # the model's own checks
            raise BadRequest(400, first_line(exc)) from None
        except Exception as exc:  # a bug: the log keeps its traceback, the client gets a line
            logging.getLogger(__name__).exception("prediction failed")
            raise BadRequest(500, f"the model failed ({type(exc).__name__})") from None
        return np.ascontiguousarray(predictions)


def check_content_type(scope: dict) -> None:
    headers = dict(scope["headers"])
    given = headers.get(b"content-type", b"").decode("latin-1")
    mime, _, rest = given.partition(";")
    charset = rest.strip().lower().removeprefix("charset=") or "utf-8"
    if mime.strip().lower() != "application/json" or charset != "utf-8":
        raise BadRequest(415, f"expected Content-Type application/json, got {excerpt(given)}")


async def read_body(scope: dict, receive: Receive, limit: int) -> bytes:
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"a body of {int(declared)} bytes; this server takes {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"a body over {limit} bytes; this server takes {limit}")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands MLflow's app the body already read, then the connection's own
    messages (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def respond(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    """A JSON error in one line; `headers` are the app's own (Allow on a 405), less the body's."""
    await send_json(send, status, error_body(status, message), headers)


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": head + kept})
    await send({"type": "http.response.body", "body": body})


def one_line_errors(send: Send) -> Send:
    """`send` with any 4xx or 5xx body cut to its message's first line (MLflow echoes the whole
    input, and adds its stack trace)."""
    started: list[dict] = []
    head = bytearray()  # the error body's first 4 KiB hold its message

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            started.append(message)
            if message["status"] < 400:
                await send(message)
            return
        if message["type"] == "http.response.body" and started and started[0]["status"] >= 400:
            head.extend(message.get("body", b"")[: 4096 - len(head)])
            if not message.get("more_body"):
                status, headers = started[0]["status"], started[0].get("headers", [])
                await respond(send, status, error_message(bytes(head)), headers)
            return
        await send(message)

    return wrapped


MESSAGE_FIELD = re.compile(rb'"(?:message|detail)"\s*:\s*"((?:[^"\\]|\\.)*)')


def error_message(body: bytes) -> str:
    """The message of an error body: its JSON `message` (or FastAPI's `detail`), even when the
    body was cut short, else its first line."""
    found = MESSAGE_FIELD.search(body)
    if found:
        try:
            return json.loads(b'"' + found.group(1) + b'"').splitlines()[0]
        except (ValueError, IndexError):
            return found.group(1).decode("utf-8", "replace")
    text = body.decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else HTTPStatus.BAD_REQUEST.phrase


@dataclass(frozen=True)
class Settings:
    model_dir: str
    limits: dict[str, Any]
    threads: int
    model: dict[str, Any]  # what the request log says answered: its URI, version and run


def create_app() -> Guard:
    """uvicorn's factory, once in each worker: the model from the parent's download, guarded."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    from pipeline import runtime

    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    torch.set_num_threads(settings.threads)
    runtime.start()
    model = mlflow.pyfunc.load_model(settings.model_dir)
    latent_dim = int(model.metadata.metadata["latent_dim"])
    app = scoring_server.init(model)  # /ping, /health, /version, and /invocations for `mlflow`
    limits = ServeConfig(**settings.limits)
    log = None
    if limits.request_log:
        log = RequestLog(limits.request_log, limits.request_log_bytes, settings.model)
    return Guard(app, limits, model, latent_dim, log)


def serve(model_uri: str, port: int, settings: ServeConfig, ready: Callable[[], None]) -> None:
    """Download the model once, then run uvicorn with `settings.workers` workers on 127.0.0.1
    until SIGINT or SIGTERM."""
    import uvicorn
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    from pipeline.tools.servers import check_free
    from pipeline.tracking import store

    check_free(port, "mnist-vae serve")
    if settings.request_log:  # the workers' working folder may differ; the file must not
        settings = replace(settings, request_log=str(Path(settings.request_log).resolve()))
        check_log(Path(settings.request_log))
    with tempfile.TemporaryDirectory(prefix="mnist-vae-serve-") as folder:
        # Only downloaded here: loading a model puts its own copy of this package first on
        # sys.path, and the workers, which start from the parent's sys.path, would import that.
        local = store.download_model(model_uri, Path(folder))
        threads = max(1, (os.cpu_count() or 1) // settings.workers)
        named = served_model(model_uri) if settings.request_log else {"uri": model_uri}
        served = Settings(local, asdict(settings), threads, named)
        os.environ[SETTINGS_ENV] = json.dumps(asdict(served))
        timeout = str(math.ceil(settings.timeout_seconds))
        os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = timeout
        ready()
        uvicorn.run(
            "pipeline.tools.serve:create_app",
            factory=True,
            host="127.0.0.1",
            port=port,
            workers=settings.workers,
            limit_concurrency=settings.max_concurrency,
            timeout_keep_alive=5,
            log_level="warning",
        )
