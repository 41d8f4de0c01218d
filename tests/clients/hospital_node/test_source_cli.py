"""`medfed node source`: add and validate OMOP sources through the Typer app and the medfed entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.hospital_node.cli import app
from clients.hospital_node.errors import NodeError, OmopSourceError
from clients.hospital_node.home import NodeHome

from tests.postgres import PostgresServer, write_password_file
from .data.omop_data import load_postgres, write_parquet_folder, write_sqlite

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "node"
    result = runner.invoke(app, ["init", "--home", str(folder), "--name", "hospital_3"])
    assert result.exit_code == 0, result.output
    return folder


def test_source_add_folder_registers_validates_and_prints_the_report(home: Path, tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    result = runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--folder", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"registered OMOP dataset 'ehr' on node 'hospital_3' from folder {folder.resolve()}"
    assert "measurement.value_as_number: implausible, 1 row: drop the row" in result.output
    assert lines[-1] == "set its lifetime budget with `medfed node budget set ehr --epsilon E --delta D`"
    entry = NodeHome.open(home).dataset("ehr")
    assert entry.kind == "omop" and entry.omop is not None
    assert entry.omop.kind == "folder" and entry.omop.location == str(folder.resolve())
    assert entry.path == home.resolve() / "omop-scratch" / "ehr"
    assert list(entry.path.iterdir()) == []  # the staged snapshot is gone


def test_source_validate_prints_the_report_again(home: Path, tmp_path: Path) -> None:
    path = write_sqlite(tmp_path / "omop.sqlite")
    added = runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--sqlite", str(path)])
    assert added.exit_code == 0, added.output
    result = runner.invoke(app, ["source", "validate", "ehr", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"OMOP dataset 'ehr' on node 'hospital_3' from sqlite {path.resolve()}"
    report_lines = [line for line in result.output.splitlines() if line.startswith("  person ")]
    assert report_lines == [f"  {'person':<22} {9:>10} {5:>10} {4:>10}"]


def test_an_omop_dataset_takes_a_budget(home: Path, tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    assert runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--folder", str(folder)]).exit_code == 0
    result = runner.invoke(app, ["budget", "set", "ehr", "--epsilon", "3", "--delta", "1e-5", "--home", str(home),
                                 "--by", "officer"])
    assert result.exit_code == 0, result.output
    assert "lifetime budget ε 3 at δ 1e-05" in result.output


def test_node_toml_stores_the_source_relative_to_the_home(home: Path) -> None:
    folder = write_parquet_folder(home / "data" / "omop")
    assert runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--folder", str(folder)]).exit_code == 0
    table = tomllib.loads((home / "node.toml").read_text())["datasets"]["ehr"]
    assert table == {"kind": "omop", "source": "folder", "location": "data/omop",
                     "validation_fraction": 0.2, "split_seed": 0}
    moved = home.parent / "moved"
    home.rename(moved)
    assert NodeHome.open(moved).dataset("ehr").omop.location == str(moved.resolve() / "data" / "omop")  # type: ignore[union-attr]


def test_postgres_source_is_stored_without_password(
    home: Path, postgres_server: PostgresServer, fresh_database: str, tmp_path: Path
) -> None:
    with postgres_server.connect(fresh_database) as connection:
        load_postgres(connection, schema="cdm")
    password_file = write_password_file(home / "cdm.pw", postgres_server.password)
    url = postgres_server.url(fresh_database)
    result = runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--postgres", url,
                                 "--password-file", str(password_file), "--schema", "cdm"])
    assert result.exit_code == 0, result.output
    text = (home / "node.toml").read_text()
    assert postgres_server.password not in text and postgres_server.password not in result.output
    table = tomllib.loads(text)["datasets"]["ehr"]
    assert table["location"] == url and table["password_file"] == "cdm.pw" and table["schema"] == "cdm"
    validated = runner.invoke(app, ["source", "validate", "ehr", "--home", str(home)])
    assert validated.exit_code == 0, validated.output
    assert f"from PostgreSQL {url} schema cdm" in validated.output


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["--folder", "{tmp}/nowhere"], OmopSourceError, r"OMOP folder .*/nowhere does not exist"),
        (["--sqlite", "{tmp}/nowhere.sqlite"], OmopSourceError, r"SQLite file .*/nowhere.sqlite does not exist"),
        ([], NodeError, r"give exactly one of --folder DIR, --sqlite FILE or --postgres URL"),
        (["--folder", "{tmp}", "--sqlite", "{tmp}/x"], NodeError, r"found --folder and --sqlite"),
        (["--postgres", "postgresql://u@h/db"], NodeError, r"--postgres needs --password-file FILE"),
        (["--postgres", "mysql://u@h/db", "--password-file", "{pw}"], OmopSourceError, r"found scheme 'mysql'"),
        (["--postgres", "postgresql://u:hunter2@h/db", "--password-file", "{pw}"], NodeError, r"holds a password"),
        (["--postgres", "postgresql://u@127.0.0.1:1/db", "--password-file", "{pw}"], OmopSourceError,
         r"cannot connect to PostgreSQL postgresql://u@127.0.0.1:1/db"),
        (["--postgres", "postgresql://u@127.0.0.1:1/db", "--password-file", "{open_pw}"], OmopSourceError,
         r"password file .*open.pw is readable by other users \(mode 0644\); run `chmod 600 .*open.pw`"),
        (["--sqlite", "{tmp}", "--schema", "x"], NodeError, r"--password-file and --schema apply only to --postgres"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_and_writes_nothing(
    home: Path, tmp_path: Path, args: list[str], error: type[Exception], message: str
) -> None:
    write_password_file(tmp_path / "pw", "hunter2")
    write_password_file(tmp_path / "open.pw", "hunter2", mode=0o644)
    before = (home / "node.toml").read_text()
    filled = [a.format(tmp=tmp_path, pw=tmp_path / "pw", open_pw=tmp_path / "open.pw") for a in args]
    result = runner.invoke(app, ["source", "add", "ehr", "--home", str(home), *filled])
    assert isinstance(result.exception, error), result.output
    assert __import__("re").search(message, str(result.exception)), str(result.exception)
    assert "\n" not in str(result.exception)
    assert "hunter2" not in str(result.exception)
    assert (home / "node.toml").read_text() == before


def test_the_medfed_command_prints_one_line_and_exits_2(home: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from medfed.cli import main; main()", "node", "source", "add", "ehr",
         "--home", str(home), "--folder", str(tmp_path / "nowhere")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: OMOP folder {tmp_path / 'nowhere'} does not exist; give the folder that holds "
        "<table>.parquet or <table>.csv files"
    )
    assert "Traceback" not in result.stderr


def test_validate_refuses_a_dataset_of_another_kind(home: Path, tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    runner.invoke(app, ["source", "add", "ehr", "--home", str(home), "--folder", str(folder)])
    result = runner.invoke(app, ["source", "validate", "nope", "--home", str(home)])
    assert isinstance(result.exception, NodeError)
    assert "dataset 'nope' is not registered" in str(result.exception)
