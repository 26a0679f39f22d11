"""Servers as child processes: started in a session of their own, waited for, stopped with
everything they started; ports checked and chosen on 127.0.0.1. Not a process library
(mirakuru, psutil): none stops a server when the process that started it dies by kill -9, which
the watchdog here does, and start, wait and stop take fewer lines than adapting one would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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


def start(
    name: str, command: list[str], log: Path, stop_signal: int = signal.SIGTERM, **popen
) -> subprocess.Popen:
    """A server in a session of its own (Ctrl-C reaches us, and we stop it), output to `log`,
    watched by a process that stops it if we end without doing so."""
    with log.open("ab") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    watch(server.pid, stop_signal)
    return server


def watch(server_pid: int, stop_signal: int = signal.SIGTERM) -> None:
    """Start a watchdog that stops the server's process group when this process ends without
    stopping it: SIGTERM from a scheduler or a CI time-out (which runs no cleanup), kill -9."""
    command = [sys.executable, "-m", "pipeline.tools.servers"]
    command += [str(os.getpid()), str(server_pid), str(int(stop_signal))]
    subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server
    )


def watchdog(parent: int, server: int, stop_signal: int) -> None:
    """Wait while both `parent` and the server's group live; if the parent goes first (we are
    handed to another parent then, even while it is a zombie), stop the group as `stop` would."""
    while group_alive(server):
        if os.getppid() != parent:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server, stop_signal)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while group_alive(server) and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server, signal.SIGKILL)
            return
        time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


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
    return last_error_line(log.read_text(errors="replace"))


def last_error_line(text: str) -> str:
    """A program's output: its last error line, or its last line (at most 200 characters)."""
    lines = text.strip().splitlines() or ["no output"]
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


if __name__ == "__main__":
    watchdog(*(int(arg) for arg in sys.argv[1:4]))
