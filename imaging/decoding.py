"""Pixel data decoding with a clear answer when it cannot be done.

pydicom decodes; this module checks first that there is pixel data, that an uncompressed
buffer is as long as the header says, and that a decoder for the transfer syntax is
installed, so a failure says which of these went wrong (and which package is missing)
instead of surfacing a decoder's own message, which may quote data.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imaging.errors import DicomReadError, MissingPixelDataError, UnsupportedTransferSyntaxError

__all__ = [
    "check_pixel_length",
    "decode_pixels",
    "ensure_decodable",
    "expected_native_length",
    "transfer_syntax_of",
]

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def transfer_syntax_of(ds: Dataset) -> UID:
    """The data set's transfer syntax, inferred from its encoding when the meta lacks it."""
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian


def _safe_name(uid: UID) -> str:
    # The name comes from pydicom's UID dictionary; an unknown UID (which could be any text
    # a file carries) is not echoed back.
    return uid.name if uid.is_valid and uid.name != str(uid) else "unknown transfer syntax"


def expected_native_length(ds: Dataset) -> int | None:
    """Bytes an uncompressed (native) Pixel Data element must hold, or None if unknown."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() in (
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
    ):
        samples = 2  # chroma subsampled by two horizontally: 2 values per pixel on average
    pixels = rows * cols * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * bits // 8


def check_pixel_length(ds: Dataset) -> None:
    """Raise MissingPixelDataError when there is no pixel data or native data is short."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise MissingPixelDataError("missing_pixel_data", "the instance has no pixel data")
    ts = transfer_syntax_of(ds)
    if 0x7FE00010 in ds and not ts.is_compressed:
        expected = expected_native_length(ds)
        value = ds.get_item(0x7FE00010).value
        have = len(value) if value is not None else 0
        if expected is not None and have < expected:
            raise MissingPixelDataError(
                "truncated",
                f"pixel data holds {have} of the {expected} bytes its header declares",
            )


def ensure_decodable(ds: Dataset) -> None:
    """Raise UnsupportedTransferSyntaxError when no installed decoder handles the data."""
    ts = transfer_syntax_of(ds)
    if not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(str(ts), _safe_name(ts), ()) from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(
            str(ts), _safe_name(ts), tuple(decoder.missing_dependencies)
        )


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values as an array: (rows, cols), (frames, rows, cols) or with samples.

    Raises
    ------
    MissingPixelDataError
        No pixel data, or fewer bytes than declared.
    UnsupportedTransferSyntaxError
        The transfer syntax needs a decoder that is not installed.
    DicomReadError
        The decoder failed on the data (code ``pixel_decode_failed``).
    """
    check_pixel_length(ds)
    ensure_decodable(ds)
    ts = transfer_syntax_of(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is None:  # a bare data set (no Part 10 header): pydicom decodes by the meta
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ts
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise many types; their text may quote data
        raise DicomReadError(
            "pixel_decode_failed", f"the pixel data could not be decoded ({type(exc).__name__})"
        ) from None
