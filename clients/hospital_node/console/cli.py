"""`medfed node console`: serve the officer's web console; `medfed node console init`: add an officer account.

The console is bound to 127.0.0.1 unless ``--host`` says otherwise, and then it warns:
it speaks plain HTTP, so an officer on another machine should reach it through an SSH
tunnel to the loopback port rather than over the network. User mistakes raise
:class:`~clients.hospital_node.errors.NodeError` subclasses (``ConsoleError``), which
``medfed`` prints as one line with exit code 2.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import typer

from clients.hospital_node.console.accounts import MIN_PASSWORD_LENGTH, OfficerAccounts, session_key
from clients.hospital_node.errors import ConsoleError, NodeError
from clients.hospital_node.home import NodeHome

__all__ = ["allowed_hosts", "console_app", "host_warning"]

HOME_ENVVAR = "MEDFED_NODE_HOME"
_HOME_HELP = "The node home folder."

console_app = typer.Typer(
    help="The officer's web console (budgets, requests, decisions, audit trail). `init` adds an officer account.",
    invoke_without_command=True,
)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """What `medfed node console --host HOST` warns, or None for a loopback address."""
    if _loopback(host):
        return None
    return (f"warning: --host {host} makes the console reachable from other machines over plain HTTP: officer "
            "passwords and session cookies would cross the network unencrypted. Prefer the default 127.0.0.1 "
            "and an SSH tunnel (ssh -L 8470:127.0.0.1:8470 node-host)")


def allowed_hosts(host: str) -> list[str]:
    """The Host headers the console answers: loopback names, plus the bound address when it is one."""
    from clients.hospital_node.console.app import LOOPBACK_HOSTS

    if host in ("0.0.0.0", "::", ""):
        return ["*"]  # every address of the machine: no name to check against
    return [*LOOPBACK_HOSTS, host]


@console_app.callback()
def serve(
    ctx: typer.Context,
    home: Path = typer.Option(None, "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback warns."),
    port: int = typer.Option(8470, "--port", min=1, max=65535, help="TCP port to listen on."),
    session_minutes: float = typer.Option(30.0, "--session-minutes", help="How long a login lasts."),
) -> None:
    """Serve the officer's console for one node home (Ctrl-C stops it)."""
    if ctx.invoked_subcommand is not None:
        return
    if home is None:
        raise NodeError("--home is required (or set MEDFED_NODE_HOME)")
    import uvicorn

    from clients.hospital_node.console.app import create_app

    app = create_app(home, session_minutes=session_minutes, allowed_hosts=allowed_hosts(host))
    warning = host_warning(host)
    if warning is not None:
        typer.secho(warning, fg=typer.colors.RED, err=True)
    shown = f"[{host}]" if ":" in host else host
    node = NodeHome.open(home)
    typer.echo(f"console of node {node.name!r} on http://{shown}:{port}/ "
               f"(officers: {', '.join(app.state.console.accounts.names())}; sessions last {session_minutes:g} min)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)


@console_app.command("init")
def init(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    officer: str = typer.Option(..., "--officer", help="The officer's name, as decisions will record it."),
    replace: bool = typer.Option(False, "--replace", help="Set a new password for an existing officer."),
) -> None:
    """Add a named officer account (the password is asked twice and stored as a salted scrypt hash, 0600)."""
    node = NodeHome.open(home)
    accounts = OfficerAccounts(node.path)
    if officer in accounts.names() and not replace:
        raise ConsoleError(f"officer {officer!r} already has an account in {accounts.path}; pass --replace to set a new password")
    password = typer.prompt(f"password for officer {officer} (at least {MIN_PASSWORD_LENGTH} characters)", hide_input=True)
    again = typer.prompt("the same password again", hide_input=True)
    if password != again:
        raise ConsoleError("the two passwords differ; nothing was written")
    accounts.add(officer, password, replace=replace)
    session_key(node.path, create=True)
    typer.echo(f"officer {officer!r} can log in to the console of node {node.name!r} "
               f"(accounts in {accounts.path}, mode 0600); start it with `medfed node console --home {node.path}`")
