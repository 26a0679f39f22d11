"""The stack's servers: a port in use and a server that exits are named in one line."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest


def test_the_stack_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    from pipeline.errors import StackError
    from pipeline.tools.stack import running_stack

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StackError) as refused, running_stack(tmp_path, mlflow_port=port):
            pass
    assert str(refused.value) == (
        f"127.0.0.1:{port}, wanted for MLflow, is in use: stop what listens there or choose "
        "another port (mnist-vae stack --help)"
    )
    assert list(tmp_path.iterdir()) == []  # no data folder, no keys, no server


def test_a_server_that_exits_is_reported_with_its_last_error_line(tmp_path: Path) -> None:
    from pipeline.errors import StackError
    from pipeline.tools.servers import start, wait_until

    log = tmp_path / "server.log"
    script = "print('starting'); print('FATAL: could not bind 127.0.0.1:5433'); print('shut down')"
    server = start("test", [sys.executable, "-c", script], log)
    with pytest.raises(StackError) as failed:
        wait_until("the server", lambda: False, server, log)
    assert str(failed.value) == (
        f"the server exited (FATAL: could not bind 127.0.0.1:5433); see {log}"
    )
