"""Typed checks of a YAML mapping against frozen dataclasses: every key required, no unknown one,
each value's type, range and MLflow-name rules from its field; one line naming the first bad key.

`config.py` declares what params.yaml holds; this is how it is checked. Not pydantic (installed
with MLflow): its messages would need a table of some fifteen error types to keep saying, in one
line, the key, the value, the rule and the bound's reason (`must be <= 4096 (25 MB of weights for
784 pixels)`), which is about what this module is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Literal

from pipeline.errors import ConfigError

YAML_SWITCHES = {True: "on", False: "off"}


def parse_sections(cls: type, raw: Any, source: str) -> Any:
    """`raw`, a mapping of sections, as the frozen dataclass `cls` whose fields are sections."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = type_hints(cls)
    _refuse_unknown(raw, sections, source, prefix="")
    values = {}
    for name in sections:
        if name not in raw:
            raise ConfigError(f"{source}: missing section '{name}'; add it (see the README)")
        values[name] = _parse_section(sections[name], raw[name], source, name)
    return cls(**values)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The dataclass's resolved annotations, once per class: resolving them parses each one
    again, and the tests and commands validate params.yaml thousands of times."""
    return typing.get_type_hints(cls)


def _refuse_unknown(raw: dict, allowed: dict, source: str, prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'; allowed: {', '.join(allowed)}"
            )


def _parse_section(cls: type, raw: Any, source: str, section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    _refuse_unknown(raw, fields, source, prefix=f"{section}.")
    values = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in raw:
            raise ConfigError(f"{source}: missing key '{key}'; add it (see the README)")
        values[name] = _parse_value(hints[name], raw[name], f"{source}: {key}", f.metadata)
    return cls(**values)


def _parse_value(kind: Any, value: Any, key: str, limits: Any) -> Any:
    if typing.get_origin(kind) is dict:  # a non-empty mapping; config.py checks its entries
        if not isinstance(value, dict) or not value:
            raise ConfigError(
                f"{key} = {value!r} must be a mapping, e.g. {{model.latent_dim: [10, 20]}}"
            )
        return value
    if typing.get_origin(kind) is list:  # a non-empty list of values, each checked as one
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key} = {value!r} must be a list of values, e.g. [64, 128]")
        (item,) = typing.get_args(kind)
        return [_parse_value(item, v, key, limits) for v in value]
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        # YAML 1.1 (PyYAML, and DVC's `exp run -S`) reads a bare on / off as true / false.
        if isinstance(value, bool) and YAML_SWITCHES[value] in allowed:
            value = YAML_SWITCHES[value]
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; use one of: {', '.join(allowed)}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} must be a string")
        if limits.get("mlflow_name"):
            _check_name(value, key, limits["refused"])
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} must be an integer")
    elif kind is float:
        # PyYAML (YAML 1.1) reads `1e-3` as a string; accept any float literal.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} = {value!r} must be a number") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{key} = {value!r} must be a finite number")
        value = float(value)
    _check_range(value, key, limits)
    return value


def _check_name(value: str, key: str, refused: str) -> None:
    if not value.strip() or value != value.strip():
        raise ConfigError(f"{key} = {value!r} is not a usable MLflow name; give a name without "
                          "leading or trailing spaces")  # fmt: skip
    bad = sorted(set(refused) & set(value))
    if bad:
        raise ConfigError(
            f"{key} = {value!r}: MLflow refuses {' and '.join(repr(c) for c in bad)} in names; "
            "choose another name"
        )


def _check_range(value: float, key: str, limits: Any) -> None:
    at_least, above, at_most = limits.get("at_least"), limits.get("above"), limits.get("at_most")
    below = limits.get("below")
    if at_least is not None and value < at_least:
        raise ConfigError(f"{key} = {value!r} is out of range; must be >= {at_least}")
    if above is not None and value <= above:
        raise ConfigError(f"{key} = {value!r} is out of range; must be > {above}")
    if below is not None and value >= below:
        raise ConfigError(f"{key} = {value!r} is out of range; must be < {below}")
    if at_most is not None and value > at_most:
        raise ConfigError(
            f"{key} = {value!r} is out of range; must be <= {at_most} ({limits['why']})"
        )
