"""Burned-in annotation: suspicion rules, device rules, blanking pixels and overlays."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from imaging.pixels import (
    BurnedInPolicy,
    CleaningRule,
    Region,
    blank_overlay,
    blank_regions,
    burned_in_reasons,
    matching_rule,
)


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


def test_an_image_is_suspect_when_flagged_by_modality_or_as_secondary_capture() -> None:
    ct = _read("CT_small.dcm")
    assert burned_in_reasons(ct, BurnedInPolicy()) == ()
    ct.BurnedInAnnotation = "YES"
    assert burned_in_reasons(ct, BurnedInPolicy()) == ("burned_in_annotation",)
    ct.Modality = "US"
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    assert burned_in_reasons(ct, BurnedInPolicy()) == (
        "burned_in_annotation",
        "suspect_modality",
        "secondary_capture",
    )
    assert burned_in_reasons(ct, BurnedInPolicy(suspect_modalities=frozenset())) == (
        "burned_in_annotation",
        "secondary_capture",
    )


def test_an_instance_without_pixels_is_never_suspect() -> None:
    ds = _read("rtplan.dcm")
    ds.BurnedInAnnotation = "YES"
    assert burned_in_reasons(ds, BurnedInPolicy()) == ()


def test_the_first_rule_matching_the_device_applies() -> None:
    ds = _read("CT_small.dcm")
    general = CleaningRule(regions=(Region(0, 0, 1, 1),))
    ge = CleaningRule(regions=(Region(0, 0, 2, 2),), manufacturer=" ge medical systems ", rows=128)
    other = CleaningRule(regions=(Region(0, 0, 3, 3),), model="ELSEWHERE")
    assert matching_rule(ds, [other, ge, general]) is ge
    assert matching_rule(ds, [other]) is None


def test_regions_are_blanked_in_every_frame_and_nowhere_else() -> None:
    ds = _read("CT_small.dcm")
    before = ds.pixel_array.copy()
    blanked = blank_regions(ds, [Region(top=0, left=0, bottom=10, right=20), Region(120, 120, 500, 500)])
    after = pydicom.dcmread(_roundtrip(ds)).pixel_array

    assert blanked == 10 * 20 + 8 * 8
    assert (after[:10, :20] == before.min()).all()
    assert (after[120:, 120:] == before.min()).all()
    assert np.array_equal(after[10:120, :], before[10:120, :])


def test_monochrome1_is_blanked_to_its_black_which_is_the_highest_value() -> None:
    ds = _read("CT_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    top = ds.pixel_array.max()
    blank_regions(ds, [Region(0, 0, 4, 4)])
    assert (pydicom.dcmread(_roundtrip(ds)).pixel_array[:4, :4] == top).all()


def test_compressed_pixels_are_rewritten_uncompressed_after_blanking() -> None:
    ds = _read("JPEG2000.dcm")
    blank_regions(ds, [Region(0, 0, 8, 8)])
    out = pydicom.dcmread(_roundtrip(ds))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (out.pixel_array[:8, :8] == out.pixel_array.min()).all()


def test_overlay_bits_are_blanked_in_image_coordinates() -> None:
    ds = _read("CT_small.dcm")
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000050, "SS", [3, 1])  # the overlay starts at image row 3 (1-based)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    blanked = blank_overlay(ds, 0x6000, [Region(top=0, left=0, bottom=4, right=8)])
    bits = np.unpackbits(np.frombuffer(ds[0x60003000].value, np.uint8), bitorder="little").reshape(8, 8)

    assert blanked == 16  # image rows 2 and 3 are overlay rows 0 and 1
    assert not bits[:2].any() and bits[2:].all()


def test_an_overlay_without_its_size_cannot_be_blanked() -> None:
    ds = _read("CT_small.dcm")
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    with pytest.raises(ValueError, match="overlay group 6000 lacks rows, columns or data"):
        blank_overlay(ds, 0x6000, [Region(0, 0, 1, 1)])


def _roundtrip(ds: pydicom.Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return buffer
