"""The plain app's run config, parsed once into a frozen value.

A Flower run config holds scalars only, so the feature list, the scaling table and the
hidden widths travel as JSON strings. `PlainConfig.to_run_config` writes exactly the
mapping `PlainConfig.from_run_config` reads, so the benchmark and the app agree on it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODES", "PlainConfig"]

MODES = ("fedavg", "empty")

# run-config key -> (attribute, kind); kind "json-..." is a JSON string of that shape.
_FIELDS: dict[str, tuple[str, str]] = {
    "mode": ("mode", "str"),
    "num-rounds": ("num_rounds", "int"),
    "min-nodes": ("min_nodes", "int"),
    "dataset": ("dataset", "str"),
    "features": ("features", "json-names"),
    "scaling": ("scaling", "json-scaling"),
    "model-kind": ("model_kind", "str"),
    "hidden": ("hidden", "json-widths"),
    "noise-multiplier": ("noise_multiplier", "float"),
    "max-grad-norm": ("max_grad_norm", "float"),
    "sample-rate": ("sample_rate", "float"),
    "steps": ("steps", "int"),
    "learning-rate": ("learning_rate", "float"),
    "round-timeout": ("round_timeout", "float"),
    "poll-interval": ("poll_interval", "float"),
}


@dataclass(frozen=True)
class PlainConfig:
    """What both modes of the plain app need; see pyproject.toml for the keys."""

    mode: str
    num_rounds: int
    min_nodes: int
    dataset: str = ""
    features: tuple[str, ...] = ()
    scaling: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    model_kind: str = "logistic"
    hidden: tuple[int, ...] = (32, 16)
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.05
    steps: int = 20
    learning_rate: float = 0.1
    round_timeout: float = 600.0
    poll_interval: float = 0.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> PlainConfig:
        """Parse a Flower run config; every problem is reported at once, by key.

        Raises
        ------
        ValueError
            A key is missing, unknown, of the wrong type or out of range.
        """
        problems: list[str] = []
        values: dict[str, Any] = {}
        for key in sorted(set(config) - set(_FIELDS)):
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            problems.append(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        for key, (attribute, kind) in _FIELDS.items():
            if key not in config:
                problems.append(f"{key} is missing")
                continue
            value, problem = _parse(kind, config[key])
            if problem:
                problems.append(f"{key} {problem}; found {config[key]!r}")
            else:
                values[attribute] = value
        if not problems:
            problems.extend(_range_problems(values))
        if problems:
            raise ValueError("invalid plain-app run config:\n" + "\n".join(f"  - {p}" for p in problems))
        return cls(**values)

    def to_run_config(self) -> dict[str, str | int | float]:
        """The run-config mapping `from_run_config` reads back as this value."""
        out: dict[str, str | int | float] = {}
        for key, (attribute, kind) in _FIELDS.items():
            value = getattr(self, attribute)
            if kind == "json-names":
                out[key] = json.dumps(list(value))
            elif kind == "json-widths":
                out[key] = json.dumps([int(v) for v in value])
            elif kind == "json-scaling":
                out[key] = json.dumps({k: [float(c), float(s)] for k, (c, s) in sorted(value.items())})
            elif kind == "float":
                out[key] = float(value)
            else:
                out[key] = value
        return out


def _parse(kind: str, raw: Any) -> tuple[Any, str]:
    """The parsed value of `raw` and an empty string, or None and what is wrong."""
    if kind == "str":
        return (raw, "") if isinstance(raw, str) else (None, "must be a string")
    if kind == "int":
        ok = isinstance(raw, int) and not isinstance(raw, bool)
        return (raw, "") if ok else (None, "must be an integer")
    if kind == "float":
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw)
        return (float(raw), "") if ok else (None, "must be a finite number")
    if not isinstance(raw, str):
        return None, "must be a JSON string"
    try:
        decoded = json.loads(raw)
    except json.JSONDecodeError:
        return None, "is not valid JSON"
    if kind == "json-names":
        if isinstance(decoded, list) and all(isinstance(v, str) for v in decoded):
            return tuple(decoded), ""
        return None, "must be a JSON list of strings"
    if kind == "json-widths":
        if isinstance(decoded, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in decoded):
            return tuple(decoded), ""
        return None, "must be a JSON list of positive integers"
    pairs = {}
    if isinstance(decoded, dict):
        for name, pair in decoded.items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
                return None, f"must map each feature to [center, scale] (see {name!r})"
            pairs[name] = (float(pair[0]), float(pair[1]))
        return pairs, ""
    return None, "must be a JSON object"


def _range_problems(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if values["mode"] not in MODES:
        close = difflib.get_close_matches(values["mode"], MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"mode must be one of {', '.join(MODES)}; found {values['mode']!r}{hint}")
    for attribute in ("num_rounds", "min_nodes", "steps"):
        if values[attribute] < 1:
            problems.append(f"{attribute.replace('_', '-')} must be >= 1; found {values[attribute]}")
    for attribute in ("noise_multiplier", "max_grad_norm", "learning_rate", "round_timeout"):
        if values[attribute] <= 0:
            problems.append(f"{attribute.replace('_', '-')} must be > 0; found {values[attribute]}")
    if not 0 < values["sample_rate"] <= 1:
        problems.append(f"sample-rate must be in (0, 1]; found {values['sample_rate']}")
    if values["poll_interval"] < 0:
        problems.append(f"poll-interval must be >= 0; found {values['poll_interval']}")
    if values["mode"] == "fedavg" and not values["features"]:
        problems.append("features must name at least one feature in mode 'fedavg'")
    unused = sorted(set(values["scaling"]) - set(values["features"]))
    if unused:
        problems.append(f"scaling names features that are not in features: {', '.join(unused)}")
    return problems
