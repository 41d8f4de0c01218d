"""Planting identifying values in data sets for the de-identification tests.

Every planted text holds ``QZX``, which no pseudonym, dummy value or replacement UID can
contain (they are hexadecimal, digits, or fixed words), so finding it in an output is a
leak and nothing else.
"""

from __future__ import annotations

import io

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

SECRET = b"medfed-test-node-secret-0123456789abcdef"
OTHER_SECRET = b"another-node-entirely-0123456789abcdef00"

PATIENT_NAME = "QZXFAMILY^QZXGIVEN"
PATIENT_ID = "QZXPID0001"
BASE_UID = "2.25.111111111111111111111111111111111"
NESTED_UID = "2.25.222222222222222222222222222222222"
NESTED_NAME = "QZXNESTED^QZXPERSON"
PLANTED_DATE = "19470312"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
REFERENCED_SERIES_SEQUENCE = 0x00081115  # not in Table E.1-1: its items are walked as they are

# Table E.1-1 rows newer than pydicom 3.0.2's data dictionary, with their VR (PS3.6).
NEW_TAG_VRS = {
    0x0040B034: "DT",  # Annotation DateTime
    0x0040E012: "UR",  # Display URI
    0x3004007F: "LO",  # Dose Calculation Model Name
    0x0040A034: "DT",  # Effective Start DateTime
    0x0040A035: "DT",  # Effective Stop DateTime
    0x00102162: "UC",  # Ethnic Groups
    0x00100044: "SQ",  # Gender Identity Code Sequence
    0x00100045: "LT",  # Gender Identity Comment
    0x00100041: "SQ",  # Gender Identity Sequence
    0x00081304: "SQ",  # Histological Diagnoses Code Sequence
    0x0040B03F: "LO",  # Montage Channel Label
    0x0040B03B: "LO",  # Montage Name
    0x00100012: "LO",  # Name to Use
    0x00100013: "UT",  # Name to Use Comment
    0x00100011: "SQ",  # Person Names to Use Sequence
    0x00081302: "SQ",  # Primary Diagnosis Code Sequence
    0x00081301: "SQ",  # Principal Diagnosis Code Sequence
    0x00100015: "SQ",  # Pronoun Code Sequence
    0x00100016: "LT",  # Pronoun Comment
    0x00081303: "SQ",  # Secondary Diagnoses Code Sequence
    0x0040B036: "DT",  # Segment Definition DateTime
    0x00100046: "SQ",  # Sex Parameters for Clinical Use Category Code Sequence
    0x00100042: "LT",  # Sex Parameters for Clinical Use Category Comment
    0x00100047: "UR",  # Sex Parameters for Clinical Use Category Reference
    0x00100043: "SQ",  # Sex Parameters for Clinical Use Category Sequence
    0x00100014: "SQ",  # Third Person Pronouns Sequence
}

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
BINARY_VRS = frozenset({"OB", "OW", "UN"})
NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT"})


def vr_for(tag: int) -> str:
    if tag in NEW_TAG_VRS:
        return NEW_TAG_VRS[tag]
    vr = dictionary_VR(tag)
    return vr.split(" or ")[0]


def token(index: int) -> str:
    return f"QZX{index:04d}VQ"


def planted_value(vr: str, index: int) -> object:
    """A value of ``vr`` that is recognisably planted."""
    if vr in ("AE", "CS", "SH", "LO", "PN"):
        return token(index)
    if vr in ("LT", "ST", "UT", "UC"):
        return f"{token(index)} for QZXFAMILY QZXGIVEN on 1947-03-12"
    if vr == "UR":
        return f"urn:{token(index)}"
    if vr == "DA":
        return PLANTED_DATE
    if vr == "DT":
        return PLANTED_DATE + "101500"
    if vr == "TM":
        return "101500"
    if vr == "AS":
        return "047Y"
    if vr == "DS":
        return "47.25"
    if vr == "IS":
        return "4712"
    if vr in NUMBER_VRS:
        return 4712
    if vr == "UI":
        return f"2.25.{900000000000000000000 + index}"
    if vr in BINARY_VRS:
        return f"{token(index)}-BYTES".encode()
    if vr == "SQ":
        item = Dataset()
        item.PatientName = NESTED_NAME
        item.ReferencedSOPClassUID = ENHANCED_SR
        item.ReferencedSOPInstanceUID = NESTED_UID
        return Sequence([item])
    raise ValueError(f"no planted value for VR {vr}")


def base_dataset() -> Dataset:
    """A non-image instance with an identifiable patient."""
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_SR
    ds.SOPInstanceUID = BASE_UID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def encode(ds: Dataset, meta_extra: dict[int, tuple[str, object]] | None = None) -> bytes:
    """``ds`` as a Part 10 file in Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for tag, (vr, value) in (meta_extra or {}).items():
        meta.add_new(tag, vr, value)
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
