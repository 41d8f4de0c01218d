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

from clients.hospital_node.audit_cli import audit_app, egress
from clients.hospital_node.console.cli import console_app
from clients.hospital_node.data.scoring_cli import score
from clients.hospital_node.errors import NodeError
from clients.hospital_node.home import DatasetEntry, ImagingSource, NodeHome
from clients.hospital_node.officer_cli import budget_app, decision_commands, partners_app, policy_app, report
from clients.hospital_node.privacy_check_cli import privacy_check
from clients.hospital_node.runtime.apps_cli import apps_app
from clients.hospital_node.service import NodeService
from clients.hospital_node.service_cli import doctor, enrol, start, status, stop
from clients.hospital_node.source_cli import source_app

__all__ = ["app", "dataset_app"]

HOME_ENVVAR = "MEDFED_NODE_HOME"

app = typer.Typer(help="Run and govern a hospital node.", no_args_is_help=True)
dataset_app = typer.Typer(help="Register and list the node's datasets.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
app.add_typer(source_app, name="source")
app.add_typer(audit_app, name="audit")
app.command("egress")(egress)
app.command("score")(score)
app.command("privacy-check")(privacy_check)
for _command in (enrol, start, stop, status, doctor, *decision_commands, report):
    app.command(_command.__name__)(_command)
app.add_typer(partners_app, name="partners")
app.add_typer(budget_app, name="budget")
app.add_typer(apps_app, name="apps")
app.add_typer(policy_app, name="policy")
app.add_typer(console_app, name="console")

_HOME_HELP = "The node home folder (holds node.toml and the privacy ledger)."


@app.command()
def init(
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    name: str = typer.Option(..., "--name", help="The node's name, e.g. hospital_1."),
) -> None:
    """Create a node home, its keys and the enrolment request to send to the alliance operator."""
    node = NodeHome.create(home, name=name)
    service = NodeService(node)
    request = service.prepare_enrolment()
    typer.echo(f"created node home {node.path} for node {node.name!r}")
    typer.echo(f"  auth key {service.auth_key_path} ({request.auth_fingerprint})")
    typer.echo(f"  audit key {node.audit_key_path} ({request.audit_fingerprint})")
    typer.echo(f"enrolment request {service.request_path}: send it to the alliance operator "
               "(`medfed coordinator enrol`):")
    typer.echo(request.to_toml().rstrip())


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


def _names(option: str, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(","))
    if not all(names):
        raise NodeError(f"{option} has an empty name in {value!r}; separate names with single commas")
    return names


def _deid_table(config: Path | None, options: str | None, burned_in: str | None) -> dict[str, object]:
    """The [deid] settings: a TOML file's table, or the shortcuts' (not both)."""
    import tomllib

    if config is not None:
        if options is not None or burned_in is not None:
            raise NodeError("give --deid-config or --deid-options/--burned-in, not both")
        try:
            return tomllib.loads(config.expanduser().read_text(encoding="utf-8"))
        except OSError as err:
            raise NodeError(f"cannot read --deid-config {config}: {err.strerror or err}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise NodeError(f"--deid-config {config} is not valid TOML: {err}") from None
    table: dict[str, object] = {}
    if options is not None:
        table["options"] = list(_names("--deid-options", options))
    if burned_in is not None:
        table["burned_in"] = {"mode": burned_in}
    return table


@dataset_app.command("add-imaging")
def add_imaging(
    name: str = typer.Argument(..., help="Name the dataset is known by in experiment specs."),
    home: Path = typer.Option(..., "--home", envvar=HOME_ENVVAR, help=_HOME_HELP),
    folder: Path = typer.Option(..., "--folder", help="The DICOM folder, as the PACS exported it."),
    labels: Path = typer.Option(
        ..., "--labels", help="CSV with columns patient_id and label (0/1), optionally issuer."
    ),
    modalities: str | None = typer.Option(None, "--modalities", help="Series modalities to keep, e.g. CT,MR."),
    body_parts: str | None = typer.Option(None, "--body-parts", help="Body Part Examined values, e.g. CHEST."),
    series_description: str = typer.Option(
        "", "--series-description", help="Regular expression the Series Description must contain."
    ),
    deid_config: Path | None = typer.Option(
        None, "--deid-config", help="TOML file of de-identification settings (options, burned_in, ...)."
    ),
    deid_options: str | None = typer.Option(
        None, "--deid-options", help="PS3.15 options, comma-separated, e.g. clean_descriptors."
    ),
    burned_in: str | None = typer.Option(
        None, "--burned-in", help="Images that may carry burned-in text: exclude (default) or clean."
    ),
    validation_fraction: float = typer.Option(
        0.2, "--validation-fraction", help="Share of patients held out for validation."
    ),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the split by pseudonymous patient id."),
    replace: bool = typer.Option(False, "--replace", help="Replace a dataset of the same name."),
) -> None:
    """De-identify a DICOM folder into the node's cache and register it as an imaging dataset."""
    node = NodeHome.open(home)
    entry = DatasetEntry(
        name=name,
        path=folder.expanduser().resolve(),
        kind="imaging",
        imaging=ImagingSource(
            labels=labels.expanduser().resolve(),
            modalities=_names("--modalities", modalities),
            body_parts=_names("--body-parts", body_parts),
            series_description=series_description,
            deid=_deid_table(deid_config, deid_options, burned_in),
        ),
        validation_fraction=validation_fraction,
        split_seed=split_seed,
    )
    # Imported here: it pulls in pydicom, which the other commands do not need.
    from clients.hospital_node.imaging_connector import ImagingInventory

    inventory = node.register_dataset(entry, replace=replace)
    assert isinstance(inventory, ImagingInventory)  # what an imaging registration returns
    excluded = sum(inventory.files_excluded.values())
    reasons = ", ".join(f"{reason} {count}" for reason, count in inventory.files_excluded.items())
    typer.echo(
        f"registered imaging dataset {entry.name!r} on node {node.name!r}: "
        f"{inventory.files_seen} files, {inventory.files_written} de-identified, "
        f"{excluded} excluded{f' ({reasons})' if reasons else ''}; "
        f"{inventory.patients_with_images} patients with images, {inventory.patients_labelled} of them labelled"
    )
    if inventory.deid.links_not_followed:
        typer.secho(
            f"{inventory.deid.links_not_followed} symbolic link(s) in the folder lead out of it and were not followed; "
            "copy those files into the folder if they belong to the dataset",
            fg=typer.colors.YELLOW,
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
    for column in ("name", "kind", "file", "id", "label", "features", "filter", "validation", "seed"):
        table.add_column(column)
    for name in sorted(datasets):
        entry = datasets[name]
        location = str(entry.path)
        if entry.omop is not None:
            location = entry.omop.describe()
            middle = ("person_id", "-", "OMOP CDM v5.4", "-")
        elif entry.imaging is not None:
            source = entry.imaging
            selection = [
                ",".join(source.modalities) or "any modality",
                ",".join(source.body_parts) or "any body part",
                f"/{source.series_description}/" if source.series_description else "any description",
            ]
            middle = ("patient_id", str(source.labels), "images", "; ".join(selection))
        else:
            site = f"{entry.site_column} = {entry.site_value}" if entry.site_column else "-"
            middle = (entry.id_column, entry.label_column, str(len(entry.feature_columns)), site)
        cells = (
            name,
            entry.kind,
            location,
            *middle,
            f"{entry.validation_fraction:g}",
            str(entry.split_seed),
        )
        table.add_row(*(escape(cell) for cell in cells))
    Console().print(table)
