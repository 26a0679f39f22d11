"""`mnist-vae serve`: what its guard refuses (fast, in-process; fuzzed with Hypothesis), then a
real server with a tiny registered model, sent every hostile request over HTTP (slow)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.repo import environment, pipeline_command
from pipeline.config import ServeConfig
from pipeline.tools.scoring_requests import (
    EXCERPT_CHARS,
    MESSAGE_CHARS,
    BadRequest,
    check_request,
)
from pipeline.tools.servers import free_port

LIMITS = ServeConfig(
    workers=1, timeout_seconds=1.0, max_body_bytes=200_000, max_rows=8, max_samples=10,
    max_concurrency=4, handler="direct", request_log="", request_log_bytes=1 << 24,
)  # fmt: skip
LATENT = 4
DIGIT = [0.5] * 784
SECRET = "x" * 5000  # a long run of input: a refusal may echo at most EXCERPT_CHARS of it

# (what is sent, the status, words the one-line reason must hold)
HOSTILE: dict[str, tuple[bytes, int, str]] = {
    "not JSON": (b'{"inputs": [[0.1, 0.2', 400, "expected JSON"),
    "not UTF-8": (b'{"inputs": "\xff\xfe"}', 400, "UTF-8"),
    "a list, not an object": (b"[[0.0, 0.0, 0.0, 0.0]]", 400, "expected a JSON object"),
    "a string": (json.dumps(SECRET).encode(), 400, "expected a JSON object"),
    "no inputs": (b'{"params": {"method": "decode"}}', 400, "exactly one of inputs"),
    "two inputs": (b'{"inputs": [[0,0,0,0]], "instances": [[0,0,0,0]]}', 400, "exactly one"),
    "a dataframe": (b'{"dataframe_split": {"data": [[0,0,0,0]]}}', 400, "unknown key"),
    "an unknown key": (json.dumps({"inputs": [[0] * 4], SECRET: 1}).encode(), 400, "unknown key"),
    "empty rows": (b'{"inputs": []}', 400, "non-empty list"),
    "rows not a list": (json.dumps({"inputs": SECRET}).encode(), 400, "non-empty list"),
    "a wrong width": (b'{"inputs": [[0.0, 0.0, 0.0]]}', 400, "rows of 4 numbers"),
    "ragged rows": (b'{"inputs": [[0,0,0,0], [0,0,0]]}', 400, "rows differ"),
    "one dimension": (b'{"inputs": [0.0, 0.0, 0.0, 0.0]}', 400, "rows of 4 numbers"),
    "three dimensions": (b'{"inputs": [[[0,0,0,0]]]}', 400, "rows of 4 numbers"),
    "strings": (json.dumps({"inputs": [["a"] * 4]}).encode(), 400, "rows of 4 numbers"),
    "nulls": (b'{"inputs": [[null, null, null, null]]}', 400, "rows of 4 numbers"),
    "NaN": (b'{"inputs": [[NaN, 0, 0, 0]]}', 400, "finite"),
    "Infinity": (b'{"inputs": [[0, -Infinity, 0, 0]]}', 400, "finite"),
    "a float32 overflow": (b'{"inputs": [[1e39, 0, 0, 0]]}', 400, "finite"),
    "a huge integer": (b'{"inputs": [[' + b"9" * 400 + b", 0, 0, 0]]}", 400, "finite"),
    "an integer of 5000 digits": (b'{"inputs": [[' + b"9" * 5000 + b"]]}", 400, "finite"),
    "pixels above 1": (
        json.dumps({"inputs": [[2.0] * 784], "params": {"method": "score"}}).encode(),
        400,
        "[0, 1]",
    ),
    "negative pixels": (
        json.dumps({"inputs": [[-0.5] * 784], "params": {"method": "encode"}}).encode(),
        400,
        "[0, 1]",
    ),
    "an unknown method": (
        json.dumps({"inputs": [[0] * 4], "params": {"method": SECRET}}).encode(),
        400,
        "not one of decode",
    ),
    "an unknown param": (
        b'{"inputs": [[0,0,0,0]], "params": {"temperature": 2}}',
        400,
        "unknown param",
    ),
    "params not an object": (b'{"inputs": [[0,0,0,0]], "params": [1]}', 400, "params"),
    "samples a string": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "samples": "9"}}).encode(),
        400,
        "samples must be an integer",
    ),
    "samples true": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "samples": True}}).encode(),
        400,
        "samples must be an integer",
    ),
    "too many samples": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "samples": 10**9}}).encode(),
        400,
        "allows 1 to 10",
    ),
    "zero samples": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "samples": 0}}).encode(),
        400,
        "allows 1 to 10",
    ),
    "a negative seed": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "seed": -1}}).encode(),
        400,
        "seed",
    ),
    "a seed beyond 64 bits": (
        json.dumps({"inputs": [DIGIT], "params": {"method": "score", "seed": 2**70}}).encode(),
        400,
        "seed",
    ),
    "too many rows": (json.dumps({"inputs": [[0] * 4] * 9}).encode(), 400, "at most 8"),
    "inputs an object 990 deep": (
        b'{"inputs": {"a": ' + b"[" * 990 + b"]" * 990 + b"}}",
        400,
        "non-empty list",
    ),
    "a method 990 deep": (
        b'{"inputs": [[0,0,0,0]], "params": {"method": ' + b"[" * 990 + b"]" * 990 + b"}}",
        400,
        "method must be a string",
    ),
    "deep nesting": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "depth limit"),
}


def one_line_and_short(message: str) -> None:
    assert "\n" not in message and len(message) <= MESSAGE_CHARS, message
    assert "x" * (EXCERPT_CHARS + 1) not in message, message


@pytest.mark.parametrize("case", HOSTILE)
def test_the_guard_refuses_each_hostile_request_in_one_short_line(case: str) -> None:
    body, status, words = HOSTILE[case]
    with pytest.raises(BadRequest) as refused:
        check_request(body, LIMITS, LATENT)
    assert refused.value.status == status
    assert words in str(refused.value), str(refused.value)
    one_line_and_short(str(refused.value))


def test_the_guard_passes_each_good_request_as_mlflow_reads_it() -> None:
    rows, params = check_request(b'{"inputs": [[0, 0.5, 1, -3]]}', LIMITS, LATENT)
    assert rows.dtype == np.float32 and rows.shape == (1, 4) and params == {"method": "decode"}
    two = {"inputs": [DIGIT, DIGIT], "params": {"method": "score"}}
    rows, params = check_request(json.dumps(two).encode(), LIMITS, LATENT)
    assert rows.shape == (2, 784) and params["method"] == "score"
    instances = {"instances": [DIGIT], "params": {"method": "encode", "logvar": True}}
    assert check_request(json.dumps(instances).encode(), LIMITS, LATENT)[0].shape == (1, 784)


# No subnormal floats: training in the same process flushes them to zero (torch's
# set_flush_denormal), and Hypothesis refuses to draw floats it cannot represent.
FLOATS = st.floats(allow_subnormal=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | FLOATS | st.integers() | st.text(max_size=50),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(), children),
    max_leaves=40,
)
PLAUSIBLE = st.fixed_dictionaries(
    {"inputs": st.lists(st.lists(FLOATS, min_size=3, max_size=5), max_size=10)},
    optional={
        "params": st.dictionaries(
            st.sampled_from(["method", "samples", "seed", "logvar", "other"]), JSON_VALUES
        )
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=JSON_VALUES | PLAUSIBLE, noise=st.binary(max_size=40))
def test_fuzzed_requests_are_either_good_or_refused_in_one_short_line(request, noise) -> None:
    for body in (json.dumps(request).encode(), noise, json.dumps(request).encode()[:-1]):
        try:
            rows, params = check_request(body, LIMITS, LATENT)
        except BadRequest as refused:
            assert refused.status == 400
            one_line_and_short(str(refused))
            continue
        assert rows.dtype == np.float32 and np.isfinite(rows).all()
        assert 1 <= len(rows) <= LIMITS.max_rows
        assert 1 <= params.get("samples", 1) <= LIMITS.max_samples


# A real server: `python -m pipeline serve` on a tiny registered model.


@pytest.fixture(scope="module")
def server(registered: Path) -> Iterator[str]:
    work = registered
    port = free_port()
    limits = asdict(LIMITS) | {"request_log": "requests.jsonl"}  # what `monitor` reads
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in limits.items()]
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=work, env=environment(), stderr=subprocess.PIPE)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while status(url, "GET", "/ping")[0] != 200:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.5)
    yield url
    process.terminate()
    assert process.wait(30) == 0


def status(url: str, method: str, path: str, body: bytes = b"", **headers: str):
    """(status, body, seconds) of one request; (0, b"", 0) when nothing answers."""
    connection = http.client.HTTPConnection(url, timeout=10)
    started = time.monotonic()
    try:
        connection.request(method, path, body, headers)
        answer = connection.getresponse()
        return answer.status, answer.read(), time.monotonic() - started
    except OSError:
        return 0, b"", 0
    finally:
        connection.close()


def post(url: str, body: bytes, content_type: str = "application/json"):
    return status(url, "POST", "/invocations", body, **{"Content-Type": content_type})


def good(url: str) -> None:
    answer, body, _ = post(url, b'{"inputs": [[0.0, 0.0, 0.0, 0.0]]}')
    assert answer == 200 and np.asarray(json.loads(body)["predictions"]).shape == (1, 784)


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def server_pids(port: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"pipeline serve --port {port}"], capture_output=True)
    parents = [int(pid) for pid in found.stdout.split()]
    children = subprocess.run(["pgrep", "-P", ",".join(map(str, parents))], capture_output=True)
    return parents + [int(pid) for pid in children.stdout.split()]


@pytest.mark.slow
def test_the_server_answers_every_hostile_request_fast_and_keeps_serving(server: str) -> None:
    good(server)
    pids = server_pids(server.split(":")[1])
    before = rss_kib(pids)
    for case, (body, wanted, words) in HOSTILE.items():
        answer, text, seconds = post(server, body)
        if case == "deep nesting":  # 200 kB: over this server's body limit before it is parsed
            wanted, words = 413, "takes 200000"
        assert answer == wanted, (case, text[:200])
        message = json.loads(text)["message"]
        assert words in message and seconds < 2, (case, message, seconds)
        one_line_and_short(message)
        good(server)
    wrong_types = ("text/csv", "application/x-www-form-urlencoded", "", "application/json; x=1")
    for content_type in wrong_types + ("application/json; charset=latin-1",):
        answer, text, _ = post(server, b"a,b\n1,2", content_type)
        assert answer == 415 and b"application/json" in text, content_type
    elsewhere = (
        ("GET", "/invocations", 405), ("DELETE", "/invocations", 405), ("POST", "/admin", 404),
        ("GET", "/../../etc/passwd", 404),
    )  # fmt: skip
    for method, path, wanted in elsewhere:
        answer, text, _ = status(server, method, path, b"")
        assert answer == wanted and len(text) < 200, (method, path, text)
    # Oversized: refused from the Content-Length alone, and when the body runs past the limit.
    big = b'{"inputs": [' + b"0.0, " * 100_000 + b"0.0]}"
    for _ in range(20):
        answer, text, seconds = post(server, big)
        assert answer == 413 and seconds < 2, text[:200]
    assert declared_but_not_sent(server, 10**9) == 413
    assert streamed_past_the_limit(server, LIMITS.max_body_bytes + 100_000) == 413
    assert rss_kib(pids) - before < 100_000, "the server's memory grew by 100 MB"
    good(server)


def streamed_past_the_limit(url: str, length: int) -> int:
    """A chunked body, no Content-Length: the server counts what arrives and stops at its limit."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        head = (
            f"POST /invocations HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        raw.sendall(head.encode())
        chunk = b'{"inputs": [' + b"0.0, " * 2_000
        for _ in range(length // len(chunk) + 1):
            raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        return int(raw.recv(4096).split(b" ")[1])


def declared_but_not_sent(url: str, length: int) -> int:
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        head = (
            f"POST /invocations HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        raw.sendall(head.encode())
        return int(raw.recv(4096).split(b" ")[1])


def stalled_request(server: str) -> socket.socket:
    """A request whose body never finishes: its headers and the first bytes, then nothing."""
    host, port = server.split(":")
    raw = socket.create_connection((host, int(port)), timeout=5)
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\n"
        'Content-Length: 100\r\n\r\n{"inputs": '
    )
    raw.sendall(head.encode())
    return raw


def answer_status(raw: socket.socket) -> int:
    status = int(raw.recv(4096).split(b" ")[1])
    raw.close()
    return status


@pytest.mark.slow
def test_a_body_that_never_finishes_times_out_and_too_many_at_once_get_503(server: str) -> None:
    # uvicorn's limit counts open connections: with --max-concurrency 4, three are let in ...
    admitted = [stalled_request(server) for _ in range(LIMITS.max_concurrency - 1)]
    time.sleep(0.3)
    started = time.monotonic()
    # ... and while they wait, the fourth and fifth connections get 503 at once
    assert [answer_status(stalled_request(server)) for _ in range(2)] == [503, 503]
    assert time.monotonic() - started < 0.5
    assert [answer_status(raw) for raw in admitted] == [408] * len(admitted)  # --timeout-seconds 1
    assert time.monotonic() - started < LIMITS.timeout_seconds + 1
    good(server)


def test_the_flags_are_checked_like_params_yaml(workdir: Path) -> None:
    refused = pipeline_command(workdir, "serve", "--max-rows", "0")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "serve.max_rows" in refused.stderr


def requests_of_every_method() -> list[dict]:
    digits = np.random.default_rng(1).uniform(size=(3, 784)).round(3).tolist()
    z = np.random.default_rng(2).standard_normal((3, LATENT)).tolist()
    return [
        {"inputs": z},
        {"instances": z, "params": {"method": "decode"}},
        {"inputs": digits, "params": {"method": "encode", "logvar": True}},
        {"instances": digits, "params": {"method": "reconstruct"}},
        {"inputs": digits, "params": {"method": "score", "samples": 3, "seed": 7}},
    ]


@pytest.mark.slow
def test_the_direct_handler_answers_what_mlflows_handler_and_the_model_answer(
    registered: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import dataclasses

    import httpx
    import mlflow
    from mlflow.pyfunc import scoring_server

    from pipeline.tools.serve import Guard

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{registered / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    apps = {
        handler: Guard(
            scoring_server.init(model), dataclasses.replace(LIMITS, handler=handler), model, LATENT
        )
        for handler in ("direct", "mlflow")
    }

    async def answer(app: Guard, request: dict) -> np.ndarray:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            got = await client.post("/invocations", json=request)
        assert got.status_code == 200, got.text
        return np.asarray(got.json()["predictions"], dtype=np.float32)

    for request in requests_of_every_method():
        direct, through_mlflow = (asyncio.run(answer(app, request)) for app in apps.values())
        assert np.array_equal(direct, through_mlflow), request.get("params")
        rows = np.asarray(request.get("inputs") or request["instances"], dtype=np.float32)
        in_process = model.predict(rows, params=request.get("params", {}))
        assert np.array_equal(direct, in_process), request.get("params")
        served_status, served, _ = post(server, json.dumps(request).encode())
        assert served_status == 200
        served = np.asarray(json.loads(served)["predictions"], dtype=np.float32)
        assert np.array_equal(served, in_process), request.get("params")


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=JSON_VALUES | PLAUSIBLE)
def test_fuzzed_requests_get_an_answer_or_a_short_refusal_from_the_live_server(
    server: str, request
) -> None:
    answer, text, seconds = post(server, json.dumps(request).encode())
    assert answer in (200, 400) and seconds < 2, (answer, text[:200])
    if answer == 400:
        one_line_and_short(json.loads(text)["message"])


@pytest.mark.slow
def test_the_request_log_round_trips_into_monitor(
    server: str, registered: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pipeline import commands
    from pipeline.data.splits import load_split
    from pipeline.paths import TEST_SPLIT
    from pipeline.tools.request_log import decode_array, read_requests

    digits = load_split(registered / TEST_SPLIT)[0][:32].numpy()
    answers = []
    for rows in np.split(digits, 4):  # four requests of max_rows images
        body = {"inputs": rows.tolist(), "params": {"method": "score", "samples": 2}}
        answer, text, _ = post(server, json.dumps(body).encode())
        assert answer == 200
        answers.append(np.asarray(json.loads(text)["predictions"], dtype=np.float32))
    log = registered / "requests.jsonl"
    logged = read_requests(log, last=4)
    assert np.array_equal(logged.images, digits)
    assert logged.models == ["models:/mnist-vae@champion version 1"]
    records = [json.loads(line) for line in log.read_text().splitlines()[-4:]]
    outputs = [decode_array(r["outputs"]) for r in records]
    assert all(np.array_equal(a, b) for a, b in zip(answers, outputs, strict=True))
    assert {r["params"]["samples"] for r in records} == {2}
    monkeypatch.chdir(registered)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exited:
        commands.main(["monitor", "--input", str(log), "--last", "4", "--no-log"])
        raise SystemExit(0)  # no drift: main returns
    printed = capsys.readouterr().out
    assert exited.value.code in (0, 1), printed
    assert f"{log} (4 requests, last 4 requests)" in printed
    report = json.loads((registered / "monitor-report" / "report.json").read_text())
    assert report["verdict"]["images"] == 32
    assert report["served_by"] == ["models:/mnist-vae@champion version 1"]


def test_a_request_log_that_cannot_be_written_costs_the_log_not_the_answer(tmp_path: Path) -> None:
    import asyncio

    import httpx

    from pipeline.errors import PipelineError
    from pipeline.tools.request_log import RequestLog, check_log
    from pipeline.tools.serve import Guard

    class Decoder:
        def predict(self, rows: np.ndarray, params: dict | None = None) -> np.ndarray:
            return np.zeros((len(rows), 784), dtype=np.float32)

    blocked = tmp_path / "requests.jsonl"
    blocked.mkdir()  # a folder where the file should be: every append fails
    guard = Guard(None, LIMITS, Decoder(), LATENT, RequestLog(blocked, 1 << 20, {"uri": "m"}))

    async def post_one() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/invocations", json={"inputs": [[0.0] * LATENT]})

    answer = asyncio.run(post_one())
    assert answer.status_code == 200 and len(answer.json()["predictions"][0]) == 784
    assert guard.log_failures == 1
    # serve refuses such a log at start, in one line naming the key
    with pytest.raises(PipelineError, match=r"^serve.request_log .*: cannot be written"):
        check_log(blocked)
    with pytest.raises(PipelineError, match=r"name it \*\.jsonl"):
        check_log(tmp_path / "requests.log")
