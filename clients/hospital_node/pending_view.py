"""A request as the officer reads it: its facts in words, every field of its spec, and what changed.

``medfed node requests`` and the officer's console (:mod:`clients.hospital_node.console`)
show a request through these functions, so the terminal and the browser say the same
thing in the same words. Everything shown comes from the request's audit entry (the
signed spec the partner sent, and what the node costed); nothing is read from a dataset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clients.hospital_node.governance import PendingRequest
from privacy.governance import APPROVED, GovernanceState, Request

__all__ = ["SpecChange", "last_approved_version", "node_checks_pass", "request_fields", "spec_changes", "spec_fields"]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def request_fields(item: PendingRequest, *, ledger_incomplete: bool = False) -> list[tuple[str, str]]:
    """The request's facts, one (field, value) pair each: who, what, its cost, the budget before and after.

    With `ledger_incomplete` (the ledger lacks charges the audit log records) the spend
    is a lower bound and the budget after is unknown, as every officer view says.
    """
    payload, position = item.request.payload, item.position
    budget = position.budget if position is not None else None
    after = _fmt(item.projected)
    if budget is not None and item.projected is not None and item.projected > budget.epsilon:
        after += " (over the budget: approving it would not let it run)"
    held = f"ε {_fmt(position.held if position is not None else None)}"
    if ledger_incomplete:
        held, after = f"at least {held} (the ledger is incomplete)", "unknown: the ledger disagrees with the audit log"
    study = payload.get("task") == "statistics"
    if study:
        releases = payload.get("releases") or []
        asks = ("what it releases", f"{len(releases)} DP releases over {payload.get('cells', '?')} cell(s): " + "; ".join(
            f"{r.get('statistic')}.{r.get('name')} ({r.get('mechanism')}, scale {r.get('scale', 0):.4g})" for r in releases
        ))
    else:
        asks = ("rounds", str(payload.get("rounds", "")))
    secure = (payload.get("spec", {}).get("federation") or {}).get("secure_aggregation") is True
    if study:
        travels = (
            "securely aggregated (SecAgg+): masked, the coordinator sees only totals over the sites"
            if secure else "in plain: the coordinator sees this site's noisy answer"
        )
    else:
        travels = "SecAgg+: masked, the coordinator sees only the sum of the updates" if secure else "in plain"
    what = "study" if study else "experiment"
    return [
        (what, item.request.experiment),
        ("description", str(payload.get("description", ""))),
        ("signed by", f"{item.request.signer} ({payload.get('signer_fingerprint', '')})"),
        ("asked at (UTC)", item.request.at.isoformat()),
        ("task", "statistics (answers under formal DP)") if study else ("task, model", f"{payload.get('task', '')}, {payload.get('model', '')}"),
        ("dataset", item.request.dataset),
        asks,
        ("how it leaves", travels),
        (f"cost of this {what}", f"ε {_fmt(item.cost)} at δ {payload.get('delta', '')}"),
        ("dataset budget", "not set" if budget is None else f"ε {budget.epsilon:g} at δ {budget.delta:g}"),
        ("spent or reserved now", held),
        (f"after this {what}", after if ledger_incomplete else f"ε {after}"),
    ]


def node_checks_pass(item: PendingRequest) -> str:
    """What the node's checks said when none of them would refuse `item`."""
    if item.request.payload.get("task") == "statistics":
        return "policy, registered columns and cell limit allow it"
    return "policy and cohort size allow it"


# What each field of a spec asks for, in words. A field not listed here is shown by its
# dotted name: nothing a partner writes is hidden from the officer.
_WORDS: dict[str, str] = {
    "experiment.name": "name of the experiment",
    "experiment.task": "kind of task",
    "experiment.description": "what the partner says it is for",
    "study.name": "name of the study",
    "study.description": "what the partner says it is for",
    "study.dataset": "dataset the study reads",
    "data.dataset": "dataset it trains on",
    "data.label": "outcome column the model learns to predict",
    "data.features": "columns it reads as model inputs",
    "data.cohort": "cohort definition (OMOP)",
    "experiment.mlflow_experiment": "where the coordinator records the run (MLflow experiment)",
    "model.kind": "kind of model",
    "model.hidden": "hidden layer widths of the model",
    "federation.node_wait_seconds": "how long the coordinator waits for hospitals to join, in seconds",
    "federation.proximal_mu": "FedProx proximal term (0: plain averaging)",
    "federation.round_timeout_seconds": "longest a round may take, in seconds",
    "federation.server_learning_rate": "the coordinator's learning rate (adaptive strategies)",
    "federation.strategy": "how the coordinator combines the hospitals' updates",
    "federation.rounds": "number of training rounds (each one this node trains is a release from it)",
    "federation.fraction_per_round": "share of the rounds each hospital trains: ceil(share x rounds), drawn before the run; "
    "this node reserves and is charged only those",
    "federation.round_deadline_seconds": "how long a round waits for replies; a late reply is charged, not aggregated",
    "federation.min_nodes": "fewest hospitals a round needs",
    "federation.local_epochs": "passes over the local data per round",
    "federation.learning_rate": "local learning rate",
    "federation.secure_aggregation": "secure aggregation (SecAgg+): the coordinator sees only sums",
    "privacy.delta": "δ the privacy guarantee is stated at",
    "privacy.max_grad_norm": "per-patient clipping norm of DP-SGD",
    "privacy.sample_rate": "share of patients sampled per step (Poisson)",
    "privacy.noise_multiplier": "DP-SGD noise multiplier (noise σ over the clipping norm)",
    "privacy.target_epsilon": "ε the partner asks the noise to be chosen for",
    "privacy.accountant": "accountant the partner planned with (the node composes with its own)",
    "privacy.min_cohort_size": "fewest patients the partner accepts (tightens the node policy)",
    "privacy.count_epsilon": "ε of the noisy training-set size",
    "privacy.evaluation_epsilon": "ε of the noisy validation-score histogram",
    "privacy.evaluate_every_round": "whether the validation histogram is released every round",
}


def _words(path: str) -> str:
    if path in _WORDS:
        return _WORDS[path]
    if path.startswith("data.scaling."):
        return f"fixed scaling (center, scale) of input {path.removeprefix('data.scaling.')}"
    parent = path.rsplit(".", 1)[0]
    if parent in _WORDS:
        return f"{_WORDS[parent]}: {path.rsplit('.', 1)[1]}"
    return path


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_shown(v) for v in value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key in sorted(value):
            out |= _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for index, item in enumerate(value):
            out |= _flatten(item, f"{prefix}[{index}]")
        return out
    return {prefix: value}


def spec_fields(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Every field of a signed spec: (dotted name, what it asks in words, value as shown), in name order."""
    return [(path, _words(path), _shown(value)) for path, value in _flatten(spec).items()]


@dataclass(frozen=True)
class SpecChange:
    """One field that differs from the last approved version: None for a side that lacks it."""

    field: str
    words: str
    before: str | None
    after: str | None


def spec_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[SpecChange]:
    """The fields that differ between two specs, added and removed ones included, in name order."""
    old, new = _flatten(before), _flatten(after)
    return [
        SpecChange(path, _words(path), None if path not in old else _shown(old[path]), None if path not in new else _shown(new[path]))
        for path in sorted(set(old) | set(new))
        if old.get(path, _MISSING) != new.get(path, _MISSING)
    ]


_MISSING = object()


def last_approved_version(state: GovernanceState, request: Request) -> Request | None:
    """The request of the latest approval of another spec with this one's name and signer (any dataset).

    A partner who changes an approved spec sends a new digest, hence a new request; this
    finds what the officer approved last time, so that the change can be shown. None if
    no such spec was ever approved, or its approval came before any request for it (the
    node holds no copy of that spec).
    """
    for decision in reversed(state.history):
        if decision.status != APPROVED or decision.spec_digest == request.spec_digest:
            continue
        earlier = state.requests.get((decision.spec_digest, decision.dataset))
        if earlier is not None and earlier.experiment == request.experiment and earlier.signer == request.signer:
            return earlier
    return None
