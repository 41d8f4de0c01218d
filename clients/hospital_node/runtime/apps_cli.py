"""`medfed node apps`: which app bundles the node serves with its installed medfed ClientApp.

User mistakes raise :class:`~clients.hospital_node.errors.NodeError`; ``medfed.cli.main``
prints them as one line and exits with code 2.
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.runtime.allowed_apps import AllowedApps, allow_app, remove_app
from federation.release import AppIdentity, installed_identity

__all__ = ["apps_app"]

HOME_ENVVAR = "MEDFED_NODE_HOME"
_HOME_HELP = "The node home folder."
_BY_HELP = "Who changes the list (recorded in the audit log); default: your user name."

apps_app = typer.Typer(
    help="The app releases this node serves (its allow-list); any other run is refused before data is touched.",
    no_args_is_help=True,
)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "hospital-it"


@apps_app.command("list")
def list_apps(home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP)) -> None:
    """Show the allowed releases, and whether the release installed here is one of them."""
    node = NodeHome.open(home)
    installed = installed_identity()
    apps = AllowedApps(node.path).list()
    table = Table(title=f"apps node {escape(node.name)} serves")
    for column in ("app", "version", "content digest", "allowed by", "allowed at (UTC)", ""):
        table.add_column(column)
    for app in apps:
        table.add_row(
            escape(app.identity.app_id), escape(app.identity.version), app.identity.digest[:16],
            escape(app.added_by), app.added_at.strftime("%Y-%m-%d %H:%M"), "installed here" if app.identity == installed else "",
        )
    Console().print(table if apps else f"node {node.name!r} serves no app: every run is refused")
    if all(app.identity != installed for app in apps):
        typer.echo(f"the installed release {installed} is not allowed; `medfed node apps allow` allows it")


@apps_app.command("allow")
def allow(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    app_id: str | None = typer.Option(None, "--app-id", help="Another release's app id (publisher/name); default: the installed release."),
    version: str | None = typer.Option(None, "--version", help="That release's version."),
    digest: str | None = typer.Option(None, "--digest", help="That release's content digest (64 hex characters)."),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Allow the medfed release installed here (default), or the release named by --app-id, --version and --digest."""
    node = NodeHome.open(home)
    given = [value for value in (app_id, version, digest) if value is not None]
    if given and len(given) != 3:
        raise NodeError("--app-id, --version and --digest go together; give all three, or none for the installed release")
    if given:
        assert app_id is not None and version is not None and digest is not None
        if not re.fullmatch(r"[0-9a-f]{64}", digest.strip().lower()):
            raise NodeError(f"--digest must be 64 hex characters (as `medfed node apps list` prints them); found {digest!r}")
        identity = AppIdentity(app_id.strip(), version.strip(), digest.strip().lower())
    else:
        identity = installed_identity()
    entry = allow_app(node, identity, by=by or _user())
    typer.echo(f"node {node.name!r} serves {entry.identity} (allowed by {entry.added_by})")


@apps_app.command("remove")
def remove(
    digest: str = typer.Argument(..., help="The release's content digest, or its first 8+ characters."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    by: str = typer.Option(None, "--by", help=_BY_HELP),
) -> None:
    """Stop serving a release: its runs are refused from the next message on."""
    node = NodeHome.open(home)
    removed = remove_app(node, digest, by=by or _user())
    typer.echo(f"node {node.name!r} no longer serves {removed.identity}")
