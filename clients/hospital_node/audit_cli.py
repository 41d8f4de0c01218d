"""`medfed node audit`: read and verify the node's signed audit log.

Payloads hold no patient data (the audit contract in :mod:`privacy.audit`), so ``show``
prints them as they are. User mistakes and a failed verification raise
:class:`~clients.hospital_node.errors.NodeError` subclasses, which ``medfed`` turns
into one message and exit code 2.
"""

from __future__ import annotations

import difflib
import math
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.hospital_node.errors import AuditVerificationError, NodeError, NodeHomeError
from clients.hospital_node.home import NodeHome
from privacy.audit import AUDIT_KINDS, AuditLog
from privacy.keys import fingerprint, load_public_key

__all__ = ["audit_app", "egress", "payload_summary"]

HOME_ENVVAR = "MEDFED_NODE_HOME"

audit_app = typer.Typer(help="Read and verify the node's signed audit log.", no_args_is_help=True)

_HOME_HELP = "The node home folder (holds the audit log and its key)."
_SUMMARY_WIDTH = 80
_VALUE_WIDTH = 24


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def payload_summary(payload: Mapping[str, Any], *, width: int = _SUMMARY_WIDTH) -> str:
    """``key=value`` pairs of a payload, sorted by key, each value and the whole line shortened."""
    text = ", ".join(f"{key}={_short(payload[key])}" for key in sorted(payload))
    return text if len(text) <= width else text[: width - 1] + "…"


@audit_app.command("show")
def show(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    kind: str | None = typer.Option(
        None, "--kind", help=f"Only entries of this kind: {', '.join(AUDIT_KINDS)}."
    ),
    last: int | None = typer.Option(None, "--last", min=1, help="Only the last N entries (after --kind)."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON Lines, as stored."),
) -> None:
    """List the audit log's entries (without checking them; see `verify`)."""
    node = NodeHome.open(home)
    if kind is not None and kind not in AUDIT_KINDS:
        close = difflib.get_close_matches(kind, AUDIT_KINDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"kinds: {', '.join(AUDIT_KINDS)}"
        raise NodeError(f"--kind {kind!r} is not an audit kind; {hint}")
    entries = AuditLog(node.audit_log_path).entries()
    if kind is not None:
        entries = tuple(entry for entry in entries if entry.kind == kind)
    if last is not None:
        entries = entries[-last:]
    if as_json:
        for entry in entries:
            typer.echo(entry.to_json())
        return
    if not entries:
        what = f"{kind} entries" if kind else "entries"
        typer.echo(f"no audit {what} on node {node.name!r}")
        return
    table = Table(title=f"audit log of node {escape(node.name)}")
    for column in ("seq", "time (UTC)", "kind", "payload"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            str(entry.seq),
            entry.time.strftime("%Y-%m-%d %H:%M:%S"),
            entry.kind,
            escape(payload_summary(entry.payload)),
        )
    Console().print(table)


@audit_app.command("verify")
def verify(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    public_key: Path | None = typer.Option(
        None,
        "--public-key",
        help="Check against this copy of the node's audit public key (say, one the officer kept) "
        "instead of the one in the node home.",
    ),
) -> None:
    """Check every entry's hash and signature, the chain's order and the signed head."""
    node = NodeHome.open(home)
    key_path = public_key if public_key is not None else node.audit_public_key_path
    log = AuditLog(node.audit_log_path)
    if public_key is None and not key_path.exists():
        if log.path.exists() or log.head_path.exists():
            raise NodeHomeError(
                f"the node's audit public key {key_path} is missing; pass --public-key with a copy of it"
            )
        typer.echo("audit log ok: 0 entries (nothing has been audited yet)")
        return
    key = load_public_key(key_path)
    result = log.verify(key)
    if not result.ok:
        raise AuditVerificationError(str(log.path), [str(problem) for problem in result.problems])
    if result.last_hash is None:
        typer.echo("audit log ok: 0 entries (nothing has been audited yet)")
        return
    typer.echo(f"audit log ok: {result.count} entries, head {result.last_hash[:12]}")
    typer.echo(f"signed by node key {fingerprint(key)}")


def egress(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    run: str | None = typer.Option(None, "--run", help="Only what left for this Flower run id."),
    as_json: bool = typer.Option(False, "--json", help="Print the release records as JSON Lines."),
) -> None:
    """Show exactly what left this site: every reply (query, train, evaluate), its arrays, size, digest, masking and charge.

    Under secure aggregation the sizes and digest are those of the update before
    SecAgg+ masked it; only the masked vector left.
    """
    node = NodeHome.open(home)
    releases = [e for e in AuditLog(node.audit_log_path).entries() if e.kind == "release"]
    if run is not None:
        releases = [e for e in releases if str(e.payload.get("run")) == run]
    if as_json:
        for entry in releases:
            typer.echo(entry.to_json())
        return
    if not releases:
        typer.echo(f"nothing has left node {node.name!r}" + (f" for run {run}" if run else ""))
        return
    table = Table(title=f"what left node {escape(node.name)} (from its signed audit log)")
    for column in ("time (UTC)", "run", "round", "reply", "dataset", "arrays", "values", "bytes", "sha256", "left as", "ε spent"):
        table.add_column(column)
    for entry in releases:
        payload = entry.payload
        shapes = payload.get("arrays", {})
        values = sum(math.prod(shape) for shape in shapes.values())
        charge = payload.get("charge", {})
        table.add_row(
            entry.time.strftime("%Y-%m-%d %H:%M:%S"),
            escape(str(payload.get("run", ""))),
            str(payload.get("round", "")),
            escape(str(payload.get("message", ""))),
            escape(str(payload.get("dataset", ""))),
            str(len(shapes)),
            str(values),
            str(payload.get("bytes", "")),
            str(payload.get("sha256", ""))[:12],
            "SecAgg+ masked" if payload.get("secure_aggregation", {}).get("masked") else "plain",
            f"{charge['epsilon_spent']:.3f}" if "epsilon_spent" in charge else "",
        )
    Console().print(table)
