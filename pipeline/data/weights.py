"""The trained VAE on disk: its weights and the sizes that rebuild it, in safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.files import read_tensors, write_tensors
from pipeline.vae.model import VAE


def save_vae(model: VAE, path: Path | str) -> None:
    """The weights plus the arguments that rebuild the network (`model.shape`), in safetensors."""
    write_tensors(path, model.state_dict(), model.shape)


def load_vae(path: Path | str, device: str | torch.device = "cpu") -> VAE:
    state, sizes = read_tensors(path, "dvc repro train", device)
    # Files written before the network had these parameters hold the handout's one relu layer.
    shape = {"hidden_layers": 1, "activation": "relu"} | sizes
    model = VAE(**shape).to(device)
    model.load_state_dict(state)
    return model.eval()
