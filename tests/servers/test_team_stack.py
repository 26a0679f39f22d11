"""Slow: the team stack for real (PostgreSQL, SeaweedFS's S3, `mlflow server`) on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import boto3
import mlflow
import numpy as np
import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers.repo import dvc, git_commit, grid_steps, python_m
from helpers.workdir import trained_run_id
from pipeline.paths import EVAL_METRICS, FIGURES, TRAIN_SPLIT, WEIGHTS
from pipeline.tools.stack import ARTIFACTS, Stack

pytestmark = pytest.mark.slow


def s3_keys(stack: Stack) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": stack.access_key, "AWS_SECRET_ACCESS_KEY": stack.secret_key}


def bucket_keys(stack: Stack, bucket: str, prefix: str) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1", **{
        "aws_access_key_id": stack.access_key, "aws_secret_access_key": stack.secret_key
    })  # fmt: skip
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture(scope="module")
def team_repo(
    reproduced: tuple[Path, str], stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The reproduced repository run again, for 2 epochs, through the stack's MLflow server
    with no S3 credentials: the server proxies the artifacts."""
    repo = tmp_path_factory.mktemp("team") / "repo"
    shutil.copytree(reproduced[0], repo, symlinks=True)
    shutil.rmtree(repo / "mlruns")
    (repo / "mlflow.db").unlink()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    params["evaluate"]["iwae_samples"] = 8
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
    promoted = python_m(team_repo, "pipeline", "promote", MLFLOW_TRACKING_URI=stack.tracking_uri)
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.startswith("keep @champion on v1: version 1 is already champion")

    out = tmp_path / "digits.png"
    made = python_m(
        team_repo, "pipeline", "generate", "-n", "16", "-o", str(out),
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
    pulled = dvc(clone, "pull", **s3_keys(stack))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "Running stage" not in pulled.stdout + pulled.stderr
    for path in (TRAIN_SPLIT, WEIGHTS, EVAL_METRICS, FIGURES / "manifold.png"):
        assert (clone / path).read_bytes() == (team_repo / path).read_bytes(), path
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
