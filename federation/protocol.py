"""The wire contract between the coordinator and a hospital node.

This module is the *whole* contract: the ServerApp and the ClientApp import nothing
else of each other. It depends only on Flower's record types and the standard library,
so a node imports it cheaply.

One experiment is three kinds of message wave:

``query``     before anything runs: can the node run this instruction (dataset
              registered and readable, features present)? Reply: counts and the
              node's current spend, no arrays.
``train``     one per round: the node evaluates the incoming global model on its
              validation split, then trains it with DP-SGD and charges its ledger.
              Reply: the trained arrays and metrics.
``evaluate``  once, after the last round: the node evaluates the final model.

A node that refuses answers with an error reply whose code is one of
``REFUSAL_CODES`` and whose reason is a one-line message meant for the researcher.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ConfigRecord, MetricRecord


__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "EVAL_METRICS",
    "INSTRUCTION_KEY",
    "METRICS_KEY",
    "NODE_KEY",
    "ProtocolError",
    "QUERY_METRICS",
    "REFUSAL_CODES",
    "REFUSED_BAD_INSTRUCTION",
    "REFUSED_BUDGET",
    "REFUSED_DATASET",
    "TRAIN_METRICS",
    "TrainInstruction",
    "node_record",
    "read_metrics",
    "read_refusal",
    "read_site",
    "refusal_reason",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NODE_KEY = "node"
INSTRUCTION_KEY = "medfed.instruction"

# Error codes of a node's refusal (Flower's own codes are below 1000).
REFUSED_BAD_INSTRUCTION = 4001
REFUSED_DATASET = 4002
REFUSED_BUDGET = 4003
REFUSAL_CODES = (REFUSED_BAD_INSTRUCTION, REFUSED_DATASET, REFUSED_BUDGET)

# The metric keys a reply may carry: a node sends exactly these, the coordinator
# rejects anything else. "num-examples" is Flower's weighting key.
EVAL_METRICS = (
    "eval-num-examples",
    "eval-loss",
    "eval-auc",
    "eval-accuracy",
    "eval-brier",
)
TRAIN_METRICS = (
    "num-examples",
    *EVAL_METRICS,
    "train-loss",
    "steps",
    "epsilon",
)
QUERY_METRICS = (
    "num-examples",
    "eval-num-examples",
    "epsilon-spent",
    "epsilon-after",
)


class ProtocolError(ValueError):
    """A message between coordinator and node does not follow this contract."""


@dataclass(frozen=True)
class TrainInstruction:
    """What a node needs to evaluate and train one round of an experiment.

    Built by the coordinator from a validated spec; every value is explicit so the node
    never has to interpret the spec itself.
    """

    experiment: str
    spec_digest: str
    dataset: str
    features: tuple[str, ...]
    label: str
    model_kind: str
    hidden: tuple[int, ...]
    local_epochs: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    rounds: int
    scaling: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name in ("experiment", "spec_digest", "dataset", "label", "model_kind", "accountant"):
            if not getattr(self, name):
                problems.append(f"{name} must be a non-empty string")
        if not self.features:
            problems.append("features must not be empty")
        for name in ("local_epochs", "steps", "rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1; found {getattr(self, name)}")
        for name in ("learning_rate", "noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be > 0; found {value}")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1]; found {self.sample_rate}")
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1); found {self.delta}")
        if problems:
            raise ProtocolError("invalid training instruction: " + "; ".join(problems))

    def to_json(self) -> str:
        """Serialise to the canonical JSON carried in a ConfigRecord."""
        data = asdict(self)
        data["scaling"] = {k: [float(c), float(s)] for k, (c, s) in sorted(self.scaling.items())}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TrainInstruction:
        """Parse what `to_json` wrote; a malformed instruction raises ProtocolError."""
        try:
            data: dict[str, Any] = json.loads(text)
            data["features"] = tuple(data["features"])
            data["hidden"] = tuple(int(h) for h in data["hidden"])
            data["scaling"] = {k: (float(c), float(s)) for k, (c, s) in data["scaling"].items()}
            return cls(**data)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed training instruction: {err}") from None

    def to_config(self, server_round: int = 0) -> ConfigRecord:
        """The ConfigRecord a coordinator sends (Flower adds its own keys to it)."""
        return ConfigRecord({INSTRUCTION_KEY: self.to_json(), "server-round": server_round})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> TrainInstruction:
        """Read the instruction from a received ConfigRecord."""
        text = config.get(INSTRUCTION_KEY)
        if not isinstance(text, str):
            raise ProtocolError(f"the message has no '{INSTRUCTION_KEY}' entry in its config")
        return cls.from_json(text)


def node_record(site: str) -> ConfigRecord:
    """The record a node attaches to name itself (its site name, never patient data)."""
    return ConfigRecord({"site": site})


def read_site(content: Mapping[str, Any], fallback: str) -> str:
    """The site name of a reply, or `fallback` when the node did not send one."""
    record = content.get(NODE_KEY) if hasattr(content, "get") else None
    if isinstance(record, ConfigRecord) and isinstance(record.get("site"), str):
        return str(record["site"])
    return fallback


def read_metrics(content: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, float]:
    """The metrics of a reply, refusing keys that the contract does not declare."""
    record = content.get(METRICS_KEY) if hasattr(content, "get") else None
    if not isinstance(record, MetricRecord):
        raise ProtocolError(f"reply has no '{METRICS_KEY}' MetricRecord")
    unexpected = sorted(set(record) - set(allowed))
    if unexpected:
        raise ProtocolError(f"reply carries undeclared metrics: {', '.join(unexpected)}")
    return {key: float(value) for key, value in record.items()}  # type: ignore[arg-type]


def refusal_reason(site: str, reason: str) -> str:
    """The reason text of a refusal: the site name, then the one-line reason."""
    return f"{site}\t{reason}"


def read_refusal(text: str | None, fallback: str) -> tuple[str, str]:
    """Split a refusal's reason into ``(site, reason)``; other errors keep `fallback` as site."""
    site, sep, reason = (text or "").partition("\t")
    if sep and site and "\n" not in site:
        return site, reason
    return fallback, text or ""
