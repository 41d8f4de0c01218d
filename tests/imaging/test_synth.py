"""Synthetic cohorts: sites differ as real ones do, the lesion defines the label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from imaging.decoding import decode_pixels
from imaging.preprocess import to_modality_units
from imaging.synth import HOSPITALS, write_cohort
from tests.imaging.conftest import CohortFactory


def test_the_sites_differ_in_vendor_encoding_and_photometry(cohort_factory: CohortFactory) -> None:
    seen = {}
    for key in HOSPITALS:
        ct = pydicom.dcmread(cohort_factory(hospital=key, modality="CT", n_patients=1, size=16, slices=2).files[0])
        dx = pydicom.dcmread(cohort_factory(hospital=key, modality="DX", n_patients=1, size=16).files[0])
        shared = ct.get("SharedFunctionalGroupsSequence")
        slope = ct.get("RescaleSlope") or shared[0].PixelValueTransformationSequence[0].RescaleSlope
        seen[key] = (
            ct.Manufacturer,
            float(slope),
            ct.PixelRepresentation,
            ct.SOPClassUID.name,
            dx.PhotometricInterpretation,
            ct.file_meta.TransferSyntaxUID.name,
        )
    assert seen == {
        "north": ("GE MEDICAL SYSTEMS", 1.0, 0, "CT Image Storage", "MONOCHROME2", "Explicit VR Little Endian"),
        "east": ("SIEMENS", 0.5, 0, "CT Image Storage", "MONOCHROME1", "Implicit VR Little Endian"),
        "south": ("Philips", 1.0, 1, "Enhanced CT Image Storage", "MONOCHROME2", "Explicit VR Little Endian"),
    }


def test_every_image_holds_a_bright_finding_whatever_its_label(cohort_factory: CohortFactory) -> None:
    # A lesion if the label is 1, a decoy vessel of the same brightness if 0: the peak
    # no longer tells the label (tests/imaging/test_synth_difficulty.py measures that).
    cohort = cohort_factory(
        hospital="east", modality="CT", n_patients=6, size=32, slices=3, seed=4, lesion_fraction=0.5, burned_in_fraction=0
    )
    assert sorted(p.label for p in cohort.patients) == [0, 0, 0, 1, 1, 1]
    for patient in cohort.patients:
        peak = max(float(to_modality_units(decode_pixels(d), d).max()) for d in map(pydicom.dcmread, patient.files))
        assert 90.0 < peak < 600.0, f"label {patient.label} with peak {peak:.0f} HU"


def test_the_burned_in_share_is_flagged_and_visible_in_the_pixels(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=4, size=32, seed=5, burned_in_fraction=0.5)
    flagged = [p for p in cohort.patients if p.burned_in]
    assert len(flagged) == 2
    for patient in cohort.patients:
        ds = pydicom.dcmread(patient.files[0])
        family = patient.name.split("^")[0].encode()
        assert (ds.BurnedInAnnotation == "YES") == patient.burned_in
        assert (family in ds.PixelData) == patient.burned_in


def test_phi_is_planted_in_sequences_private_blocks_free_text_and_folder_names(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=6)
    [patient] = cohort.patients
    ds = pydicom.dcmread(patient.files[0])
    family = patient.name.split("^")[0]
    assert ds.OtherPatientIDsSequence[0].PatientID != patient.patient_id
    assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID in cohort.planted_uids
    assert family in ds.RequestAttributesSequence[0].RequestedProcedureDescription.upper()
    block = ds.private_block(0x0011, "MEDFED SYNTH PACS")
    assert block[0x02].value == patient.patient_id
    assert family in ds.StudyDescription
    assert patient.patient_id in str(patient.files[0].parent.parent)


def test_the_same_seed_writes_the_same_cohort(tmp_path: Path) -> None:
    a = write_cohort(tmp_path / "a", hospital="north", n_patients=2, size=16, slices=2, seed=9)
    b = write_cohort(tmp_path / "b", hospital="north", n_patients=2, size=16, slices=2, seed=9)
    assert [p.patient_id for p in a.patients] == [p.patient_id for p in b.patients]
    assert all(np.array_equal(pydicom.dcmread(x).pixel_array, pydicom.dcmread(y).pixel_array) for x, y in zip(a.files, b.files))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modality must be 'CT' or 'DX'; found 'MR'"):
        write_cohort(tmp_path, hospital="north", modality="MR")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        write_cohort(tmp_path, hospital="west")
