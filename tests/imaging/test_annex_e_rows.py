"""Every row of Table E.1-1, checked on a data set with a planted value in that attribute.

For each row: the Basic Profile action, at the top level and inside a sequence item; and
the action of every option column the row has, with that option selected alone. The
planted value must be gone from the encoded output whenever the action is not K.
"""

from __future__ import annotations

import datetime as dt
import functools
import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from imaging.deid import Deidentifier
from imaging.deid_config import DeidConfig, SafePrivateTag
from imaging.pixels import BurnedInPolicy, CleaningRule, Region
from imaging.profile import ProfileOption, ProfileRow, TagKind, load_profile_table
from tests.imaging.planting import (
    BASE_UID,
    BINARY_VRS,
    NESTED_UID,
    NUMBER_VRS,
    PLANTED_DATE,
    REFERENCED_SERIES_SEQUENCE,
    SECRET,
    base_dataset,
    encode,
    planted_value,
    token,
    vr_for,
)

TABLE = load_profile_table()
PLAIN_ROWS = [row for row in TABLE.rows if row.tag_int is not None]
OPTION_CASES = [(row, option) for row in PLAIN_ROWS for option in row.options]
PATIENT_NAME_TAG = 0x00100010
PATIENT_ID_TAG = 0x00100020
TEXT_C_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})


def resolved(code: str, vr: str) -> str:
    """The single action a compound code takes (the rule documented in imaging.deid)."""
    if code == "X/Z":
        return "Z"
    if code in ("X/D", "Z/D", "X/Z/D", "D"):
        return "Z" if vr == "SQ" else "D"
    if code == "X/Z/U*":
        return "U"
    return code


@functools.lru_cache(maxsize=None)
def _deidentifier(options: frozenset[ProfileOption]) -> Deidentifier:
    return Deidentifier(secret=SECRET, config=DeidConfig(options=options))


def run(row: ProfileRow, options: frozenset[ProfileOption] = frozenset(), *, nested: bool = False):
    """Plant the row's attribute, de-identify, return (output data set, container, bytes)."""
    tag = row.tag_int
    assert tag is not None
    vr = vr_for(tag)
    value = planted_value(vr, PLAIN_ROWS.index(row))
    deidentifier = _deidentifier(options)
    ds = base_dataset()
    ds.StudyDate = PLANTED_DATE  # the reference for date shifts (a Study Date row replaces it)
    if tag >> 16 == 0x0000:  # command elements cannot be stored in a file: data set level
        ds.add_new(tag, vr, value)
        deidentifier.deidentify_dataset(ds)
        return ds, ds, b""
    if tag >> 16 == 0x0002:
        pass  # Media Storage SOP Instance UID: the encoder derives it from the SOP Instance UID
    elif nested:
        item = Dataset()
        item.add_new(tag, vr, value)
        ds.add_new(REFERENCED_SERIES_SEQUENCE, "SQ", Sequence([item]))
    else:
        if tag in (PATIENT_NAME_TAG, PATIENT_ID_TAG, 0x00080018):
            del ds[tag]
        ds.add_new(tag, vr, value)
    data = encode(ds)
    encoded, _, _ = deidentifier.deidentify_bytes(data)
    out = pydicom.dcmread(io.BytesIO(encoded))
    if tag >> 16 == 0x0002:
        return out, out.file_meta, encoded
    container = out[REFERENCED_SERIES_SEQUENCE].value[0] if nested else out
    return out, container, encoded


def planted_text(row: ProfileRow) -> str:
    return token(PLAIN_ROWS.index(row))


def assert_gone(row: ProfileRow, container: Dataset, encoded: bytes) -> None:
    tag = row.tag_int
    vr = vr_for(tag)  # type: ignore[arg-type]
    if vr in NUMBER_VRS or vr in ("DS", "IS", "AS", "TM"):
        if tag in container:
            assert container[tag].value != planted_value(vr, 0)
        return
    if vr == "UI":
        assert planted_value(vr, PLAIN_ROWS.index(row)).encode() not in encoded  # type: ignore[union-attr]
        return
    if vr in ("DA", "DT"):
        if tag in container:
            assert PLANTED_DATE not in str(container[tag].value)
        return
    assert planted_text(row).lower().encode() not in encoded.lower()
    assert b"qzxnested" not in encoded.lower()


def assert_action(row: ProfileRow, action: str, container: Dataset, *, basic_code: str) -> None:
    tag = row.tag_int
    assert tag is not None
    vr = vr_for(tag)
    planted = planted_value(vr, PLAIN_ROWS.index(row))
    if action == "X":
        assert tag not in container
        return
    assert tag in container, f"{row.tag} should be present after {action}"
    elem = container[tag]
    if action == "Z":
        if tag == PATIENT_NAME_TAG:
            assert str(elem.value).startswith("MF-")
        elif vr == "SQ":
            assert len(elem.value) == 0
        else:
            assert elem.is_empty
    elif action == "D":
        if tag in (PATIENT_NAME_TAG, PATIENT_ID_TAG):
            assert str(elem.value).startswith("MF-")
        elif vr == "SQ":
            assert len(elem.value) == 0
        elif vr in BINARY_VRS:
            assert elem.is_empty
        else:
            assert not elem.is_empty
            assert elem.value != planted
    elif action == "U":
        if vr == "SQ":
            assert len(elem.value) == 1
            item = elem.value[0]
            assert str(item.PatientName).startswith("MF-")
            assert item.ReferencedSOPInstanceUID != NESTED_UID
            assert item.ReferencedSOPInstanceUID.startswith("2.25.")
        else:
            assert elem.value != planted
            assert str(elem.value).startswith("2.25.") and len(str(elem.value)) <= 64
    elif action == "K":
        if vr == "SQ":
            assert len(elem.value) == 1
        elif vr in BINARY_VRS:
            assert elem.value.rstrip(b"\x00") == planted  # padded to even length
        else:
            assert elem.value == planted
    else:  # pragma: no cover - the table only holds the codes above
        raise AssertionError(f"unexpected action {action} ({basic_code})")


def test_the_table_has_every_row_of_the_edition() -> None:
    assert TABLE.title == "DICOM PS3.15 2026d Table E.1-1"
    assert len(TABLE.rows) == 657
    assert len(PLAIN_ROWS) == 653


@pytest.mark.parametrize("row", PLAIN_ROWS, ids=lambda r: f"{r.tag}-{r.basic}")
def test_basic_profile_applies_the_row_action(row: ProfileRow) -> None:
    out, container, encoded = run(row)
    vr = vr_for(row.tag_int)  # type: ignore[arg-type]
    action = resolved(row.basic, vr)
    if row.tag_int == 0x00020003:  # the rebuilt file meta follows the remapped SOP Instance UID
        assert container[row.tag_int].value == out.SOPInstanceUID != BASE_UID
        return
    assert_action(row, action, container, basic_code=row.basic)
    if encoded:
        assert_gone(row, container, encoded)


@pytest.mark.parametrize(
    "row",
    [r for r in PLAIN_ROWS if r.tag_int >> 16 not in (0x0000, 0x0002)],  # type: ignore[operator]
    ids=lambda r: f"{r.tag}-{r.basic}",
)
def test_basic_profile_applies_the_row_action_inside_a_sequence(row: ProfileRow) -> None:
    out, container, encoded = run(row, nested=True)
    vr = vr_for(row.tag_int)  # type: ignore[arg-type]
    assert_action(row, resolved(row.basic, vr), container, basic_code=row.basic)
    assert_gone(row, container, encoded)


def _shifted_back(original: str, shifted: str) -> int:
    days = (dt.date(int(original[:4]), int(original[4:6]), int(original[6:8]))
            - dt.date(int(shifted[:4]), int(shifted[4:6]), int(shifted[6:8]))).days
    return days


@pytest.mark.parametrize(
    "row, option", OPTION_CASES, ids=[f"{r.tag}-{o.value}-{c}" for r, o in OPTION_CASES for c in [r.options[o]]]
)
def test_option_column_applies(row: ProfileRow, option: ProfileOption) -> None:
    out, container, encoded = run(row, frozenset({option}))
    tag = row.tag_int
    assert tag is not None
    vr = vr_for(tag)
    code = row.options[option]
    if tag >> 16 == 0x0002:  # Media Storage SOP Instance UID follows the SOP Instance UID
        assert container[tag].value == (BASE_UID if code == "K" else out.SOPInstanceUID)
        return
    if code == "K":
        assert_action(row, "K", container, basic_code=code)
        return
    planted = planted_value(vr, PLAIN_ROWS.index(row))
    if vr in ("DA", "DT") and option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        value = str(container[tag].value)
        assert value != planted
        days = _shifted_back(str(planted), value)
        assert 1 <= days <= 3650
        assert value[8:] == str(planted)[8:]  # the time of a DateTime stays
        assert _shifted_back(PLANTED_DATE, str(out.StudyDate)) == days  # one shift per patient
    elif vr == "TM" and option is ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES:
        assert container[tag].value == planted  # whole-day shifts leave times alone
    elif vr in TEXT_C_VRS:
        value = str(container[tag].value)
        assert "QZXFAMILY" not in value and "QZXGIVEN" not in value and "1947" not in value
        assert value.startswith(planted_text(row))
    elif vr == "AE":
        value = str(container[tag].value)
        assert value != planted and len(value) == 16
        assert planted_text(row).encode() not in encoded
    elif vr == "SQ":
        assert len(container[tag].value) == 1
        item = container[tag].value[0]
        assert str(item.PatientName).startswith("MF-")
        assert item.ReferencedSOPInstanceUID != NESTED_UID
    else:  # C has no meaning for this VR: the Basic Profile action applies
        assert_action(row, resolved(row.basic, vr), container, basic_code=row.basic)
        assert_gone(row, container, encoded)


# ---------------------------------------------------------------- the repeating and private rows


def _with_overlay_and_curve() -> Dataset:
    ds = base_dataset()
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", "QZXOVERLAYDESC")
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "QZXOVERLAYCOMMENT by QZXFAMILY")
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50000022, "LO", "QZXCURVEDESC for QZXFAMILY")
    ds.add_new(0x50003000, "OB", b"QZXCURVEDATA")
    return ds


def _deidentify(ds: Dataset, config: DeidConfig) -> tuple[Dataset, bytes]:
    encoded, _, _ = Deidentifier(secret=SECRET, config=config).deidentify_bytes(encode(ds))
    return pydicom.dcmread(io.BytesIO(encoded)), encoded


def test_the_table_has_one_row_per_repeating_and_private_kind() -> None:
    kinds = {row.kind for row in TABLE.rows if row.tag_int is None}
    assert kinds == {TagKind.CURVE, TagKind.OVERLAY_DATA, TagKind.OVERLAY_COMMENTS, TagKind.PRIVATE}


def test_basic_profile_removes_overlay_and_curve_groups() -> None:
    out, encoded = _deidentify(_with_overlay_and_curve(), DeidConfig())
    assert not [t for t in out.keys() if t >> 16 in (0x5000, 0x6000)]
    assert b"qzxcurve" not in encoded.lower() and b"qzxoverlay" not in encoded.lower()


def test_clean_graphics_without_a_rule_for_the_device_removes_the_overlay() -> None:
    out, encoded = _deidentify(_with_overlay_and_curve(), DeidConfig(options=frozenset({ProfileOption.CLEAN_GRAPHICS})))
    assert not [t for t in out.keys() if t >> 16 == 0x6000]
    assert b"qzxoverlay" not in encoded.lower()


def test_clean_graphics_blanks_overlay_regions_and_cleans_graphic_texts() -> None:
    rule = CleaningRule(regions=(Region(top=0, left=0, bottom=4, right=8),))
    config = DeidConfig(
        options=frozenset({ProfileOption.CLEAN_GRAPHICS}),
        burned_in=BurnedInPolicy(rules=(rule,)),
    )
    out, encoded = _deidentify(_with_overlay_and_curve(), config)
    bits = out[0x60003000].value
    assert bits[:4] == b"\x00\x00\x00\x00" and bits[4:8] == b"\xff\xff\xff\xff"  # rows 0-3 blanked
    assert "QZXFAMILY" not in str(out[0x60004000].value)
    assert "QZXFAMILY" not in str(out[0x50000022].value)
    assert out[0x50003000].value == b"QZXCURVEDATA"  # curve data is numbers, kept


def _with_private_block() -> Dataset:
    ds = base_dataset()
    block = ds.private_block(0x0029, "QZX VENDOR", create=True)
    block.add_new(0x10, "LO", "QZXPRIVATENAME")
    block.add_new(0x11, "DS", "1.5")
    return ds


def test_basic_profile_removes_every_private_attribute() -> None:
    out, encoded = _deidentify(_with_private_block(), DeidConfig())
    assert not [t for t in out.keys() if (t >> 16) & 1]
    assert b"qzx" not in encoded.lower()


def test_retain_safe_private_keeps_only_the_attributes_the_site_lists() -> None:
    config = DeidConfig(
        options=frozenset({ProfileOption.RETAIN_SAFE_PRIVATE}),
        safe_private=frozenset({SafePrivateTag(creator="QZX VENDOR", group=0x0029, element=0x11)}),
    )
    out, _ = _deidentify(_with_private_block(), config)
    assert out[0x00291011].value == "1.5"
    assert out[0x00290010].value == "QZX VENDOR"
    assert 0x00291010 not in out


def test_retain_safe_private_with_no_list_removes_every_private_attribute() -> None:
    out, _ = _deidentify(_with_private_block(), DeidConfig(options=frozenset({ProfileOption.RETAIN_SAFE_PRIVATE})))
    assert not [t for t in out.keys() if (t >> 16) & 1]
