"""The stack's servers: a port in use and a server that exits are named in one line; servers
stop when the process that started them ends without stopping them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tools.postgres import remove_data


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


@pytest.mark.slow
def test_postgres_data_of_another_password_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    from pipeline.errors import StackError
    from pipeline.tools.postgres import pg_home, postgres, service_user
    from pipeline.tools.servers import free_port

    (tmp_path / "logs").mkdir()
    try:
        with postgres(tmp_path, free_port(), "first password"):
            pass
        port = free_port()
        with pytest.raises(StackError) as refused, postgres(tmp_path, port, "another password"):
            pass
    finally:
        remove_data(tmp_path)
    _, data = pg_home(tmp_path, service_user())
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "password authentication failed" in message
    assert message.startswith(f"PostgreSQL on 127.0.0.1:{port} did not let the stack's superuser")
    assert message.endswith(f"if its data in {data} are from a stack with another password, "
                            "remove them")  # fmt: skip


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


STACK_IN_A_PROCESS = """
import json, sys, time
from pathlib import Path
from pipeline.tools.stack import running_stack
with running_stack(Path(sys.argv[1])) as stack:
    print(json.dumps({name: p.pid for name, p in stack.servers.items()}), flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # each server leads a process group of its own
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGKILL])
def test_servers_stop_when_the_process_that_started_them_is_ended(
    tmp_path: Path, ending: signal.Signals
) -> None:
    # tmp_path is under pytest's 0700 root: the stack must start from a private folder too.
    owner = subprocess.Popen(
        [sys.executable, "-c", STACK_IN_A_PROCESS, str(tmp_path / "stack")],
        stdout=subprocess.PIPE,
        text=True,
    )
    servers = json.loads(owner.stdout.readline())
    assert set(servers) == {"PostgreSQL", "SeaweedFS", "MLflow"}
    assert all(alive(pid) for pid in servers.values())
    owner.send_signal(ending)  # no cleanup runs: SIGTERM's default is to die at once
    owner.wait()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in servers.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [name for name, pid in servers.items() if alive(pid)] == []
    remove_data(tmp_path / "stack")
