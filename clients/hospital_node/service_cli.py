"""`medfed node enrol|start|stop|status|doctor`: join the alliance and run the SuperNode.

User mistakes raise :class:`~clients.hospital_node.errors.NodeError` (or a privacy error
for keys, certificates and enrolment files); ``medfed.cli.main`` prints them as one line
and exits with code 2. `doctor` prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from clients.hospital_node.home import NodeHome
from clients.hospital_node.runtime.supervisor import DEFAULT_IDLE_SECONDS
from clients.hospital_node.service import NodeService

__all__ = ["doctor", "enrol", "start", "status", "stop"]

HOME_ENVVAR = "MEDFED_NODE_HOME"
_HOME_HELP = "The node home folder (holds node.toml and the privacy ledger)."


def enrol(
    bundle: Path = typer.Argument(..., help="The enrolment bundle from the alliance operator."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    replace: bool = typer.Option(False, "--replace", help="Replace an installed enrolment."),
) -> None:
    """Install the coordinator's CA certificate and fleet address from an enrolment bundle."""
    service = NodeService(NodeHome.open(home))
    installed = service.enrol(bundle, replace=replace)
    typer.echo(f"node {installed.node!r} enrolled as SuperNode {installed.node_id}: dials {installed.fleet_address}, "
               f"trusts CA {installed.ca_fingerprint}")


def start(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    port: int = typer.Option(
        0, "--port", min=0, max=65535,
        help="Loopback port of the SuperNode's runtime API; default: a free one (several nodes may share a host).",
    ),
    foreground: bool = typer.Option(False, "--foreground", help="Stay in the foreground (for systemd)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the coordinator to accept the node."),
    executor: str = typer.Option(
        "warm", "--executor",
        help="When the node executor runs: 'warm' (always, torch imported: fastest first message) or 'on-demand' "
             "(started when a message arrives, stopped after --executor-idle seconds without one: ~340 MB less while idle).",
    ),
    executor_idle: float = typer.Option(
        DEFAULT_IDLE_SECONDS, "--executor-idle", help="With --executor on-demand: seconds without a message before it stops."
    ),
) -> None:
    """Start the node service (a SuperNode that runs no app bundle, and the node executor); wait until accepted."""
    service = NodeService(NodeHome.open(home))
    options = {"runtime_port": port, "timeout": timeout, "executor": executor, "executor_idle_seconds": executor_idle}
    if foreground:
        typer.echo(f"starting the node service in the foreground; log {service.log_path}")
        service.start(foreground=True, **options)  # type: ignore[arg-type]
        return
    pid = service.start(**options)  # type: ignore[arg-type]
    typer.echo(f"node service running (pid {pid}), accepted by {service.enrolment().fleet_address}; log {service.log_path}")


def stop(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Stop the SuperNode (SIGTERM to its process group, then wait)."""
    pid = NodeService(NodeHome.open(home)).stop()
    typer.echo("the SuperNode was not running" if pid is None else f"stopped the SuperNode (pid {pid})")


def _report(service: NodeService, *, connect: bool) -> None:
    failed = False
    for check in service.checks(connect=connect):
        typer.echo(str(check))
        failed |= check.level == "fail"
    if failed:
        raise typer.Exit(1)


def status(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Is the SuperNode running and accepted; enrolment and keys (no network)."""
    service = NodeService(NodeHome.open(home))
    pid = service.pid()
    typer.echo(f"{'ok   ' if pid else 'warn '} SuperNode: {'running (pid %d)' % pid if pid else 'not running'}")
    failed = False
    for check in service.checks(connect=False):
        if check.what in ("enrolment", "auth key", "registration", "CA certificate"):
            typer.echo(str(check))
            failed |= check.level == "fail"
    if failed:
        raise typer.Exit(1)


def doctor(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Check everything: enrolment, keys, TLS to the coordinator, datasets, audit log, ledger, disk."""
    _report(NodeService(NodeHome.open(home)), connect=True)
