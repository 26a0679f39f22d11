"""Where a run comes from: git commit, data version, torch, device, its name and description, and
MNIST as its dataset inputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import warnings
from pathlib import Path

import mlflow
import torch
import yaml

from pipeline import exact
from pipeline.config import Params
from pipeline.data.files import hash_file, read_tensors
from pipeline.data.mnist import FILES as CANONICAL

# Files DVC rewrites as the pipeline runs, and params.yaml, which `dvc exp run -S` rewrites (every
# param is logged with the run): changing them does not make the code dirty.
DVC_OWNED = ("dvc.lock", "params.yaml", "metrics", "plots", "figures", "reports")


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    excluded = [f":(exclude){path}" for path in DVC_OWNED]
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def this_process(device: torch.device) -> str:
    """The code and machine this process trains with, in one line: what a resumed run records,
    since its tags describe the process that started it."""
    git = git_tags()
    dirty = " (dirty)" if git["git.dirty"] == "true" else ""
    return f"git {git['git.commit']}{dirty}, torch {torch.__version__}, {device}"


def data_version(lock: Path = Path("dvc.lock")) -> str:
    """The processed data's hash as dvc.lock records it ("unknown" outside a DVC run)."""
    try:
        outs = yaml.safe_load(lock.read_text())["stages"]["preprocess"]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "unknown"
    return next((out["md5"] for out in outs if out["path"] == "data/processed"), "unknown")


def run_tags(device: torch.device) -> dict[str, str]:
    tags = {**git_tags(), "torch.version": torch.__version__, "device": str(device)}
    # exact mode and what torch really runs: its vectorised kernels' level and thread count
    tags |= exact.recorded() | {"torch.cpu_capability": torch.backends.cpu.get_cpu_capability()}
    tags["torch.threads"] = str(torch.get_num_threads())
    tags |= {"data.version": data_version(), "dvc.stage": "train"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def run_name(params: Params) -> str:
    """The DVC experiment's name, else what the run is: h400-z20-e10 (-dyn: binarised pixels)."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    model, train = params.model, params.train
    layers = f"x{model.hidden_layers}" if model.hidden_layers > 1 else ""
    name = f"h{model.hidden_dim}{layers}-z{model.latent_dim}-e{train.epochs}"
    return name + ("-dyn" if params.data.binarize == "dynamic" else "")


def describe_training(params: Params) -> str:
    """The run's description (MLflow's note): what was trained, in a sentence."""
    m, t = params.model, params.train
    pixels = "dynamically binarised" if params.data.binarize == "dynamic" else "grey-level"
    hidden = "-".join([str(m.hidden_dim)] * m.hidden_layers)
    schedule = "Burda et al.'s staged schedule from" if t.schedule == "burda" else "constant"
    return (
        f"VAE on MNIST ({pixels} pixels): encoder 784-{hidden}-{m.latent_dim}, decoder "
        f"{m.latent_dim}-{hidden}-784 ({m.activation}); {t.epochs} epochs, batch "
        f"{t.batch_size}, Adam lr {schedule} {t.lr}, seed {t.seed}."
    )


def log_datasets(train_file: Path, test_file: Path) -> None:
    """MNIST train and test as the run's dataset inputs, named by their canonical digests."""
    for name, path, canonical in (
        ("mnist-train", train_file, "train-images-idx3-ubyte"),
        ("mnist-test", test_file, "t10k-images-idx3-ubyte"),
    ):
        tensors, _ = read_tensors(path, "dvc repro preprocess")
        with warnings.catch_warnings():  # MLflow registers local files under two names
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                tensors["images"].numpy(),
                targets=tensors["labels"].numpy(),
                source=str(Path(path).resolve()),
                name=name,
                digest=CANONICAL[canonical]["md5"],
            )
        mlflow.log_input(dataset, context="training" if name == "mnist-train" else "testing")


def file_digest(path: Path) -> str:
    return hash_file(path, hashlib.sha256()).hexdigest()[:16]
