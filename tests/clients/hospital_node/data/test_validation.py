"""Validation of an OMOP snapshot: each rule, counts that add up, and no value from the data in a report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.hospital_node.data.omop_tables import TABLES
from clients.hospital_node.data.sources import OmopSource, open_snapshot
from clients.hospital_node.data.validation import PROBLEM_KINDS, ValidationReport, validate
from clients.hospital_node.errors import OmopSourceError

from .omop_data import SENTINEL, SENTINEL_NUMBER, SNAPSHOT, arrow_tables, rows, write_csv_folder, write_parquet_folder


def report_of(folder: Path, tmp_path: Path) -> ValidationReport:
    with open_snapshot(OmopSource("folder", str(folder)), scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        return snapshot.report


@pytest.fixture
def report(tmp_path: Path) -> ValidationReport:
    return report_of(write_parquet_folder(tmp_path / "omop"), tmp_path)


@pytest.mark.parametrize(
    ("table", "kind", "column", "count"),
    [
        ("person", "implausible", "year_of_birth", 1),
        ("person", "future", "year_of_birth", 1),
        ("person", "duplicate_key", "person_id", 2),
        ("observation_period", "unknown_person", "person_id", 1),
        ("condition_occurrence", "unknown_person", "person_id", 1),
        ("condition_occurrence", "before_birth", "condition_start_date", 1),
        ("condition_occurrence", "future", "condition_start_date", 1),
        ("condition_occurrence", "unused_concept", "condition_concept_id", 1),
        ("measurement", "implausible", "value_as_number", 1),
        ("measurement", "wrong_unit", "unit_concept_id", 1),
        ("measurement", "duplicate_key", "measurement_id", 2),
        ("measurement", "unused_concept", "measurement_concept_id", 1),
        ("measurement", "unused_concept", "measurement_type_concept_id", 1),
    ],
)
def test_each_planted_problem_is_counted_once(
    report: ValidationReport, table: str, kind: str, column: str, count: int
) -> None:
    assert report.rows(table, kind, column) == count


def test_dropped_rows_add_up_per_table(report: ValidationReport) -> None:
    for count in report.tables:
        assert count.dropped == report.dropped_by_problem(count.table), count.table
    assert [(t.table, t.read, t.kept) for t in report.tables] == [
        ("person", 9, 5), ("observation_period", 6, 5), ("visit_occurrence", 1, 1),
        ("condition_occurrence", 5, 2), ("measurement", 9, 5), ("observation", 1, 1), ("drug_exposure", 1, 1),
    ]


def test_every_problem_states_its_rule(report: ValidationReport) -> None:
    rules = {(p.kind, p.rule) for p in report.problems}
    assert ("unused_concept", "keep: not used by medfed") in rules
    assert ("implausible", "drop the patient (their rows in the other tables go with them)") in rules
    assert ("wrong_unit", "drop the row") in rules
    text = report.render()
    for kind in PROBLEM_KINDS:
        assert f"{kind}: " in text  # the rules line lists every kind


def test_the_module_docstring_documents_every_problem_kind() -> None:
    import clients.hospital_node.data.validation as validation

    for kind in PROBLEM_KINDS:
        assert f"\n{kind} " in validation.__doc__  # type: ignore[operator]


def test_wrong_types_in_required_columns_drop_and_in_optional_ones_null(tmp_path: Path) -> None:
    folder = write_csv_folder(tmp_path / "omop")
    text = (folder / "measurement.csv").read_text().splitlines()
    header = text[0].split(",")
    row = dict(zip(header, text[1].split(",")))
    bad_date = {**row, "measurement_id": "100", "measurement_date": "not-a-date"}
    bad_value = {**row, "measurement_id": "101", "value_as_number": "abc", "unit_concept_id": "8876"}
    half_id = {**row, "measurement_id": "102.5"}
    empty_person = {**row, "measurement_id": "103", "person_id": ""}
    for extra in (bad_date, bad_value, half_id, empty_person):
        text.append(",".join(extra[h] for h in header))
    (folder / "measurement.csv").write_text("\n".join(text) + "\n")
    with open_snapshot(OmopSource("folder", str(folder)), scratch=tmp_path / "s", today=SNAPSHOT) as snapshot:
        report = snapshot.report
        kept = snapshot.connection.execute(
            "SELECT value_as_number FROM measurement WHERE measurement_id = 101").fetchall()
    assert kept == [(None,)]
    assert report.rows("measurement", "wrong_type", "measurement_date") == 1
    assert report.rows("measurement", "wrong_type", "measurement_id") == 1
    assert report.rows("measurement", "missing_value", "person_id") == 1
    assert report.rows("measurement", "wrong_type", "value_as_number") == 1
    assert report.table("measurement").dropped == report.dropped_by_problem("measurement")


def test_a_parquet_column_of_another_type_is_cast_or_counted(tmp_path: Path) -> None:
    folder = write_parquet_folder(tmp_path / "omop")
    table = pq.read_table(folder / "observation.parquet")
    as_text = table.set_column(table.schema.get_field_index("observation_date"), "observation_date",
                               pa.array(["2023-01-01"], pa.string()))
    pq.write_table(as_text, folder / "observation.parquet")
    report = report_of(folder, tmp_path)
    assert report.table("observation").kept == 1


def test_missing_required_columns_are_all_named(tmp_path: Path) -> None:
    connection = duckdb.connect()
    for name, table in arrow_tables().items():
        if name == "person":
            table = table.drop_columns(["year_of_birth"])
        if name == "drug_exposure":
            table = table.drop_columns(["drug_concept_id", "drug_exposure_start_date"])
        connection.register(f"raw_{name}", table)
    with pytest.raises(OmopSourceError) as caught:
        validate(connection, snapshot_date=SNAPSHOT)
    assert str(caught.value) == (
        "the OMOP source lacks required columns person.year_of_birth (required by OMOP CDM v5.4), "
        "drug_exposure.drug_concept_id (required by OMOP CDM v5.4), drug_exposure.drug_exposure_start_date "
        "(required by OMOP CDM v5.4); add them to the source's tables (OMOP CDM v5.4 names) and try again"
    )


def test_columns_are_matched_whatever_their_case(tmp_path: Path) -> None:
    connection = duckdb.connect()
    for name, table in arrow_tables().items():
        connection.register(f"raw_{name}", table.rename_columns([c.upper() for c in table.column_names]))
    report = validate(connection, snapshot_date=SNAPSHOT)
    assert report.table("measurement").kept == 5


def test_a_report_holds_no_value_read_from_the_data(tmp_path: Path) -> None:
    data = rows()
    for table in ("measurement", "condition_occurrence"):
        for row in data[table]:
            row[f"{table}_source_value"] = SENTINEL
    data["measurement"][1]["value_as_number"] = SENTINEL_NUMBER  # implausible sbp: dropped and counted
    folder = write_csv_folder(tmp_path / "omop", data)
    # A sentinel where a number belongs: counted as a wrong type, never echoed.
    text = (folder / "measurement.csv").read_text().replace("128.0", SENTINEL)
    (folder / "measurement.csv").write_text(text)
    report = report_of(folder, tmp_path)
    rendered = report.render() + repr(report) + repr(report.to_mapping())
    assert report.rows("measurement", "wrong_type", "value_as_number") == 1
    for secret in (SENTINEL, str(SENTINEL_NUMBER), "987654", "1200"):
        assert secret not in rendered


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.none(),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(numbers, min_size=1, max_size=12), concepts=st.lists(
    st.sampled_from(["3004249", "3012888", "3027018", "3000963", "x", "", "1e3", "-5"]), min_size=12, max_size=12))
def test_arbitrary_values_never_raise_and_every_drop_is_counted(
    values: list[Any], concepts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Whatever a numeric column holds, validation finishes and read = kept + every counted drop."""
    tables = arrow_tables()
    connection = duckdb.connect()
    for name, table in tables.items():
        if name != "measurement":
            connection.register(f"raw_{name}", table)
    n = len(values)
    measurement = pa.table({
        "measurement_id": pa.array([str(i) for i in range(n)]),
        "person_id": pa.array(["1"] * n),
        "measurement_concept_id": pa.array(concepts[:n]),
        "measurement_date": pa.array(["2024-01-01"] * n),
        "measurement_type_concept_id": pa.array(["32817"] * n),
        "value_as_number": pa.array(values, pa.string()),
        "unit_concept_id": pa.array(["8876"] * n),
    })
    connection.register("raw_measurement", measurement)
    report = validate(connection, snapshot_date=SNAPSHOT)
    counts = report.table("measurement")
    assert counts.read == n
    assert counts.dropped == report.dropped_by_problem("measurement")
    kept = connection.execute("SELECT value_as_number FROM measurement").fetchall()
    assert len(kept) == counts.kept
    assert all(v is None or math.isfinite(v) for (v,) in kept)


@pytest.mark.parametrize("ids", [[10, 11, 12, 12], [10, 10**12, 10**12, 3 * 10**12]], ids=["dense", "sparse"])
def test_repeated_keys_are_found_whether_ids_are_dense_or_sparse(ids: list[int], tmp_path: Path) -> None:
    # Dense ids are checked with one bit per value, sparse ones by a group-by: both find the pair.
    folder = write_parquet_folder(tmp_path / "omop")
    table = pq.read_table(folder / "observation.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    pq.write_table(pa.Table.from_pylist([{**row, "observation_id": i} for i in ids], table.schema),
                   folder / "observation.parquet")
    report = report_of(folder, tmp_path)
    assert report.rows("observation", "duplicate_key", "observation_id") == 2
    assert report.table("observation").kept == 2
