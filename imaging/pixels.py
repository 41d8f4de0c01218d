"""Burned-in annotation: which images may carry text in their pixels, and cleaning it.

An image is suspect when it says so (Burned In Annotation = YES), when its modality is one
where devices usually burn text in (ultrasound, secondary capture, ...), or when it is a
Secondary Capture instance. A suspect image is either cleaned, by blanking the regions a
site configured for that kind of device, or excluded; the policy decides, and an image
the policy cannot clean (no rule matches, no decoder) is excluded, never let through.

The same regions blank the overlay planes when the Clean Graphics option is selected.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits, unpack_bits
from pydicom.uid import ExplicitVRLittleEndian

from imaging.decoding import decode_pixels, transfer_syntax_of

__all__ = [
    "DEFAULT_SUSPECT_MODALITIES",
    "SECONDARY_CAPTURE_CLASSES",
    "BurnedInMode",
    "BurnedInPolicy",
    "CleaningRule",
    "Region",
    "blank_overlay",
    "blank_regions",
    "burned_in_reasons",
    "matching_rule",
]

#: Modalities whose devices commonly burn patient details into the image.
DEFAULT_SUSPECT_MODALITIES = frozenset({"US", "IVUS", "SC", "OT", "ES", "XC", "GM", "SM", "DOC"})
#: Secondary Capture storage SOP classes (screenshots, scanned documents).
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)


class BurnedInMode(enum.StrEnum):
    """What to do with a suspect image."""

    CLEAN = "clean"
    EXCLUDE = "exclude"


@dataclass(frozen=True)
class Region:
    """A rectangle of pixels, rows ``top..bottom-1`` and columns ``left..right-1``."""

    top: int
    left: int
    bottom: int
    right: int

    def problems(self) -> list[str]:
        out = []
        if min(self.top, self.left) < 0:
            out.append("top and left must be >= 0")
        if self.bottom <= self.top or self.right <= self.left:
            out.append("bottom must exceed top and right must exceed left")
        return out


@dataclass(frozen=True)
class CleaningRule:
    """Regions to blank on images from one kind of device.

    Every criterion that is not None must equal the image's value (strings compared
    without case and surrounding spaces) for the rule to apply.
    """

    regions: tuple[Region, ...]
    modality: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    rows: int | None = None
    columns: int | None = None

    def matches(self, ds: Dataset) -> bool:
        def same(expected: str | None, keyword: str) -> bool:
            if expected is None:
                return True
            return str(ds.get(keyword, "") or "").strip().upper() == expected.strip().upper()

        return (
            same(self.modality, "Modality")
            and same(self.manufacturer, "Manufacturer")
            and same(self.model, "ManufacturerModelName")
            and (self.rows is None or int(ds.get("Rows", -1) or -1) == self.rows)
            and (self.columns is None or int(ds.get("Columns", -1) or -1) == self.columns)
        )


@dataclass(frozen=True)
class BurnedInPolicy:
    """How suspect images are handled: cleaned with the first matching rule, or excluded."""

    mode: BurnedInMode = BurnedInMode.EXCLUDE
    rules: tuple[CleaningRule, ...] = ()
    suspect_modalities: frozenset[str] = field(default=DEFAULT_SUSPECT_MODALITIES)


def _has_pixels(ds: Dataset) -> bool:
    return any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))


def burned_in_reasons(ds: Dataset, policy: BurnedInPolicy) -> tuple[str, ...]:
    """Why an image is suspect of burned-in text (empty when it is not).

    Reason codes: ``burned_in_annotation`` (flag is YES), ``suspect_modality``,
    ``secondary_capture``.
    """
    if not _has_pixels(ds):
        return ()
    reasons = []
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        reasons.append("burned_in_annotation")
    if str(ds.get("Modality", "") or "").strip().upper() in policy.suspect_modalities:
        reasons.append("suspect_modality")
    if str(ds.get("SOPClassUID", "") or "") in SECONDARY_CAPTURE_CLASSES:
        reasons.append("secondary_capture")
    return tuple(reasons)


def matching_rule(ds: Dataset, rules: Iterable[CleaningRule]) -> CleaningRule | None:
    """The first rule that applies to the image, if any."""
    return next((rule for rule in rules if rule.matches(ds)), None)


def _fill_value(ds: Dataset, arr: np.ndarray) -> int | float:
    # Blank is "black": the lowest value, or the highest for MONOCHROME1 (inverted grey).
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        return arr.max() if arr.size else 0
    return arr.min() if arr.size else 0


def _store(ds: Dataset, arr: np.ndarray) -> None:
    """Write decoded pixels back uncompressed, little endian, interleaved."""
    ts = transfer_syntax_of(ds)
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        # pydicom decodes colour to interleaved RGB
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    if ts.is_compressed or not ts.is_little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def blank_regions(ds: Dataset, regions: Iterable[Region]) -> int:
    """Blank ``regions`` in every frame of the image; returns the number of pixels blanked.

    The pixel data is decoded (raising as :func:`imaging.decoding.decode_pixels` does)
    and written back uncompressed in Explicit VR Little Endian when it was compressed.
    """
    arr = np.array(decode_pixels(ds), copy=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    view = arr
    if frames == 1:
        view = arr[np.newaxis, ...]
    fill = _fill_value(ds, arr)
    rows, cols = view.shape[1], view.shape[2]
    blanked = 0
    for region in regions:
        top, bottom = max(region.top, 0), min(region.bottom, rows)
        left, right = max(region.left, 0), min(region.right, cols)
        if top >= bottom or left >= right:
            continue
        view[:, top:bottom, left:right, ...] = fill
        blanked += (bottom - top) * (right - left) * view.shape[0]
    _store(ds, arr)
    return blanked


def blank_overlay(ds: Dataset, group: int, regions: Iterable[Region]) -> int:
    """Blank ``regions`` (image coordinates) in the overlay plane of repeating ``group``.

    Returns the number of overlay bits blanked. An overlay without the attributes needed
    to place it raises ValueError.
    """

    def get(element: int) -> object:
        item = ds.get((group << 16) | element)
        return item.value if item is not None else None

    rows, cols, origin, data = get(0x0010), get(0x0011), get(0x0050), get(0x3000)
    if rows is None or cols is None or data is None:
        raise ValueError(f"overlay group {group:04X} lacks rows, columns or data")
    rows, cols = int(rows), int(cols)  # type: ignore[call-overload]
    o_row, o_col = (int(origin[0]), int(origin[1])) if origin else (1, 1)  # type: ignore[index]
    frames = int(get(0x0015) or 1)  # type: ignore[call-overload]
    bits = np.asarray(unpack_bits(bytes(data)))  # type: ignore[arg-type]
    needed = rows * cols * frames
    if bits.size < needed:
        raise ValueError(f"overlay group {group:04X} holds fewer bits than declared")
    plane = bits[:needed].reshape(frames, rows, cols).copy()
    blanked = 0
    for region in regions:
        top, bottom = max(region.top - (o_row - 1), 0), min(region.bottom - (o_row - 1), rows)
        left, right = max(region.left - (o_col - 1), 0), min(region.right - (o_col - 1), cols)
        if top >= bottom or left >= right:
            continue
        blanked += int(plane[:, top:bottom, left:right].sum())
        plane[:, top:bottom, left:right] = 0
    ds[(group << 16) | 0x3000].value = pack_bits(plane.ravel())
    return blanked

