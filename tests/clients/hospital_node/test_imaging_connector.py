"""The imaging connector: de-identify once, one labelled image per patient, nothing leaks."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from clients.hospital_node.errors import ConnectorError, NodeHomeError
from clients.hospital_node.home import DatasetEntry, ImagingSource, NodeHome
from clients.hospital_node.imaging_connector import (
    CACHE_DIR,
    ImagingConnector,
    ImagingData,
    ImagingInventory,
    node_secret,
)
from imaging.deid import Deidentifier
from imaging.synth import SynthCohort
from tests.paused_process import kill_when_paused

from .conftest import IMAGING_REQUEST, ImagingSite, write_imaging_labels

N_PATIENTS = 14
FILES = 2 * N_PATIENTS


def _deid_entries(home: NodeHome) -> list[dict[str, object]]:
    if not home.audit_log_path.exists():
        return []
    return [dict(e.payload) for e in home.audit_log().entries() if e.kind == "deidentification"]


def _original_images(cohort: SynthCohort) -> tuple[np.ndarray, np.ndarray]:
    """Each generated patient's image made from its original files, not through the node: (images, labels).

    The same reading and preprocessing library calls as the connector, on the files before
    de-identification: a lesion shows only in its shape (a decoy is as bright), so no
    pixel threshold can tell which image is whose; the nearest original image can.
    """
    from imaging.preprocess import PreprocessConfig
    from imaging.reading import scan_files, sort_slices
    from imaging.volumes import series_volume

    config = PreprocessConfig(size=(16, 16), intensity="window", window=(240.0, 400.0))
    images, labels = [], []
    for patient in cohort.patients:
        scan = scan_files(list(patient.files))
        [series] = [s for p in scan.index.patients for study in p.studies for s in study.series]
        images.append(series_volume(sort_slices(series), config).max(axis=0).ravel())
        labels.append(patient.label)
    return np.stack(images), np.array(labels, dtype=np.float32)


def _lesion(data: ImagingData, split: str, cohort: SynthCohort) -> np.ndarray:
    """The label of each loaded image's patient, found by its nearest original image."""
    x = data.x_train if split == "train" else data.x_val
    originals, labels = _original_images(cohort)
    flat = x.reshape(len(x), -1)
    distances = ((flat[:, None, :] - originals[None, :, :]) ** 2).sum(axis=2)
    return labels[distances.argmin(axis=1)]


def _leaks(cohort: SynthCohort, text: str) -> list[str]:
    lowered = text.lower()
    found = [f"text of {len(t)} characters" for t in cohort.planted_text if t.lower() in lowered]
    found += ["a planted number" for n in cohort.planted_numbers if n in text]
    found += ["a planted UID" for u in cohort.planted_uids if u in text]
    found += ["a patient ID" for p in cohort.patients if p.patient_id.lower() in lowered]
    return found


def _copy_series(folder: Path, patient_dir: Path) -> None:
    """Add a second series to one patient: the same images under new series and instance UIDs."""
    series_uid = generate_uid()
    for source in sorted((patient_dir / "2").iterdir()):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = patient_dir / "3" / source.name
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target, enforce_file_format=True)


# ---------------------------------------------------------------- one image per patient


def test_load_gives_one_image_per_patient_with_its_own_label(imaging_site: ImagingSite) -> None:
    data = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    assert data.n_train + data.n_val == N_PATIENTS
    assert data.x_train.shape == (data.n_train, 1, 16, 16) and data.x_train.dtype == np.float32
    assert data.n_val >= 1
    # Labels reached the right images through the keyed pseudonyms: each label is that of
    # the patient whose original files make the image.
    np.testing.assert_array_equal(data.y_train, _lesion(data, "train", imaging_site.cohort))
    np.testing.assert_array_equal(data.y_val, _lesion(data, "val", imaging_site.cohort))
    assert 0 < data.y_train.sum() < data.n_train
    assert data.skipped == {}


def test_the_split_is_deterministic_on_a_node(imaging_site: ImagingSite) -> None:
    first = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    shutil.rmtree(imaging_site.home.path / CACHE_DIR / "chest_ct" / "samples")
    again = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    np.testing.assert_array_equal(first.x_val, again.x_val)
    np.testing.assert_array_equal(first.y_train, again.y_train)


def test_a_patient_with_two_series_is_still_one_sample(imaging_site: ImagingSite) -> None:
    patient_dir = next(p for p in imaging_site.folder.iterdir() if p.is_dir())
    _copy_series(imaging_site.folder, patient_dir)
    data = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    assert data.n_train + data.n_val == N_PATIENTS
    np.testing.assert_array_equal(data.y_train, _lesion(data, "train", imaging_site.cohort))


def test_labels_with_an_issuer_column_map_to_the_same_patients(imaging_site: ImagingSite) -> None:
    plain = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    rows = ["patient_id,issuer,label"]
    for patient in imaging_site.cohort.patients:
        issuer = pydicom.dcmread(patient.files[0], stop_before_pixels=True).IssuerOfPatientID
        rows.append(f"{patient.patient_id},{issuer},{patient.label}")
    imaging_site.labels.write_text("\n".join(rows) + "\n")
    with_issuer = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    np.testing.assert_array_equal(plain.y_train, with_issuer.y_train)
    np.testing.assert_array_equal(plain.x_val, with_issuer.x_val)


def test_the_experiments_selection_narrows_the_registrations(imaging_site: ImagingSite) -> None:
    request = IMAGING_REQUEST.__class__(**{**IMAGING_REQUEST.__dict__, "modalities": ("MR",)})
    with pytest.raises(ConnectorError, match=r"has 0 labelled patients with a matching series; at least 10") as info:
        ImagingConnector(imaging_site.home, imaging_site.entry).load(request)
    assert "patient_no_matching_series 14" in str(info.value)


# ---------------------------------------------------------------- de-identified once, audited


def test_registration_deidentifies_the_folder_and_audits_the_run(imaging_site: ImagingSite) -> None:
    inventory = imaging_site.home.register_dataset(imaging_site.entry)
    assert isinstance(inventory, ImagingInventory)
    assert (inventory.files_seen, inventory.files_written, inventory.files_excluded) == (FILES, FILES, {})
    assert (inventory.patients_with_images, inventory.patients_labelled) == (N_PATIENTS, N_PATIENTS)
    [payload] = _deid_entries(imaging_site.home)
    assert payload["dataset"] == "chest_ct"
    assert (payload["files_in"], payload["files_written"], payload["files_excluded"]) == (FILES, FILES, 0)
    assert payload["options"] == ["clean_descriptors"] and payload["burned_in_mode"] == "exclude"
    assert payload["key_fingerprint"] == Deidentifier(secret=node_secret(imaging_site.home)).key_fingerprint
    assert "files" not in payload  # per-file digests are in the report the entry commits to
    report = imaging_site.home.path / str(payload["report_file"])
    assert hashlib.sha256(report.read_bytes()).hexdigest() == payload["report_sha256"] == inventory.deid.report_sha256
    files = json.loads(report.read_text())["files"]
    assert len(files) == FILES and all(f["status"] == "written" for f in files)
    assert NodeHome.open(imaging_site.home.path).dataset("chest_ct") == imaging_site.entry


def test_loading_again_reuses_the_cache_and_deidentifies_nothing(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    first = connector.load(IMAGING_REQUEST)
    samples = list((connector.root / "samples").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in [*samples, *connector.deid_dir.rglob("*.dcm")]}
    again = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    assert len(_deid_entries(imaging_site.home)) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    np.testing.assert_array_equal(first.x_train, again.x_train)
    # Touching a file without changing it costs a hash, not a de-identification.
    os.utime(imaging_site.cohort.root.parent)  # noqa: the original stays as it is
    for path in imaging_site.folder.rglob("*.dcm"):
        os.utime(path)
    assert connector.prepare().deid.files_processed == 0
    assert len(_deid_entries(imaging_site.home)) == 1


def test_a_changed_file_alone_is_deidentified_again(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.prepare()
    changed = sorted(imaging_site.folder.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(changed)
    ds.StudyTime = "091500"
    ds.save_as(changed, enforce_file_format=True)
    sync = connector.prepare().deid
    assert (sync.files_processed, sync.files_unchanged, sync.files_removed) == (1, FILES - 1, 0)
    first, second = _deid_entries(imaging_site.home)
    assert (second["files_in"], second["files_written"], second["files_unchanged"]) == (1, 1, FILES - 1)


def test_a_removed_patient_leaves_the_cache(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.load(IMAGING_REQUEST)
    assert any((connector.root / "arrays").iterdir())
    gone = next(p for p in sorted(imaging_site.folder.iterdir()) if p.is_dir())
    shutil.rmtree(gone)
    inventory = connector.prepare()
    assert (inventory.deid.files_removed, inventory.patients_with_images) == (2, N_PATIENTS - 1)
    assert len(list(connector.deid_dir.rglob("*.dcm"))) == FILES - 2
    assert len(list(connector.deid_dir.iterdir())) == N_PATIENTS - 1  # one folder per pseudonym
    assert not (connector.root / "arrays").exists() and not (connector.root / "samples").exists()
    data = connector.load(IMAGING_REQUEST)
    assert data.n_train + data.n_val == N_PATIENTS - 1
    assert data.skipped == {"label_without_usable_image": 1}
    assert _deid_entries(imaging_site.home)[-1]["files_removed"] == 2


# ---------------------------------------------------------------- bad input


def test_bad_files_are_excluded_by_reason_and_the_rest_is_used(imaging_site: ImagingSite) -> None:
    patients = sorted(p for p in imaging_site.folder.iterdir() if p.is_dir())
    good = sorted(patients[0].rglob("*.dcm"))[0]
    (patients[0] / "notes.txt").write_text(f"{imaging_site.cohort.patients[0].name} called back\n")
    (patients[1] / "cut.dcm").write_bytes(good.read_bytes()[:300])
    for path in sorted(patients[2].rglob("*.dcm")):  # text burned into these images
        ds = pydicom.dcmread(path)
        ds.BurnedInAnnotation = "YES"
        ds.save_as(path, enforce_file_format=True)
    inventory = imaging_site.home.register_dataset(imaging_site.entry)
    assert isinstance(inventory, ImagingInventory)
    assert inventory.files_excluded == {"burned_in_annotation": 2, "not_dicom": 1, "truncated": 1}
    assert (inventory.files_seen, inventory.files_written) == (FILES + 2, FILES - 2)
    assert _deid_entries(imaging_site.home)[0]["exclusions"] == inventory.files_excluded
    data = ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    assert data.n_train + data.n_val == N_PATIENTS - 1
    assert data.skipped == {"label_without_usable_image": 1}


def test_every_labels_problem_is_reported_at_once_without_values(imaging_site: ImagingSite) -> None:
    patients = imaging_site.cohort.patients
    imaging_site.labels.write_text(
        "patient_id,label\n"
        f"{patients[0].patient_id},1\n"
        f"{patients[0].patient_id},0\n"
        f",1\n"
        f"{patients[1].patient_id},{patients[1].name}\n"
        f"{patients[2].patient_id},2\n"
    )
    with pytest.raises(ConnectorError) as info:
        ImagingConnector(imaging_site.home, imaging_site.entry).load(IMAGING_REQUEST)
    message = str(info.value)
    assert message == (
        f"imaging dataset 'chest_ct': labels file {imaging_site.labels} does not fit its registration:\n"
        "  - 1 row without a patient_id\n"
        "  - column 'label' must hold 0 or 1 only; 2 rows hold something else\n"
        "  - 1 patient on more than one row; one label per patient is needed"
    )
    assert _leaks(imaging_site.cohort, message) == []


def test_a_labels_file_without_its_columns_is_refused(imaging_site: ImagingSite) -> None:
    imaging_site.labels.write_text("mrn,outcome\nA1,1\n")
    with pytest.raises(ConnectorError, match="missing column 'patient_id'\n  - missing column 'label'"):
        imaging_site.home.register_dataset(imaging_site.entry)
    assert not (imaging_site.home.path / CACHE_DIR).exists()  # refused before any de-identification


def test_a_missing_folder_is_named(imaging_site: ImagingSite, tmp_path: Path) -> None:
    entry = DatasetEntry(
        name="chest_ct", path=tmp_path / "nowhere", kind="imaging", imaging=ImagingSource(labels=imaging_site.labels)
    )
    with pytest.raises(ConnectorError, match=f"the DICOM folder {tmp_path / 'nowhere'} does not exist"):
        ImagingConnector(imaging_site.home, entry).load(IMAGING_REQUEST)


# ---------------------------------------------------------------- crashes and leaks


def test_an_interrupted_deidentification_leaves_nothing_half_written(
    imaging_site: ImagingSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Deidentifier.deidentify_bytes
    calls = {"n": 0}

    def crash_on_the_fifth(self: Deidentifier, data: bytes):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(Deidentifier, "deidentify_bytes", crash_on_the_fifth)
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    with pytest.raises(KeyboardInterrupt):
        connector.prepare()
    home = imaging_site.home.path
    assert [p for p in home.rglob("*") if p.name.endswith((".partial", ".tmp"))] == []
    assert not connector.manifest_path.exists()
    assert _deid_entries(imaging_site.home) == []  # nothing audited, nothing taken as done
    monkeypatch.setattr(Deidentifier, "deidentify_bytes", original)
    sync = connector.prepare().deid
    assert (sync.files_processed, sync.files_unchanged) == (FILES, 0)
    assert len(_deid_entries(imaging_site.home)) == 1


def test_no_planted_identifier_reaches_logs_errors_or_the_cache(
    imaging_site: ImagingSite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts = []
    (next(p for p in imaging_site.folder.iterdir() if p.is_dir()) / "junk.dcm").write_bytes(b"not dicom")
    imaging_site.home.register_dataset(imaging_site.entry)
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.load(IMAGING_REQUEST)
    for request in (IMAGING_REQUEST.__class__(**{**IMAGING_REQUEST.__dict__, "modalities": ("MR",)}),):
        with pytest.raises(ConnectorError) as info:
            connector.load(request)
        texts.append(str(info.value))
    texts += [record.getMessage() for record in caplog.records]
    home = imaging_site.home.path
    cache = [p for p in home.rglob("*")]
    texts += [p.relative_to(home).as_posix() for p in cache]
    texts += [p.read_text() for p in cache if p.suffix in (".json", ".jsonl", ".head", ".toml")]
    texts += [home.joinpath("audit.jsonl").read_text()]
    leaks = [leak for text in texts for leak in _leaks(imaging_site.cohort, text)]
    assert leaks == []
    # The de-identified files themselves carry none either.
    outputs = list(connector.deid_dir.rglob("*.dcm"))
    assert len(outputs) == FILES
    assert [leak for path in outputs for leak in imaging_site.cohort.find_leaks(path.read_bytes())] == []


# ---------------------------------------------------------------- the node secret


def test_the_node_secret_is_made_once_private_and_refused_when_others_can_read_it(imaging_site: ImagingSite) -> None:
    home = imaging_site.home
    secret = node_secret(home)
    path = home.path / "keys" / "deid.secret"
    assert len(secret) == 32 and node_secret(home) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(NodeHomeError, match=r"deid.secret is readable by other users; run `chmod 600 "):
        node_secret(home)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(NodeHomeError, match="holds 5 bytes; at least 32 are needed. Restore it from backup"):
        node_secret(home)


def test_another_secret_gives_other_pseudonyms_and_starts_afresh(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.prepare()
    before = {p.name for p in connector.deid_dir.iterdir()}
    (imaging_site.home.path / "keys" / "deid.secret").write_bytes(b"\x01" * 32)
    assert connector.prepare().deid.files_processed == FILES
    after = {p.name for p in connector.deid_dir.iterdir()}
    assert len(after) == N_PATIENTS and not before & after
    assert connector.load(IMAGING_REQUEST).n_train > 0


def test_an_imaging_registration_round_trips_through_node_toml(imaging_site: ImagingSite) -> None:
    entry = DatasetEntry(
        name="chest_ct",
        path=imaging_site.folder,
        kind="imaging",
        imaging=ImagingSource(
            labels=imaging_site.labels,
            modalities=("CT", "MR"),
            body_parts=("CHEST",),
            series_description=r"ax(ial)?\s",
            deid={
                "options": ["clean_descriptors", "retain_longitudinal_modified_dates"],
                "burned_in": {"mode": "clean", "rules": [{"modality": "CT", "regions": [{"top": 0, "left": 0, "bottom": 4, "right": 16}]}]},
                "max_date_shift_days": 30,
            },
        ),
        validation_fraction=0.25,
        split_seed=3,
    )
    imaging_site.home.register_dataset(entry)
    assert NodeHome.open(imaging_site.home.path).dataset("chest_ct") == entry
    text = imaging_site.home.config_path.read_text()
    assert 'kind = "imaging"' in text and 'modalities = ["CT", "MR"]' in text
    assert 'series_description = "ax(ial)?\\\\s"' in text


@pytest.mark.parametrize(("fraction", "which"), [(0.0, "validation"), (0.99, "training")])
def test_a_split_that_leaves_a_side_empty_is_refused(imaging_site: ImagingSite, fraction: float, which: str) -> None:
    entry = DatasetEntry(
        name="chest_ct", path=imaging_site.folder, kind="imaging", imaging=imaging_site.entry.imaging,
        validation_fraction=fraction,
    )
    with pytest.raises(ConnectorError, match=f"validation_fraction {fraction} leaves no {which} patients out of 14"):
        ImagingConnector(imaging_site.home, entry).load(IMAGING_REQUEST)


# ---------------------------------------------------------------- crash consistency

def _add_imaging_argv(site: ImagingSite) -> list[str]:
    return [
        "node", "dataset", "add-imaging", site.entry.name, "--home", str(site.home.path), "--folder", str(site.folder),
        "--labels", str(site.labels), "--modalities", "CT", "--deid-options", "clean_descriptors",
    ]


def _kill_ingestion_midway(site: ImagingSite) -> None:
    """A real `medfed node dataset add-imaging`, SIGKILLed inside its 5th file."""
    code = "from medfed.cli import main\nsys.argv = ['medfed', *sys.argv[1:]]\nmain()\n"
    kill_when_paused("imaging.deid:Deidentifier.deidentify_bytes", 5, code, _add_imaging_argv(site))


def test_a_killed_ingestion_leaves_nothing_that_is_used_and_a_rerun_cleans_up(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    _kill_ingestion_midway(imaging_site)
    left = sorted(p for p in connector.deid_dir.rglob("*.dcm"))
    assert len(left) == 4  # the killed run got that far: four de-identified, unrecorded files
    assert not connector.manifest_path.exists()
    assert (connector.root / ".ingesting").exists()
    assert _deid_entries(imaging_site.home) == []  # nothing audited
    assert imaging_site.entry.name not in NodeHome.open(imaging_site.home.path).datasets()

    rerun = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), *_add_imaging_argv(imaging_site)],
        capture_output=True, text=True, check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{FILES} files, {FILES} de-identified" in rerun.stdout
    assert not (connector.root / ".ingesting").exists()
    assert [p for p in connector.root.rglob(".*") if p.name != ".lock"] == []
    manifest = json.loads(connector.manifest_path.read_text())
    recorded = {e["output"]: e["output_sha256"] for e in manifest["files"].values() if e["status"] == "written"}
    on_disk = {p.relative_to(connector.deid_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in connector.deid_dir.rglob("*") if p.is_file()}
    assert on_disk == recorded
    assert len(_deid_entries(imaging_site.home)) == 1


def _stray_patient(connector: ImagingConnector) -> Path:
    """A valid de-identified file of a patient no ingestion recorded, put straight into the cache."""
    source = next(connector.deid_dir.rglob("*.dcm"))
    ds = pydicom.dcmread(source)
    ds.PatientID = ds.PatientName = "stray-patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target = connector.deid_dir / "stray" / "1" / "2" / "3.dcm"
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_training_reads_only_files_the_manifest_records_with_their_digest(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.prepare()
    _stray_patient(connector)
    changed = sorted(connector.deid_dir.rglob("*.dcm"))[0]
    changed.write_bytes(changed.read_bytes() + b"\x00")
    data = connector.load(IMAGING_REQUEST)
    assert data.skipped.get("patient_without_label", 0) == 0  # the stray patient was never scanned
    assert data.skipped["file_missing_or_changed"] == 1
    assert data.n_train + data.n_val == N_PATIENTS  # one slice of one patient lost; the patient kept its other


def test_a_rerun_of_the_python_api_removes_a_killed_runs_staging_folder_only(imaging_site: ImagingSite, tmp_path: Path) -> None:
    # The connector de-identifies file by file; the hidden staging folders of the Python
    # API's deidentify_folder are covered in tests/imaging/test_deid.py. Here: a staging
    # folder in the node's cache is never read as data.
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    connector.prepare()
    staging = connector.deid_dir / ".deid-abc.partial" / "p" / "s" / "x"
    staging.mkdir(parents=True)
    shutil.copy(next(p for p in connector.deid_dir.rglob("*.dcm") if ".deid-" not in str(p)), staging / "1.dcm")
    data = connector.load(IMAGING_REQUEST)
    assert data.n_train + data.n_val == N_PATIENTS
    assert "file_missing_or_changed" not in data.skipped


def test_symbolic_links_out_of_the_folder_are_not_followed_and_only_counted(
    imaging_site: ImagingSite, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "Doe_Jane_19700101"  # a target path may name a patient
    shutil.copytree(imaging_site.folder, outside)
    first = next(p for p in sorted(outside.rglob("*")) if p.is_file())
    (imaging_site.folder / "escape.dcm").symlink_to(first)
    (imaging_site.folder / "escape-folder").symlink_to(outside, target_is_directory=True)
    inside = next(p for p in sorted(imaging_site.folder.rglob("*")) if p.is_file() and not p.is_symlink())
    (imaging_site.folder / "alias.dcm").symlink_to(inside)  # inside the folder: read at its target
    caplog.set_level(logging.DEBUG)
    inventory = ImagingConnector(imaging_site.home, imaging_site.entry).prepare()
    assert inventory.deid.links_not_followed == 2
    assert inventory.files_seen == FILES + 1
    [entry] = _deid_entries(imaging_site.home)
    assert entry["links_not_followed"] == 2
    assert "Doe_Jane" not in caplog.text
    result = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), *_add_imaging_argv(imaging_site)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 symbolic link(s) in the folder lead out of it and were not followed" in result.stdout
    assert "Doe_Jane" not in result.stdout + result.stderr


def test_the_cache_is_owner_only_whatever_the_umask(imaging_site: ImagingSite) -> None:
    previous = os.umask(0)
    try:
        connector = ImagingConnector(imaging_site.home, imaging_site.entry)
        connector.prepare()
        connector.load(IMAGING_REQUEST)
    finally:
        os.umask(previous)
    cache = imaging_site.home.path / CACHE_DIR
    paths = [cache, *cache.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o600}


def test_the_officers_count_of_labelled_patients_reads_the_manifest_and_writes_nothing(imaging_site: ImagingSite) -> None:
    connector = ImagingConnector(imaging_site.home, imaging_site.entry)
    assert connector.labelled_patients() is None  # never prepared: nothing to count yet
    connector.prepare()
    before = sorted((p, p.stat().st_mtime_ns) for p in connector.root.rglob("*"))
    (imaging_site.folder / "new.dcm").write_bytes(b"not yet de-identified")
    assert connector.labelled_patients() == N_PATIENTS
    assert sorted((p, p.stat().st_mtime_ns) for p in connector.root.rglob("*")) == before
    assert len(_deid_entries(imaging_site.home)) == 1
