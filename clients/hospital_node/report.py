"""The officer's evidence pack: what this node decided, charged and released, and proof of it.

``medfed node report --out DIR [--spec HASH]`` writes, for the whole node or one
experiment:

``report.html``              the pack for a reader: verification, budgets, decisions,
                             charges, releases, refusals, and the plot
``epsilon.png``              cumulative epsilon over time per dataset (composed, at the
                             budget's delta), with each budget as a line
``evidence.json``            the same facts, machine-readable
``audit_verification.txt``   the audit log's verification result and its head hash, to
                             keep outside the node as an anchor against a rolled-back log

Everything comes from the node's own ledger and audit log; nothing contains patient data
(audit payloads never do). The pack is written into a temporary folder beside `out` and
renamed into place, so a failure leaves no half-written pack.

A pack is evidence, so it is written even when the node's records disagree, and says so
first: an audit log that fails verification, or a ledger that lacks charges the audit
log records (the check admission refuses all work on; its spend figures are then too
low), heads the page and ``evidence.json`` and is returned to the caller.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clients.hospital_node.egress_records import recorded_replies, reply_kind, what_left
from clients.hospital_node.errors import GovernanceError
from clients.hospital_node.governance import check_ledger
from clients.hospital_node.home import NodeHome
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.audit import AuditEntry, AuditLog
from privacy.governance import GovernanceState
from privacy.keys import fingerprint, load_public_key
from privacy.ledger import Charge, PrivacyLedger

__all__ = ["EvidencePack", "epsilon_curve", "write_report"]

_DECISION_KINDS = ("request", "approval", "denial", "revocation")
_CHARGE_FIELDS = ("dataset", "run", "round", "release", "charged_at", "mechanism", "noise_multiplier", "sample_rate", "steps")
_RESERVATION_FIELDS = ("dataset", "submission", "state", "rounds", "charged", "reserved_at", "expires_at", "released_at")


def epsilon_curve(charges: Sequence[Charge], *, delta: float) -> list[tuple[datetime, float]]:
    """(time, composed epsilon after that charge, as the ledger composes it), oldest first."""
    ordered = sorted(charges, key=lambda c: c.charged_at)
    return [
        (c.charged_at, epsilon([x.event for x in ordered[: i + 1]], delta=delta, accountant=LEDGER_ACCOUNTANT))
        for i, c in enumerate(ordered)
    ]


def _plot(curves: Mapping[str, list[tuple[datetime, float]]], budgets: Mapping[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for index, (dataset, points) in enumerate(sorted(curves.items())):
            colour = f"C{index % 10}"
            if points:
                times, values = zip(*points, strict=True)
                axes.step(times, values, where="post", marker="o", markersize=3, color=colour, label=f"{dataset} spent")
            if dataset in budgets:
                axes.axhline(budgets[dataset], color=colour, linestyle="--", linewidth=1, label=f"{dataset} budget")
        axes.set_xlabel("time (UTC)")
        axes.set_ylabel("cumulative ε")
        axes.set_title(title)
        axes.set_ylim(bottom=0)
        if curves or budgets:
            axes.legend(loc="upper left", fontsize="small")
        figure.autofmt_xdate()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body or '<tr><td colspan=99>none</td></tr>'}</tbody></table>"


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat()


def _entry_rows(entries: Iterable[AuditEntry], keys: Sequence[str]) -> list[list[Any]]:
    return [[e.seq, e.time.isoformat(), e.kind, *[e.payload.get(k, "") for k in keys]] for e in entries]


def _reply_rows(entries: Iterable[AuditEntry]) -> list[list[Any]]:
    return [[e.seq, e.time.isoformat(), e.payload.get("run", e.payload.get("first_run", "")), e.payload.get("round", ""),
             reply_kind(e), "\n".join(what_left(e))] for e in entries]


@dataclass(frozen=True)
class EvidencePack:
    """What :func:`write_report` wrote, and what the caller must not let go unnoticed."""

    files: list[Path]
    audit_ok: bool | None  # None: nothing audited yet
    ledger_missing: list[str] = field(default_factory=list)  # releases the ledger does not hold as charges


def write_report(home: NodeHome, out: Path, *, spec_hash: str | None = None) -> EvidencePack:
    """Write the evidence pack into `out` (new or empty); returns what was written and any disagreement found.

    Raises
    ------
    GovernanceError
        `out` is a non-empty folder or a file, or `spec_hash` matches no experiment.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GovernanceError(f"--out {out} exists and is not an empty folder; choose a new folder")
    log = AuditLog(home.audit_log_path)
    public_key = load_public_key(home.audit_public_key_path) if home.audit_public_key_path.exists() else None
    verification = log.verify(public_key) if public_key is not None and log.path.exists() else None
    entries = log.entries() if log.path.exists() else ()
    state = GovernanceState.from_entries(entries)
    digest = None
    if spec_hash is not None:
        try:
            digest = state.resolve(spec_hash)
        except ValueError as err:
            raise GovernanceError(str(err)) from None

    def mine(entry: AuditEntry) -> bool:
        return digest is None or entry.payload.get("spec_digest") == digest

    decisions = [e for e in entries if e.kind in _DECISION_KINDS and mine(e)]
    releases = [e for e in entries if e.kind == "release" and mine(e)]
    refusals = [e for e in entries if e.kind == "refusal" and mine(e)]
    replies = [e for e in recorded_replies(entries) if mine(e)]
    budget_changes = [e for e in entries if e.kind == "budget"]
    runs = {str(e.payload.get("run")) for e in releases}
    policy = home.policy()

    curves: dict[str, list[tuple[datetime, float]]] = {}
    budgets: dict[str, float] = {}
    charge_rows = []
    with PrivacyLedger.open(home.ledger_path) as ledger:
        for dataset in sorted(set(ledger.datasets()) | set(state.budgets)):
            setting = state.budgets.get(dataset)
            delta = setting.delta if setting is not None else 1e-5
            if setting is not None:
                budgets[dataset] = setting.epsilon
            charges = ledger.charges(dataset)
            curves[dataset] = epsilon_curve(charges, delta=delta)
            for charge in charges:
                if digest is None or charge.run_id in runs:
                    event = charge.event
                    charge_rows.append([dataset, charge.run_id, charge.round, getattr(charge, "release", 0),
                                        charge.charged_at.isoformat(), event.mechanism, event.noise_multiplier,
                                        event.sample_rate, event.steps])
        now, hold = ledger.now(), policy.reservation_hold
        reservations = [
            [r.dataset, r.submission, r.state(hold=hold, now=now), r.rounds, r.charged,
             _iso(r.reserved_at), _iso(r.expires_at(hold)), _iso(r.released_at)]
            for r in ledger.run_reservations()
        ]
        missing = check_ledger(entries, ledger)

    head = "" if verification is None else (verification.last_hash or "")
    if verification is None:
        verdict = "no audit log yet: nothing was decided or released on this node"
    elif verification.ok:
        verdict = f"OK: {verification.count} entries, every one signed by the node key and chained; head hash {head}"
    else:
        verdict = f"FAILED: {len(verification.problems)} problem(s)\n" + "\n".join(str(p) for p in verification.problems)
    key_line = f"node audit key {fingerprint(public_key)}" if public_key is not None else "no node audit key"
    if missing:
        ledger_verdict = (
            f"DISAGREES: the ledger lacks {len(missing)} charge(s) the audit log records, so every ε below "
            "is too low and what remains of each budget is unknown; the node refuses all work until its "
            "ledger is restored from backup.\n" + "\n".join(missing)
        )
    else:
        ledger_verdict = "OK: the ledger holds the charges of every release the audit log records (training rounds and statistics answers)"
    warnings = [text for text in (
        None if verification is None or verification.ok else "the audit log FAILED verification",
        f"the privacy ledger lacks {len(missing)} charge(s) the audit log records" if missing else None,
    ) if text]

    scope = f"experiment {digest}" if digest else "the whole node"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "audit_verification.txt").write_text(f"node {home.name}\n{key_line}\n{verdict}\n", encoding="utf-8")
        title = f"node {home.name}: cumulative ε per dataset (PLD)"
        _plot(curves, budgets, tmp / "epsilon.png", title + (" - LEDGER INCOMPLETE: too low" if missing else ""))
        evidence = {
            "node": home.name,
            "scope": scope,
            "generated_at": datetime.now().astimezone().isoformat(),
            "audit": {"key": key_line, "ok": None if verification is None else verification.ok, "head_hash": head,
                      "problems": [] if verification is None else [str(p) for p in verification.problems]},
            "ledger_check": {"ok": not missing, "missing_charges": missing},
            "warnings": warnings,
            "policy": {k: v for k, v in vars(policy).items() if k != "source"},
            "budgets": {d: {"epsilon": s.epsilon, "delta": s.delta, "set_at": s.at.isoformat(), "by": s.by} for d, s in state.budgets.items()},
            "cumulative_epsilon": {d: [[t.isoformat(), v] for t, v in points] for d, points in curves.items()},
            "decisions": [json.loads(e.to_json()) for e in decisions],
            "charges": [dict(zip(_CHARGE_FIELDS, row, strict=True)) for row in charge_rows],
            "run_reservations": [dict(zip(_RESERVATION_FIELDS, row, strict=True)) for row in reservations],
            "releases": [json.loads(e.to_json()) for e in releases],
            "refusals": [json.loads(e.to_json()) for e in refusals],
            "replies": [
                {"seq": e.seq, "time": e.time.isoformat(), "reply": reply_kind(e), "run": e.payload.get("run", e.payload.get("first_run")),
                 "round": e.payload.get("round"), "dataset": e.payload.get("dataset"), "what_left": what_left(e)}
                for e in replies
            ],
        }
        (tmp / "evidence.json").write_text(json.dumps(evidence, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        png = base64.b64encode((tmp / "epsilon.png").read_bytes()).decode("ascii")
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medfed evidence pack: {html.escape(home.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:.25em .5em;font-size:.9em;text-align:left;white-space:pre-line}} pre{{background:#f4f4f4;padding:.5em}}
.warning{{color:#b00;font-weight:bold}}</style></head>
<body><h1>Evidence pack: node {html.escape(home.name)}</h1>
{"".join(f'<p class="warning">WARNING: {html.escape(w)}; see below.</p>' for w in warnings)}
<p>Scope: {html.escape(scope)}. Generated {html.escape(evidence['generated_at'])}. Every figure comes from the node's own
privacy ledger and signed audit log.</p>
<h2>Audit log verification</h2><p>{html.escape(key_line)}</p><pre>{html.escape(verdict)}</pre>
<h2>Ledger against the audit log</h2><pre>{html.escape(ledger_verdict)}</pre>
<h2>Policy</h2>{_table(["setting", "value"], sorted(evidence["policy"].items()))}
<h2>Cumulative ε per dataset</h2><img alt="cumulative epsilon over time per dataset" src="data:image/png;base64,{png}">
<h2>Budgets</h2>{_table(["seq", "time (UTC)", "kind", "dataset", "epsilon", "delta", "by"], _entry_rows(budget_changes, ["dataset", "epsilon", "delta", "by"]))}
<h2>Requests and decisions</h2>{_table(["seq", "time (UTC)", "kind", "spec", "dataset", "experiment", "signer", "max ε", "expires", "reason", "by"],
    _entry_rows(decisions, ["spec_digest", "dataset", "experiment", "signer", "max_epsilon", "expires", "reason", "by"]))}
<h2>Charges</h2>{_table(["dataset", "run", "round", "release", "charged at (UTC)", "mechanism", "noise multiplier (scale / sensitivity)", "sample rate", "steps"], charge_rows)}
<h2>Run reservations</h2>{_table(["dataset", "submission", "state", "rounds", "charged", "reserved at (UTC)", "expires (UTC)", "released (UTC)"], reservations)}
<h2>What left the site: every reply</h2>{_table(["seq", "time (UTC)", "run", "round", "reply", "what left (every number, or the refusal)"],
    _reply_rows(replies))}
</body></html>
"""
        (tmp / "report.html").write_text(page, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EvidencePack(sorted(out.iterdir()), None if verification is None else verification.ok, missing)
