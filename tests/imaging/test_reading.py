"""Scanning a folder into patients, studies and series; selection; slice order; bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging.errors import SeriesError
from imaging.reading import IssueCode, scan_folder, select_series, series_problems, sort_slices
from tests.imaging.conftest import CohortFactory


def test_a_cohort_is_indexed_by_patient_study_and_series(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=3, size=16, slices=4, seed=1)
    report = scan_folder(cohort.root)

    assert report.issues == ()
    assert report.files_seen == 12
    assert len(report.index.patients) == 3
    assert [len(p.studies) for p in report.index.patients] == [1, 1, 1]
    series = list(report.index.iter_series())
    assert [len(s.instances) for s in series] == [4, 4, 4]
    assert {(s.modality, s.body_part) for s in series} == {("CT", "CHEST")}


def test_slices_are_sorted_by_position_not_by_instance_number(cohort_factory: CohortFactory) -> None:
    # The synthetic series numbers its slices against their positions.
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=5, seed=1)
    [series] = scan_folder(cohort.root).index.iter_series()
    ordered = sort_slices(series)

    z = [s.instance.position[2] for s in ordered]  # type: ignore[index]
    assert z == sorted(z) and len(set(z)) == 5
    assert [s.instance.instance_number for s in ordered] == [5, 4, 3, 2, 1]


def test_a_multi_frame_instance_gives_one_slice_per_frame(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="south", modality="CT", n_patients=1, size=16, slices=4, seed=1)
    [series] = scan_folder(cohort.root).index.iter_series()
    [instance] = series.instances
    ordered = sort_slices(series)

    assert instance.frames == 4
    assert instance.frame_positions is not None
    assert [s.frame for s in ordered] == [0, 1, 2, 3]
    assert [s.instance for s in ordered] == [instance] * 4


def test_series_are_selected_by_modality_body_part_and_description(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    ct = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=2, seed=1)
    dx = cohort_factory(hospital="east", modality="DX", n_patients=2, size=16, seed=2)
    root = tmp_path / "mixed"
    root.mkdir()
    ct.root.rename(root / "ct")
    dx.root.rename(root / "dx")
    index = scan_folder(root).index

    assert len(select_series(index, modality="CT")) == 2
    assert len(select_series(index, modality=["dx", "cr"])) == 2
    assert len(select_series(index, body_part="CHEST")) == 4
    assert len(select_series(index, description=r"^axial\b")) == 2
    assert len(select_series(index, modality="CT", description="PA$")) == 0


def test_an_invalid_description_pattern_is_a_series_error(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=1)
    with pytest.raises(SeriesError, match="not a valid regular expression"):
        select_series(scan_folder(cohort.root).index, description="(unclosed")


def test_bad_files_are_reported_per_file_and_the_scan_goes_on(
    cohort_factory: CohortFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=3, seed=3)
    files = cohort.files
    files[0].write_bytes(files[0].read_bytes()[:-300])  # pixel data cut short
    files[1].write_bytes(files[1].read_bytes()[:700])  # cut inside the header
    no_pixels = pydicom.dcmread(files[2])
    del no_pixels.PixelData
    no_pixels.save_as(files[2])
    (cohort.root / "notes.txt").write_text("exported by QZX PACS")
    (cohort.root / "copy.dcm").write_bytes(files[3].read_bytes())  # the same instance twice

    with caplog.at_level(logging.DEBUG, logger="imaging"):
        report = scan_folder(cohort.root)

    assert report.counts() == {
        "truncated": 2,
        "missing_pixel_data": 1,
        "not_dicom": 1,
        "duplicate_instance": 1,
    }
    assert report.index.instance_count == 3
    text = " ".join(i.detail for i in report.issues) + " ".join(r.getMessage() for r in caplog.records)
    assert not any(t.lower() in text.lower() for t in cohort.planted_text)
    assert str(cohort.root) not in text


def test_inconsistent_series_are_refused_with_every_problem(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=3, seed=4)
    files = sorted(cohort.files)
    other = pydicom.dcmread(files[0])
    other.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    other.ImageOrientationPatient = [0, 1, 0, 0, 0, 1]
    other.Rows, other.Columns = 8, 8
    other.save_as(files[0])
    [series] = scan_folder(cohort.root).index.iter_series()

    assert series_problems(series) == (
        "instances have 2 different matrix sizes",
        "instances have 2 different orientations",
        "two slices share one position",
    )
    with pytest.raises(SeriesError, match="2 different matrix sizes; instances have 2 different orientations"):
        sort_slices(series)


def test_duplicate_positions_make_a_series_inconsistent(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=3, seed=4)
    files = sorted(cohort.files)
    first = pydicom.dcmread(files[0])
    first.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    first.save_as(files[0])
    [series] = scan_folder(cohort.root).index.iter_series()
    with pytest.raises(SeriesError, match="two slices share one position"):
        sort_slices(series)


def test_pydicom_test_files_scan_without_error() -> None:
    root = Path(get_testdata_file("CT_small.dcm", download=False)).parent  # type: ignore[arg-type]
    report = scan_folder(root)
    assert report.index.instance_count > 40
    codes = {issue.code for issue in report.issues}
    assert IssueCode.TRUNCATED in codes and IssueCode.NOT_DICOM in codes
    assert report.files_seen == report.index.instance_count + len(report.issues)


def test_the_scan_root_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "absent")


def test_reprs_carry_no_patient_identifiers(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=5)
    report = scan_folder(cohort.root)
    text = repr(report)
    assert not any(t.lower() in text.lower() for t in cohort.planted_text)
    assert not any(u in text for u in cohort.planted_uids)


def test_a_series_description_pattern_runs_in_linear_time_whoever_wrote_it() -> None:
    import time

    from imaging.reading import compile_description

    pattern = compile_description("(.|.)*#")  # exponential for a backtracking engine
    started = time.process_time()
    assert pattern.search("a" * 10_000) is None
    assert time.process_time() - started < 0.5
    assert compile_description("AXIAL").search("axial 5mm") is not None  # case-insensitive
    with pytest.raises(ValueError, match="invalid escape sequence"):
        compile_description(r"(a)\1")  # a backreference: RE2 refuses what it cannot run in linear time
