"""Every size bound of params.yaml runs through every stage."""

import math
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.repo import FIGURE_NAMES
from pipeline.config import load_params
from pipeline.data.splits import load_split, save_split
from pipeline.paths import TEST_SPLIT
from pipeline.stages import train as train_stage
from pipeline.stages.evaluate import run_evaluation
from pipeline.stages.sample import run_sampling


def size_bounds(bound: str) -> dict[str, dict[str, int]]:
    """Every bounded size in config.py at its smallest or largest accepted value (epochs: 1)."""
    import dataclasses
    import typing

    from pipeline.config import Params

    chosen = {}
    for section, kind in typing.get_type_hints(Params).items():
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            if f.metadata.get("at_most") is not None and f.name != "epochs":
                value = f.metadata["at_least"] if bound == "smallest" else f.metadata["at_most"]
                listed = typing.get_origin(hints[f.name]) is list  # sweep's choices: [value]
                chosen.setdefault(section, {})[f.name] = [value] if listed else value
    chosen["train"]["epochs"] = 1
    return chosen


@pytest.mark.parametrize(
    "bound",
    ["smallest", pytest.param("largest", marks=pytest.mark.slow)],
)
def test_every_size_bound_config_accepts_runs_through_every_stage(
    workdir: Path, set_params, bound: str
) -> None:
    import yaml

    from pipeline.config import parse_params
    from pipeline.errors import ConfigError

    bounds = size_bounds(bound)
    assert {key for values in bounds.values() for key in values} >= {
        "hidden_dim", "latent_dim", "batch_size", "iwae_samples", "n_samples", "manifold_size",
        "trials",
    }  # fmt: skip
    set_params(workdir, **bounds)
    params = load_params()
    # Each bound is where validation stops: one step beyond it is refused.
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in bounds.items():
        for key, value in values.items():
            if key == "epochs":
                continue
            beyond = yaml.safe_load(yaml.safe_dump(raw))
            step = -1 if bound == "smallest" else 1
            beyond[section][key] = [value[0] + step] if isinstance(value, list) else value + step
            with pytest.raises(ConfigError, match=f"{section}.{key} = "):
                parse_params(beyond)
    train_stage.train(params)
    with few_test_images(2 if bound == "largest" else None):
        metrics = run_evaluation(params)
    assert math.isfinite(metrics["test_loss"]) and math.isfinite(metrics["log_px_iwae"])
    assert set(run_sampling(params)) == FIGURE_NAMES


@contextmanager
def few_test_images(n: int | None):
    """The test split cut to its first `n` images while evaluate runs: at the largest bounds the
    size of the network and of k (10,000 samples an image, in chunks) is the point, not the
    images (on the 2-core AMD machine, 2026-12-04: all 64, 470 s; 4, 54 s; 2, 38 s, the fewest
    that leave the reference profile, half the test split, an image); the sample stage's figures
    then get the whole split back."""
    if n is None:
        yield
        return
    kept = TEST_SPLIT.read_bytes()
    images, labels = load_split(TEST_SPLIT)
    save_split(TEST_SPLIT, (images[:n] * 255).round(), labels[:n])
    try:
        yield
    finally:
        TEST_SPLIT.write_bytes(kept)
