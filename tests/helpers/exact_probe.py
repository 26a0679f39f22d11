"""A short piece of the real training and evaluation, printed as SHA-256 digests (one JSON line).

Run as a script by tests/test_exact.py, natively and under qemu with another vendor's CPU model:
a few steps of the lab's VAE (params.yaml's sizes) through each training path, then the evaluate
stage's maths, on seeded digit-like images (mostly exact zeros, as MNIST's). Equal digests mean
equal bytes.
"""

# ruff: noqa: I001 (pipeline before torch)
from __future__ import annotations

import hashlib
import json
import sys

from pipeline import runtime  # first: it sets exact mode's environment before torch loads

import torch
from pipeline.config import load_params
from pipeline.vae import training
from pipeline.vae.evaluation import evaluate


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(steps: int, images_used: int) -> dict:
    runtime.start()
    runtime.flush_denormals()
    params = load_params()
    seeded = torch.Generator().manual_seed(0)
    ink = torch.rand(images_used, 784, generator=seeded) < 0.2
    images = ink * torch.rand(images_used, 784, generator=seeded)
    labels = torch.arange(images_used) % 10
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out["threads"] = torch.get_num_threads()
    for name, fast in (("autograd", False), ("fast", True)):
        torch.manual_seed(0)
        model, optimizer = training.vae_and_optimizer(params.model, params.train, images)
        training.train_epoch(
            model, optimizer, images[: steps * params.train.batch_size],
            params.train.batch_size, binarize=False, epoch=1, epochs=1, fast=fast,
        )  # fmt: skip
        out[f"{name}_weights"] = digest(*model.state_dict().values())
    metrics = evaluate(model, images, labels, k=4, batch_size=64, threshold=0.01, seed=0)
    out["evaluate"] = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:16]
    return out


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
