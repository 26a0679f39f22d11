"""What an interrupted run says it keeps, and the optimizer a checkpoint saves."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.checkpoints import kept, portable
from pipeline.vae.history import Epoch
from pipeline.vae.model import VAE
from pipeline.vae.training import make_optimizer


def rows(n: int) -> list[Epoch]:
    return [Epoch(e, 0, 0, 0, 0, 0, 0, 1.0, 0.001) for e in range(1, n + 1)]


def test_an_interrupted_run_names_the_epochs_it_keeps_and_how_to_go_on() -> None:
    path = Path("checkpoints/train.pt")
    assert kept(rows(0), path, "r1") == "no epoch had finished; MLflow run r1 is marked KILLED"
    assert kept(rows(1), path, "r1") == (
        "epoch 1 is kept in checkpoints/train.pt and MLflow run r1 is marked KILLED: run the "
        "same command again to resume"
    )
    assert kept(rows(3), path, "r1").startswith("epochs 1-3 are kept in checkpoints/train.pt ")


def test_a_checkpoint_from_another_model_py_or_history_starts_over_untouched(
    tmp_path: Path, capsys
) -> None:
    import torch

    from pipeline.data.checkpoints import resume_or_start, save_checkpoint
    from pipeline.vae.model import VAE
    from pipeline.vae.training import make_optimizer

    path = tmp_path / "train.pt"
    old = VAE(8, 2)
    save_checkpoint(path, "key", old, make_optimizer(old, 1e-3), rows(2), "r1", 5)
    model = VAE(8, 3)  # model.py changed under the same params: another network
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = resume_or_start(path, "key", 5, model, make_optimizer(model, 1e-3), lambda r: True)
    assert resumed.history == [] and resumed.run_id is None
    assert "its weights are another network's than model.py's" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    state = torch.load(path, weights_only=True)
    state["history"] = [row | {"test_bits": 1.0} for row in state["history"]]  # a new column
    torch.save(state, path)
    resumed = resume_or_start(path, "key", 5, old, make_optimizer(old, 1e-3), lambda r: True)
    assert resumed.history == [] and "other columns than Epoch's" in capsys.readouterr().err


def test_a_graphed_runs_optimizer_is_saved_as_any_device_resumes_it() -> None:
    optimizer = make_optimizer(VAE(hidden_dim=4, latent_dim=2), 1e-3)
    group = optimizer.param_groups[0]
    group["lr"], group["capturable"] = torch.tensor(5e-4), True  # as cuda_graph.py leaves it
    saved = portable(optimizer.state_dict())["param_groups"][0]
    assert saved["lr"] == float(torch.tensor(5e-4)) and type(saved["lr"]) is float
    assert saved["capturable"] is False
    assert group["capturable"] is True  # the running optimizer is left as it is
