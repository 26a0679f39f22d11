"""The trained VAE on disk: safetensors with the sizes that rebuild it, never unpickled."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.data import splits
from pipeline.data.weights import load_vae, save_vae
from pipeline.errors import StaleOutputError
from pipeline.vae.model import VAE


def test_missing_weights_name_the_file_and_the_command(tmp_path: Path) -> None:
    from pipeline.data.weights import load_vae
    from pipeline.errors import StaleOutputError

    with pytest.raises(StaleOutputError) as missing:
        load_vae(tmp_path / "vae.safetensors")
    assert str(missing.value) == f"{tmp_path / 'vae.safetensors'}: not found; run `dvc repro train`"


def test_burdas_network_has_two_tanh_layers_each_way_and_round_trips(tmp_path: Path) -> None:
    from pipeline.data.weights import load_vae, save_vae

    model = VAE(hidden_dim=200, latent_dim=50, hidden_layers=2, activation="tanh")
    linear = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linear == [(784, 200), (200, 200), (200, 50), (200, 50), (50, 200), (200, 200),
                      (200, 784)]  # fmt: skip
    assert [type(m) for m in model.encoder[1::2]] == [nn.Tanh, nn.Tanh]
    save_vae(model, tmp_path / "vae.safetensors")
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert (loaded.hidden_layers, loaded.activation) == (2, "tanh")
    z = torch.randn(3, 50)
    assert torch.equal(loaded.decode(z), model.eval().decode(z))


def test_weights_saved_before_layers_were_a_param_load_as_the_labs_network(tmp_path: Path) -> None:
    from pipeline.data.files import write_tensors
    from pipeline.data.weights import load_vae

    model = VAE(hidden_dim=8, latent_dim=2)
    write_tensors(tmp_path / "old.safetensors", model.state_dict(), {"hidden_dim": 8,
                                                                     "latent_dim": 2})  # fmt: skip
    loaded = load_vae(tmp_path / "old.safetensors")
    assert (loaded.hidden_layers, loaded.activation) == (1, "relu")
    assert isinstance(loaded.encoder[1], nn.ReLU)


def test_weights_round_trip_with_their_sizes(tmp_path: Path) -> None:
    model = VAE(hidden_dim=12, latent_dim=3)
    umask = os.umask(0o022)
    try:
        save_vae(model, tmp_path / "vae.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "vae.safetensors").stat().st_mode) == 0o644  # not private
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert (loaded.hidden_dim, loaded.latent_dim) == (12, 3)
    z = torch.randn(4, 3)
    assert torch.equal(loaded.decode(z), model.eval().decode(z))


def test_an_old_pt_output_names_the_file_and_the_command(tmp_path: Path) -> None:
    old = tmp_path / "train.pt"
    torch.save({"images": torch.zeros(1, 28, 28, dtype=torch.uint8)}, old)
    with pytest.raises(StaleOutputError) as raised:
        splits.load_split(tmp_path / "train.safetensors")
    assert str(raised.value) == (
        f"{old} is in the old torch.save format, which this version no longer reads; "
        f"run `dvc repro preprocess` to write {tmp_path / 'train.safetensors'}"
    )
    # Given the old file itself: not unpickled, named, and the command that rewrites it.
    with pytest.raises(StaleOutputError, match=r"train\.pt: not a safetensors file .*dvc repro"):
        splits.load_split(old)


@pytest.mark.parametrize("damage", ["truncated", "hostile pickle"])
def test_a_damaged_weights_file_is_refused_without_unpickling(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "vae.safetensors"
    save_vae(VAE(hidden_dim=8, latent_dim=2), path)
    marker = tmp_path / "pwned"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:

        class Hostile:
            def __reduce__(self):
                return (Path.touch, (marker,))

        torch.save(Hostile(), path)
    with pytest.raises(StaleOutputError, match=r"vae\.safetensors: not a safetensors file"):
        load_vae(path)
    assert not marker.exists()
