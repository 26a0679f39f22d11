"""Slow: the team stack for real (PostgreSQL, SeaweedFS's S3, `mlflow server`) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import psycopg
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from helpers.repo import (
    LOGINS_WORK,
    FirstStart,
    dvc,
    environment,
    experiments_search,
    git_commit,
    grid_steps,
    login_statuses,
    pipeline_command,
    status_of,
    wait_for,
)
from helpers.workdir import trained_run_id
from pipeline.paths import EVAL_METRICS, FIGURES, TRAIN_SPLIT, WEIGHTS
from pipeline.tools.servers import free_port
from pipeline.tools.stack import ARTIFACTS, Stack

pytestmark = pytest.mark.slow


def s3_keys(stack: Stack, role: str = "writer") -> dict[str, str]:
    env = stack.client_env(role)
    return {key: env[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def bucket_keys(stack: Stack, bucket: str, prefix: str) -> set[str]:
    """The objects under `prefix`, seen as the operator (the server's keys reach every bucket)."""
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1", **{
        "aws_access_key_id": stack.keys["server_access_key"],
        "aws_secret_access_key": stack.keys["server_secret_key"],
    })  # fmt: skip
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture(scope="module")
def team_repo(
    reproduced: tuple[Path, str], stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The reproduced repository run again, a small model for 2 epochs, through the stack's
    MLflow server with no S3 credentials: the server proxies the artifacts."""
    repo = tmp_path_factory.mktemp("team") / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    shutil.rmtree(repo / "mlruns")
    (repo / "mlflow.db").unlink()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    params["evaluate"]["iwae_samples"] = 8
    # a narrow network on the first 10,000 digits: what is tested is the stack, not the model
    params["model"]["hidden_dim"] = 64
    params["data"]["holdout"] = 50000
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(repo, "two epochs")
    result = dvc(repo, "repro", MLFLOW_TRACKING_URI=stack.tracking_uri)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'train'" in result.stdout
    return repo


def test_runs_grids_and_the_model_go_to_postgres_and_s3_through_the_server(
    team_repo: Path, stack: Stack
) -> None:
    run_id = trained_run_id(team_repo, stack.tracking_uri)
    client = MlflowClient(stack.tracking_uri)
    for key in ("train/loss", "train/kl", "test/loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert grid_steps(client, run_id) == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run_id, "figures")} >= {
        "figures/generated.png",
        "figures/manifold.png",
    }
    assert "evaluate/log_px_iwae" in client.get_run(run_id).data.metrics
    assert not (team_repo / "mlruns").exists() and not (team_repo / "mlflow.db").exists()

    # The run and the registry are rows in PostgreSQL, the artifacts objects in the bucket.
    with psycopg.connect(stack.postgres_uri.replace("+psycopg", "")) as db:
        assert db.execute("SELECT status FROM runs WHERE run_uuid = %s", [run_id]).fetchone() == (
            "FINISHED",
        )
        assert db.execute("SELECT name FROM registered_models").fetchall() == [("mnist-vae",)]
    experiment_id = client.get_run(run_id).info.experiment_id
    bucket, prefix = ARTIFACTS.removeprefix("s3://").split("/", 1)
    stored = bucket_keys(stack, bucket, f"{prefix}/{experiment_id}/{run_id}/artifacts/")
    names = {key.split("/artifacts/", 2)[-1] for key in stored}
    assert {"figures/manifold.png", "weights/vae.safetensors"} <= names
    assert any(name.startswith("images/generated+step+2") for name in names)
    assert any(name.endswith("MLmodel") for name in bucket_keys(stack, bucket, prefix))


def test_the_registry_promote_and_generate_work_through_the_server(
    team_repo: Path, stack: Stack, tmp_path: Path
) -> None:
    client = MlflowClient(stack.tracking_uri)
    for alias in ("candidate", "champion"):
        assert client.get_model_version_by_alias("mnist-vae", alias).version == "1"
    promoted = pipeline_command(team_repo, "promote", MLFLOW_TRACKING_URI=stack.tracking_uri)
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("keep @champion on v1: version 1 is already champion")

    out = tmp_path / "digits.png"
    made = pipeline_command(
        team_repo, "generate", "-n", "16", "-o", str(out),
        MLFLOW_TRACKING_URI=stack.tracking_uri,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    mlflow.set_tracking_uri(stack.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
    assert model.predict(np.zeros((2, 20), dtype=np.float32)).shape == (2, 784)


def test_a_dvc_remote_on_s3_restores_everything_in_a_fresh_clone(
    team_repo: Path, stack: Stack, tmp_path: Path
) -> None:
    assert dvc(team_repo, "remote", "add", "-d", "team", "s3://dvc/mnist-vae").returncode == 0
    modified = dvc(team_repo, "remote", "modify", "team", "endpointurl", stack.s3_endpoint)
    assert modified.returncode == 0, modified.stderr
    git_commit(team_repo, "results and the team's remote")
    pushed = dvc(team_repo, "push", **s3_keys(stack))
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert bucket_keys(stack, "dvc", "mnist-vae/files/md5/")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(team_repo), str(clone)], check=True)
    # Credentials do not travel with a clone: without them in the environment, DVC says so.
    refused = dvc(clone, "pull", AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    assert refused.returncode != 0
    assert "Unable to locate credentials" in refused.stdout + refused.stderr
    pulled = dvc(clone, "pull", **s3_keys(stack, "reader"))  # read-only keys suffice
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "Running stage" not in pulled.stdout + pulled.stderr
    for path in (TRAIN_SPLIT, WEIGHTS, EVAL_METRICS, FIGURES / "manifold.png"):
        assert (clone / path).read_bytes() == (team_repo / path).read_bytes(), path
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout


# The login: MLflow's basic-auth app, tested as MLflow tests it, against the live server.


def login(monkeypatch: pytest.MonkeyPatch, stack: Stack, role: str) -> MlflowClient:
    for key, value in stack.client_env(role).items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(stack.tracking_uri)
    return MlflowClient(stack.tracking_uri)


def test_anonymous_requests_and_the_old_default_admin_password_are_refused(stack: Stack) -> None:
    search = experiments_search(stack.tracking_uri)
    assert status_of(search) == 401
    assert status_of(stack.tracking_uri + "/") == 401  # the UI too
    assert status_of(search, ("admin", "password1234")) == 401
    assert status_of(search, ("writer", "not-the-password")) == 401
    assert status_of(search, ("writer", stack.keys["writer_password"])) == 200
    assert status_of(f"{stack.tracking_uri}/health") == 200  # for load balancers, nothing else


def test_the_users_table_is_in_postgresql_with_hashed_passwords(stack: Stack) -> None:
    uri = stack.postgres_uri.replace("+psycopg", "").replace("/mlflow", "/mlflow_auth")
    with psycopg.connect(uri) as db:
        users = dict(db.execute("SELECT username, password_hash FROM users").fetchall())
    assert {"admin", "writer", "reader"} <= set(users)
    for name, hashed in users.items():
        assert stack.keys.get(f"{name}_password", "?") not in hashed


def test_the_reader_browses_runs_and_loads_the_champion_but_cannot_promote_or_delete(
    team_repo: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer (the session's login) registers the run's model again: a candidate to promote.
    writer = MlflowClient(stack.tracking_uri)
    first = writer.get_model_version("mnist-vae", "1")
    second = writer.copy_model_version("models:/mnist-vae/1", "mnist-vae")
    for key, value in first.tags.items():
        writer.set_model_version_tag("mnist-vae", second.version, key, value)
    writer.set_registered_model_alias("mnist-vae", "candidate", second.version)
    try:
        as_reader = stack.client_env("reader")
        promoted = pipeline_command(team_repo, "promote", "--force", **as_reader)
        assert promoted.returncode == 1, promoted.stdout
        assert promoted.stderr.count("\n") == 1, promoted.stderr
        assert "does not let user 'reader'" in promoted.stderr
        assert stack.tracking_uri in promoted.stderr and ".stack/writer.env" in promoted.stderr
        assert writer.get_model_version_by_alias("mnist-vae", "champion").version == "1"
        made = pipeline_command(team_repo, "generate", "-n", "4", "-o", "r.png", **as_reader)
        assert made.returncode == 0, made.stderr

        client = login(monkeypatch, stack, "reader")
        run_id = trained_run_id(team_repo, stack.tracking_uri)
        assert client.get_run(run_id).data.metrics["train/loss"] > 0
        model = mlflow.pyfunc.load_model("models:/mnist-vae@champion")
        assert model.predict(np.zeros((2, 20), dtype=np.float32)).shape == (2, 784)
        with pytest.raises(MlflowException, match="403"):
            client.delete_run(run_id)
        with pytest.raises(MlflowException, match="403"):
            client.set_registered_model_alias("mnist-vae", "champion", second.version)
        assert client.get_run(run_id).info.lifecycle_stage == "active"
    finally:
        monkeypatch.undo()  # the writer's login again
        writer.set_registered_model_alias("mnist-vae", "candidate", "1")


@pytest.mark.parametrize("password", ["wrong", None])
def test_a_wrong_or_missing_password_is_one_line_naming_the_server_and_the_variables(
    team_repo: Path, stack: Stack, password: str | None
) -> None:
    env = stack.client_env("writer") | {"MLFLOW_TRACKING_PASSWORD": password or ""}
    if password is None:
        env["MLFLOW_TRACKING_USERNAME"] = ""
    for command in (["promote", "--dry-run"], ["generate", "-n", "1", "-o", "x.png"]):
        refused = pipeline_command(team_repo, *command, **env)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.count("\n") == 1, refused.stderr
        line = refused.stderr
        assert stack.tracking_uri in line and "401" in line, line
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line


def test_a_new_user_gets_nothing_it_was_not_given(
    team_repo: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Imported here, not at the top: the fast loop collects this module too.
    from mlflow.server.auth.client import AuthServiceClient

    admin = {"MLFLOW_TRACKING_USERNAME": "admin"}
    admin["MLFLOW_TRACKING_PASSWORD"] = stack.keys["admin_password"]
    with monkeypatch.context() as as_admin:
        for key, value in admin.items():
            as_admin.setenv(key, value)
        AuthServiceClient(stack.tracking_uri).create_user("newcomer", "a-long-enough-pass-123")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "newcomer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-enough-pass-123")
    client = MlflowClient(stack.tracking_uri)
    assert client.search_experiments() == []
    assert client.search_registered_models() == []
    with pytest.raises(MlflowException, match="403"):
        client.get_model_version_by_alias("mnist-vae", "champion")


def test_secrets_stay_in_0600_files_off_command_lines_and_out_of_logs(stack: Stack) -> None:
    secrets = [v for k, v in stack.keys.items() if "password" in k or "secret" in k]
    for name in ("credentials.json", "pgpass", "auth.ini", "s3.json", "writer.env", "reader.env"):
        assert (stack.root / name).stat().st_mode & 0o777 == 0o600, name
    for server in stack.servers.values():
        command_line = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert not [s for s in secrets if s in command_line]
    for log in (stack.root / "logs").iterdir():
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], log


def test_the_reader_scores_and_serves_the_champion_from_the_server(
    team_repo: Path, stack: Stack, tmp_path: Path
) -> None:
    as_reader = stack.client_env("reader")
    digits = tmp_path / "digits.npy"
    np.save(digits, np.zeros((3, 28, 28), dtype=np.uint8))
    out = tmp_path / "scores.csv"
    scored = pipeline_command(
        team_repo, "score", "--input", str(digits), "-o", str(out), **as_reader
    )
    assert scored.returncode == 0, scored.stderr
    assert len(out.read_text().splitlines()) == 1 + 3

    port = free_port()
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port), "--workers", "1"]
    env = environment(**as_reader)
    server = subprocess.Popen(command, cwd=team_repo, env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, 120)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": [[0.0] * 20]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert len(json.loads(answer.read())["predictions"][0]) == 784
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_each_users_s3_keys_reach_only_what_its_role_needs(stack: Stack) -> None:
    from botocore.exceptions import ClientError

    def writes(role: str, bucket: str) -> bool:
        keys = s3_keys(stack, role)
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1", **{
            "aws_access_key_id": keys["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": keys["AWS_SECRET_ACCESS_KEY"],
        })  # fmt: skip
        try:
            s3.put_object(Bucket=bucket, Key="probe/written-by-a-test", Body=b"x")
        except ClientError:
            return False
        s3.delete_object(Bucket=bucket, Key="probe/written-by-a-test")
        return True

    assert writes("writer", "dvc")
    assert not writes("writer", "mlflow")  # logged models change only through MLflow's server
    assert not writes("reader", "dvc") and not writes("reader", "mlflow")


def test_a_second_start_keeps_the_users_their_rights_and_their_passwords(
    first_start: FirstStart, stack: Stack
) -> None:
    # `stack` is the second start on the first's root (conftest.py): the first start's passwords
    # still log in, and its experiment, run and artifact are still in PostgreSQL and S3.
    assert stack.keys == first_start.keys
    assert login_statuses(stack.tracking_uri, first_start.keys) == LOGINS_WORK
    client = MlflowClient(stack.tracking_uri)  # as the writer
    assert client.get_experiment_by_name("mnist-vae").experiment_id == first_start.experiment_id
    assert client.get_run(first_start.run_id).info.run_name == "before-the-restart"
    kept = client.download_artifacts(first_start.run_id, "marker.txt")
    assert Path(kept).read_text() == "written before the restart"
