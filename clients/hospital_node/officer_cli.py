"""The data-governance officer's commands on a node.

``medfed node partners add|list|remove``  the research partners whose signed specs count
``medfed node requests``                 pending requests, with their cost and the budget left
``medfed node approve|deny|revoke``      decide on one spec hash for one dataset
``medfed node budget [set]``             each dataset's lifetime budget, spend and what remains
``medfed node policy show|set``          the node policy, changed field by field and audited
``medfed node report --out DIR``         the evidence pack (:mod:`clients.hospital_node.report`)

Every decision is an entry of the node's signed audit log, which is the only place the
node reads decisions from. User mistakes raise :class:`~clients.hospital_node.errors.NodeError`
subclasses; ``medfed`` prints them as one line and exits with code 2.

The views never show a figure the node itself would not act on. When the ledger lacks
charges the audit log records (the disagreement admission refuses all work on), they
warn in red, keep showing what is there (the officer needs it to repair the node), mark
each spend as a lower bound and what remains as unknown, and exit 1. Each pending
request and each approval says which of the node's own checks would refuse it at run
time (policy, cohort), without showing the cohort's size.
"""

from __future__ import annotations

import getpass
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.hospital_node import governance
from clients.hospital_node.errors import GovernanceError, NodeError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.pending_view import node_checks_pass, request_fields
from clients.hospital_node.policy import POLICY_FIELDS, NodePolicy, parse_settings
from privacy.errors import PrivacyError
from privacy.ledger import EXPIRED, LIVE

__all__ = ["budget_app", "current_officer", "decision_commands", "partners_app", "policy_app", "report", "requests"]

HOME_ENVVAR = "MEDFED_NODE_HOME"
_HOME_HELP = "The node home folder."

partners_app = typer.Typer(help="The research partners whose signed experiment specs this node accepts.", no_args_is_help=True)
budget_app = typer.Typer(help="Each dataset's lifetime privacy budget: show it, or set it.", invoke_without_command=True)
policy_app = typer.Typer(help="The node policy: every experiment's standing limits. Show it, or set fields.", no_args_is_help=True)


def current_officer() -> str:
    """Who runs this command, as the audit log names them: the user name, or 'officer' if none can be read."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "officer"


_BY_HELP = "Who decides (recorded in the audit log); default: your user name."


@contextmanager
def _governed() -> Iterator[None]:
    """Governance refusals and privacy errors, as one-line node errors for the CLI."""
    try:
        yield
    except governance.Refusal as err:
        raise GovernanceError(err.reason) from None
    except PrivacyError as err:
        raise GovernanceError(str(err)) from None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _warn(text: str) -> None:
    """A warning the officer cannot miss: red, on stderr (stdout keeps the view)."""
    Console(stderr=True).print(f"[bold red]warning:[/] {escape(text)}", style="red")


def _disagreement(node: NodeHome, missing: list[str]) -> None:
    _warn(
        f"the privacy ledger {node.ledger_path} lacks {len(missing)} charge(s) that the signed audit log records "
        f"(first: {missing[0]}). Spend below comes from the incomplete ledger and is too low; what remains is "
        "unknown. The node refuses all work until the ledger is restored from backup; `medfed node doctor` "
        "lists the charges"
    )


# ---------------------------------------------------------------- partners


@partners_app.command("add")
def partners_add(
    name: str = typer.Argument(..., help="The partner's name, e.g. acme_research."),
    public_key: Path = typer.Argument(..., help="The partner's public key file (<name>.pub from `medfed keys new`)."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Trust a research partner's key; compare its fingerprint with the partner's first."""
    node = NodeHome.open(home)
    with _governed():
        partner = node.trusted_partners().add(name, public_key, added_by=by or current_officer())
        node.audit_log().append("key", {"action": "trust", "partner": name, "fingerprint": partner.fingerprint, "by": by or current_officer()})
    typer.echo(f"node {node.name!r} now trusts partner {name!r} ({partner.fingerprint})")


@partners_app.command("remove")
def partners_remove(
    name: str = typer.Argument(..., help="The partner to stop trusting."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Stop trusting a partner: their specs are refused from the next message on."""
    node = NodeHome.open(home)
    with _governed():
        partner = node.trusted_partners().remove(name)
        node.audit_log().append("key", {"action": "distrust", "partner": name, "fingerprint": partner.fingerprint, "by": by or current_officer()})
    typer.echo(f"node {node.name!r} no longer trusts partner {name!r} ({partner.fingerprint})")


@partners_app.command("list")
def partners_list(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """The trusted partners, with their key fingerprints."""
    node = NodeHome.open(home)
    with _governed():
        partners = node.trusted_partners().list()
    if not partners:
        typer.echo(f"node {node.name!r} trusts no research partner yet; add one with `medfed node partners add`")
        return
    typer.echo(f"trusted partners of node {node.name!r}:")
    for partner in partners:
        typer.echo(f"  {partner.name}  {partner.fingerprint}  added {partner.added_at:%Y-%m-%d %H:%M} UTC by {partner.added_by or '-'}")


# ---------------------------------------------------------------- requests and decisions


def requests(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Pending requests: who asks, for what, what it costs and what the budget would be after."""
    node = NodeHome.open(home)
    with _governed():
        pending = governance.pending_requests(node)
        missing = governance.ledger_disagreement(node, governance.verified_entries(node))
        refusals = {(i.request.spec_digest, i.request.dataset): governance.foreseen_refusals(
            node, i.request.spec_digest, i.request.dataset) for i in pending}
    if missing:
        _disagreement(node, missing)
    if not pending:
        typer.echo(f"no pending requests on node {node.name!r}")
        raise typer.Exit(1 if missing else 0)
    console = Console()
    for item in pending:
        table = Table(title=f"request {item.request.spec_digest}", show_header=False, title_justify="left")
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for field, value in request_fields(item, ledger_incomplete=bool(missing)):
            table.add_row(field, escape(value))
        foreseen = refusals[(item.request.spec_digest, item.request.dataset)]
        if foreseen:
            table.add_row("[red]the node will refuse it[/]", "[red]" + escape("\n".join(foreseen)) + "[/]")
        else:
            table.add_row("node checks", node_checks_pass(item))
        console.print(table)
    typer.echo("decide with `medfed node approve|deny <spec hash> --dataset <dataset>`")
    if missing:
        raise typer.Exit(1)


def approve(
    spec_hash: str = typer.Argument(..., help="The spec hash (at least 8 hex characters of a request, or all 64)."),
    dataset: str = typer.Option(..., "--dataset", help="The dataset the approval covers."),
    max_epsilon: float | None = typer.Option(None, "--max-epsilon", help="Cap on this experiment's own epsilon."),
    expires: str | None = typer.Option(None, "--expires", help="When the approval lapses (YYYY-MM-DD, UTC)."),
    runs: int = typer.Option(1, "--runs", min=1, help="How many submissions of the spec may run on it (each is spent once)."),
    not_yet_requested: bool = typer.Option(
        False, "--not-yet-requested",
        help="Approve a full spec hash that no request on this node names yet (check it with the partner first).",
    ),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Approve exactly this spec on a dataset for a number of runs; any change to the spec is a new request."""
    node = NodeHome.open(home)
    with _governed():
        digest = governance.approve(
            node, spec_hash, dataset=dataset, by=by or current_officer(), max_epsilon=max_epsilon, expires=governance.parse_expiry(expires),
            runs=runs, not_yet_requested=not_yet_requested,
        )
        foreseen = governance.foreseen_refusals(node, digest, dataset, max_epsilon=max_epsilon)
    limits = [f"{runs} run{'s' if runs != 1 else ''}"]
    if max_epsilon is not None:
        limits.append(f"capped at ε {max_epsilon:g}")
    if expires is not None:
        limits.append(f"until {expires}")
    typer.echo(f"approved spec {digest[:16]} on dataset {dataset!r}" + (f" ({', '.join(limits)})" if limits else ""))
    if foreseen:
        _warn("this node will still refuse it when it runs: " + "; ".join(foreseen))
    elif not_yet_requested:
        typer.echo("no request for it has arrived yet: the node checks its policy and cohort size when it does")


_HASH_ARGUMENT = typer.Argument(..., help="The spec hash (at least 8 hex characters).")
_REASON_OPTION = typer.Option(..., "--reason", help="One line the researcher will see.")
_DATASET_OPTION = typer.Option(None, "--dataset", help="Needed only if the spec concerns several datasets.")
_HOME_OPTION = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)
_BY_OPTION = typer.Option(None, "--by", help=_BY_HELP)


def _decide(decide, home: Path, spec_hash: str, dataset: str | None, reason: str, by: str | None) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    node = NodeHome.open(home)
    with _governed():
        name = governance.decision_dataset(node, spec_hash, dataset)
        return decide(node, spec_hash, dataset=name, reason=reason, by=by or current_officer()), name


def deny(
    spec_hash: str = _HASH_ARGUMENT,
    reason: str = _REASON_OPTION,
    dataset: str | None = _DATASET_OPTION,
    home: Path = _HOME_OPTION,
    by: str = _BY_OPTION,
) -> None:
    """Deny a request; the researcher sees the reason."""
    digest, name = _decide(governance.deny, home, spec_hash, dataset, reason, by)
    typer.echo(f"denied spec {digest[:16]} on dataset {name!r}")


def revoke(
    spec_hash: str = _HASH_ARGUMENT,
    reason: str = _REASON_OPTION,
    dataset: str | None = _DATASET_OPTION,
    home: Path = _HOME_OPTION,
    by: str = _BY_OPTION,
) -> None:
    """Revoke an approval: every later message of that spec on the dataset is refused."""
    digest, name = _decide(governance.revoke, home, spec_hash, dataset, reason, by)
    typer.echo(f"revoked the approval of spec {digest[:16]} on dataset {name!r}")


decision_commands = (requests, approve, deny, revoke)


# ---------------------------------------------------------------- budgets


@budget_app.callback()
def budget_show(
    ctx: typer.Context,
    home: Path = typer.Option(None, "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
) -> None:
    """Per dataset: lifetime budget, spent, reserved by runs, remaining, charges; then every run reservation."""
    if ctx.invoked_subcommand is not None:
        return
    if home is None:
        raise NodeError("--home is required (or set MEDFED_NODE_HOME)")
    node = NodeHome.open(home)
    with _governed():
        entries = governance.verified_entries(node)
        rows = governance.budget_status(node, entries)
        missing = governance.ledger_disagreement(node, entries)
    if missing:
        _disagreement(node, missing)
    table = Table(title=f"privacy budgets of node {escape(node.name)} (PLD accountant)")
    table.add_column("dataset", no_wrap=True)
    for column in ("budget ε", "δ", "spent ε", "reserved ε", "remaining ε", "charges"):
        table.add_column(column)
    notes = []
    for row in rows:
        if row.open_reservations:
            notes.append(f"{row.dataset}: {row.open_reservations} live run reservation(s) hold ε {_fmt(row.reserved)} until their runs end or expire")
        if row.uncharged_releases:
            notes.append(f"{row.dataset}: {row.uncharged_releases} charge(s) without a release record: the node stopped before the reply left (counted)")
        if row.budget is None:
            notes.append(f"{row.dataset}: no budget, so every request is refused; set one with `medfed node budget set`")
        table.add_row(
            escape(row.dataset),
            "-" if row.budget is None else f"{row.budget.epsilon:g}",
            "-" if row.budget is None else f"{row.budget.delta:g}",
            f"[red]≥ {_fmt(row.spent)}[/]" if missing else _fmt(row.spent),
            _fmt(row.reserved),
            "[red]unknown[/]" if missing and row.budget is not None else _fmt(row.remaining),
            str(row.charges),
        )
    Console().print(table)
    for note in notes:
        typer.echo(note)
    held = [(row.dataset, status) for row in rows for status in row.reservations]
    if held:
        hours = node.policy().reservation_hold_hours
        typer.echo(f"run reservations (a run holds all its rounds from admission; one that goes quiet stops counting {hours:g} h after its last activity):")
        for dataset, status in held:
            typer.echo("  " + _reservation_line(dataset, status))
    if missing:
        raise typer.Exit(1)


def _reservation_line(dataset: str, status: governance.ReservationStatus) -> str:
    held = status.reservation
    when = ""
    if status.state == LIVE and status.expires_at is not None:
        when = f", expires {status.expires_at:%Y-%m-%d %H:%M} UTC"
    elif status.state == EXPIRED and status.expires_at is not None:
        when = f", expired {status.expires_at:%Y-%m-%d %H:%M} UTC"
    elif held.released_at is not None:
        when = f", released {held.released_at:%Y-%m-%d %H:%M} UTC"
    what = f" ({len(held.events)} releases each)" if len(held.events) > 1 else ""
    return f"{dataset}  submission {held.submission}  {status.state}: {held.charged} of {held.rounds} round(s){what} charged{when}"


@budget_app.command("set")
def budget_set(
    dataset: str = typer.Argument(..., help="The registered dataset."),
    epsilon_: float = typer.Option(..., "--epsilon", help="Lifetime epsilon the dataset may reach."),
    delta: float = typer.Option(..., "--delta", help="The delta that epsilon is measured at, e.g. 1e-5."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Set (or change) a dataset's lifetime budget; the change is audited."""
    node = NodeHome.open(home)
    with _governed():
        budget = governance.set_budget(node, dataset, epsilon_=epsilon_, delta=delta, by=by or current_officer())
    typer.echo(f"dataset {dataset!r} on node {node.name!r}: lifetime budget ε {budget.epsilon:g} at δ {budget.delta:g}")


# ---------------------------------------------------------------- the evidence pack


def report(
    out: Path = typer.Option(..., "--out", help="Folder to write the evidence pack into (created; must be empty)."),
    spec_hash: str | None = typer.Option(None, "--spec", help="Only this experiment (a spec hash); default: the whole node."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
) -> None:
    """Write the evidence pack: approvals, charges, what left, audit verification, ε over time."""
    from clients.hospital_node.report import write_report

    node = NodeHome.open(home)
    with _governed():
        pack = write_report(node, out, spec_hash=spec_hash)
    typer.echo(f"evidence pack for node {node.name!r} written to {out}: " + ", ".join(p.name for p in pack.files))
    # Written anyway (it is the evidence), and headed by the problem; the exit code says it too.
    if pack.audit_ok is False:
        _warn("the audit log FAILED verification; the pack records each problem. Run `medfed node audit verify`")
    if pack.ledger_missing:
        _disagreement(node, pack.ledger_missing)
    if pack.audit_ok is False or pack.ledger_missing:
        raise typer.Exit(1)


# ---------------------------------------------------------------- policy


@policy_app.command("show")
def policy_show(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the settings as one JSON object."),
) -> None:
    """Every policy setting in force, and whether it is what the audit log last recorded."""
    node = NodeHome.open(home)
    policy = node.policy()
    with _governed():
        last, in_force = governance.audited_policy(node)
    if as_json:
        typer.echo(json.dumps(policy.to_mapping(), indent=2, sort_keys=True))
        return
    defaults = NodePolicy().to_mapping()
    table = Table(title=f"policy of node {escape(node.name)} ({escape(str(node.policy_path))})")
    for column in ("setting", "value", "default"):
        table.add_column(column, overflow="fold")
    for key, value in policy.to_mapping().items():
        table.add_row(key, escape(_setting(value)), escape(_setting(defaults[key])))
    Console().print(table)
    if last is None:
        typer.echo("no policy change is recorded in the audit log yet: these are the defaults or a hand edit; "
                   "change settings with `medfed node policy set FIELD=VALUE ...`")
    elif in_force:
        typer.echo(f"as recorded in the audit log (seq {last.seq}, {last.time:%Y-%m-%d %H:%M} UTC, by {last.payload.get('by', '-')})")
    else:
        _warn(f"{node.policy_path} differs from the policy the audit log last recorded (seq {last.seq}): it was edited "
              "by hand or its last change was not written. Set it again with `medfed node policy set`")


def _setting(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


@policy_app.command("set")
def policy_set(
    settings: list[str] = typer.Argument(
        ..., metavar="FIELD=VALUE...",
        help=f"Settings to change, e.g. min_cohort_size=200 allowed_tasks=tabular-classification "
             f"require_secure_aggregation=true. Fields: {', '.join(POLICY_FIELDS)}.",
    ),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Change policy settings: each validated, the change audited, policy.toml rewritten whole (0600)."""
    node = NodeHome.open(home)
    with _governed():
        _, changed = governance.set_policy(node, parse_settings(settings), by=by or current_officer())
    for key, change in changed.items():
        typer.echo(f"policy.{key}: {_setting(change['from'])} -> {_setting(change['to'])}")
    typer.echo(f"node {node.name!r}: policy written to {node.policy_path} and recorded in the audit log")
