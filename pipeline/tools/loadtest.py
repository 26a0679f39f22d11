"""`mnist-vae loadtest`: a bounded load test of `mnist-vae serve` on 127.0.0.1, beside the floor.

It starts the server on a free port, sends `--requests` requests for each method (score, decode),
batch (1, 32 rows) and number of concurrent clients (1, 8, 32), then stops it. Per case: requests
and images a second, p50 and p99 latency, errors; the server's peak memory (the sum of its
processes' high-water RSS); and the floor, the same model's in-process `predict` on the same
batches one after another, with the server's throughput as a share of it. The client runs on the
same machine and takes CPU from the server: the ratios are what one machine does, client and all;
the server's own CPU time per request says how much of it is the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.paths import TEST_SPLIT
from pipeline.tools.servers import stop
from pipeline.vae.model import IMAGE_DIM

METHODS = ("score", "decode")
BATCHES = (1, 32)
CLIENTS = (1, 8, 32)


@dataclass(frozen=True)
class Case:
    method: str
    rows: int
    clients: int
    seconds: float
    latencies: list[float]
    errors: int
    server_cpu_s: float  # CPU time the server's processes spent on the case

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, share: float) -> float:
        """Latency in ms; nan when no request succeeded."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000


def batch(method: str, rows: int, latent_dim: int) -> tuple[np.ndarray, dict]:
    """What one request sends: test digits to score (random pixels without the data), latent
    vectors to decode."""
    rng = np.random.default_rng(0)
    if method == "decode":
        return rng.standard_normal((rows, latent_dim)).astype(np.float32), {"method": "decode"}
    if TEST_SPLIT.exists():
        from pipeline.data.splits import load_split

        images = load_split(TEST_SPLIT)[0][:rows].numpy()
    else:
        images = rng.uniform(size=(rows, IMAGE_DIM)).astype(np.float32)
    return images, {"method": "score", "samples": 1}


async def load(url: str, body: bytes, clients: int, requests: int) -> tuple[list[float], int]:
    try:
        import httpx  # the dev extra
    except ImportError:
        raise PipelineError("httpx is missing: `make venv` installs the dev extra") from None

    latencies: list[float] = []
    errors = 0
    left = requests

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                answer = await session.post(url, content=body, headers=JSON)
                ok = answer.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, errors


JSON = {"Content-Type": "application/json"}


def server_processes(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [pid, *map(int, children.stdout.split())]


def peak_rss_mib(pid: int) -> float:
    """The high-water resident memory of `pid` and its children, summed, in MiB."""
    total = 0
    for each in server_processes(pid):
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its children so far (/proc/PID/stat)."""
    ticks = 0
    for each in server_processes(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def floor_requests_per_s(model, data: np.ndarray, params: dict, repeats: int) -> float:
    """The model's own `predict`, one batch after another: the best of three rounds."""
    model.predict(data, params=params)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            model.predict(data, params=params)
        best = min(best, time.perf_counter() - started)
    return repeats / best


def start_server(model_uri: str, workers: int, handler: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "serve", "--model", model_uri]
    command += ["--port", str(port), "--workers", str(workers), "--handler", handler]
    # Its own process group: `stop` ends the server and its workers together.
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PipelineError(f"mnist-vae serve stopped with exit code {server.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise PipelineError("mnist-vae serve did not answer /ping within 180 s")


def run(model_uri: str, workers: int, handler: str, requests: int) -> str:
    from pipeline.tools.servers import free_port
    from pipeline.tracking import store

    model = store.load_model(model_uri)
    latent_dim = int(model.metadata.metadata["latent_dim"])
    batches = {(m, rows): batch(m, rows, latent_dim) for m in METHODS for rows in BATCHES}
    # The floor first, alone on the machine: nothing else runs while it is timed.
    floors = {
        key: floor_requests_per_s(model, data, params, requests)
        for key, (data, params) in batches.items()
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    server = start_server(model_uri, workers, handler, port)
    cases = []
    try:
        for (method, rows), (data, params) in batches.items():
            body = json.dumps({"inputs": data.tolist(), "params": params}).encode()
            asyncio.run(load(url, body, 1, min(20, requests)))  # warm-up
            for clients in CLIENTS:
                started, cpu = time.perf_counter(), cpu_seconds(server.pid)
                latencies, errors = asyncio.run(load(url, body, clients, requests))
                seconds = time.perf_counter() - started
                used = cpu_seconds(server.pid) - cpu
                cases.append(Case(method, rows, clients, seconds, latencies, errors, used))
        memory = peak_rss_mib(server.pid)
    finally:
        stop(server)
    said = f"mnist-vae serve, {workers} worker(s), handler {handler}, {requests} requests a case"
    return table(cases, floors, f"{said}; server peak memory {memory:.0f} MiB")


def table(cases: list[Case], floors: dict, title: str) -> str:
    lines = [
        title,
        "",
        "| method | rows | clients | req/s | images/s | p50 ms | p99 ms | errors | "
        "server CPU ms/req | floor req/s | server / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        floor = floors[case.method, case.rows]
        lines.append(
            f"| {case.method} | {case.rows} | {case.clients} | {case.requests_per_s:.0f} | "
            f"{case.requests_per_s * case.rows:.0f} | {case.percentile(0.5):.1f} | "
            f"{case.percentile(0.99):.1f} | {case.errors} | "
            f"{case.server_cpu_s / max(1, len(case.latencies)) * 1000:.1f} | {floor:.0f} | "
            f"{case.requests_per_s / floor:.2f} |"
        )
    median = statistics.median(c.requests_per_s / floors[c.method, c.rows] for c in cases)
    lines += ["", f"median server / floor: {median:.2f}"]
    return "\n".join(lines)
