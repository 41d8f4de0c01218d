"""`medfed node audit`: read and verify the node's signed audit log.

Payloads hold no patient data (the audit contract in :mod:`privacy.audit`), so ``show``
prints them as they are. User mistakes and a failed verification raise
:class:`~clients.hospital_node.errors.NodeError` subclasses, which ``medfed`` turns
into one message and exit code 2.
"""

from __future__ import annotations

import difflib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.hospital_node.egress_records import recorded_replies, reply_kind, what_left
from clients.hospital_node.errors import AuditVerificationError, GovernanceError, NodeError, NodeHomeError
from clients.hospital_node.home import NodeHome
from privacy.audit import AUDIT_KINDS, AuditEntry, AuditLog
from privacy.keys import fingerprint, load_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["audit_app", "egress", "payload_lines"]

HOME_ENVVAR = "MEDFED_NODE_HOME"

audit_app = typer.Typer(help="Read and verify the node's signed audit log.", no_args_is_help=True)

_HOME_HELP = "The node home folder (holds the audit log and its key)."
# A nested value (a spec, a list of arrays) longer than this is shortened in the table;
# scalars are never cut, only folded onto more lines. `--json` shows everything whole.
_NESTED_WIDTH = 60
_SHORTENED_NOTE = "… marks a nested value shortened here; --json shows every value whole"


def printable(text: str) -> str:
    """`text` with every control character but the newline shown as an escape (``\\x1b``).

    Refusal reasons, app names and versions come from whoever submitted a run; a terminal
    must never execute them as commands (clear the screen, hide a line).
    """
    return "".join(ch if ch == "\n" or (ch.isprintable() and not unicodedata.category(ch).startswith("C")) else repr(ch)[1:-1] for ch in text)


def _shown(text: str) -> str:
    """`text` as a table cell: control characters made visible, rich markup escaped."""
    return escape(printable(text))


def _value(value: Any) -> tuple[str, bool]:
    """A payload value as shown, and whether it was shortened."""
    if isinstance(value, str):
        return value, False
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, (dict, list)) and len(text) > _NESTED_WIDTH:
        return text[: _NESTED_WIDTH - 1] + "…", True
    return text, False


def payload_lines(payload: Mapping[str, Any]) -> tuple[list[str], bool]:
    """``key = value`` lines of a payload, sorted by key, and whether a nested value was shortened."""
    lines, shortened = [], False
    for key in sorted(payload):
        text, cut = _value(payload[key])
        lines.append(f"{key} = {text}")
        shortened |= cut
    return lines, shortened


def _time_cell(entry: AuditEntry) -> str:
    # Date and time on two lines: narrow, and never cut.
    return entry.time.strftime("%Y-%m-%d\n%H:%M:%S")


def _print_json(entries: Sequence[AuditEntry]) -> None:
    """One JSON array on stdout whose elements are the entries exactly as stored."""
    if not entries:
        typer.echo("[]")
        return
    typer.echo("[\n" + ",\n".join(entry.to_json() for entry in entries) + "\n]")


@audit_app.command("show")
def show(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    kind: str | None = typer.Option(
        None, "--kind", help=f"Only entries of this kind: {', '.join(AUDIT_KINDS)}."
    ),
    last: int | None = typer.Option(None, "--last", min=1, help="Only the last N entries (after --kind)."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as one JSON array, each as stored."),
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
        _print_json(entries)
        return
    if not entries:
        what = f"{kind} entries" if kind else "entries"
        typer.echo(f"no audit {what} on node {node.name!r}")
        return
    table = Table(title=f"audit log of node {escape(node.name)}", show_lines=True)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("payload", overflow="fold", ratio=1)
    shortened = False
    for entry in entries:
        lines, cut = payload_lines(entry.payload)
        shortened |= cut
        table.add_row(str(entry.seq), _time_cell(entry), entry.kind, _shown("\n".join(lines)))
    if shortened:
        table.caption = _SHORTENED_NOTE
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
    """Check every entry's hash and signature, the chain's order and the signed head; record a checkpoint.

    When the log verifies against the node's own key and the node key is readable here,
    the ledger is checked against it as well and a signed checkpoint is recorded at its
    end: each message then checks only what follows it. A log that fails loses its
    checkpoint, so that every message runs the full verification, and is refused, until
    the officer has dealt with it.
    """
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
        log.drop_checkpoint()
        raise AuditVerificationError(str(log.path), [str(problem) for problem in result.problems])
    if result.last_hash is None:
        typer.echo("audit log ok: 0 entries (nothing has been audited yet)")
        return
    typer.echo(f"audit log ok: {result.count} entries, head {result.last_hash[:12]}")
    typer.echo(f"signed by node key {fingerprint(key)}")
    typer.echo(_record_checkpoint(node, key))


def _record_checkpoint(node: NodeHome, key: Ed25519PublicKey) -> str:
    """Run the node's full check and record its checkpoint; what happened, in one line.

    Raises
    ------
    GovernanceError
        The ledger disagrees with the log (the node refuses all work until it is restored).
    """
    from clients.hospital_node.governance import Refusal, full_check

    if not node.audit_key_path.exists() or not node.audit_public_key_path.exists():
        return "no checkpoint recorded: the node key is not in this node home"
    if fingerprint(load_public_key(node.audit_public_key_path)) != fingerprint(key):
        return "no checkpoint recorded: the log was checked against another key than the node's"
    try:
        full_check(node)
    except Refusal as err:
        raise GovernanceError(err.reason) from None
    checkpoint = AuditLog(node.audit_log_path).verify_tail(key).checkpoint
    if checkpoint is None:
        return "no checkpoint recorded: the log holds entries the node's governance cannot read"
    return f"checkpoint at seq {checkpoint.position.count - 1}: each message verifies only the entries after it"


def egress(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    run: str | None = typer.Option(None, "--run", help="Only what left for this Flower run id."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as one JSON array, each as stored."),
) -> None:
    """Show exactly what left this site: every reply (query, train, evaluate, refusals), each number in it, size, digest, masking.

    Under secure aggregation the sizes and digest are those of the update before
    SecAgg+ masked it; only the masked vector left.
    """
    node = NodeHome.open(home)
    replies = recorded_replies(AuditLog(node.audit_log_path).entries(), run=run)
    if as_json:
        _print_json(replies)
        return
    if not replies:
        typer.echo(f"nothing has left node {node.name!r}" + (f" for run {run}" if run else ""))
        return
    table = Table(title=f"what left node {escape(node.name)} (from its signed audit log)", show_lines=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("run, round", overflow="fold", max_width=20)
    table.add_column("reply", no_wrap=True)
    table.add_column("what left", overflow="fold", ratio=1)
    for entry in replies:
        payload = entry.payload
        where = str(payload.get("run", payload.get("first_run", "")))
        if "round" in payload:
            where += f"\nround {payload['round']}"
        table.add_row(_time_cell(entry), _shown(where), _shown(reply_kind(entry)).replace(" ", "\n"), _shown("\n".join(what_left(entry))))
    Console().print(table)
