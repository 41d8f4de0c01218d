"""OMOP datasets in the node home: node.toml round trip, every problem by field, nothing written on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital_node.data.sources import OmopSource
from clients.hospital_node.data.validation import ValidationReport
from clients.hospital_node.errors import NodeHomeError, OmopSourceError
from clients.hospital_node.home import DatasetEntry, NodeHome

from .data.omop_data import write_parquet_folder


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    return NodeHome.create(tmp_path / "home", name="hospital_4")


def omop_entry(node: NodeHome, source: OmopSource, name: str = "ehr") -> DatasetEntry:
    return DatasetEntry(name=name, path=node.path / "omop-scratch" / name, kind="omop", omop=source)


def test_register_returns_the_report_and_round_trips(node: NodeHome, tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    report = node.register_dataset(omop_entry(node, OmopSource("folder", str(folder))))
    assert isinstance(report, ValidationReport)
    assert report.table("person").kept == 5
    entry = NodeHome.open(node.path).dataset("ehr")
    assert entry == omop_entry(node, OmopSource("folder", str(folder)))
    assert entry.columns == ()


def test_postgres_entry_round_trips_with_its_password_file(node: NodeHome) -> None:
    (node.path / "cdm.pw").write_text("x\n")
    source = OmopSource("postgres", "postgresql://reader@db:5432/cdm", node.path / "cdm.pw", "cdm")
    config = node.config_path.read_text() + (
        '\n[datasets.ehr]\nkind = "omop"\nsource = "postgres"\nlocation = "postgresql://reader@db:5432/cdm"\n'
        'password_file = "cdm.pw"\nschema = "cdm"\n'
    )
    node.config_path.write_text(config)
    assert NodeHome.open(node.path).dataset("ehr") == omop_entry(node, source)


def test_a_failed_registration_writes_nothing(node: NodeHome, tmp_path: Path) -> None:
    before = node.config_path.read_text()
    with pytest.raises(OmopSourceError, match="does not exist"):
        node.register_dataset(omop_entry(node, OmopSource("folder", str(tmp_path / "nowhere"))))
    assert node.config_path.read_text() == before


def test_node_toml_problems_are_all_named_by_field(node: NodeHome) -> None:
    node.config_path.write_text(node.config_path.read_text() + (
        '\n[datasets.a]\nkind = "omop"\nsource = "postgress"\nlocation = "postgresql://u@h/db"\n'
        '\n[datasets.b]\nkind = "omop"\nsource = "postgres"\nlocation = "postgresql://u:pw@h/db"\n'
        '\n[datasets.c]\nkind = "omop"\nsource = "folder"\nlocation = "x"\nschema = "cdm"\nid_column = "id"\n'
        '\n[datasets.d]\nkind = "omop"\nsource = "sqlite"\n'
    ))
    with pytest.raises(NodeHomeError) as caught:
        NodeHome.open(node.path)
    message = str(caught.value)
    for expected in (
        "datasets.a.source must be one of 'folder', 'sqlite', 'postgres'; found 'postgress'; did you mean 'postgres'?",
        "datasets.b.location holds a password; move it to datasets.b.password_file (mode 0600)",
        "datasets.b.password_file is required for source 'postgres'",
        "datasets.c.schema applies only to source 'postgres'",
        "datasets.c.id_column does not apply to kind 'omop'",
        "datasets.d.location is missing",
    ):
        assert expected in message
    assert ":pw@" not in message


def test_an_entry_needs_absolute_paths_and_its_source(node: NodeHome) -> None:
    with pytest.raises(NodeHomeError, match=r"datasets.ehr.location must be an absolute path; found 'rel'"):
        omop_entry(node, OmopSource("folder", "rel"))
    with pytest.raises(NodeHomeError, match=r"datasets.ehr.omop is required for kind 'omop'"):
        DatasetEntry(name="ehr", path=node.path / "x", kind="omop")


def test_doctor_checks_an_omop_source_without_reading_it(node: NodeHome, tmp_path: Path) -> None:
    from clients.hospital_node.service import _dataset_check

    folder = write_parquet_folder(tmp_path / "omop")
    entry = omop_entry(node, OmopSource("folder", str(folder)))
    assert _dataset_check(node, entry).level == "ok"
    (folder / "person.parquet").rename(tmp_path / "moved.parquet")  # a table gone: found by a full read only
    assert _dataset_check(node, entry).level == "ok"
    gone = omop_entry(node, OmopSource("folder", str(tmp_path / "gone")))
    check = _dataset_check(node, gone)
    assert check.level == "fail" and "does not exist" in check.detail
