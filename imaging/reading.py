"""Reading a folder of DICOM files into an index of patients, studies, series and slices.

Headers are read with ``stop_before_pixels`` and only the attributes the index needs;
whether pixel data is present and as long as declared is checked from the element header
without reading the pixels. A file that is not DICOM, is truncated or lacks what an image
needs becomes a :class:`FileIssue` and the scan goes on.

The index holds identifiers read from the files (patient IDs, original UIDs); it is for
use on the node, before de-identification. Reprs leave patient-level values out, and no
message or log line here carries a value or a file name.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, MediaStorageDirectoryStorage

from imaging.decoding import expected_native_length
from imaging.errors import SeriesError

__all__ = [
    "DicomIndex",
    "FileIssue",
    "InstanceRecord",
    "IssueCode",
    "PatientRecord",
    "ScanReport",
    "SeriesRecord",
    "SliceRef",
    "StudyRecord",
    "scan_files",
    "scan_folder",
    "select_series",
    "series_problems",
    "sort_slices",
]

logger = logging.getLogger(__name__)

_INDEX_TAGS = [
    "PatientID",
    "IssuerOfPatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "PhotometricInterpretation",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]


class IssueCode(enum.StrEnum):
    """Why a file was left out of the index."""

    NOT_DICOM = "not_dicom"
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    MISSING_PIXEL_DATA = "missing_pixel_data"
    NOT_AN_INSTANCE = "not_an_instance"
    DICOMDIR = "dicomdir"
    DUPLICATE_INSTANCE = "duplicate_instance"


@dataclass(frozen=True)
class FileIssue:
    """A file the scan skipped, with a reason code and a message free of values.

    ``path`` is the file as found on the node; it is kept for hospital IT and must not
    be copied into audit records or logs (folder names often carry patient names).
    """

    path: Path = field(repr=False)
    code: IssueCode
    detail: str


@dataclass(frozen=True)
class InstanceRecord:
    """One DICOM instance (file) of a series."""

    path: Path = field(repr=False)
    sop_instance_uid: str = field(repr=False)
    sop_class_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    frame_positions: tuple[tuple[float, float, float], ...] | None
    frames: int
    rows: int
    columns: int
    has_pixel_data: bool


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice of a series: an instance and a frame within it (0 if single-frame)."""

    instance: InstanceRecord
    frame: int


@dataclass(frozen=True)
class SeriesRecord:
    """A series and its instances, in file-name order."""

    series_instance_uid: str = field(repr=False)
    modality: str
    body_part: str
    description: str = field(repr=False)
    instances: tuple[InstanceRecord, ...]


@dataclass(frozen=True)
class StudyRecord:
    """A study and its series."""

    study_instance_uid: str = field(repr=False)
    series: tuple[SeriesRecord, ...]


@dataclass(frozen=True)
class PatientRecord:
    """A patient (keyed by issuer and patient ID) and their studies."""

    patient_key: tuple[str, str] = field(repr=False)
    studies: tuple[StudyRecord, ...]


@dataclass(frozen=True)
class DicomIndex:
    """Patients, studies and series found by a scan."""

    patients: tuple[PatientRecord, ...]

    def iter_series(self) -> Iterator[SeriesRecord]:
        for patient in self.patients:
            for study in patient.studies:
                yield from study.series

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.iter_series())


@dataclass(frozen=True)
class ScanReport:
    """What a scan found: the index, the skipped files and how many files it looked at."""

    index: DicomIndex
    issues: tuple[FileIssue, ...]
    files_seen: int

    def counts(self) -> dict[str, int]:
        """Skipped files per reason code."""
        out: dict[str, int] = defaultdict(int)
        for issue in self.issues:
            out[issue.code.value] += 1
        return dict(out)


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frame_geometry(
    ds: Dataset, frames: int
) -> tuple[tuple[float, ...] | None, tuple[tuple[float, float, float], ...] | None]:
    """Orientation and per-frame positions of an enhanced multi-frame instance."""
    orientation = None
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        plane = _first_item(shared, "PlaneOrientationSequence")
        if plane is not None:
            orientation = _floats(plane.get("ImageOrientationPatient"), 6)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        return orientation, None
    positions: list[tuple[float, float, float]] = []
    for item in per_frame:
        if orientation is None:
            plane = _first_item(item, "PlaneOrientationSequence")
            if plane is not None:
                orientation = _floats(plane.get("ImageOrientationPatient"), 6)
        pos_item = _first_item(item, "PlanePositionSequence")
        pos = _floats(pos_item.get("ImagePositionPatient"), 3) if pos_item is not None else None
        if pos is None:
            return orientation, None
        positions.append((pos[0], pos[1], pos[2]))
    return orientation, tuple(positions)


def _pixel_state(fp: BinaryIO, ds: Dataset, size: int) -> str:
    """'ok', 'missing' or 'truncated' from the Pixel Data element header at ``fp``."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return "missing"
    implicit, little = ds.original_encoding
    endian = "<" if little in (True, None) else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if group != 0x7FE0 or element not in (0x0010, 0x0008, 0x0009):
        return "missing"
    if implicit:
        (length,) = struct.unpack(endian + "I", head[4:8])
        header = 8
    else:
        if len(head) < 12:
            return "truncated"
        (length,) = struct.unpack(endian + "I", head[8:12])
        header = 12
    if length == 0xFFFFFFFF:  # encapsulated; fragments are checked when decoding
        return "ok" if size - start > header else "truncated"
    if size - start - header < length:
        return "truncated"
    expected = expected_native_length(ds)
    if expected is not None and element == 0x0010 and length < expected:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is None or not ts.is_compressed:
            return "truncated"
    return "ok"


def _read_header(path: Path) -> tuple[Dataset | None, FileIssue | None, str]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns with values; we report codes
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_INDEX_TAGS)
            meta = getattr(ds, "file_meta", None)
            ts = getattr(meta, "TransferSyntaxUID", None)
            deflated = ts is not None and ts == "1.2.840.10008.1.2.1.99"
            if fp.tell() > size:  # a skipped value claimed more bytes than the file has
                return None, FileIssue(path, IssueCode.TRUNCATED, "the file ends inside its header"), ""
            state = "ok" if deflated else _pixel_state(fp, ds, size)
    except InvalidDicomError:
        return None, FileIssue(path, IssueCode.NOT_DICOM, "no DICOM preamble and 'DICM' prefix"), ""
    except (EOFError, struct.error):
        return None, FileIssue(path, IssueCode.TRUNCATED, "the file ends inside its header"), ""
    except OSError as exc:
        return None, FileIssue(path, IssueCode.UNREADABLE, f"cannot be read ({type(exc).__name__})"), ""
    except Exception as exc:  # a malformed header surfaces as many exception types
        return None, FileIssue(path, IssueCode.UNREADABLE, f"malformed header ({type(exc).__name__})"), ""
    return ds, None, state


def _record(path: Path, ds: Dataset, state: str) -> tuple[InstanceRecord | None, FileIssue | None]:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        return None, FileIssue(path, IssueCode.DICOMDIR, "a DICOMDIR, not an instance")
    if not len(ds) or _last_value_short(ds):
        return None, FileIssue(path, IssueCode.TRUNCATED, "the file ends inside its header")
    missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if not ds.get(k)]
    if missing:
        return None, FileIssue(path, IssueCode.NOT_AN_INSTANCE, f"lacks {', '.join(missing)}")
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    is_image = ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class.name
    if is_image and state == "missing":
        return None, FileIssue(path, IssueCode.MISSING_PIXEL_DATA, "an image without pixel data")
    if state == "truncated":
        return None, FileIssue(path, IssueCode.TRUNCATED, "pixel data is shorter than declared")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    frame_positions = None
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        mf_orientation, frame_positions = _frame_geometry(ds, frames)
        orientation = orientation or mf_orientation
    position = _floats(ds.get("ImagePositionPatient"), 3)
    try:
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    record = InstanceRecord(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        instance_number=number,
        position=(position[0], position[1], position[2]) if position else None,
        orientation=orientation,  # type: ignore[arg-type]
        frame_positions=frame_positions,
        frames=frames,
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        has_pixel_data=state == "ok",
    )
    return record, None


def _last_value_short(ds: Dataset) -> bool:
    last = ds.get_item(max(ds.keys()))
    if not isinstance(last, RawDataElement) or last.value is None or last.length == 0xFFFFFFFF:
        return False
    return len(last.value) < last.length


def _iter_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, hidden ones excluded: temporary files and staging folders
    (``.<name>.partial``, ``.deid-*.partial``) of a write in progress, or cut off, are never data."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def scan_folder(root: Path | str) -> ScanReport:
    """Walk ``root`` and index every readable DICOM instance; report the rest per file.

    Hidden files and folders are skipped. Never raises for a bad file; raises
    NotADirectoryError if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError("the scan root is not a directory")
    return scan_files(_iter_files(root))


def scan_files(paths: Iterable[Path]) -> ScanReport:
    """Index every readable DICOM instance among `paths`, in their order; report the rest per file.

    For a reader that knows which files it may use (a manifest), rather than whatever
    a folder holds. Never raises for a bad file.
    """
    grouped: dict[tuple[str, str], dict[str, dict[str, list[InstanceRecord]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    series_meta: dict[str, tuple[str, str, str]] = {}
    issues: list[FileIssue] = []
    seen_sop: set[str] = set()
    files_seen = 0
    for path in paths:
        path = Path(path)
        files_seen += 1
        ds, issue, state = _read_header(path)
        if ds is not None:
            record, issue = _record(path, ds, state)
        if issue is not None:
            issues.append(issue)
            logger.debug("skipped file %d: %s", files_seen, issue.code.value)
            continue
        assert ds is not None and record is not None
        if record.sop_instance_uid in seen_sop:
            issues.append(FileIssue(path, IssueCode.DUPLICATE_INSTANCE, "an instance already indexed"))
            continue
        seen_sop.add(record.sop_instance_uid)
        patient = (str(ds.get("IssuerOfPatientID", "") or ""), str(ds.get("PatientID", "") or ""))
        series_uid = str(ds.SeriesInstanceUID)
        grouped[patient][str(ds.StudyInstanceUID)][series_uid].append(record)
        series_meta.setdefault(
            series_uid,
            (
                str(ds.get("Modality", "") or ""),
                str(ds.get("BodyPartExamined", "") or ""),
                str(ds.get("SeriesDescription", "") or ""),
            ),
        )
    patients = tuple(
        PatientRecord(
            patient_key=patient,
            studies=tuple(
                StudyRecord(
                    study_instance_uid=study_uid,
                    series=tuple(
                        SeriesRecord(
                            series_instance_uid=series_uid,
                            modality=series_meta[series_uid][0],
                            body_part=series_meta[series_uid][1],
                            description=series_meta[series_uid][2],
                            instances=tuple(instances),
                        )
                        for series_uid, instances in series.items()
                    ),
                )
                for study_uid, series in studies.items()
            ),
        )
        for patient, studies in grouped.items()
    )
    report = ScanReport(index=DicomIndex(patients), issues=tuple(issues), files_seen=files_seen)
    logger.info(
        "scanned %d files: %d instances indexed, %d skipped",
        files_seen,
        report.index.instance_count,
        len(issues),
    )
    return report


def compile_description(pattern: str):  # type: ignore[no-untyped-def]
    """`pattern` compiled by RE2, case-insensitive: matching takes time linear in the text.

    A Series Description pattern comes with a research partner's spec; Python's
    backtracking engine would let a pattern such as ``(.|.)*#`` stall a node for hours
    on a short description. RE2 refuses what it cannot run in linear time
    (backreferences, lookaround) instead.

    Raises
    ------
    ValueError
        The pattern is not a regular expression RE2 accepts; the message says why.
    """
    import re2

    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    options.max_mem = _PATTERN_MEMORY
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(reason) from None


# The most memory one compiled Series Description pattern may take (RE2 refuses beyond).
_PATTERN_MEMORY = 1 << 20


def select_series(
    index: DicomIndex,
    *,
    modality: str | Sequence[str] | None = None,
    body_part: str | Sequence[str] | None = None,
    description: str | None = None,
    require_pixels: bool = True,
) -> tuple[SeriesRecord, ...]:
    """Series matching a task's request.

    Parameters
    ----------
    modality, body_part
        Accepted values (case-insensitive); None accepts any.
    description
        A regular expression searched (case-insensitively) in the Series Description, in
        RE2 syntax (:func:`compile_description`: linear time, whoever wrote it).
    require_pixels
        Keep only series whose instances all carry pixel data.

    Raises
    ------
    SeriesError
        If ``description`` is not a valid regular expression.
    """

    def accepted(value: str | Sequence[str] | None) -> set[str] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, str) else list(value)
        return {v.strip().upper() for v in values}

    modalities, parts = accepted(modality), accepted(body_part)
    try:
        pattern = compile_description(description) if description is not None else None
    except ValueError as exc:
        raise SeriesError(f"series description pattern is not a valid regular expression: {exc}") from None
    chosen = []
    for series in index.iter_series():
        if modalities is not None and series.modality.upper() not in modalities:
            continue
        if parts is not None and series.body_part.upper() not in parts:
            continue
        if pattern is not None and not pattern.search(series.description):
            continue
        if require_pixels and not all(i.has_pixel_data for i in series.instances):
            continue
        chosen.append(series)
    return tuple(chosen)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal


def _slices(series: SeriesRecord) -> list[tuple[SliceRef, tuple[float, float, float] | None]]:
    out: list[tuple[SliceRef, tuple[float, float, float] | None]] = []
    for inst in series.instances:
        if inst.frames > 1:
            positions = inst.frame_positions
            for f in range(inst.frames):
                out.append((SliceRef(inst, f), positions[f] if positions else None))
        else:
            out.append((SliceRef(inst, 0), inst.position))
    return out


def series_problems(series: SeriesRecord) -> tuple[str, ...]:
    """What makes a series unusable as one volume (empty when it is consistent)."""
    problems: list[str] = []
    if not series.instances:
        return ("the series has no instances",)
    sizes = {(i.rows, i.columns) for i in series.instances}
    if len(sizes) > 1:
        problems.append(f"instances have {len(sizes)} different matrix sizes")
    if any(not i.has_pixel_data for i in series.instances):
        problems.append("some instances have no pixel data")
    orientations = {
        tuple(round(v, 4) for v in i.orientation) for i in series.instances if i.orientation
    }
    if len(orientations) > 1:
        problems.append(f"instances have {len(orientations)} different orientations")
    slices = _slices(series)
    if len(slices) > 1:
        positions = [p for _, p in slices]
        if all(p is not None for p in positions) and orientations:
            normal = _normal(next(iter(orientations)))
            depth = sorted(float(np.dot(normal, p)) for p in positions)  # type: ignore[arg-type]
            if any(abs(b - a) < 1e-4 for a, b in zip(depth, depth[1:])):
                problems.append("two slices share one position")
        elif any(p is None for p in positions) and any(p is not None for p in positions):
            problems.append("some slices have a position and some do not")
    return tuple(problems)


def sort_slices(series: SeriesRecord) -> tuple[SliceRef, ...]:
    """Slices ordered along the slice normal (by Instance Number when positions are absent).

    Multi-frame instances contribute one slice per frame. Raises SeriesError listing every
    problem when the series is not one consistent volume.
    """
    problems = series_problems(series)
    if problems:
        raise SeriesError("series cannot be sorted into a volume: " + "; ".join(problems))
    slices = _slices(series)
    orientation = next((i.orientation for i in series.instances if i.orientation), None)
    if orientation is not None and all(p is not None for _, p in slices):
        normal = _normal(orientation)
        slices.sort(key=lambda s: float(np.dot(normal, s[1])))  # type: ignore[arg-type]
    else:
        slices.sort(
            key=lambda s: (
                s[0].instance.instance_number if s[0].instance.instance_number is not None else 0,
                s[0].frame,
            )
        )
    return tuple(ref for ref, _ in slices)
