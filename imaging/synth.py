"""Synthetic DICOM cohorts for tests and the demo, full of planted identifiers.

:func:`write_cohort` writes, for one hospital, a folder of patients with a CT series or a
radiograph, the way a PACS export looks: folders named after patients, headers carrying
names, IDs, dates, addresses, free text, sequences and a private block, and in some
images the patient's name burned into the pixels. Hospitals differ as real sites do:
scanner vendor and model, rescale encoding (slope, intercept, signed or not), MONOCHROME1
or MONOCHROME2 radiographs, implicit or explicit VR, CT as slices or as one enhanced
multi-frame instance.

The label is in the pixels, and only in their arrangement: a patient with label 1 has
a lesion (a flat-topped ellipse of varying size, elongation, orientation and place), one
with label 0 a decoy (two thin vessel segments of the same peak contrast and about as
many bright pixels). Vessels, calcifications, body size, tissue level, gradient and noise
level vary alike in both classes, so no global statistic of the image (its maximum, mean,
standard deviation or a percentile) tells the classes apart, and a spatial filter does.
Every planted identifier is remembered, so
:meth:`SynthCohort.find_leaks` can tell whether any of them survives de-identification.
"""

from __future__ import annotations

import datetime as dt
import io
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "HOSPITALS",
    "HospitalProfile",
    "SynthCohort",
    "SynthPatient",
    "write_cohort",
]

PRIVATE_CREATOR = "MEDFED SYNTH PACS"
PRIVATE_GROUP = 0x0011


@dataclass(frozen=True)
class HospitalProfile:
    """How one hospital's equipment encodes its images."""

    key: str
    institution: str
    manufacturer: str
    model: str
    rescale_slope: float
    rescale_intercept: float
    signed: bool
    radiograph_photometric: Literal["MONOCHROME1", "MONOCHROME2"]
    implicit_vr: bool
    multiframe_ct: bool


#: Three sites that differ in every way the reader and preprocessing must absorb.
HOSPITALS: dict[str, HospitalProfile] = {
    "north": HospitalProfile(
        key="north",
        institution="QUORVIN NORTH GENERAL",
        manufacturer="GE MEDICAL SYSTEMS",
        model="LightSpeed VCT",
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        signed=False,
        radiograph_photometric="MONOCHROME2",
        implicit_vr=False,
        multiframe_ct=False,
    ),
    "east": HospitalProfile(
        key="east",
        institution="ZELVARA EAST INFIRMARY",
        manufacturer="SIEMENS",
        model="SOMATOM Force",
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        signed=False,
        radiograph_photometric="MONOCHROME1",
        implicit_vr=True,
        multiframe_ct=False,
    ),
    "south": HospitalProfile(
        key="south",
        institution="VORTHAX SOUTH MEDICAL CENTRE",
        manufacturer="Philips",
        model="IQon Spectral CT",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        signed=True,
        radiograph_photometric="MONOCHROME2",
        implicit_vr=False,
        multiframe_ct=True,
    ),
}


@dataclass(frozen=True)
class SynthPatient:
    """One synthetic patient: original identifiers (planted PHI) and the label."""

    patient_id: str = field(repr=False)
    name: str = field(repr=False)
    label: int
    burned_in: bool
    files: tuple[Path, ...] = field(repr=False)


@dataclass(frozen=True)
class SynthCohort:
    """A written cohort: where it is, who is in it, and every identifier planted."""

    root: Path = field(repr=False)
    hospital: HospitalProfile
    modality: str
    patients: tuple[SynthPatient, ...]
    planted_text: frozenset[str] = field(repr=False)
    planted_numbers: frozenset[str] = field(repr=False)
    planted_uids: frozenset[str] = field(repr=False)

    @property
    def labels(self) -> dict[str, int]:
        """Label per original Patient ID (what the hospital's records would hold)."""
        return {p.patient_id: p.label for p in self.patients}

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(f for p in self.patients for f in p.files)

    def find_leaks(self, data: bytes) -> tuple[str, ...]:
        """Where planted identifiers survive in an encoded file.

        Returns descriptions (tag and kind of identifier), never the values. Text
        identifiers are searched in the raw bytes, pixel data included; numbers (dates,
        numeric IDs) and UIDs in the decoded values, where a chance match inside another
        number cannot occur.
        """
        found: list[str] = []
        lowered = data.lower()
        for token in sorted(self.planted_text):
            if token.lower().encode("ascii") in lowered:
                found.append(f"planted text of {len(token)} characters in the file bytes")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception:
            return tuple(found) + ("the file could not be parsed to check numbers and UIDs",)
        datasets: list[Dataset] = [ds]
        if getattr(ds, "file_meta", None) is not None:
            datasets.append(ds.file_meta)
        while datasets:
            item = datasets.pop()
            for elem in item:
                if elem.VR == "SQ":
                    datasets.extend(elem.value or ())
                    continue
                values = elem.value if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
                for value in values:
                    if isinstance(value, bytes) or value is None:
                        continue
                    text = str(value)
                    if elem.VR == "UI":
                        if text in self.planted_uids:
                            found.append(f"{elem.tag} keeps a planted UID")
                    elif any(number in text for number in self.planted_numbers):
                        found.append(f"{elem.tag} keeps a planted date or number")
        return tuple(found)

    def name_leaks(self, name: str) -> tuple[str, ...]:
        """Which kinds of planted identifiers appear in a file or folder name."""
        lowered = name.lower()
        out = [f"planted text of {len(t)} characters" for t in self.planted_text if t.lower() in lowered]
        out += ["a planted UID" for u in self.planted_uids if u in name]
        out += ["a planted number" for n in self.planted_numbers if n in name]
        return tuple(out)


class _Planter:
    """Makes unique identifier-like values and remembers them."""

    _CONSONANTS = "BDFGKLMNPQRSTVXZ"
    _VOWELS = "AEIOUY"

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.text: set[str] = set()
        self.numbers: set[str] = set()
        self.uids: set[str] = set()

    def word(self, length: int = 7) -> str:
        while True:
            letters = [
                (self._CONSONANTS if i % 2 == 0 else self._VOWELS)[
                    int(self.rng.integers(0, len(self._CONSONANTS if i % 2 == 0 else self._VOWELS)))
                ]
                for i in range(length)
            ]
            word = "".join(letters)
            # every planted word holds Q, X or Z, so no English word or hex token matches it
            if not any(c in word for c in "QXZ"):
                continue
            if word not in self.text:
                self.text.add(word)
                return word

    def person(self) -> str:
        return f"{self.word()}^{self.word(6)}"

    def code(self, prefix: str, digits: int = 7) -> str:
        value = prefix + "".join(string.digits[int(d)] for d in self.rng.integers(0, 10, digits))
        value += self._CONSONANTS[int(self.rng.integers(0, len(self._CONSONANTS)))] + "Q"
        self.text.add(value)
        return value

    def date(self, start_year: int, end_year: int) -> str:
        start = dt.date(start_year, 1, 1).toordinal()
        end = dt.date(end_year, 12, 28).toordinal()
        value = dt.date.fromordinal(int(self.rng.integers(start, end))).strftime("%Y%m%d")
        self.numbers.add(value)
        return value

    def phone(self) -> str:
        value = "+1 555 " + "".join(str(int(d)) for d in self.rng.integers(0, 10, 7))
        self.numbers.add(value)
        return value

    def uid(self) -> str:
        value = "2.25." + str(int.from_bytes(self.rng.bytes(16), "big"))
        self.uids.add(value)
        return value


def _phantom(rng: np.random.Generator, size: int, depth: int, lesion: bool) -> np.ndarray:
    """A body-like volume in HU: air, an elliptic body, distractors, and a lesion or its decoy.

    Only the *shape* of one finding depends on the label, so that no global statistic of
    the image tells the classes apart (see the module docstring):

    - the finding: a lesion (an ellipsoid of varying size, elongation, orientation and
      place) if `lesion`, else a decoy, a thin vessel segment drawn with the same peak
      contrast and about as many bright pixels. Both images hold the same intensities in
      about the same amounts; only a spatial filter sees a blob rather than a line;
    - the body's size and place, its tissue level, a linear gradient across it and the
      noise level vary per image, so the mean, standard deviation and percentiles vary
      far more between patients than one finding moves them;
    - up to three more vessels and up to four calcifications (single bright voxels), in
      every image, from the same contrast range as the finding, so the image maximum is
      as often theirs as the finding's.
    """
    z, y, x = np.mgrid[0:depth, 0:size, 0:size].astype(np.float32)
    scale = size / 32.0
    cy = (size - 1) / 2.0 + rng.uniform(-0.03, 0.03) * size
    cx = (size - 1) / 2.0 + rng.uniform(-0.03, 0.03) * size
    ax, ay = rng.uniform(0.34, 0.47) * size, rng.uniform(0.25, 0.37) * size
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    direction = rng.uniform(0.0, 2 * np.pi)
    ramp = ((x - cx) * np.cos(direction) + (y - cy) * np.sin(direction)) / size
    tissue = 40.0 + rng.uniform(-10.0, 10.0) + rng.uniform(0.0, 30.0) * ramp
    hu = np.where(body, tissue, -1000.0).astype(np.float32)
    contrast = rng.uniform(*_FINDING_HU)
    if lesion:
        ly, lx = _point_inside(rng, cx, cy, ax * 0.75, ay * 0.75)
        lz = rng.uniform(0.0, depth - 1.0)
        long_axis = rng.uniform(*_LESION_RADIUS) * scale
        short_axis = long_axis * rng.uniform(0.5, 1.0)
        angle = rng.uniform(0.0, np.pi)
        u = (x - lx) * np.cos(angle) + (y - ly) * np.sin(angle)
        v = -(x - lx) * np.sin(angle) + (y - ly) * np.cos(angle)
        # A flat top with soft edges (a super-Gaussian in plane), as solid nodules look.
        plane = (u / long_axis) ** 2 + (v / short_axis) ** 2
        blob = np.exp(-0.5 * (plane**2 + ((z - lz) / 1.2) ** 2))
        hu += (contrast * blob).astype(np.float32)
    else:
        # As many pixels above half its peak as a lesion of median size has (about
        # 4.35 * long * short axis), on two segments of a thin vessel's width.
        radius = float(np.mean(_LESION_RADIUS)) * scale
        length = _DECOY_LENGTH * 4.35 * 0.75 * radius**2 / (2.355 * _VESSEL_WIDTH * scale) / 2
        for _ in range(2):
            decoy = _vessel(rng, x[0], y[0], cx, cy, ax, ay, _VESSEL_WIDTH * scale, contrast, length)
            hu += np.where(body, decoy, 0.0).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        width = _VESSEL_WIDTH * scale
        vessel = _vessel(rng, x[0], y[0], cx, cy, ax, ay, width, rng.uniform(*_FINDING_HU), rng.uniform(0.3, 0.7) * size)
        hu += np.where(body, vessel, 0.0).astype(np.float32)
    for _ in range(int(rng.integers(0, 5))):
        py, px = _point_inside(rng, cx, cy, ax * 0.9, ay * 0.9)
        hu[int(rng.integers(0, depth)), py, px] += rng.uniform(*_FINDING_HU)
    hu += rng.normal(0.0, rng.uniform(*_NOISE_HU), hu.shape).astype(np.float32)
    return hu


#: What the phantom draws from, in HU or in pixels of a 32 x 32 image: the peak contrast
#: of the finding, the vessels and the calcifications; a lesion's semi-axis; the noise.
_FINDING_HU = (60.0, 100.0)
_LESION_RADIUS = (3.0, 4.5)
_VESSEL_WIDTH = 0.55
_DECOY_LENGTH = 0.55
_NOISE_HU = (6.0, 14.0)


def _point_inside(rng: np.random.Generator, cx: float, cy: float, ax: float, ay: float) -> tuple[int, int]:
    """A pixel uniformly inside the ellipse centred at (cx, cy) with semi-axes ax, ay."""
    radius, angle = np.sqrt(rng.uniform(0.0, 1.0)), rng.uniform(0.0, 2 * np.pi)
    return int(round(cy + ay * radius * np.sin(angle))), int(round(cx + ax * radius * np.cos(angle)))


def _vessel(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    width: float,
    contrast: float,
    length: float,
) -> np.ndarray:
    """A thin, slightly curved bright segment of about `length` pixels, centred inside the body.

    `width` is the standard deviation of its Gaussian cross-section, in pixels.
    """
    middle = np.array(_point_inside(rng, cx, cy, ax * 0.6, ay * 0.6), dtype=np.float32)
    heading = rng.uniform(0.0, 2 * np.pi)
    start = middle - 0.5 * length * np.array([np.sin(heading), np.cos(heading)], dtype=np.float32)
    bend = rng.uniform(-0.4, 0.4)
    t = np.linspace(0.0, 1.0, max(int(4 * length), 8), dtype=np.float32)
    angle = heading + bend * t
    curve = start + length * np.stack([np.cumsum(np.sin(angle)), np.cumsum(np.cos(angle))], axis=1) / len(t)
    d2 = (y[None] - curve[:, 0, None, None]) ** 2 + (x[None] - curve[:, 1, None, None]) ** 2
    return contrast * np.exp(-0.5 * d2.min(axis=0) / width**2)


def _burn_text(stored: np.ndarray, text: str) -> None:
    """Write ``text``'s bytes into the top rows, as a device burning in a label would.

    The bytes land in the pixel buffer as they are, so a search of the encoded file for
    the text finds them unless the region is blanked.
    """
    raw = text.encode("ascii")
    if len(raw) % stored.dtype.itemsize:
        raw += b" "
    values = np.frombuffer(raw, dtype=stored.dtype.newbyteorder("<"))
    width = stored.shape[-1]
    row_len = width - 2
    for start in range(0, len(values), row_len):
        chunk = values[start : start + row_len]
        row = 1 + start // row_len
        stored[row, 1 : 1 + len(chunk)] = chunk


def _base_dataset(site: HospitalProfile, patient: dict[str, str], modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.IssuerOfPatientID = patient["issuer"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    ds.PatientAge = patient["age"]
    ds.PatientWeight = "71.5"
    ds.PatientAddress = patient["address"]
    ds.PatientTelephoneNumbers = patient["phone"]
    ds.PatientMotherBirthName = patient["mother"]
    ds.OtherPatientIDs = patient["other_id"]
    ds.MilitaryRank = patient["rank"]
    ds.AdditionalPatientHistory = f"Seen by {patient['referrer'].replace('^', ' ')} for cough"
    ds.PatientComments = f"{patient['name'].replace('^', ' ')} prefers morning slots"
    ds.StudyDate = patient["study_date"]
    ds.StudyTime = "101512"
    ds.SeriesDate = patient["study_date"]
    ds.AcquisitionDate = patient["study_date"]
    ds.ContentDate = patient["study_date"]
    ds.InstanceCreationDate = patient["study_date"]
    ds.AccessionNumber = patient["accession"]
    ds.StudyID = patient["study_id"]
    ds.StudyInstanceUID = patient["study_uid"]
    ds.ReferringPhysicianName = patient["referrer"]
    ds.PerformingPhysicianName = patient["performer"]
    ds.OperatorsName = patient["operator"]
    ds.NameOfPhysiciansReadingStudy = patient["reader"]
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = patient["institution_address"]
    ds.InstitutionalDepartmentName = patient["department"]
    ds.StationName = patient["station"]
    ds.DeviceSerialNumber = patient["device_serial"]
    ds.Manufacturer = site.manufacturer
    ds.ManufacturerModelName = site.model
    ds.Modality = modality
    ds.StudyDescription = f"{modality} CHEST {patient['name'].split('^')[0]} FOLLOWUP"
    ds.ProtocolName = f"CHEST ROUTINE {patient['station']}"
    ds.ImageComments = f"patient {patient['name'].replace('^', ' ')} id {patient['id']} tolerated well"
    other = Dataset()
    other.PatientID = patient["other_id2"]
    other.IssuerOfPatientID = patient["issuer"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = patient["ref_study_uid"]
    ds.ReferencedStudySequence = Sequence([ref_study])
    request = Dataset()
    request.RequestedProcedureID = patient["request_id"]
    request.ScheduledProcedureStepID = patient["step_id"]
    request.RequestedProcedureDescription = f"CT chest for {patient['name'].replace('^', ' ')}"
    request.ReasonForTheRequestedProcedure = f"follow-up, referred by {patient['referrer'].replace('^', ' ')}"
    request.AccessionNumber = patient["accession"]
    request.StudyInstanceUID = patient["study_uid"]
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", patient["name"].replace("^", " "))
    block.add_new(0x02, "LO", patient["id"])
    block.add_new(0x03, "DA", patient["birth_date"])
    nested = Dataset()
    nested.PersonName = patient["reader"]
    nested.add_new(0x00100020, "LO", patient["id"])
    block.add_new(0x10, "SQ", Sequence([nested]))
    return ds


def _image_pixels(ds: Dataset, site: HospitalProfile, stored: np.ndarray, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if site.signed else 0
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()


def _to_stored(hu: np.ndarray, site: HospitalProfile) -> np.ndarray:
    stored = np.round((hu - site.rescale_intercept) / site.rescale_slope)
    if site.signed:
        return np.clip(stored, -32768, 32767).astype(np.int16)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def _save(ds: Dataset, sop_class: str, path: Path, site: HospitalProfile) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if site.implicit_vr else ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "PACSQUORV"
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _patient_values(planter: _Planter, site: HospitalProfile, index: int) -> dict[str, str]:
    name = planter.person()
    return {
        "name": name,
        "id": planter.code(f"{site.key[:1].upper()}P"),
        "issuer": f"{planter.word(6)} MRN",
        "other_id": planter.code("OID"),
        "other_id2": planter.code("ALT"),
        "birth_date": planter.date(1935, 2000),
        "sex": "F" if index % 2 else "M",
        "age": f"{40 + index % 40:03d}Y",
        "address": f"{int(planter.rng.integers(1, 99))} {planter.word()} STREET {planter.word(6)}",
        "phone": planter.phone(),
        "mother": planter.person(),
        "rank": planter.word(6),
        "study_date": planter.date(2016, 2024),
        "accession": planter.code("AC"),
        "study_id": planter.code("S", 5),
        "study_uid": planter.uid(),
        "ref_study_uid": planter.uid(),
        "referrer": planter.person(),
        "performer": planter.person(),
        "operator": planter.person(),
        "reader": planter.person(),
        "institution_address": f"{planter.word()} AVENUE {planter.word(6)}",
        "department": f"{planter.word()} RADIOLOGY",
        "station": planter.code("ST", 4),
        "device_serial": planter.code("SN", 6),
        "request_id": planter.code("RQ"),
        "step_id": planter.code("SP"),
    }


def write_cohort(
    root: Path | str,
    *,
    hospital: HospitalProfile | str,
    modality: Literal["CT", "DX"] = "CT",
    n_patients: int = 4,
    size: int = 32,
    slices: int = 4,
    seed: int = 0,
    lesion_fraction: float = 0.5,
    burned_in_fraction: float = 0.25,
) -> SynthCohort:
    """Write a synthetic hospital export under ``root`` and describe it.

    Parameters
    ----------
    hospital
        A :class:`HospitalProfile` or the key of one in :data:`HOSPITALS`.
    modality
        ``CT`` (a series of ``slices`` slices per patient) or ``DX`` (one radiograph).
    size
        Rows and columns of every image.
    lesion_fraction, burned_in_fraction
        Share of patients with label 1 (a lesion), and with text burned into the pixels
        (flagged Burned In Annotation = YES). At least one of each when the share is > 0.
    """
    site = HOSPITALS[hospital] if isinstance(hospital, str) else hospital
    if modality not in ("CT", "DX"):
        raise ValueError(f"modality must be 'CT' or 'DX'; found {modality!r}")
    if n_patients < 1 or size < 8 or slices < 1:
        raise ValueError("n_patients >= 1, size >= 8 and slices >= 1 are required")
    root = Path(root)
    rng = np.random.default_rng(seed)
    # The phantoms draw from their own stream: tuning them never moves the identifiers,
    # hence the pseudonyms and every node's train/validation split.
    pixels = np.random.default_rng((seed, 1))
    planter = _Planter(rng)
    planter.text.update({site.institution, "PACSQUORV"})
    n_lesion = max(int(round(lesion_fraction * n_patients)), 1 if lesion_fraction > 0 else 0)
    n_burned = max(int(round(burned_in_fraction * n_patients)), 1 if burned_in_fraction > 0 else 0)
    lesion_set = set(rng.permutation(n_patients)[:n_lesion].tolist())
    burned_set = set(rng.permutation(n_patients)[:n_burned].tolist())
    patients: list[SynthPatient] = []
    for index in range(n_patients):
        values = _patient_values(planter, site, index)
        label = int(index in lesion_set)
        burned = index in burned_set
        folder = root / f"{values['id']}_{values['name'].split('^')[0]}"
        depth = slices if modality == "CT" else 1
        hu = _phantom(pixels, size, depth, lesion=bool(label))
        burn_text = f"{values['name'].replace('^', ' ')} {values['id']}" if burned else None
        if modality == "CT":
            files = _write_ct(folder, site, planter, values, hu, burn_text)
        else:
            files = _write_dx(folder, site, planter, values, hu[0], burn_text)
        patients.append(
            SynthPatient(patient_id=values["id"], name=values["name"], label=label, burned_in=burned, files=files)
        )
    return SynthCohort(
        root=root,
        hospital=site,
        modality=modality,
        patients=tuple(patients),
        planted_text=frozenset(planter.text),
        planted_numbers=frozenset(planter.numbers),
        planted_uids=frozenset(planter.uids),
    )


def _write_ct(
    folder: Path,
    site: HospitalProfile,
    planter: _Planter,
    values: dict[str, str],
    hu: np.ndarray,
    burn_text: str | None,
) -> tuple[Path, ...]:
    depth, size = hu.shape[0], hu.shape[1]
    series_uid, frame_uid = planter.uid(), planter.uid()
    stored = _to_stored(hu, site)
    if burn_text is not None:
        for z in range(depth):
            _burn_text(stored[z], burn_text)
    spacing = 0.7
    orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def position(z: int) -> list[float]:
        return [-size * spacing / 2, -size * spacing / 2, -50.0 + 2.5 * z]

    common = _base_dataset(site, values, "CT")
    common.SeriesInstanceUID = series_uid
    common.FrameOfReferenceUID = frame_uid
    common.SeriesNumber = 2
    common.SeriesDescription = f"AXIAL 2.5MM {values['id']}"
    common.BodyPartExamined = "CHEST"
    common.BurnedInAnnotation = "YES" if burn_text else "NO"
    if site.multiframe_ct:
        ds = common
        ds.SOPInstanceUID = planter.uid()
        ds.InstanceNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.NumberOfFrames = depth
        ds.AcquisitionDateTime = values["study_date"] + "101512"
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = [spacing, spacing]
        measures.SliceThickness = 2.5
        shared.PixelMeasuresSequence = Sequence([measures])
        plane = Dataset()
        plane.ImageOrientationPatient = orientation
        shared.PlaneOrientationSequence = Sequence([plane])
        transform = Dataset()
        transform.RescaleIntercept = site.rescale_intercept
        transform.RescaleSlope = site.rescale_slope
        transform.RescaleType = "HU"
        shared.PixelValueTransformationSequence = Sequence([transform])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for z in range(depth):
            item = Dataset()
            pos = Dataset()
            pos.ImagePositionPatient = position(z)
            item.PlanePositionSequence = Sequence([pos])
            content = Dataset()
            content.FrameAcquisitionDateTime = values["study_date"] + "101512"
            content.InStackPositionNumber = z + 1
            item.FrameContentSequence = Sequence([content])
            frames.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        _image_pixels(ds, site, stored, "MONOCHROME2")
        path = folder / "CT_ENHANCED.dcm"
        _save(ds, EnhancedCTImageStorage, path, site)
        return (path,)
    paths = []
    sop_uids = [planter.uid() for _ in range(depth)]
    for z in range(depth):
        ds = Dataset()
        ds.update(common)
        ds.SOPInstanceUID = sop_uids[z]
        ds.InstanceNumber = depth - z  # numbering runs against position: sorting must use geometry
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = position(z)
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = 2.5
        ds.RescaleIntercept = site.rescale_intercept
        ds.RescaleSlope = site.rescale_slope
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        if z > 0:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CTImageStorage
            ref.ReferencedSOPInstanceUID = sop_uids[z - 1]
            ds.ReferencedImageSequence = Sequence([ref])
        _image_pixels(ds, site, stored[z], "MONOCHROME2")
        path = folder / "2" / f"IM{z + 1:04d}.dcm"
        _save(ds, CTImageStorage, path, site)
        paths.append(path)
    return tuple(paths)


def _write_dx(
    folder: Path,
    site: HospitalProfile,
    planter: _Planter,
    values: dict[str, str],
    hu: np.ndarray,
    burn_text: str | None,
) -> tuple[Path, ...]:
    # Attenuation-like values: denser (brighter in display) is higher before inversion.
    display = np.clip((hu + 1000.0) * 2.0, 0, 4095)
    stored_values = 4095 - display if site.radiograph_photometric == "MONOCHROME1" else display
    intercept, slope = (0.0, 1.0) if site.rescale_intercept == 0 else (-10.0, 1.0)
    stored = np.round((stored_values - intercept) / slope).astype(np.int16 if site.signed else np.uint16)
    if burn_text is not None:
        _burn_text(stored, burn_text)
    ds = _base_dataset(site, values, "DX")
    ds.SeriesInstanceUID = planter.uid()
    ds.SOPInstanceUID = planter.uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"CHEST PA {values['id']}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "YES" if burn_text else "NO"
    ds.DetectorID = planter.code("DET", 5)
    ds.PlateID = planter.code("PL", 5)
    _image_pixels(ds, site, stored, site.radiograph_photometric)
    path = folder / "1" / "CR0001.dcm"
    _save(ds, DigitalXRayImageStorageForPresentation, path, site)
    return (path,)
