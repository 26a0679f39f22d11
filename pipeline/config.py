"""params.yaml -> typed dataclasses, checked by validate.py. The only module that reads params.yaml.

Every section and key is required and checked for type and range; unknown keys are refused, so a
typo in params.yaml or in `dvc exp run -S` fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.validate import parse_sections

PARAMS_FILE = Path("params.yaml")
# libyaml's parser where PyYAML has it: the same rules; params.yaml in 0.7 ms, not 9.6 ms.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
PRESETS = Path(__file__).parent / "presets"  # named sets of overrides, e.g. the paper's protocol


def _check(
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    why: str = "",
):
    """A numeric field's bounds, kept in the field's metadata; `why` explains the upper one."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    return field(metadata=bounds | {"why": why})


# Upper bounds on sizes: every value below them runs through every stage (a test runs each
# bound end to end); above them a run would not fit in memory or would make no sense for MNIST.
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
SCORE_SAMPLES = 10_000  # draws of z per image one score may ask for (the model's own bound)


@dataclass(frozen=True)
class DataConfig:
    source: str  # auto | torchvision | package | a local folder holding the four IDX files
    local_dir: str  # a folder `auto` tries last; "" to skip
    binarize: Literal["none", "dynamic"]
    binarize_seed: int = _check(at_least=0)
    holdout: int = _check(at_least=0)  # the last N training images are not trained on


@dataclass(frozen=True)
class ModelConfig:
    hidden_dim: int = _check(at_least=1, at_most=4096, why="25 MB of weights for 784 pixels")
    latent_dim: int = _check(at_least=1, at_most=256, why="more units than MNIST can use")
    hidden_layers: int = _check(at_least=1, at_most=3, why="the IWAE paper's nets have 2")
    activation: Literal["relu", "tanh"]
    output_bias: Literal["default", "data_mean"]  # data_mean: logit of the mean training pixel


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _check(at_least=1, at_most=10_000, why="the IWAE paper trains 3,280")
    batch_size: int = _check(at_least=1, at_most=TRAIN_IMAGES, why="the training set")
    lr: float = _check(above=0)
    schedule: Literal["constant", "burda"]
    adam_beta1: float = _check(at_least=0, below=1)
    adam_beta2: float = _check(at_least=0, below=1)
    adam_eps: float = _check(above=0)
    adam_v0: float = _check(at_least=0)  # the second moment's start: 0 in Adam, 1 in Burda's code
    seed: int = _check(at_least=0)
    device: Literal["auto", "cpu", "cuda"]
    step: Literal["auto", "fast", "autograd"]
    cuda_graphs: Literal["auto", "on", "off"]
    compile: Literal["off", "on"]


@dataclass(frozen=True)
class EvaluateConfig:
    iwae_samples: int = _check(at_least=1, at_most=10_000, why="the literature uses 5,000")
    batch_size: int = _check(at_least=1, at_most=TEST_IMAGES, why="the test set")
    active_unit_threshold: float = _check(above=0)
    seed: int = _check(at_least=0)
    # The drift monitor's reference profile (tracking/reference.py): a seeded half of the test set
    # at most, so that the other half stays unseen for its operating figures.
    reference_images: int = _check(at_least=10, at_most=TEST_IMAGES // 2, why="half the test set")
    reference_samples: int = _check(at_least=1, at_most=100, why="monitor scores batches alike")


@dataclass(frozen=True)
class SampleConfig:
    n_samples: int = _check(at_least=1, at_most=1024, why="a 32x32 grid")
    n_reconstructions: int = _check(at_least=1, at_most=64, why="one row of the figure")
    manifold_size: int = _check(at_least=2, at_most=50, why="a 50x50 grid")
    interpolation_rows: int = _check(at_least=1, at_most=32, why="rows of one figure")
    interpolation_steps: int = _check(at_least=2, at_most=32, why="columns of one figure")
    seed: int = _check(at_least=0)


def _mlflow_name(refused: str = ""):
    """A name MLflow must accept: not blank, none of the characters in `refused`."""
    return field(metadata={"mlflow_name": True, "refused": refused})


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = _mlflow_name()


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = _mlflow_name(refused="/:")  # MLflow's registry refuses both
    metric: str
    direction: Literal["minimize", "maximize"]
    min_improvement: float = _check(at_least=0)


@dataclass(frozen=True)
class SweepConfig:
    study: str = _mlflow_name()  # the Optuna study and its MLflow parent run; --study overrides
    storage: str  # "" = optuna.db (SQLite) in the repository; or postgresql+psycopg://...
    trials: int = _check(at_least=1, at_most=10_000, why="a study, not a census")
    epochs: int = _check(at_least=1, at_most=100, why="trials are short; the winner trains longer")
    holdout_images: int = _check(at_least=1, below=TRAIN_IMAGES)  # scored, never trained on
    pruner: Literal["median", "none"]
    pruner_startup: int = _check(at_least=0)  # finished trials before pruning starts
    heartbeat_seconds: int = _check(at_least=1, at_most=3600, why="an hour of silence")
    # What the study searches: `section.key` of model or train -> a list to choose from, or a
    # range {low, high, log}; each value is checked as params.yaml's own (typed_space).
    space: dict[str, Any]


@dataclass(frozen=True)
class ServeConfig:
    workers: int = _check(at_least=1, at_most=64, why="processes, each with the model loaded")
    timeout_seconds: float = _check(at_least=0.1, at_most=600, why="a request, not a batch job")
    max_body_bytes: int = _check(at_least=1024, at_most=1 << 30, why="read into memory")
    max_rows: int = _check(at_least=1, at_most=10_000, why="a request, not the test set")
    max_samples: int = _check(at_least=1, at_most=SCORE_SAMPLES, why="the model's own bound")
    max_concurrency: int = _check(at_least=1, at_most=10_000, why="requests held in memory")
    handler: Literal["direct", "mlflow"]  # who answers a checked request (docs/serving.md)
    request_log: str  # "" = off; a JSON-lines file of what was asked and answered
    request_log_bytes: int = _check(at_least=1 << 20, at_most=1 << 40, why="a terabyte")


@dataclass(frozen=True)
class MonitorConfig:
    alpha: float = _check(above=0, below=1)  # the family-wise false-alarm rate (Holm)
    worst_inputs: int = _check(at_least=1, at_most=64, why="one row of the report")


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    sample: SampleConfig
    mlflow: MlflowConfig
    registry: RegistryConfig
    sweep: SweepConfig
    serve: ServeConfig
    monitor: MonitorConfig

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow logs params in."""
        return {
            f"{section}.{key}": value
            for section, values in dataclasses.asdict(self).items()
            for key, value in values.items()
        }


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ConfigError naming the first bad key."""
    return parse_params(read_yaml(Path(path)), source=str(path))


def read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; run from the repository root") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None


def read_preset(name: str) -> dict[str, Any]:
    """pipeline/presets/NAME.yaml: `section.key: value` overrides of params.yaml."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r} in {PRESETS}; see the files there")
    return read_yaml(path)


def load_params_with(overrides: dict[str, Any], what: str, path: Path = PARAMS_FILE) -> Params:
    """params.yaml with `section.key` overrides (`what` names them in errors) applied as `dvc exp
    run -S` applies them, validated like params.yaml itself."""
    raw = read_yaml(path)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not isinstance(raw, dict) or not isinstance(raw.get(section), dict):
            raise ConfigError(f"{what}: {key} names no section of {path}")
        raw[section][name] = value
    return parse_params(raw, source=f"{path} with {what}")


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Check a mapping read from params.yaml against Params; ConfigError names the first bad key."""
    params = parse_sections(Params, raw, source)
    space = typed_space(params.sweep.space, raw, source)
    return dataclasses.replace(params, sweep=dataclasses.replace(params.sweep, space=space))


SEARCHABLE = ("model", "train")  # the sections a sweep may search; sweep.epochs sets the length


def typed_space(space: dict[str, Any], raw: dict, source: str) -> dict[str, Any]:
    """sweep.space with each value checked, and typed, as its param's own in params.yaml: a list
    to choose from, or a range {low, high, log}."""
    typed = {}
    for key, choice in space.items():
        at = f"{source}: sweep.space.{key}"
        section, _, name = key.partition(".")
        if section not in SEARCHABLE or name not in raw[section] or key == "train.epochs":
            raise ConfigError(
                f"{at} names no param the sweep can search; use a key of the "
                f"{' or '.join(SEARCHABLE)} section, e.g. model.latent_dim"
            )
        if isinstance(choice, list) and choice:
            typed[key] = [checked_as(key, value, raw, at) for value in choice]
            continue
        if not isinstance(choice, dict) or not {"low", "high"} <= set(choice) <= RANGE_KEYS:
            raise ConfigError(f"{at} = {choice!r}: give a list of values or {RANGE}")
        low, high = (checked_as(key, choice[end], raw, at) for end in ("low", "high"))
        log = choice.get("log", False)
        if not isinstance(low, int | float) or not isinstance(log, bool) or low >= high:
            raise ConfigError(f"{at} = {choice!r}: a range of a number is {RANGE}")
        if log and low <= 0:
            raise ConfigError(f"{at} = {choice!r}: a log range needs low > 0")
        typed[key] = {"low": low, "high": high, "log": log}
    return typed


def checked_as(key: str, value: Any, raw: dict, at: str) -> Any:
    """`value` checked and typed as params.yaml's `key` (section.name) would be."""
    section, _, name = key.partition(".")
    with_value = {**raw, section: {**raw[section], name: value}}
    return getattr(getattr(parse_sections(Params, with_value, at), section), name)


RANGE_KEYS, RANGE = {"low", "high", "log"}, "{low: L, high: H, log: true} with L < H"


def with_values(params: Params, values: dict[str, Any]) -> Params:
    """`params` with `section.key` values (a trial's choice from sweep.space) in place."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    changed = {section: dataclasses.replace(getattr(params, section), **new)
               for section, new in sections.items()}  # fmt: skip
    return dataclasses.replace(params, **changed)
