"""`medfed node source`: register a hospital's OMOP CDM tables as a dataset, and validate them again.

A source is a folder of Parquet/CSV files, a SQLite file, or a PostgreSQL database (URL
without password, password in an owner-only file). Registering opens it as one snapshot,
validates it and prints the report; nothing is recorded if it cannot be opened. Its
lifetime budget is set like any dataset's, with `medfed node budget set NAME`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from clients.hospital_node.data.sources import OmopSource, check_source
from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import OMOP_SCRATCH_DIR, DatasetEntry, NodeHome

__all__ = ["source_app"]

HOME_ENVVAR = "MEDFED_NODE_HOME"
_HOME_HELP = "The node home folder (holds node.toml and the privacy ledger)."

source_app = typer.Typer(help="Register and validate the node's OMOP sources.", no_args_is_help=True)


def _source(folder: Path | None, sqlite: Path | None, postgres: str | None,
            password_file: Path | None, schema: str | None) -> OmopSource:
    given = [option for option, value in (("--folder", folder), ("--sqlite", sqlite), ("--postgres", postgres))
             if value is not None]
    if len(given) != 1:
        found = f"; found {' and '.join(given)}" if given else ""
        raise NodeError(f"give exactly one of --folder DIR, --sqlite FILE or --postgres URL{found}")
    if postgres is None and (password_file is not None or schema is not None):
        raise NodeError("--password-file and --schema apply only to --postgres")
    if folder is not None:
        return OmopSource("folder", str(folder.expanduser().resolve()))
    if sqlite is not None:
        return OmopSource("sqlite", str(sqlite.expanduser().resolve()))
    assert postgres is not None
    if password_file is None:
        raise NodeError("--postgres needs --password-file FILE: the password on one line, mode 0600")
    return OmopSource("postgres", postgres, password_file.expanduser().resolve(), schema or "public")


@source_app.command("add")
def add(
    name: str = typer.Argument(..., help="Name the dataset is known by in experiment specs."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    folder: Path | None = typer.Option(None, "--folder", help="A folder with <table>.parquet or <table>.csv files."),
    sqlite: Path | None = typer.Option(None, "--sqlite", help="An OMOP SQLite database file."),
    postgres: str | None = typer.Option(
        None, "--postgres", help="postgresql://user@host:port/database, WITHOUT password."
    ),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="With --postgres: the file holding the password (mode 0600)."
    ),
    schema: str | None = typer.Option(None, "--schema", help="With --postgres: the schema of the OMOP tables."),
    replace: bool = typer.Option(False, "--replace", help="Replace a dataset of the same name."),
) -> None:
    """Validate an OMOP source and register it as a dataset of this node; print the validation report."""
    node = NodeHome.open(home)
    source = _source(folder, sqlite, postgres, password_file, schema)
    check_source(source)  # one line naming the option or file, before any registration is built
    entry = DatasetEntry(name=name, path=node.path / OMOP_SCRATCH_DIR / name, kind="omop", omop=source)
    report = node.register_dataset(entry, replace=replace)
    typer.echo(f"registered OMOP dataset {name!r} on node {node.name!r} from {source.describe()}")
    typer.echo(report.render())  # type: ignore[union-attr]  # an OMOP registration returns its report
    typer.echo(f"set its lifetime budget with `medfed node budget set {name} --epsilon E --delta D`")


@source_app.command("validate")
def validate(
    name: str = typer.Argument(..., help="The registered OMOP dataset."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
) -> None:
    """Open the dataset's source as a fresh snapshot and print its validation report."""
    from clients.hospital_node.data.sources import open_snapshot

    node = NodeHome.open(home)
    entry = node.dataset(name)
    if entry.kind != "omop" or entry.omop is None:
        raise NodeError(f"dataset {name!r} is of kind {entry.kind!r}, not 'omop'; `medfed node source validate` "
                        "validates OMOP sources only")
    with open_snapshot(entry.omop, scratch=entry.path) as snapshot:
        typer.echo(f"OMOP dataset {name!r} on node {node.name!r} from {entry.omop.describe()}")
        typer.echo(snapshot.report.render())
