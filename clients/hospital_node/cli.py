"""`medfed node`: set up a hospital node and register its datasets.

User mistakes raise :class:`~clients.hospital_node.errors.NodeError` subclasses;
``medfed.cli.main`` prints them as one line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import DatasetEntry, NodeHome

__all__ = ["app", "dataset_app"]

HOME_ENVVAR = "MEDFED_NODE_HOME"

app = typer.Typer(help="Run and govern a hospital node.", no_args_is_help=True)
dataset_app = typer.Typer(help="Register and list the node's datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

_HOME_HELP = "The node home folder (holds node.toml and the privacy ledger)."


@app.command()
def init(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    name: str = typer.Option(..., "--name", help="The node's name, e.g. hospital_1."),
) -> None:
    """Create a node home with an empty dataset registry."""
    node = NodeHome.create(home, name=name)
    typer.echo(f"created node home {node.path} for node {node.name!r}")


def _feature_list(features: str) -> list[str]:
    names = [name.strip() for name in features.split(",")]
    if not any(names):
        raise NodeError("--features must name at least one column, e.g. --features age,bmi")
    if not all(names):
        raise NodeError(f"--features has an empty name in {features!r}; separate names with single commas")
    return names


@dataset_app.command("add")
def add(
    name: str = typer.Argument(..., help="Name the dataset is known by in experiment specs."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    file: Path = typer.Option(..., "--file", help="The cohort file: .csv, .parquet or .pq."),
    id_column: str = typer.Option(..., "--id-column", help="Column of pseudonymous patient ids."),
    label_column: str = typer.Option(..., "--label-column", help="Column of the 0/1 outcome."),
    features: str = typer.Option(..., "--features", help="Feature columns, comma-separated."),
    site_column: str | None = typer.Option(
        None, "--site-column", help="With --site-value: keep only this site's rows of the file."
    ),
    site_value: str | None = typer.Option(None, "--site-value", help="This site's value in --site-column."),
    validation_fraction: float = typer.Option(
        0.2, "--validation-fraction", help="Share of patients held out for validation."
    ),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the split by patient id."),
    replace: bool = typer.Option(False, "--replace", help="Replace a dataset of the same name."),
) -> None:
    """Validate a tabular file and register it as a dataset of this node."""
    node = NodeHome.open(home)
    entry = DatasetEntry(
        name=name,
        path=file.expanduser().resolve(),
        id_column=id_column,
        label_column=label_column,
        feature_columns=tuple(_feature_list(features)),
        site_column=site_column,
        site_value=site_value,
        validation_fraction=validation_fraction,
        split_seed=split_seed,
    )
    data = node.register_dataset(entry, replace=replace)
    typer.echo(
        f"registered dataset {entry.name!r} on node {node.name!r}: "
        f"{data.n_train + data.n_val} rows ({data.n_train} training, {data.n_val} validation), "
        f"{len(entry.feature_columns)} features"
    )


@dataset_app.command("list")
def list_datasets(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
) -> None:
    """List the datasets registered on this node."""
    node = NodeHome.open(home)
    datasets = node.datasets()
    if not datasets:
        typer.echo(f"no datasets registered on node {node.name!r}; add one with `medfed node dataset add`")
        return
    table = Table(title=f"datasets of node {escape(node.name)}")
    for column in ("name", "file", "id", "label", "features", "site filter", "validation", "seed"):
        table.add_column(column)
    for name in sorted(datasets):
        entry = datasets[name]
        site = f"{entry.site_column} = {entry.site_value}" if entry.site_column else "-"
        cells = (
            name,
            str(entry.path),
            entry.id_column,
            entry.label_column,
            str(len(entry.feature_columns)),
            site,
            f"{entry.validation_fraction:g}",
            str(entry.split_seed),
        )
        table.add_row(*(escape(cell) for cell in cells))
    Console().print(table)
