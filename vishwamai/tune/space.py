"""The search space: declared once in config, translated for every backend.

`tuning.search_space` maps a config key to a spec, e.g.

    training.optimizer.lr: {type: log_float, low: 1.0e-4, high: 3.0e-3}
    model.n_heads:         {type: categorical, choices: [2, 4]}
    training.batch_size:   {type: int, low: 4, high: 16, step: 4}

Each trial trains with its sampled values applied as overrides to a copy of the
config, so any key of the schema can be tuned.  `parse_space` checks every key and
bound against the schema before a single trial starts; Optuna, Ray Tune and the
Katib manifest all read the same `Param` list, so they cannot drift apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vishwamai.errors import ConfigError

SPEC_TYPES = ("float", "log_float", "int", "categorical")
_ABSENT = object()


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: Any = None
    high: Any = None
    step: Any = None
    choices: tuple = ()

    @property
    def config_key(self) -> str:
        return f"tuning.search_space.{self.key}"

    def candidates(self) -> list:
        """Values that must fit the schema: the bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid_values(self) -> list:
        """The finite set a grid search walks: the choices, or low..high in `step`s."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None:
            raise ConfigError(self.config_key, "tuning.sampler=grid needs `choices` or a `step` for every key")
        if self.type == "int":
            return list(range(self.low, self.high + 1, self.step))
        count = int(round((self.high - self.low) / self.step)) + 1
        return [round(float(v), 12) for v in np.linspace(self.low, self.low + (count - 1) * self.step, count)]


def _number(spec: dict, name: str, key: str, kind: type) -> Any:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"`{name}` must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise ConfigError(key, f"`{name}` must be an integer for type int, got {value!r}")
    return kind(value)


def parse_param(key: str, spec: Any) -> Param:
    where = f"tuning.search_space.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(where, f"expected a mapping like {{type: float, low: 0, high: 1}}, got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "step", "choices"}
    if unknown:
        raise ConfigError(where, f"unknown field(s) {sorted(unknown)}")
    kind = spec.get("type")
    if kind not in SPEC_TYPES:
        raise ConfigError(where, f"`type` is {kind!r}, expected one of {list(SPEC_TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(where, "categorical needs a non-empty `choices` list")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(where, f"choices must be scalars (null, bool, int, float, str), got {choices!r}")
        return Param(key, kind, choices=tuple(choices))
    num = int if kind == "int" else float
    low, high = _number(spec, "low", where, num), _number(spec, "high", where, num)
    if not low < high:
        raise ConfigError(where, f"`low` ({low}) must be below `high` ({high})")
    if kind == "log_float" and low <= 0:
        raise ConfigError(where, f"log_float needs `low` > 0, got {low}")
    step = None
    if spec.get("step") is not None:
        if kind == "log_float":
            raise ConfigError(where, "`step` cannot be combined with log_float")
        step = _number(spec, "step", where, num)
        if step <= 0:
            raise ConfigError(where, f"`step` must be > 0, got {step}")
    return Param(key, kind, low, high, step)


def _check_key(cfg: DictConfig, param: Param) -> None:
    """The key must be a leaf of the schema, and every candidate value must fit its type."""
    if param.key.split(".")[0] in ("tuning", "run_dir"):
        raise ConfigError(param.config_key, f"'{param.key}' cannot be tuned")
    node = OmegaConf.select(cfg, param.key, default=_ABSENT)
    if node is _ABSENT:
        raise ConfigError(param.config_key, f"'{param.key}' is not a config key")
    if OmegaConf.is_config(node):
        raise ConfigError(param.config_key, f"'{param.key}' is a config group, not a value")
    probe = copy.deepcopy(cfg)
    for value in param.candidates():
        try:
            OmegaConf.update(probe, param.key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(param.config_key, f"{value!r} does not fit '{param.key}': "
                                                f"{str(e).splitlines()[0]}") from None


def parse_space(cfg: DictConfig) -> list[Param]:
    """The validated search space of `cfg.tuning.search_space` (null specs dropped)."""
    raw = OmegaConf.to_container(cfg.tuning.search_space, resolve=True) or {}
    params = [parse_param(key, spec) for key, spec in raw.items() if spec is not None]
    if not params:
        raise ConfigError("tuning.search_space", "is empty: give at least one key to tune, e.g. "
                                                 "{training.optimizer.lr: {type: log_float, low: 1e-4, high: 3e-3}}")
    for param in params:
        _check_key(cfg, param)
    return params


def apply_overrides(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of `cfg` with `values` (config key -> value) set: one trial's config."""
    trial = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(trial, key, value, merge=False)
    return trial


def to_builtin(value: Any) -> Any:
    """Plain Python scalars (numpy / backend types -> YAML- and CLI-friendly values)."""
    return value.item() if isinstance(value, np.generic) else value


def overrides_as_nested(values: dict[str, Any]) -> dict:
    """{'training.optimizer.lr': 1e-3} -> {'training': {'optimizer': {'lr': 1e-3}}} (mergeable YAML)."""
    nested: dict = {}
    for key, value in sorted(values.items()):
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = to_builtin(value)
    return nested


def cli_value(value: Any) -> str:
    value = to_builtin(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def overrides_as_cli(values: dict[str, Any]) -> list[str]:
    """{'training.optimizer.lr': 1e-3} -> ['training.optimizer.lr=0.001'] (Hydra override syntax)."""
    return [f"{key}={cli_value(value)}" for key, value in sorted(values.items())]
