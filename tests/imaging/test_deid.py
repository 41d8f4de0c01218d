"""De-identification of synthetic hospital exports: no leaks, consistent studies, reports."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file

from imaging.deid import Deidentifier, _Staging, remove_stale_staging
from imaging.deid_config import DeidConfig
from imaging.errors import DeidentificationError
from imaging.pixels import BurnedInMode, BurnedInPolicy, CleaningRule, Region
from imaging.profile import ProfileOption
from imaging.reading import scan_folder
from imaging.report import FileStatus
from imaging.synth import SynthCohort
from tests.imaging.conftest import CohortFactory
from tests.imaging.planting import OTHER_SECRET, SECRET
from tests.paused_process import kill_when_paused

CLEAN_TOP_ROWS = BurnedInPolicy(
    mode=BurnedInMode.CLEAN, rules=(CleaningRule(regions=(Region(top=0, left=0, bottom=8, right=4096),)),)
)


def _outputs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _leaks(cohort: SynthCohort, out_root: Path) -> list[str]:
    found: list[str] = []
    for path in _outputs(out_root):
        found += cohort.find_leaks(path.read_bytes())
        found += cohort.name_leaks(str(path.relative_to(out_root)))
    return found


@pytest.mark.parametrize("hospital", ["north", "east", "south"])
@pytest.mark.parametrize("modality", ["CT", "DX"])
def test_no_planted_identifier_survives_in_files_or_names(
    cohort_factory: CohortFactory, tmp_path: Path, hospital: str, modality: str
) -> None:
    cohort = cohort_factory(hospital=hospital, modality=modality, n_patients=4, size=32, slices=3, seed=11)
    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")

    assert report.written
    assert _leaks(cohort, tmp_path / "out") == []


def test_the_synthetic_export_leaks_before_de_identification(cohort_factory: CohortFactory) -> None:
    # The leak oracle works: every raw file shows planted identifiers.
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=32, slices=2, seed=3)
    assert all(cohort.find_leaks(f.read_bytes()) for f in cohort.files)
    assert all(cohort.name_leaks(str(f.relative_to(cohort.root))) for f in cohort.files)


def test_burned_in_images_are_excluded_by_default_with_the_reason(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=4, size=32, seed=5, burned_in_fraction=0.5)
    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")

    burned = sum(p.burned_in for p in cohort.patients)
    assert report.exclusion_counts() == {"burned_in_annotation": burned}
    assert len(report.written) == len(cohort.patients) - burned
    assert all("policy excludes" in f.detail for f in report.excluded)  # type: ignore[operator]


def test_burned_in_text_is_blanked_when_the_policy_cleans(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="east", modality="CT", n_patients=4, size=32, slices=2, seed=5, burned_in_fraction=0.5)
    config = DeidConfig(burned_in=CLEAN_TOP_ROWS)
    report = Deidentifier(secret=SECRET, config=config).deidentify_folder(cohort.root, tmp_path / "out")

    assert not report.excluded
    cleaned = [f for f in report.files if f.pixels == "cleaned"]
    assert len(cleaned) == 2 * sum(p.burned_in for p in cohort.patients)
    assert _leaks(cohort, tmp_path / "out") == []
    ds = pydicom.dcmread(tmp_path / "out" / cleaned[0].output_name)  # type: ignore[operator]
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]


def test_a_suspect_image_without_a_rule_for_its_device_is_excluded(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=2, size=32, seed=5, burned_in_fraction=0.5)
    policy = BurnedInPolicy(
        mode=BurnedInMode.CLEAN,
        rules=(CleaningRule(regions=(Region(0, 0, 8, 32),), manufacturer="NOBODY"),),
    )
    report = Deidentifier(secret=SECRET, config=DeidConfig(burned_in=policy)).deidentify_folder(
        cohort.root, tmp_path / "out"
    )
    assert report.exclusion_counts() == {"no_cleaning_rule": 1}


def test_uid_references_stay_consistent_across_the_files_of_a_study(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=4, seed=2, burned_in_fraction=0)
    Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    datasets = [pydicom.dcmread(p) for p in _outputs(tmp_path / "out")]
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)

    assert len(by_study) == 2
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    for members in by_study.values():
        assert len(members) == 4
        assert len({ds.SeriesInstanceUID for ds in members}) == 1
        assert len({ds.FrameOfReferenceUID for ds in members}) == 1
        assert len({ds.PatientID for ds in members}) == 1
        for ds in members:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for ref in ds.get("ReferencedImageSequence", []):
                assert ref.ReferencedSOPInstanceUID in sop_uids  # points at a de-identified slice
    referenced = [ref for ds in datasets for ref in ds.get("ReferencedImageSequence", [])]
    assert len(referenced) == 2 * 3


def test_the_same_secret_gives_the_same_output_and_another_secret_does_not(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="south", modality="CT", n_patients=2, size=16, slices=2, seed=4, burned_in_fraction=0)
    first = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "a")
    second = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "b")
    other = Deidentifier(secret=OTHER_SECRET).deidentify_folder(cohort.root, tmp_path / "c")

    assert [f.output_sha256 for f in first.files] == [f.output_sha256 for f in second.files]
    assert [f.output_name for f in first.files] == [f.output_name for f in second.files]
    assert not {f.output_name for f in first.files} & {f.output_name for f in other.files}
    assert first.key_fingerprint != other.key_fingerprint


def test_patient_name_and_id_become_one_keyed_pseudonym(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=3, size=16, seed=8, burned_in_fraction=0)
    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    pseudonyms = set()
    for outcome in report.written:
        ds = pydicom.dcmread(tmp_path / "out" / outcome.output_name)  # type: ignore[operator]
        assert str(ds.PatientName) == ds.PatientID
        assert outcome.output_name.startswith(ds.PatientID + "/")  # type: ignore[union-attr]
        pseudonyms.add(ds.PatientID)
    assert len(pseudonyms) == 3
    assert all(p.startswith("MF-") and len(p) == 19 for p in pseudonyms)


def test_modified_dates_shift_each_patient_by_one_keyed_offset(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    import datetime as dt

    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=2, seed=6, burned_in_fraction=0)
    config = DeidConfig(options=frozenset({ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES}), max_date_shift_days=400)
    Deidentifier(secret=SECRET, config=config).deidentify_folder(cohort.root, tmp_path / "out")
    originals = {pydicom.dcmread(f).StudyInstanceUID: pydicom.dcmread(f).StudyDate for f in cohort.files}
    assert len(originals) == 2
    shifts = set()
    for path in _outputs(tmp_path / "out"):
        ds = pydicom.dcmread(path)
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.StudyDate == ds.SeriesDate == ds.AcquisitionDate
        shifted = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        candidates = [(dt.datetime.strptime(d, "%Y%m%d").date() - shifted).days for d in originals.values()]
        assert any(1 <= c <= 400 for c in candidates)
        shifts.add((ds.PatientID, ds.StudyDate))
        assert ds.PatientBirthDate == ""  # Z in every option set
    assert len({p for p, _ in shifts}) == 2


@pytest.mark.parametrize(
    ("option", "keyword"),
    [
        (ProfileOption.RETAIN_PATIENT_CHARACTERISTICS, "PatientAge"),
        (ProfileOption.RETAIN_PATIENT_CHARACTERISTICS, "PatientSex"),
        (ProfileOption.RETAIN_DEVICE_IDENTITY, "DeviceSerialNumber"),
        (ProfileOption.RETAIN_DEVICE_IDENTITY, "StationName"),
        (ProfileOption.RETAIN_INSTITUTION_IDENTITY, "InstitutionName"),
        (ProfileOption.RETAIN_UIDS, "StudyInstanceUID"),
        (ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES, "StudyDate"),
    ],
)
def test_a_retain_option_keeps_its_attributes(
    cohort_factory: CohortFactory, tmp_path: Path, option: ProfileOption, keyword: str
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=9, burned_in_fraction=0)
    original = pydicom.dcmread(cohort.files[0])
    Deidentifier(secret=SECRET, config=DeidConfig(options=frozenset({option}))).deidentify_folder(
        cohort.root, tmp_path / "out"
    )
    [path] = _outputs(tmp_path / "out")
    ds = pydicom.dcmread(path)
    assert ds.data_element(keyword).value == original.data_element(keyword).value
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100" and len(codes) == 2


def test_clean_descriptors_keeps_the_description_without_the_patient(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=9, burned_in_fraction=0)
    config = DeidConfig(options=frozenset({ProfileOption.CLEAN_DESCRIPTORS}))
    Deidentifier(secret=SECRET, config=config).deidentify_folder(cohort.root, tmp_path / "out")
    [path] = _outputs(tmp_path / "out")
    ds = pydicom.dcmread(path)

    assert ds.StudyDescription == "DX CHEST FOLLOWUP"
    assert ds.SeriesDescription == "CHEST PA"
    assert ds.ImageComments == "patient id tolerated well"
    assert _leaks(cohort, tmp_path / "out") == []


def test_the_output_is_valid_dicom(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="east", modality="CT", n_patients=2, size=16, slices=2, seed=1, burned_in_fraction=0)
    Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    try:
        for path in _outputs(tmp_path / "out"):
            raw = path.read_bytes()
            assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
            ds = pydicom.dcmread(path)
            for _ in ds.iterall():  # every value decodes under strict validation
                pass
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.DeidentificationMethod == "DICOM PS3.15 2026d Basic Application Confidentiality Profile"
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.pixel_array.shape == (16, 16)
    finally:
        pydicom_config.settings.reading_validation_mode = previous


def test_the_report_records_digests_counts_and_profile_but_no_values(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=3, size=16, seed=12, burned_in_fraction=0.34)
    (cohort.root / "notes.txt").write_text("not an image")
    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    document = report.to_dict()
    text = json.dumps(document)

    assert document["profile"] == "Basic Application Level Confidentiality Profile"
    assert document["edition"] == "DICOM PS3.15 2026d Table E.1-1"
    assert document["files_in"] == 4 and document["files_excluded"] == 2
    assert document["exclusions"] == {"burned_in_annotation": 1, "not_dicom": 1}
    assert set(document["action_counts"]) <= {"X", "Z", "D", "U", "C", "K"}
    assert document["action_counts"]["X"] > 0
    for outcome in report.written:
        written = (tmp_path / "out" / outcome.output_name).read_bytes()  # type: ignore[operator]
        assert hashlib.sha256(written).hexdigest() == outcome.output_sha256
    inputs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in cohort.root.rglob("*") if p.is_file()}
    assert {f.input_sha256 for f in report.files} == inputs
    assert not any(token.lower() in text.lower() for token in cohort.planted_text)
    assert str(cohort.root) not in text


def test_logs_and_exclusion_details_carry_no_identifier(
    cohort_factory: CohortFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=3, size=16, seed=12, burned_in_fraction=0.34)
    truncated = cohort.files[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with caplog.at_level(logging.DEBUG, logger="imaging"):
        report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    messages = " ".join(r.getMessage() for r in caplog.records) + " ".join(
        f"{f.reason} {f.detail}" for f in report.excluded
    )
    assert caplog.records
    assert "truncated" in messages
    assert not any(token.lower() in messages.lower() for token in cohort.planted_text)
    assert not any(number in messages for number in cohort.planted_numbers)
    assert str(cohort.root) not in messages


def test_bad_inputs_are_reported_per_file_and_the_rest_proceeds(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=3, seed=13, burned_in_fraction=0)
    files = cohort.files
    files[0].write_bytes(files[0].read_bytes()[:-200])  # pixel data cut short
    files[1].write_bytes(files[1].read_bytes()[:200])  # cut inside the header
    no_pixels = pydicom.dcmread(files[2])
    del no_pixels.PixelData
    no_pixels.save_as(files[2])
    (cohort.root / "README.txt").write_text("exported by PACS")
    jpeg_ls = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False))  # type: ignore[arg-type]
    flagged = pydicom.dcmread(jpeg_ls)
    flagged.BurnedInAnnotation = "YES"
    flagged.save_as(cohort.root / "flagged.dcm")
    config = DeidConfig(burned_in=CLEAN_TOP_ROWS)

    report = Deidentifier(secret=SECRET, config=config).deidentify_folder(cohort.root, tmp_path / "out")

    assert report.exclusion_counts() == {
        "truncated": 2,
        "missing_pixel_data": 1,
        "not_dicom": 1,
        "pixel_decoder_missing": 1,
    }
    assert len(report.written) == 3
    decoder = next(f for f in report.excluded if f.reason == "pixel_decoder_missing")
    assert "1.2.840.10008.1.2.4.80" in decoder.detail and "pyjpegls" in decoder.detail  # type: ignore[operator]
    assert not list((tmp_path / "out").rglob("*.partial"))
    assert all(p.stat().st_size > 0 for p in _outputs(tmp_path / "out"))


def test_a_data_set_without_instance_uids_is_refused(deidentifier: Deidentifier) -> None:
    ds = pydicom.Dataset()
    ds.PatientName = "QZXNOBODY"
    with pytest.raises(DeidentificationError, match="no SOPClassUID") as info:
        deidentifier.deidentify_dataset(ds)
    assert info.value.code == "not_an_instance"


BUNDLED = sorted(
    Path(get_testdata_file("CT_small.dcm", download=False)).parent.glob("*.dcm")  # type: ignore[arg-type]
)
KNOWN_EXCLUSIONS = {
    "not_an_instance",
    "not_dicom",
    "truncated",
    "pixel_decoder_missing",
    "pixel_decode_failed",
}


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # one bundled file mislabels its VR
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_pydicom_test_files_de_identify_without_error(path: Path, tmp_path: Path) -> None:
    deidentifier = Deidentifier(secret=SECRET, config=DeidConfig(burned_in=CLEAN_TOP_ROWS))
    outcome, _ = deidentifier.deidentify_file(path, tmp_path)

    if outcome.status is FileStatus.EXCLUDED:
        assert outcome.reason in KNOWN_EXCLUSIONS
        return
    written = (tmp_path / outcome.output_name).read_bytes()  # type: ignore[operator]
    ds = pydicom.dcmread(io.BytesIO(written))
    assert ds.PatientIdentityRemoved == "YES"
    assert not [t for t in ds.keys() if (t >> 16) & 1]
    original = pydicom.dcmread(path, force=True)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID"):
        before = str(original.get(keyword, "") or "")
        if before:
            assert str(ds.get(keyword, "")) != before


def test_most_pydicom_test_files_are_written() -> None:
    deidentifier = Deidentifier(secret=SECRET, config=DeidConfig(burned_in=CLEAN_TOP_ROWS))
    statuses = []
    for path in BUNDLED:
        try:
            _, result, _ = deidentifier.deidentify_bytes(path.read_bytes())
            statuses.append(result is not None)
        except DeidentificationError:
            statuses.append(False)
    assert len(BUNDLED) > 70
    assert sum(statuses) >= 55


def test_several_processes_give_the_same_report_as_one(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="east", modality="DX", n_patients=4, size=16, seed=14, burned_in_fraction=0.25)
    one = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "one")
    two = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "two", workers=2)
    assert one.to_dict() == two.to_dict()


def test_the_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes; found 8"):
        Deidentifier(secret=b"tooshort")


def _safeguard_dataset() -> pydicom.Dataset:
    from tests.imaging.planting import base_dataset

    ds = base_dataset()
    ds.add_new(0x00200242, "UI", "2.25.4242")  # SOP Instance UID of Concatenation Source: not in the table
    ds.add_new(0x00140104, "PN", "QZXREVIEWER^ANNA")  # Secondary Reviewer Name: not in the table
    ds.add_new(0x00141020, "DA", "19470312")  # Expiry Date: not in the table
    ds.FrameOfReferenceUID = "1.2.840.10008.1.4.1.1"  # a well-known frame (Talairach), not an instance
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = "2.25.4242"
    ds.ReferencedImageSequence = [ref]
    return ds


def test_safeguards_cover_names_dates_and_instance_uids_the_table_lacks(deidentifier: Deidentifier) -> None:
    ds = _safeguard_dataset()
    result = deidentifier.deidentify_dataset(ds)

    assert ds[0x00200242].value == ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID != "2.25.4242"
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.FrameOfReferenceUID == "1.2.840.10008.1.4.1.1"
    assert ds[0x00140104].value == "" and ds[0x00141020].value == ""
    assert result.counts["U"] >= 2 and result.counts["Z"] >= 2


def test_retain_uids_keeps_unlisted_instance_uids_too() -> None:
    ds = _safeguard_dataset()
    Deidentifier(secret=SECRET, config=DeidConfig(options=frozenset({ProfileOption.RETAIN_UIDS}))).deidentify_dataset(ds)
    assert ds[0x00200242].value == "2.25.4242" == ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID


def test_full_dates_keep_unlisted_dates_and_modified_dates_shift_them() -> None:
    full = _safeguard_dataset()
    Deidentifier(
        secret=SECRET, config=DeidConfig(options=frozenset({ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES}))
    ).deidentify_dataset(full)
    modified = _safeguard_dataset()
    Deidentifier(
        secret=SECRET, config=DeidConfig(options=frozenset({ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES}))
    ).deidentify_dataset(modified)
    assert full[0x00141020].value == "19470312"
    assert modified[0x00141020].value not in ("", "19470312") and modified[0x00141020].value < "19470312"


def _report_with_text() -> pydicom.Dataset:
    from tests.imaging.planting import base_dataset

    ds = base_dataset()
    item = pydicom.Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "Nodule unchanged; discussed with QZXFAMILY QZXGIVEN on 2021-04-01"
    ds.ContentSequence = [item]
    return ds


def test_clean_structured_content_keeps_findings_without_the_patient() -> None:
    ds = _report_with_text()
    config = DeidConfig(options=frozenset({ProfileOption.CLEAN_STRUCTURED_CONTENT}))
    Deidentifier(secret=SECRET, config=config).deidentify_dataset(ds)
    assert ds.ContentSequence[0].TextValue == "Nodule unchanged; discussed with on"


def test_the_basic_profile_empties_structured_content(deidentifier: Deidentifier) -> None:
    ds = _report_with_text()
    deidentifier.deidentify_dataset(ds)
    assert len(ds.ContentSequence) == 0


def test_a_second_run_into_the_same_folder_merges_and_replaces_outputs(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=3, size=16, slices=2, seed=15, burned_in_fraction=0)
    first = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")
    (tmp_path / "out" / first.written[0].output_name).write_bytes(b"stale")  # type: ignore[operator]

    second = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out")

    assert first.to_dict() == second.to_dict()
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in _outputs(tmp_path / "out"))
    assert names == sorted(f.output_name for f in second.written)  # type: ignore[type-var]
    for outcome in second.written:
        data = (tmp_path / "out" / outcome.output_name).read_bytes()  # type: ignore[operator]
        assert hashlib.sha256(data).hexdigest() == outcome.output_sha256


class _InterruptedAfter(Deidentifier):
    """Stops the run (as Ctrl-C would) when asked for its n-th file."""

    def __init__(self, n: int) -> None:
        super().__init__(secret=SECRET)
        self._left = n

    def _deidentify_chunks(self, data: bytes):  # type: ignore[no-untyped-def]
        self._left -= 1
        if self._left < 0:
            raise KeyboardInterrupt
        return super()._deidentify_chunks(data)


def test_an_interrupted_run_leaves_whole_files_and_no_staging(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=2, size=16, slices=3, seed=16, burned_in_fraction=0)
    with pytest.raises(KeyboardInterrupt):
        _InterruptedAfter(4).deidentify_folder(cohort.root, tmp_path / "out")

    everything = list((tmp_path / "out").rglob("*"))
    assert not [p for p in everything if p.name.startswith(".")]
    outputs = _outputs(tmp_path / "out")
    assert len(outputs) == 4
    complete = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "again")
    expected = {f.output_name: f.output_sha256 for f in complete.written}
    for path in outputs:
        name = str(path.relative_to(tmp_path / "out"))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[name]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # what the crafted export says
def test_a_crafted_uid_cannot_place_an_output_outside_the_destination(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=2, seed=21, burned_in_fraction=0)
    source = tmp_path / "export"
    source.mkdir()
    crafted = "1.2.840.10008.9/../../../../escaped"
    for index, path in enumerate(cohort.files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = crafted  # under the standard's root, so never taken as its own UID
        ds.SeriesInstanceUID = "1.2.840.10008.1.2/.."
        ds.save_as(source / f"{index}.dcm")
    out = tmp_path / "deep" / "out"

    report = Deidentifier(secret=SECRET).deidentify_folder(source, out)

    assert len(report.written) == 2 and not report.excluded
    inputs = (source, cohort.root)
    everything = sorted(p for p in tmp_path.rglob("*") if p.is_file() and not any(p.is_relative_to(i) for i in inputs))
    assert everything and all(p.resolve().is_relative_to(out.resolve()) for p in everything)
    for path in everything:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID.startswith("2.25.") and ds.SeriesInstanceUID.startswith("2.25.")
        assert ds.SOPClassUID.startswith("1.2.840.10008.")  # a well-formed standard UID is kept
        assert "escaped" not in str(path) and ".." not in path.relative_to(out).parts


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_pydicom_log_messages_about_bad_values_do_not_quote_them(caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.valuerep import validate_value

    import imaging.errors

    with caplog.at_level(logging.DEBUG):
        validate_value("DA", "QZXLEAKDATE", pydicom_config.WARN)  # pydicom's message quotes the value
    [record] = [r for r in caplog.records if r.name == "pydicom"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == imaging.errors.WITHHELD
    assert "QZXLEAK" not in caplog.text


# ---------------------------------------------------------------- interrupted runs

def test_a_killed_run_leaves_only_a_hidden_staging_folder_that_the_next_run_removes(
    cohort_factory: CohortFactory, tmp_path: Path
) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=3, size=16, slices=2, seed=31, burned_in_fraction=0.0)
    out = tmp_path / "out"
    # A real run of deidentify_folder, SIGKILLed inside its third file.
    code = (
        "from pathlib import Path\nfrom imaging.deid import Deidentifier\nfrom tests.imaging.planting import SECRET\n"
        "Deidentifier(secret=SECRET).deidentify_folder(Path(sys.argv[1]), Path(sys.argv[2]))\n"
    )
    kill_when_paused("imaging.deid:Deidentifier._deidentify_chunks", 3, code, [str(cohort.root), str(out)])
    [staging] = [p for p in out.iterdir()]
    assert staging.name.startswith(".deid-") and staging.name.endswith(".partial")
    assert len([p for p in staging.rglob("*.dcm")]) == 2  # what the killed run had written
    assert scan_folder(out).files_seen == 0  # a reader never takes it for data

    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert len(_outputs(out)) == len(report.written) == 6


def test_a_staging_folder_of_a_run_in_progress_is_kept(tmp_path: Path) -> None:
    live = _Staging(tmp_path)  # holds its lock, as a run in another process would
    try:
        assert remove_stale_staging(tmp_path) == 0
        assert Path(live.root).is_dir()
    finally:
        live.commit()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_outputs_are_owner_only_whatever_the_umask(cohort_factory: CohortFactory, tmp_path: Path, workers: int) -> None:
    cohort = cohort_factory(hospital="east", modality="DX", n_patients=3, size=16, seed=14, burned_in_fraction=0.0)
    previous = os.umask(0)
    try:
        Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "out", workers=workers)
    finally:
        os.umask(previous)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o600}
