"""`medfed node`: init, dataset add and dataset list through the Typer app."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from clients.hospital_node.cli import HOME_ENVVAR, app
from clients.hospital_node.connectors import TabularConnector
from clients.hospital_node.errors import ConnectorError, NodeError, NodeHomeError
from clients.hospital_node.home import NodeHome
from medfed.synth import FEATURES, ID_COLUMN, LABEL, SITE_COLUMN

from .conftest import SENTINEL

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "node"
    result = runner.invoke(app, ["init", "--home", str(folder), "--name", "hospital_2"])
    assert result.exit_code == 0, result.output
    return folder


def add_args(home: Path, file: Path, *extra: str, name: str = "htn_cohort") -> list[str]:
    return [
        "dataset", "add", name,
        "--home", str(home),
        "--file", str(file),
        "--id-column", ID_COLUMN,
        "--label-column", LABEL,
        "--features", ",".join(FEATURES),
        *extra,
    ]  # fmt: skip


def test_init_creates_the_node_home(tmp_path: Path) -> None:
    result = runner.invoke(app, ["init", "--home", str(tmp_path / "h"), "--name", "hospital_1"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"created node home {(tmp_path / 'h').resolve()} for node 'hospital_1'"
    assert NodeHome.open(tmp_path / "h").name == "hospital_1"
    # ... with its Fleet auth key and the enrolment request for the operator, printed too.
    assert (tmp_path / "h" / "keys" / "fleet_auth.key").exists()
    assert "[enrolment_request]" in result.output
    assert (tmp_path / "h" / "enrolment-request.toml").exists()


def test_init_twice_is_a_node_home_error(home: Path) -> None:
    result = runner.invoke(app, ["init", "--home", str(home), "--name", "again"])
    assert isinstance(result.exception, NodeHomeError)
    assert "already exists" in str(result.exception)


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Run and govern a hospital node." in result.output
    assert "dataset" in result.output


def test_dataset_add_validates_and_prints_counts(home: Path, cohort: pd.DataFrame, tmp_path: Path) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    result = runner.invoke(app, add_args(home, tmp_path / "cohort.csv"))
    assert result.exit_code == 0, result.output
    entry = NodeHome.open(home).dataset("htn_cohort")
    assert entry.feature_columns == FEATURES
    assert entry.path == (tmp_path / "cohort.csv").resolve()
    loaded = TabularConnector(entry).load()
    assert result.output.strip() == (
        f"registered dataset 'htn_cohort' on node 'hospital_2': {len(cohort)} rows "
        f"({loaded.n_train} training, {loaded.n_val} validation), 16 features"
    )


def test_dataset_add_relative_file_is_resolved_from_the_working_directory(
    home: Path, cohort: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, add_args(home, Path("cohort.csv")))
    assert result.exit_code == 0, result.output
    assert NodeHome.open(home).dataset("htn_cohort").path == (tmp_path / "cohort.csv").resolve()


def test_dataset_add_with_a_site_filter(home: Path, alliance_frame: pd.DataFrame, tmp_path: Path) -> None:
    alliance_frame.to_parquet(tmp_path / "extract.parquet", index=False)
    args = add_args(
        home,
        tmp_path / "extract.parquet",
        "--site-column", SITE_COLUMN,
        "--site-value", "hospital_3",
        "--validation-fraction", "0.3",
        "--split-seed", "9",
    )  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = int((alliance_frame[SITE_COLUMN] == "hospital_3").sum())
    assert f": {rows} rows (" in result.output
    stored = tomllib.loads((home / "node.toml").read_text())["datasets"]["htn_cohort"]
    assert (stored["site_value"], stored["validation_fraction"], stored["split_seed"]) == ("hospital_3", 0.3, 9)


def test_dataset_add_of_a_bad_file_writes_nothing_and_shows_no_values(
    home: Path, cohort: pd.DataFrame, tmp_path: Path
) -> None:
    before = (home / "node.toml").read_bytes()
    cohort["bmi"] = cohort["bmi"].astype(object)
    cohort.loc[[0, 1], "bmi"] = SENTINEL
    cohort.loc[2, ID_COLUMN] = cohort.loc[3, ID_COLUMN]
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    result = runner.invoke(app, add_args(home, tmp_path / "cohort.csv"))
    assert isinstance(result.exception, ConnectorError)
    message = str(result.exception)
    assert "feature column 'bmi' is not numeric: 2 rows hold non-numeric values" in message
    assert "id column 'patient_id' has 1 ids on more than one row (2 rows)" in message
    assert SENTINEL not in message and SENTINEL not in result.output
    assert (home / "node.toml").read_bytes() == before


def test_dataset_add_refuses_a_duplicate_unless_replace(home: Path, cohort: pd.DataFrame, tmp_path: Path) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    assert runner.invoke(app, add_args(home, tmp_path / "cohort.csv")).exit_code == 0
    again = runner.invoke(app, add_args(home, tmp_path / "cohort.csv", "--split-seed", "2"))
    assert isinstance(again.exception, NodeHomeError)
    assert "pass --replace to replace it" in str(again.exception)
    replaced = runner.invoke(app, add_args(home, tmp_path / "cohort.csv", "--split-seed", "2", "--replace"))
    assert replaced.exit_code == 0, replaced.output
    assert NodeHome.open(home).dataset("htn_cohort").split_seed == 2


def test_dataset_add_with_an_empty_feature_name(home: Path, tmp_path: Path) -> None:
    args = add_args(home, tmp_path / "cohort.csv")
    args[args.index("--features") + 1] = "age,,bmi"
    result = runner.invoke(app, args)
    assert isinstance(result.exception, NodeError)
    assert str(result.exception) == "--features has an empty name in 'age,,bmi'; separate names with single commas"


def test_dataset_add_with_an_invalid_fraction_names_the_field(home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, add_args(home, tmp_path / "cohort.csv", "--validation-fraction", "1.5"))
    assert isinstance(result.exception, NodeHomeError)
    assert "datasets.htn_cohort.validation_fraction must be in [0, 1); found 1.5" in str(result.exception)


def test_dataset_add_on_a_missing_home(tmp_path: Path) -> None:
    result = runner.invoke(app, add_args(tmp_path / "nowhere", tmp_path / "cohort.csv"))
    assert isinstance(result.exception, NodeHomeError)
    assert "does not exist; create it with `medfed node init" in str(result.exception)


def test_dataset_list_shows_the_registry(home: Path, cohort: pd.DataFrame, tmp_path: Path) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    runner.invoke(app, add_args(home, tmp_path / "cohort.csv", name="htn_a"))
    site = ("--site-column", SITE_COLUMN, "--site-value", "hospital_2")
    runner.invoke(app, add_args(home, tmp_path / "cohort.csv", *site, name="htn_b"))
    result = runner.invoke(app, ["dataset", "list", "--home", str(home)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "datasets of node hospital_2" in result.output
    assert "htn_a" in result.output and "htn_b" in result.output
    assert "site = hospital_2" in result.output
    assert result.output.index("htn_a") < result.output.index("htn_b")


def test_dataset_list_of_an_empty_node(home: Path) -> None:
    result = runner.invoke(app, ["dataset", "list", "--home", str(home)])
    assert result.exit_code == 0
    assert result.output.strip() == "no datasets registered on node 'hospital_2'; add one with `medfed node dataset add`"


def test_home_can_come_from_the_environment(home: Path) -> None:
    result = runner.invoke(app, ["dataset", "list"], env={HOME_ENVVAR: str(home)})
    assert result.exit_code == 0
    assert "hospital_2" in result.output


# ---------------------------------------------------------------- imaging datasets


def imaging_args(site, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        "dataset", "add-imaging", "chest_ct",
        "--home", str(site.home.path),
        "--folder", str(site.folder),
        "--labels", str(site.labels),
        *extra,
    ]  # fmt: skip


def test_dataset_add_imaging_deidentifies_registers_and_prints_counts(imaging_site) -> None:  # type: ignore[no-untyped-def]
    (imaging_site.folder / "README.txt").write_text("export notes\n")
    args = imaging_args(imaging_site, "--modalities", "CT", "--body-parts", "CHEST", "--deid-options", "clean_descriptors")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "registered imaging dataset 'chest_ct' on node 'hospital_7': 29 files, 28 de-identified, "
        "1 excluded (not_dicom 1); 14 patients with images, 14 of them labelled"
    )
    entry = NodeHome.open(imaging_site.home.path).dataset("chest_ct")
    assert entry.kind == "imaging" and entry.imaging is not None
    assert (entry.imaging.modalities, entry.imaging.body_parts) == (("CT",), ("CHEST",))
    assert dict(entry.imaging.deid) == {"options": ["clean_descriptors"]}
    listed = runner.invoke(app, ["dataset", "list", "--home", str(imaging_site.home.path)], env={"COLUMNS": "250"})
    assert "imaging" in listed.output and "CT; CHEST; any description" in listed.output


def test_dataset_add_imaging_reads_a_deid_config_file(imaging_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "deid.toml"
    config.write_text('options = ["clean_descriptors"]\nmax_date_shift_days = 30\n[burned_in]\nmode = "exclude"\n')
    result = runner.invoke(app, imaging_args(imaging_site, "--deid-config", str(config)))
    assert result.exit_code == 0, result.output
    entry = NodeHome.open(imaging_site.home.path).dataset("chest_ct")
    assert entry.imaging is not None and entry.imaging.deid["max_date_shift_days"] == 30


def test_dataset_add_imaging_refuses_a_config_file_with_shortcuts(imaging_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, imaging_args(imaging_site, "--deid-config", str(tmp_path / "x.toml"), "--burned-in", "clean"))
    assert isinstance(result.exception, NodeError)
    assert str(result.exception) == "give --deid-config or --deid-options/--burned-in, not both"


def test_dataset_add_imaging_reports_bad_settings_by_field(imaging_site) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, imaging_args(imaging_site, "--burned-in", "clean", "--deid-options", "retain_uid"))
    assert isinstance(result.exception, NodeHomeError)
    message = str(result.exception)
    assert "datasets.chest_ct.deid.options[0] 'retain_uid' is not a PS3.15 option; did you mean 'retain_uids'?" in message
    assert "datasets.chest_ct.deid.burned_in.rules must list at least one rule when mode is 'clean'" in message
