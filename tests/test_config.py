import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.repo import committed_params
from pipeline.config import Params, load_params, parse_params
from pipeline.errors import ConfigError


def default_raw() -> dict:
    return yaml.safe_load(committed_params())


def test_the_lab_params_are_valid(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(committed_params())
    params = load_params(tmp_path / "params.yaml")
    assert isinstance(params, Params)
    assert (params.model.hidden_dim, params.model.latent_dim) == (400, 20)
    assert params.train.lr == 0.001 and params.train.batch_size == 128
    assert params.flat()["train.epochs"] == 10


def test_float_written_in_exponent_form_is_accepted() -> None:
    raw = default_raw()
    raw["train"]["lr"] = "1e-3"  # how PyYAML reads `lr: 1e-3`
    assert parse_params(raw).train.lr == 0.001


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "epochs", "ten", r"train.epochs = 'ten' must be an integer"),
        ("train", "epochs", True, r"train.epochs = True must be an integer"),
        ("train", "lr", "fast", r"train.lr = 'fast' must be a number"),
        ("train", "epochs", 0, r"train.epochs = 0 is out of range; must be >= 1"),
        ("train", "lr", -0.1, r"train.lr = -0.1 is out of range; must be > 0"),
        (
            "train",
            "device",
            "tpu",
            r"train.device = 'tpu' is not allowed; use one of: auto, cpu, cuda",
        ),
        ("mlflow", "experiment", 3, r"mlflow.experiment = 3 must be a string"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(section, key, value, message) -> None:
    raw = default_raw()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_unknown_key_is_refused() -> None:
    raw = default_raw()
    raw["train"]["learning_rate"] = 0.01
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'; allowed: epochs"):
        parse_params(raw)


def test_unknown_section_is_refused() -> None:
    raw = default_raw()
    raw["optimiser"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser'"):
        parse_params(raw)


def test_missing_section_and_key_are_named() -> None:
    raw = default_raw()
    del raw["model"]
    with pytest.raises(ConfigError, match=r"missing section 'model'"):
        parse_params(raw)
    raw = default_raw()
    del raw["model"]["latent_dim"]
    with pytest.raises(ConfigError, match=r"missing key 'model.latent_dim'"):
        parse_params(raw)


def test_unparsable_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [10\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML at line \d"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")


def test_stage_exits_2_with_one_line_and_touches_no_output(tmp_path: Path) -> None:
    raw = default_raw()
    raw["data"]["source"] = 42
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    existing = tmp_path / "data" / "raw" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"kept")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.download"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: data.source = 42 must be a string"
    assert existing.read_bytes() == b"kept"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_the_sweep_space_is_typed_and_each_value_checked_as_its_own_param() -> None:
    raw = default_raw()
    raw["sweep"]["space"] = {"train.lr": {"low": "1e-4", "high": "3e-3"}, "train.adam_v0": ["one"]}
    with pytest.raises(ConfigError, match=r"adam_v0 = 'one' must be a number"):
        parse_params(raw)  # a list value is checked as the param's own
    raw["sweep"]["space"]["train.adam_v0"] = ["1e-1", 1]
    space = parse_params(raw).sweep.space
    assert space == {"train.lr": {"low": 1e-4, "high": 3e-3, "log": False},
                     "train.adam_v0": [0.1, 1.0]}  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"model.hidden_dim": [400, 5000]}, r"sweep.space.model.hidden_dim: model.hidden_dim "
                                            r"= 5000 is out of range; must be <= 4096"),
        ({"model.width": [400]}, r"sweep.space.model.width names no param the sweep can search"),
        ({"sweep.trials": [4]}, r"sweep.space.sweep.trials names no param the sweep can search"),
        ({"train.epochs": [4]}, r"sweep.space.train.epochs names no param the sweep can search"),
        ({"train.lr": {"low": 0.1, "high": 0.01}}, r"a range of a number is \{low: L, high: H"),
        ({"train.lr": {"low": 0.1}}, r"give a list of values or \{low: L, high: H"),
        ({"train.lr": []}, r"give a list of values or"),
        ({"model.activation": {"low": "relu", "high": "tanh"}}, "a range of a number"),
    ],
)  # fmt: skip
def test_a_bad_sweep_space_entry_is_one_line_naming_it(entry: dict, message: str) -> None:
    raw = default_raw()
    raw["sweep"]["space"] = entry
    with pytest.raises(ConfigError, match=message) as refused:
        parse_params(raw)
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize(
    "choice", [{"low": 0, "high": 0.9, "log": True}, {"low": 0.1, "high": 0.9, "log": 1}]
)
def test_a_log_range_needs_a_positive_low_end_and_log_a_boolean(choice: dict) -> None:
    raw = default_raw()
    raw["sweep"]["space"] = {"train.adam_beta1": choice}
    with pytest.raises(ConfigError, match=r"sweep.space.train.adam_beta1 = .*(low > 0|a range)"):
        parse_params(raw)
