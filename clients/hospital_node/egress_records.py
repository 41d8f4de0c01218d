"""What left the site, as the node's signed audit log records it: every reply, each number in it.

A node records each reply it sends (:mod:`clients.hospital_node.rounds`): a ``release``
entry for an answered query, train or evaluate message (the arrays' shapes, size and
digest, and every metric with its value), a ``refusal`` entry for a refused one (the
code and the reason the researcher reads), and, once per spec and dataset, the
``request`` that the node answers "awaiting approval" until its officer decides. This
module reads those entries back for ``medfed node egress`` and the evidence pack; it
never touches the ledger or the data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from privacy.audit import AuditEntry

__all__ = ["REPLY_KINDS", "recorded_replies", "reply_kind", "what_left"]

#: The audit entries that stand for a reply that left the node.
REPLY_KINDS = ("release", "refusal", "request")


def _run(entry: AuditEntry) -> str:
    return str(entry.payload.get("run", entry.payload.get("first_run", "")))


def recorded_replies(entries: Sequence[AuditEntry], *, run: str | None = None) -> list[AuditEntry]:
    """The entries that record a reply, oldest first; only run `run`'s if given."""
    return [e for e in entries if e.kind in REPLY_KINDS and (run is None or _run(e) == run)]


def reply_kind(entry: AuditEntry) -> str:
    """``query``, ``train``, ``evaluate`` or ``statistics``, with `` refused`` when the reply was a refusal."""
    message = str(entry.payload.get("message", "query" if entry.kind == "request" else ""))
    return message if entry.kind == "release" else f"{message} refused"


def what_left(entry: AuditEntry) -> list[str]:
    """Every number (or the refusal's text) that left with one reply, one line each."""
    payload = entry.payload
    lines = [f"dataset {payload['dataset']}"] if "dataset" in payload else []
    if entry.kind == "request":
        return lines + [
            'the reply "awaiting approval" (recorded once, with the request; '
            "the same reply to later queries is not recorded again)"
        ]
    if entry.kind == "refusal":
        return lines + [f"refusal code {payload.get('code', '')}: {payload.get('reason', '')}"]
    if payload.get("message") == "statistics":
        return lines + _study_answer(payload)
    shapes = payload.get("arrays", {})
    if shapes:
        values = sum(math.prod(shape) for shape in shapes.values())
        masked = payload.get("secure_aggregation", {}).get("masked")
        lines.append(f"{len(shapes)} arrays, {values} values, " + ("SecAgg+ masked" if masked else "plain"))
    lines.append(f"{payload.get('bytes', '')} bytes, sha256 {str(payload.get('sha256', ''))[:16]}")
    recorded = payload.get("metric_values")
    if isinstance(recorded, Mapping):
        # A number that was not finite is recorded as its text ('nan'): shown bare, as it left.
        lines += [f"{name} = {value if isinstance(value, str) else json.dumps(value)}" for name, value in sorted(recorded.items())]
    else:  # a record written before release records held the values
        lines += [f"{name} = (value not recorded)" for name in payload.get("metrics", [])]
    return lines


#: Values of one statistics release shown in full; longer ones are shown by their first ones.
_SHOWN_VALUES = 12


def _study_answer(payload: Mapping[str, object]) -> list[str]:
    """What left with a statistics answer: each noisy release with its mechanism and scale, the suppressed cells."""
    releases = payload.get("releases")
    if not isinstance(releases, list):
        return ["(releases not recorded)"]
    secure = payload.get("secure_aggregation")
    refused = payload.get("refused")
    if isinstance(refused, Mapping):
        return [
            f"refusal code {refused.get('code', '')}: {refused.get('reason', '')}",
            "no value left; the study was charged (the refusal depends on the noisy answer)",
        ]
    values = sum(len(r.get("values", [])) for r in releases if isinstance(r, Mapping))
    suppressed = payload.get("suppressed") or []
    lines = [
        "SecAgg+ masked, as whole quanta beside a reported-cell vector: the coordinator sees only the sum over "
        f"{secure.get('sample_num', '?')} sites' answers; the values below are this site's part of it"
    ] if isinstance(secure, Mapping) and secure.get("masked") else []
    lines += [
        f"{len(releases)} DP releases, {values} noisy values; {len(suppressed)} cell(s) suppressed "
        f"(noisy count below min_cell_size {payload.get('min_cell_size', '?')})"
        + (f": cells {', '.join(map(str, suppressed))}" if suppressed else ""),
        f"{payload.get('bytes', '')} bytes, sha256 {str(payload.get('sha256', ''))[:16]}",
    ]
    for release in releases:
        if not isinstance(release, Mapping):
            continue
        shown = [("-" if v is None else f"{v:g}") for v in release.get("values", [])]
        more = len(shown) - _SHOWN_VALUES
        text = ", ".join(shown[:_SHOWN_VALUES]) + (f", ... ({more} more)" if more > 0 else "")
        lines.append(
            f"{release.get('statistic')}.{release.get('name')} ({release.get('mechanism')}, scale {release.get('scale'):g}, "
            f"ε {release.get('epsilon', float('nan')):.4g}) = [{text}]"
        )
    recorded = payload.get("metric_values")
    if isinstance(recorded, Mapping):
        lines += [f"{name} = {json.dumps(value)}" for name, value in sorted(recorded.items())]
    return lines
