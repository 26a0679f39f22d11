"""Servers as child processes: started in a session of their own, waited for, stopped with
everything they started; ports checked and chosen on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import StackError

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, command: list[str], log: Path, **popen) -> subprocess.Popen:
    """A server in a session of its own (Ctrl-C reaches us, and we stop it), output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server and everything it started; kill it if it has not stopped in time."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(name: str, ready: Callable[[], bool], process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited ({why_it_stopped(log)}); see {log}")
        if ready():
            return
        time.sleep(0.2)
    raise StackError(f"{name} did not start within {START_TIMEOUT_S} s; see {log}")


def why_it_stopped(log: Path) -> str:
    """The log's last error line, or its last line."""
    lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
    errors = [
        line for line in lines if any(w in line for w in ("FATAL", "ERROR", "error", "Error"))
    ]
    return (errors or lines)[-1].strip()[:200]


def check_free(port: int, wanted_for: str) -> None:
    with socket.socket() as s:
        # As the servers bind: connections of a stack just stopped (TIME_WAIT) do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"127.0.0.1:{port}, wanted for {wanted_for}, is in use: stop what listens there "
                "or choose another port (mnist-vae stack --help)"
            ) from None


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # it answered, even if it refuses anonymous requests
    except OSError:
        return False
    return True
