"""De-identification of DICOM data sets, files and folders under PS3.15 Annex E.

A :class:`Deidentifier` applies the Basic Application Level Confidentiality Profile, plus
the options a site selects, as Table E.1-1 (``imaging.profile``) prescribes for each
attribute, at every nesting depth. Replacement values are keyed by the node secret
(``imaging.pseudonyms``): UIDs map the same way in every file and run, so references
between instances of a study stay consistent; patient name and ID become one keyed
pseudonym; dates move back by a keyed per-patient number of days.

Choices the table leaves open, fixed here:

- Compound actions resolve to keep the output valid whatever the attribute's type in its
  IOD: ``X/Z`` -> Z; ``X/D``, ``Z/D``, ``X/Z/D`` -> D; ``X/Z/U*`` -> U (the sequence is
  kept and the UIDs inside it replaced). A sequence whose action is D or Z is emptied.
- Patient's Name (Z) and Patient ID (Z/D) both receive the patient pseudonym.
- All private attributes go, except under Retain Safe Private for the attributes the
  site lists. All repeating overlay groups go with their Overlay Data; under Clean
  Graphics they stay, with the configured regions blanked and their texts cleaned.
- Beyond the table, as safeguards: person names not listed are emptied; dates not listed
  follow the date options (emptied under the Basic Profile); instance UIDs not listed
  and not rooted at 1.2.840.10008 are replaced like listed ones; group lengths are
  dropped; the file meta information and preamble are rebuilt.
- An image suspected of burned-in text is cleaned or excluded (``imaging.pixels``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from imaging.decoding import check_pixel_length, transfer_syntax_of
from imaging.deid_config import DeidConfig
from imaging.errors import DeidentificationError, DicomReadError, UnsupportedTransferSyntaxError
from imaging.owner_only import FILE_MODE, make_folders, open_new
from imaging.pixels import BurnedInMode, blank_overlay, blank_regions, burned_in_reasons, matching_rule
from imaging.profile import ProfileOption, ProfileTable, TagKind, load_profile_table, parse_profile_table
from imaging.pseudonyms import Keyring
from imaging.report import DeidReport, FileOutcome, FileStatus
from imaging.scrub import TextScrubber
from imaging.splicing import Chunk, ElementCache, splice

__all__ = ["DatasetResult", "Deidentifier", "remove_stale_staging"]

logger = logging.getLogger(__name__)

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
_DICOM_ROOT = "1.2.840.10008."
# PS3.5 9.1: digits in components without leading zeros, separated by dots, 64 at most.
_WELL_FORMED_UID = re.compile(r"(?=.{1,64}$)(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_TEXT_VRS = frozenset({"LO", "LT", "ST", "SH", "UT", "UC"})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"})
_IDENTIFIER_VRS = frozenset({"PN", "LO", "SH", "AE", "DA", "DT"})
# UI attributes naming classes, syntaxes and coding resources rather than instances.
_CLASS_UID_TAGS = frozenset(
    {
        0x00080016,  # SOP Class UID
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
        0x00080062,  # SOP Classes in Study
        0x0008010C,  # Coding Scheme UID
        0x00080117,  # Context UID
        0x00080118,  # Mapping Resource UID
        0x00081150,  # Referenced SOP Class UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x0004151A,  # Referenced Related General SOP Class UID in File
    }
)
_METHOD = "Basic Application Confidentiality Profile"
_SCRUB_OPTIONS = frozenset(
    {
        ProfileOption.CLEAN_DESCRIPTORS,
        ProfileOption.CLEAN_STRUCTURED_CONTENT,
        ProfileOption.CLEAN_GRAPHICS,
        ProfileOption.RETAIN_PATIENT_CHARACTERISTICS,
    }
)


@dataclass(frozen=True)
class DatasetResult:
    """What de-identifying one data set did: actions counted by code, pixel handling."""

    counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    pixels: str | None = None
    patient_pseudonym: str = ""


@dataclass
class _Run:
    """State of one data set's de-identification."""

    pseudonym: str
    shift_days: int | None
    scrubber: TextScrubber | None
    counts: Counter[str] = field(default_factory=Counter)


def _is_image_class(ds: Dataset) -> bool:
    """Whether the SOP class is an image storage class (which must carry pixel data)."""
    return "Image Storage" in UID(str(ds.get("SOPClassUID", "") or "")).name


def _resolve(code: str, vr: str) -> str:
    """The single action a (possibly compound) code takes for an element of ``vr``."""
    if code == "X/Z":
        return "Z"
    if code in ("X/D", "Z/D", "X/Z/D", "D"):
        return "Z" if vr == "SQ" else "D"
    if code == "X/Z/U*":
        return "U"
    return code


def _vr_of(elem: object, tag: int) -> str:
    vr = getattr(elem, "VR", None)
    if vr and vr != "UN":
        return str(vr)
    try:
        found = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return found if " or " not in found else "UN"


def _shift_date(value: str, days: int) -> str | None:
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:])) - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return day.strftime("%Y%m%d") if day.year >= 1 else None


def _shift_datetime(value: str, days: int) -> str | None:
    value = value.strip()
    if len(value) < 8:
        return None
    date = _shift_date(value[:8], days)
    return None if date is None else date + value[8:]


_FIXED_DUMMIES = {
    "LT": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "UC": "ANONYMIZED",
    "UR": "urn:x-anonymized",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
}


def _empty_value(vr: str) -> object:
    if vr == "SQ":
        return Sequence()
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMBER_VRS:
        return None
    return ""


def _put(ds: Dataset, tag: int, vr: str, value: object) -> None:
    """Replace an element without decoding the old one; our values are valid by construction."""
    ds[tag] = DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _elements(*specs: tuple[int, str, object]) -> dict[BaseTag, DataElement]:
    """New elements keyed by tag, ready to make a data set from (as ``_put`` makes them)."""
    made = (DataElement(tag, vr, value, validation_mode=config.IGNORE) for tag, vr, value in specs)
    return {elem.tag: elem for elem in made}


def _strings(ds: Dataset, tag: int) -> list[str]:
    """An element's values as text, read from its undecoded bytes when it is still raw.

    Used for UIDs, dates and keys of dummies, which are ASCII whatever the character set.
    """
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if not raw:
            return []
        return [v.strip(" \x00") for v in bytes(raw).decode("latin-1").split("\\")]
    return [v.strip(" \x00") for v in _values(elem.value)]


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, MultiValue, tuple)):
        return [str(v) for v in value]
    return [str(value)]


class Deidentifier:
    """Applies PS3.15 Annex E with a site's options, keyed by the node secret.

    Parameters
    ----------
    secret
        The node's de-identification secret (at least 32 bytes). The same secret gives
        the same pseudonyms and UIDs; another secret gives unrelated ones.
    config
        Options, burned-in policy and limits chosen by the site.
    table
        The Annex E table; the bundled edition by default.
    """

    def __init__(
        self,
        *,
        secret: bytes,
        config: DeidConfig | None = None,
        table: ProfileTable | None = None,
    ) -> None:
        self._keys = Keyring(secret)
        self._secret = bytes(secret)  # handed to worker processes only
        self._config = config if config is not None else DeidConfig()
        self._table = table if table is not None else load_profile_table()
        selected = self._config.options
        self._rows = self._table.by_tag()
        self._actions = {tag: row.action(selected) for tag, row in self._rows.items()}
        self._curve = self._table.by_kind(TagKind.CURVE).action(selected)
        self._overlay = self._table.by_kind(TagKind.OVERLAY_DATA).action(selected)
        self._private = self._table.by_kind(TagKind.PRIVATE).action(selected)
        self._full_dates = ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES in selected
        self._modified_dates = ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in selected
        self._retain_uids = ProfileOption.RETAIN_UIDS in selected
        self._needs_scrubber = bool(selected & _SCRUB_OPTIONS)
        self._safe_private = {(s.creator.upper(), s.group, s.element) for s in self._config.safe_private}
        self._vr_cache: dict[int, str] = {}
        self._encoded = ElementCache()
        self._shared_marks: dict[str | None, dict[BaseTag, DataElement]] = {}

    @property
    def table(self) -> ProfileTable:
        return self._table

    @property
    def config(self) -> DeidConfig:
        return self._config

    @property
    def key_fingerprint(self) -> str:
        """Public identifier of the node secret in use (not the secret)."""
        return self._keys.fingerprint

    # ------------------------------------------------------------------ data sets

    def deidentify_dataset(self, ds: Dataset) -> DatasetResult:
        """De-identify ``ds`` in place.

        Raises
        ------
        DeidentificationError
            When the data set must not be written: its ``code`` says why
            (``not_an_instance``, ``truncated``, ``missing_pixel_data``, a burned-in
            reason, ``no_cleaning_rule``, ``pixel_decoder_missing``, ``malformed_attribute``).
        """
        return self._deidentify(ds, shared_marks=False)

    def _deidentify(self, ds: Dataset, *, shared_marks: bool) -> DatasetResult:
        """As :meth:`deidentify_dataset`; with ``shared_marks`` the de-identification marks
        are element objects shared by every such data set, for one that is encoded and
        then dropped (never handed out, where a change to one would show in all).
        """
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not str(ds.get(keyword, "") or "").strip():
                raise DeidentificationError("not_an_instance", f"the data set has no {keyword}")
        self._check_pixels(ds)
        pixels = self._handle_burned_in(ds)
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        patient_id = str(ds.get("PatientID", "") or "").strip()
        patient_key = f"{issuer}\x00{patient_id}" if patient_id else "study\x00" + str(
            ds.get("StudyInstanceUID", "") or ds.SOPInstanceUID
        )
        run = _Run(
            pseudonym=self._keys.patient_pseudonym(issuer, patient_id or patient_key),
            shift_days=(
                self._keys.date_shift_days(patient_key, self._config.max_date_shift_days)
                if self._modified_dates
                else None
            ),
            scrubber=TextScrubber(self._identifiers(ds)) if self._needs_scrubber else None,
        )
        try:
            self._walk(ds, run, clean=False)
        except DeidentificationError:
            raise
        except Exception as exc:  # a value pydicom cannot convert; its message may quote it
            raise DeidentificationError(
                "malformed_attribute", f"an attribute could not be processed ({type(exc).__name__})"
            ) from None
        self._mark(ds, pixels, shared=shared_marks)
        return DatasetResult(counts=MappingProxyType(dict(run.counts)), pixels=pixels, patient_pseudonym=run.pseudonym)

    def _check_pixels(self, ds: Dataset) -> None:
        has_pixels = any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
        if not has_pixels and (("Rows" in ds and "Columns" in ds) or _is_image_class(ds)):
            raise DeidentificationError("missing_pixel_data", "an image without pixel data")
        if has_pixels:
            try:
                check_pixel_length(ds)
            except DicomReadError as exc:
                raise DeidentificationError(exc.code, str(exc)) from None

    def _handle_burned_in(self, ds: Dataset) -> str | None:
        policy = self._config.burned_in
        reasons = burned_in_reasons(ds, policy)
        if not reasons:
            return None
        if policy.mode is BurnedInMode.EXCLUDE:
            raise DeidentificationError(
                reasons[0], f"suspected burned-in annotation ({', '.join(reasons)}); policy excludes"
            )
        rule = matching_rule(ds, policy.rules)
        if rule is None:
            raise DeidentificationError(
                "no_cleaning_rule",
                f"suspected burned-in annotation ({', '.join(reasons)}) and no cleaning rule matches the device",
            )
        try:
            blank_regions(ds, rule.regions)
        except UnsupportedTransferSyntaxError as exc:
            raise DeidentificationError(exc.code, str(exc)) from None
        except DicomReadError as exc:
            raise DeidentificationError(exc.code, str(exc)) from None
        ds.BurnedInAnnotation = "NO"
        return "cleaned"

    def _identifiers(self, ds: Dataset) -> list[str]:
        """Values the scrubber must remove from free text: every value the profile hides."""
        found: list[str] = []

        def visit(item: Dataset) -> None:
            for elem in item:
                tag = int(elem.tag)
                if elem.VR == "SQ":
                    for child in elem.value or ():
                        visit(child)
                    continue
                private = bool((tag >> 16) & 1)
                code = self._actions.get(tag)
                hidden = private or elem.VR == "PN" or (code is not None and code not in ("K", "C"))
                if hidden and elem.VR in _IDENTIFIER_VRS and not isinstance(elem.value, bytes):
                    found.extend(v for v in _values(elem.value) if v.strip())

        visit(ds)
        return found

    def _safe_private_tags(self, ds: Dataset) -> set[int]:
        if self._private != "C" or not self._safe_private:
            return set()
        keep: set[int] = set()
        for tag in ds.keys():
            group, element = tag >> 16, tag & 0xFFFF
            if not group & 1 or element < 0x1000:
                continue
            creator_elem = ds.get((group << 16) | (element >> 8))
            if creator_elem is None:
                continue
            creator = str(creator_elem.value or "").strip().upper()
            if (creator, group, element & 0xFF) in self._safe_private:
                keep.add(int(tag))
                keep.add((group << 16) | (element >> 8))
        return keep

    def _walk(self, ds: Dataset, run: _Run, *, clean: bool) -> None:
        keep_private = self._safe_private_tags(ds)
        overlay_groups: set[int] = set()
        counts = run.counts
        actions = self._actions
        # A snapshot: each step below changes only its own element (or, for a sequence,
        # the items inside it), so the elements still ahead are as listed here.
        for key, elem in list(ds.items()):
            tag = int(key)
            group = tag >> 16
            if group & 1:
                if tag in keep_private:
                    counts["C"] += 1
                else:
                    del ds[key]
                    counts["X"] += 1
                continue
            if not tag & 0xFFFF:  # group length, stale once anything changes
                del ds[key]
                continue
            if 0x5000 <= group <= 0x60FF:
                if group <= 0x50FF:
                    self._curve_element(ds, tag, run)
                    continue
                if group >= 0x6000:
                    overlay_groups.add(group)
                    continue
            vr = elem.VR
            if not vr or vr == "UN":
                vr = self._vr_cache.get(tag) or self._vr_cache.setdefault(tag, _vr_of(None, tag))
            code = actions.get(tag)
            if code is None:
                self._unlisted(ds, tag, vr, run, clean)
            else:
                counts[self._perform(ds, tag, vr, _resolve(code, vr), code, run, clean)] += 1
        for group in sorted(overlay_groups):
            self._overlay_group(ds, group, run)

    def _recurse(self, ds: Dataset, tag: int, run: _Run, clean: bool) -> None:
        for item in ds[tag].value or ():
            self._walk(item, run, clean=clean)

    def _perform(self, ds: Dataset, tag: int, vr: str, action: str, code: str, run: _Run, clean: bool) -> str:
        """Carry out one resolved action; returns the code of what was actually done."""
        if action == "X":
            del ds[tag]
        elif action == "K":
            if vr == "SQ":
                self._recurse(ds, tag, run, clean)
        elif action == "Z":
            if tag == PATIENT_NAME:
                _put(ds, tag, vr, run.pseudonym)
            else:
                _put(ds, tag, vr, _empty_value(vr))
        elif action == "D":
            self._dummy(ds, tag, vr, run)
        elif action == "U":
            if vr == "SQ":
                self._recurse(ds, tag, run, clean)
            elif vr == "UI":
                self._remap(ds, tag, vr)
            else:
                _put(ds, tag, vr, _empty_value(vr))
                return "Z"
        elif action == "C":
            return self._clean(ds, tag, vr, code, run)
        return action

    def _unlisted(self, ds: Dataset, tag: int, vr: str, run: _Run, clean: bool) -> None:
        if vr == "SQ":
            self._recurse(ds, tag, run, clean)
        elif vr == "PN":
            if any(_strings(ds, tag)):
                _put(ds, tag, vr, "")
                run.counts["Z"] += 1
        elif vr == "UI":
            if not self._retain_uids and tag not in _CLASS_UID_TAGS and self._remap(ds, tag, vr):
                run.counts["U"] += 1
        elif vr in ("DA", "DT"):
            if self._full_dates or not any(_strings(ds, tag)):
                return
            if self._modified_dates:
                run.counts[self._shift(ds, tag, vr, run)] += 1
            else:
                _put(ds, tag, vr, "")
                run.counts["Z"] += 1
        elif clean and vr in _TEXT_VRS:
            self._scrub(ds, tag, vr, run)
            run.counts["C"] += 1

    # ------------------------------------------------------------------ actions

    def _dummy(self, ds: Dataset, tag: int, vr: str, run: _Run) -> None:
        if tag in (PATIENT_NAME, PATIENT_ID):
            _put(ds, tag, vr, run.pseudonym)
            return
        fixed = _FIXED_DUMMIES.get(vr)
        if fixed is not None:
            _put(ds, tag, vr, fixed)
            return
        if vr == "UI":
            if not self._remap(ds, tag, vr):
                _put(ds, tag, vr, self._keys.uid(f"dummy:{tag:08X}"))
            return
        original = "\\".join(_strings(ds, tag))
        domain = f"{tag:08X}"
        if vr == "PN":
            _put(ds, tag, vr, "ANON^" + self._keys.token(domain, original, 12))
        elif vr in ("SH", "AE", "CS"):
            _put(ds, tag, vr, self._keys.token(domain, original, 16))
        elif vr == "LO":
            _put(ds, tag, vr, "ANON-" + self._keys.token(domain, original, 16))
        elif vr in _NUMBER_VRS:
            _put(ds, tag, vr, 0)
        else:  # sequences, binary and unknown VRs have no meaningful dummy: emptied
            _put(ds, tag, vr, _empty_value(vr))

    def _map_uid(self, value: str) -> str:
        """A keyed replacement; the standard's own UIDs (a SOP class) are kept when well formed."""
        if not value or (value.startswith(_DICOM_ROOT) and _WELL_FORMED_UID.fullmatch(value)):
            return value
        return self._keys.uid(value)

    def _remap(self, ds: Dataset, tag: int, vr: str) -> bool:
        values = _strings(ds, tag)
        if not any(values):
            return False
        mapped = [self._map_uid(v) for v in values]
        if mapped == values:
            return False
        _put(ds, tag, vr, mapped if len(mapped) > 1 else mapped[0])
        return True

    def _shift(self, ds: Dataset, tag: int, vr: str, run: _Run) -> str:
        """Move a DA/DT value back by the patient's shift; empty it if unparseable."""
        assert run.shift_days is not None
        shift = _shift_date if vr == "DA" else _shift_datetime
        shifted = [shift(v, run.shift_days) for v in _strings(ds, tag)]
        if not shifted:
            return "C"
        if any(v is None for v in shifted):
            _put(ds, tag, vr, "")
            return "Z"
        _put(ds, tag, vr, shifted if len(shifted) > 1 else shifted[0])
        return "C"

    def _scrub(self, ds: Dataset, tag: int, vr: str, run: _Run) -> None:
        scrubber = run.scrubber or TextScrubber()
        values = [scrubber.scrub(v) for v in _values(ds[tag].value)]  # decoded with the charset
        _put(ds, tag, vr, values if len(values) > 1 else (values[0] if values else ""))

    def _clean(self, ds: Dataset, tag: int, vr: str, code: str, run: _Run) -> str:
        """Apply C; falls back to the Basic Profile action where C has no meaning for the VR."""
        if vr in ("DA", "DT", "TM"):
            if run.shift_days is None:
                return self._fallback(ds, tag, vr, run)
            if vr == "TM":  # a whole-day shift leaves times as they are
                return "C"
            return self._shift(ds, tag, vr, run)
        if vr in _TEXT_VRS:
            self._scrub(ds, tag, vr, run)
            return "C"
        if vr == "AE":
            original = "\\".join(_strings(ds, tag))
            if original:
                _put(ds, tag, vr, self._keys.token(f"{tag:08X}", original, 16))
            return "C"
        if vr == "SQ":
            self._recurse(ds, tag, run, True)
            return "C"
        return self._fallback(ds, tag, vr, run)

    def _fallback(self, ds: Dataset, tag: int, vr: str, run: _Run) -> str:
        row = self._rows.get(tag)
        basic = _resolve(row.basic if row is not None else "X", vr)
        return self._perform(ds, tag, vr, basic, basic, run, False)

    def _curve_element(self, ds: Dataset, tag: int, run: _Run) -> None:
        element = tag & 0xFFFF
        if self._curve != "C":
            del ds[tag]
            run.counts["X"] += 1
        elif element in (0x0022, 0x2500, 0x4000):  # description, label, comments: text
            self._scrub(ds, tag, _vr_of(ds.get_item(tag), tag), run)
            run.counts["C"] += 1

    def _overlay_group(self, ds: Dataset, group: int, run: _Run) -> None:
        tags = [int(t) for t in ds.keys() if int(t) >> 16 == group]
        rule = matching_rule(ds, self._config.burned_in.rules) if self._overlay == "C" else None
        if rule is not None and (group << 16) | 0x3000 in ds:
            try:
                blank_overlay(ds, group, rule.regions)
            except (ValueError, TypeError):
                rule = None
        if rule is None:
            for tag in tags:
                del ds[tag]
            run.counts["X"] += len(tags)
            return
        for tag in tags:
            element = tag & 0xFFFF
            if element == 0x3000:
                run.counts["C"] += 1
            elif element in (0x0022, 0x1500, 0x4000):  # description, label, comments
                self._scrub(ds, tag, _vr_of(ds.get_item(tag), tag), run)
                run.counts["C"] += 1

    def _marks(self, pixels: str | None) -> dict[BaseTag, DataElement]:
        """New elements marking a data set de-identified, and how (the same in every file)."""
        table = self._table
        value, scheme, meaning = table.profile_code
        codes = [(value, meaning)]
        if pixels == "cleaned":
            codes.append(("113101", "Clean Pixel Data Option"))
        codes += [table.option_codes[o] for o in ProfileOption if o in self._config.options]
        items = [
            Dataset(
                _elements(
                    (0x00080100, "SH", code_value),
                    (0x00080102, "SH", scheme),
                    (0x00080104, "LO", code_meaning),
                )
            )
            for code_value, code_meaning in codes
        ]
        return _elements(
            (0x00120062, "CS", "YES"),  # Patient Identity Removed
            (0x00120063, "LO", f"{table.standard} {table.edition} {_METHOD}"[:64]),  # De-identification Method
            (0x00120064, "SQ", Sequence(items)),  # De-identification Method Code Sequence
            (
                0x00280303,  # Longitudinal Temporal Information Modified
                "CS",
                "UNMODIFIED" if self._full_dates else "MODIFIED" if self._modified_dates else "REMOVED",
            ),
        )

    def _mark(self, ds: Dataset, pixels: str | None, *, shared: bool = False) -> None:
        """Record what was done, in the attributes PS3.15 E.1.1 and PS3.3 C.12.1 define."""
        marks = self._shared_marks.get(pixels) if shared else None
        if marks is None:
            marks = self._marks(pixels)
            if shared:
                self._shared_marks[pixels] = marks
        for tag, elem in marks.items():
            ds[tag] = elem
        meta = FileMetaDataset(
            _elements(
                (0x00020001, "OB", b"\x00\x01"),
                (0x00020002, "UI", str(ds.SOPClassUID)),
                (0x00020003, "UI", str(ds.SOPInstanceUID)),
                (0x00020010, "UI", transfer_syntax_of(ds)),
                (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID),
                (0x00020013, "SH", "MEDFED_DEID"),
            )
        )
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128

    # ------------------------------------------------------------------ files

    def deidentify_bytes(self, data: bytes) -> tuple[bytes, DatasetResult, str]:
        """De-identify one encoded file; returns the new encoding, the result, its name.

        The name is ``<patient pseudonym>/<study UID>/<series UID>/<SOP UID>.dcm``, built
        from replacement values only. Raises DeidentificationError for an input that must
        not produce output.
        """
        chunks, result, name = self._deidentify_chunks(data)
        return b"".join(chunks), result, name

    def _deidentify_chunks(self, data: bytes) -> tuple[list[Chunk], DatasetResult, str]:
        """As :meth:`deidentify_bytes`, the encoding in pieces, some of them views of ``data``."""
        ds = _parse(data)
        originals = {int(t): e for t, e in ds.items() if isinstance(e, RawDataElement)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings may quote values
            result = self._deidentify(ds, shared_marks=True)
            for tag in [t for t in ds.keys() if t >> 16 == 0]:
                del ds[tag]  # DIMSE command elements have no place in a stored file
            chunks = None
            if result.pixels is None:  # cleaned pixels are new; nothing to reuse
                try:
                    chunks = splice(ds, memoryview(data), originals, self._encoded)
                except Exception:  # dcmwrite decides, and words the error, below
                    chunks = None
            if chunks is None:
                chunks = [_encode(ds)]
        study = _name_part(ds.get("StudyInstanceUID", ""), "no-study")
        series = _name_part(ds.get("SeriesInstanceUID", ""), "no-series")
        name = f"{result.patient_pseudonym}/{study}/{series}/{_name_part(ds.get('SOPInstanceUID', ''), 'no-instance')}.dcm"
        return chunks, result, name

    def deidentify_file(self, source: Path, destination_root: Path) -> tuple[FileOutcome, DatasetResult | None]:
        """De-identify one file into ``destination_root``; never raises for a bad input."""
        root = Path(destination_root)
        return self._deidentify_one(Path(source), lambda name, chunks: _store(root / name, chunks))

    def _deidentify_one(
        self, source: Path, store: Callable[[str, list[Chunk]], str]
    ) -> tuple[FileOutcome, DatasetResult | None]:
        """De-identify ``source``; ``store`` writes the output by name and returns its SHA-256."""
        data, digest, problem = _load(source)
        if data is None:
            return FileOutcome(digest, FileStatus.EXCLUDED, reason="unreadable", detail=problem), None
        try:
            chunks, result, name = self._deidentify_chunks(data)
        except (DeidentificationError, DicomReadError) as exc:
            return FileOutcome(digest, FileStatus.EXCLUDED, reason=exc.code, detail=str(exc)), None
        output_digest = store(name, chunks)
        outcome = FileOutcome(
            input_sha256=digest,
            status=FileStatus.WRITTEN,
            output_sha256=output_digest,
            output_name=name,
            pixels=result.pixels,
        )
        return outcome, result

    def deidentify_folder(
        self, source_root: Path | str, destination_root: Path | str, *, workers: int = 1
    ) -> DeidReport:
        """De-identify every file under ``source_root`` into ``destination_root``.

        Bad files are excluded with a reason code and the rest proceeds. Outputs are
        staged in a hidden ``.deid-*.partial`` folder of ``destination_root`` and moved
        into place when the run ends, or stops on an error: the destination holds whole
        files or none. A run killed outright (SIGKILL, power cut) leaves its staging
        folder behind; the next run into the same destination removes it, and nothing
        that reads the destination takes a hidden folder for data. With ``workers`` > 1
        files are shared among that many processes; the report is the same, in the
        same order, as with one. Outputs are owner only (0600 files, 0700 folders).
        """
        source_root, destination_root = Path(source_root), Path(destination_root)
        if not source_root.is_dir():
            raise NotADirectoryError("the de-identification source is not a directory")
        if workers < 1:
            raise ValueError(f"workers must be >= 1; found {workers}")
        make_folders(destination_root)
        stale = remove_stale_staging(destination_root)
        if stale:
            logger.warning("removed %d staging folder(s) left by an interrupted de-identification", stale)
        files = _iter_files(source_root, destination_root.resolve())
        staging = _Staging(destination_root)
        try:
            if workers == 1 or len(files) < 2:
                results = self._run_sequential(files, staging)
            else:
                results = self._run_processes(files, Path(staging.root), workers)
        finally:
            staging.commit()
        counts: Counter[str] = Counter()
        for index, (outcome, file_counts) in enumerate(results):
            counts.update(file_counts)
            if outcome.status is FileStatus.EXCLUDED:
                logger.info("file %d (%s) excluded: %s", index, outcome.input_sha256[:12], outcome.reason)
        report = DeidReport(
            profile=self._table.profile,
            edition=self._table.title,
            options=self._config.option_names,
            burned_in_mode=self._config.burned_in.mode.value,
            key_fingerprint=self._keys.fingerprint,
            action_counts=MappingProxyType(dict(counts)),
            files=tuple(outcome for outcome, _ in results),
        )
        logger.info(
            "de-identified %d files: %d written, %d excluded", len(results), len(report.written), len(report.excluded)
        )
        return report

    def _run_sequential(self, files: list[Path], staging: _Staging) -> list[tuple[FileOutcome, dict[str, int]]]:
        results = []
        for path in files:
            outcome, result = self._deidentify_one(path, staging.write)
            results.append((outcome, dict(result.counts) if result is not None else {}))
        return results

    def _run_processes(
        self, files: list[Path], destination: Path, workers: int
    ) -> list[tuple[FileOutcome, dict[str, int]]]:
        context = multiprocessing.get_context("spawn")  # safe beside the node's threads
        chunk = max(1, len(files) // (workers * 8))
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(self._secret, self._config, self._table.to_document()),
        ) as pool:
            return list(pool.map(_worker_file, [(str(p), str(destination)) for p in files], chunksize=chunk))


_WORKER: Deidentifier | None = None


def _init_worker(secret: bytes, config: DeidConfig, table_document: dict[str, object]) -> None:
    global _WORKER
    _WORKER = Deidentifier(secret=secret, config=config, table=parse_profile_table(table_document))


def _worker_file(job: tuple[str, str]) -> tuple[FileOutcome, dict[str, int]]:
    assert _WORKER is not None
    outcome, result = _WORKER.deidentify_file(Path(job[0]), Path(job[1]))
    return outcome, dict(result.counts) if result is not None else {}


def _encode(ds: Dataset) -> bytes:
    """The Part 10 encoding of ``ds`` by pydicom (the general path)."""
    buffer = io.BytesIO()
    try:
        try:
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        except (TypeError, ValueError):
            # Raw elements still in another encoding (the transfer syntax changed,
            # or the file lied about it): decode them all, then encode afresh.
            for _ in ds.iterall():
                pass
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except Exception as exc:
        raise DeidentificationError(
            "unwritable", f"the de-identified data set could not be encoded ({type(exc).__name__})"
        ) from None
    return buffer.getvalue()


def _load(path: Path) -> tuple[bytes | None, str, str]:
    """A file's bytes and SHA-256, or None and why it could not be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", f"the file cannot be read ({type(exc).__name__})"
    return data, hashlib.sha256(data).hexdigest(), ""


def _store(target: Path, chunks: list[Chunk]) -> str:
    """Write the concatenated ``chunks`` atomically at ``target``; returns their SHA-256."""
    _write_atomically(target, chunks)
    return _digest(chunks)


def _digest(chunks: list[Chunk]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


_STAGING_PREFIX = ".deid-"
_STAGING_SUFFIX = ".partial"
_STARTING_SUFFIX = ".starting"
_STAGING_LOCK = ".owner.lock"


class _Staging:
    """A run's outputs, written into a hidden folder of the destination, moved in at the end.

    Only complete files are ever left in the staging folder (a failed write removes its
    own), and they reach the destination by rename, a whole new patient folder at a
    time where it can: the destination holds whole files or none, as with one temporary
    file per output, for a rename per folder instead of one per file.

    The folder is made under a ``.starting`` name, with a lock file that this process
    holds (``flock``) for as long as the run lasts, and only then renamed to
    ``.deid-*.partial``. The kernel drops a lock when its holder dies, SIGKILL
    included, so a staging folder whose lock another process can take was left by a
    run that died: :func:`remove_stale_staging` removes exactly those.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = str(destination)
        starting = tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=_STARTING_SUFFIX, dir=self.destination)  # 0700
        self._lock = os.open(os.path.join(starting, _STAGING_LOCK), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            self.root = starting[: -len(_STARTING_SUFFIX)] + _STAGING_SUFFIX
            os.rename(starting, self.root)
        except BaseException:
            os.close(self._lock)
            shutil.rmtree(starting, ignore_errors=True)
            raise
        self._folders: set[str] = set()

    def write(self, name: str, chunks: list[Chunk]) -> str:
        """Write one output under its relative ``name``; returns its SHA-256."""
        path = os.path.join(self.root, name)
        folder = os.path.dirname(path)
        if folder not in self._folders:
            make_folders(folder)
            self._folders.add(folder)
        digest = _digest(chunks)
        fd = open_new(path)
        try:
            try:
                _write_all(fd, chunks)
            finally:
                os.close(fd)
        except BaseException:
            os.unlink(path)
            raise
        return digest

    def commit(self) -> None:
        """Move every staged output into the destination, then remove the staging folder."""
        try:
            _move_tree(self.root, self.destination, skip=_STAGING_LOCK)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            os.close(self._lock)


def remove_stale_staging(destination: Path | str) -> int:
    """Remove the staging folders in `destination` that a de-identification killed mid-run left; how many.

    Only folders named as :class:`_Staging` names them whose owner's lock is free are
    removed: a run in progress, in this process or another, keeps its folder. A
    ``.starting`` folder without its lock file yet is being made this instant (or is
    empty), and is left alone.
    """
    removed = 0
    try:
        entries = list(os.scandir(destination))
    except FileNotFoundError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(_STAGING_PREFIX) and name.endswith((_STAGING_SUFFIX, _STARTING_SUFFIX))):
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, _STAGING_LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if name.endswith(_STARTING_SUFFIX):
                continue
            fd = None  # a staging folder from a release without locks: no live run of this one owns it
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its run is alive
            shutil.rmtree(entry.path)
            removed += 1
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _move_tree(source: str, destination: str, *, skip: str | None = None) -> None:
    for entry in os.scandir(source):
        if entry.name == skip:
            continue
        target = os.path.join(destination, entry.name)
        if not entry.is_dir(follow_symlinks=False):
            os.replace(entry.path, target)
            continue
        try:
            os.rename(entry.path, target)  # the whole folder, when the destination has none
        except OSError:
            make_folders(target)
            _move_tree(entry.path, target)


def _parse(data: bytes) -> Dataset:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded, never shown: they may quote values
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            ds = None
        except (EOFError, ValueError, KeyError, IndexError, TypeError, OSError, NotImplementedError) as exc:
            raise DeidentificationError("unreadable", f"the file cannot be parsed ({type(exc).__name__})") from None
        if ds is None:
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
            except Exception:
                raise DeidentificationError("not_dicom", "not a DICOM file") from None
            if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
                raise DeidentificationError("not_dicom", "not a DICOM file")
    # pydicom stops quietly at the end of the data; a short last value, a data set with
    # nothing in it or an end-of-file warning from a sequence means the file was cut.
    if not len(ds) or _last_value_short(ds) or any("End of file" in str(w.message) for w in caught):
        raise DeidentificationError("truncated", "the file ends inside its data set")
    return ds


def _name_part(uid: object, missing: str) -> str:
    """A UID as a file or folder name: only a well-formed UID (digits and dots) is used."""
    text = str(uid or "")
    if not text:
        return missing
    if not _WELL_FORMED_UID.fullmatch(text):  # cannot happen after remapping; never a path
        raise DeidentificationError("bad_uid", "an instance UID is not well formed after de-identification")
    return text


def _last_value_short(ds: Dataset) -> bool:
    last = ds.get_item(max(ds.keys(), key=int))
    if not isinstance(last, RawDataElement) or last.value is None or last.length == 0xFFFFFFFF:
        return False
    return len(last.value) < last.length


def _iter_files(root: Path, skip: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() != skip)
        files.extend(here / name for name in sorted(filenames))
    return files


def _write_atomically(target: Path, chunks: list[Chunk]) -> None:
    make_folders(target.parent)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        fd = open_new(temporary)
        try:
            _write_all(fd, chunks)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_all(fd: int, chunks: list[Chunk]) -> None:
    """Write ``chunks`` in order with as few system calls and copies as the OS allows."""
    if hasattr(os, "writev") and len(chunks) <= 512:
        done = os.writev(fd, chunks)
        total = sum(len(c) for c in chunks)
        if done == total:
            return
        rest = memoryview(b"".join(chunks))[done:]
    else:
        rest = memoryview(b"".join(chunks))
    while rest:
        rest = rest[os.write(fd, rest) :]
