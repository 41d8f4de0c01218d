"""The PS3.15 Annex E confidentiality profile table, kept as data.

``annex_e_basic_profile.json`` next to this module transcribes Table E.1-1 (Application
Level Confidentiality Profile Attributes) of the edition it names: one row per attribute
with the Basic Profile action and the action of every option column. This module loads
and checks it, and answers "what does the profile do to this tag under these options".

Two rules the table leaves to the implementer are fixed here:

- When two selected options give one attribute different actions (Retain Device Identity
  says K and Retain Longitudinal Temporal Information with Modified Dates says C for the
  eleven calibration dates), C wins: cleaning is the more protective of the two.
- Retain Longitudinal Temporal Information Full Dates and ... Modified Dates are mutually
  exclusive (PS3.15 E.3.6); selecting both is an error.
"""

from __future__ import annotations

import difflib
import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from imaging.errors import ProfileError

__all__ = [
    "BASIC_ACTIONS",
    "OPTION_ACTIONS",
    "ProfileOption",
    "ProfileRow",
    "ProfileTable",
    "TagKind",
    "load_profile_table",
    "parse_options",
    "parse_profile_table",
]

TABLE_PATH = Path(__file__).with_name("annex_e_basic_profile.json")

#: Action codes (and the compound codes whose choice depends on the IOD) of the Basic column.
BASIC_ACTIONS = frozenset({"D", "Z", "X", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"})
#: Action codes an option column may give.
OPTION_ACTIONS = frozenset({"K", "C"})

_TAG_RE = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")


class ProfileOption(enum.StrEnum):
    """The option columns of Table E.1-1, in the table's order."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain_longitudinal_full_dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"


class TagKind(enum.StrEnum):
    """What a row's tag column designates."""

    TAG = "tag"  # one (gggg,eeee) attribute
    CURVE = "curve"  # (50xx,xxxx): every attribute of the repeating curve groups
    OVERLAY_DATA = "overlay_data"  # (60xx,3000)
    OVERLAY_COMMENTS = "overlay_comments"  # (60xx,4000)
    PRIVATE = "private"  # (gggg,eeee) where gggg is odd


_PATTERNS = {
    "(50xx,xxxx)": TagKind.CURVE,
    "(60xx,3000)": TagKind.OVERLAY_DATA,
    "(60xx,4000)": TagKind.OVERLAY_COMMENTS,
    "(gggg,eeee) where gggg is odd": TagKind.PRIVATE,
}


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1."""

    tag: str
    name: str
    basic: str
    options: Mapping[ProfileOption, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def kind(self) -> TagKind:
        return _PATTERNS.get(self.tag, TagKind.TAG)

    @property
    def tag_int(self) -> int | None:
        """The tag as an int for a plain row, None for the repeating and private rows."""
        match = _TAG_RE.match(self.tag)
        return int(match.group(1) + match.group(2), 16) if match else None

    def action(self, selected: frozenset[ProfileOption]) -> str:
        """The action under ``selected`` options: an option column, else the Basic column."""
        given = {self.options[o] for o in selected if o in self.options}
        if not given:
            return self.basic
        return "C" if "C" in given else "K"


@dataclass(frozen=True)
class ProfileTable:
    """Table E.1-1 of one edition of PS3.15."""

    standard: str
    edition: str
    table: str
    profile: str
    profile_code: tuple[str, str, str]  # (value, scheme, meaning)
    option_codes: Mapping[ProfileOption, tuple[str, str]]  # option -> (code value, meaning)
    rows: tuple[ProfileRow, ...]

    @property
    def title(self) -> str:
        """E.g. ``DICOM PS3.15 2026d Table E.1-1``."""
        return f"{self.standard} {self.edition} {self.table.split(' Application')[0]}"

    def by_tag(self) -> dict[int, ProfileRow]:
        """The plain rows, keyed by tag."""
        return {r.tag_int: r for r in self.rows if r.tag_int is not None}

    def by_kind(self, kind: TagKind) -> ProfileRow:
        """The single row of a repeating-group or private kind."""
        for row in self.rows:
            if row.kind is kind:
                return row
        raise ProfileError(f"{self.title} has no row for {kind.value}")

    def to_document(self) -> dict[str, object]:
        """The table as the JSON document it was parsed from (minus the prose fields)."""
        value, scheme, meaning = self.profile_code
        return {
            "standard": self.standard,
            "edition": self.edition,
            "table": self.table,
            "profile": self.profile,
            "profile_code": {"value": value, "scheme": scheme, "meaning": meaning},
            "options": [
                {"name": o.value, "code": self.option_codes[o][0], "meaning": self.option_codes[o][1]}
                for o in ProfileOption
            ],
            "rows": [
                {"tag": r.tag, "name": r.name, "basic": r.basic, "options": {o.value: c for o, c in r.options.items()}}
                for r in self.rows
            ],
        }

    def actions(self, selected: frozenset[ProfileOption]) -> dict[int, str]:
        """The action of every plain row under ``selected`` options."""
        return {t: r.action(selected) for t, r in self.by_tag().items()}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_options(names: Iterable[str], *, field_name: str = "options") -> frozenset[ProfileOption]:
    """Turn option names into options, reporting every unknown name and the date clash.

    Raises
    ------
    ProfileError
        Listing each unknown name with a suggestion, and the full/modified dates clash.
    """
    if isinstance(names, (str, bytes)):
        raise ProfileError(f"{field_name} must be a list of option names, not one string")
    known = {o.value: o for o in ProfileOption}
    problems: list[str] = []
    selected: set[ProfileOption] = set()
    for index, name in enumerate(names):
        if name in known:
            selected.add(known[name])
        else:
            problems.append(
                f"{field_name}[{index}] '{name}' is not a PS3.15 option"
                + _did_you_mean(str(name), known)
            )
    if {
        ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES,
        ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
    } <= selected:
        problems.append(
            f"{field_name}: retain_longitudinal_full_dates and "
            "retain_longitudinal_modified_dates are mutually exclusive (PS3.15 E.3.6); pick one"
        )
    if problems:
        raise ProfileError("; ".join(problems))
    return frozenset(selected)


def _parse_row(raw: object, index: int, problems: list[str]) -> ProfileRow | None:
    if not isinstance(raw, dict):
        problems.append(f"rows[{index}] must be an object")
        return None
    tag, name, basic = raw.get("tag"), raw.get("name"), raw.get("basic")
    options = raw.get("options", {})
    ok = True
    if not isinstance(tag, str) or not (_TAG_RE.match(tag) or tag in _PATTERNS):
        problems.append(f"rows[{index}].tag {tag!r} is not (GGGG,EEEE) nor a known pattern")
        ok = False
    if not isinstance(name, str) or not name:
        problems.append(f"rows[{index}].name must be a non-empty string")
        ok = False
    if basic not in BASIC_ACTIONS:
        problems.append(f"rows[{index}].basic {basic!r} is not one of {sorted(BASIC_ACTIONS)}")
        ok = False
    parsed: dict[ProfileOption, str] = {}
    if not isinstance(options, dict):
        problems.append(f"rows[{index}].options must be an object")
        ok = False
    else:
        known = {o.value: o for o in ProfileOption}
        for key, code in options.items():
            if key not in known:
                problems.append(
                    f"rows[{index}].options has unknown option '{key}'" + _did_you_mean(key, known)
                )
                ok = False
            elif code not in OPTION_ACTIONS:
                problems.append(f"rows[{index}].options.{key} {code!r} is not K or C")
                ok = False
            else:
                parsed[known[key]] = code
    if not ok:
        return None
    assert isinstance(tag, str) and isinstance(name, str) and isinstance(basic, str)
    return ProfileRow(tag=tag, name=name, basic=basic, options=MappingProxyType(parsed))


def parse_profile_table(document: Mapping[str, object]) -> ProfileTable:
    """Check a decoded table document and build the table; every problem is reported."""
    problems: list[str] = []
    for key in ("standard", "edition", "table", "profile"):
        if not isinstance(document.get(key), str) or not document.get(key):
            problems.append(f"{key} must be a non-empty string")
    code = document.get("profile_code")
    if not isinstance(code, dict) or not all(
        isinstance(code.get(k), str) for k in ("value", "scheme", "meaning")
    ):
        problems.append("profile_code must have string value, scheme and meaning")
    option_codes: dict[ProfileOption, tuple[str, str]] = {}
    raw_options = document.get("options")
    if not isinstance(raw_options, list):
        problems.append("options must be a list")
    else:
        for index, entry in enumerate(raw_options):
            try:
                option_codes[ProfileOption(entry["name"])] = (str(entry["code"]), str(entry["meaning"]))
            except (KeyError, TypeError, ValueError):
                problems.append(f"options[{index}] must name a known option with code and meaning")
        missing = set(ProfileOption) - set(option_codes)
        if missing:
            problems.append(f"options lacks {sorted(m.value for m in missing)}")
    raw_rows = document.get("rows")
    rows: list[ProfileRow] = []
    if not isinstance(raw_rows, list) or not raw_rows:
        problems.append("rows must be a non-empty list")
    else:
        seen: set[str] = set()
        for index, raw in enumerate(raw_rows):
            row = _parse_row(raw, index, problems)
            if row is None:
                continue
            if row.tag in seen:
                problems.append(f"rows[{index}].tag {row.tag} appears twice")
            seen.add(row.tag)
            rows.append(row)
        for pattern in _PATTERNS:
            if pattern not in seen:
                problems.append(f"rows lack the {pattern} row")
    if problems:
        raise ProfileError("annex E table: " + "; ".join(problems))
    assert isinstance(code, dict)
    return ProfileTable(
        standard=str(document["standard"]),
        edition=str(document["edition"]),
        table=str(document["table"]),
        profile=str(document["profile"]),
        profile_code=(code["value"], code["scheme"], code["meaning"]),
        option_codes=MappingProxyType(option_codes),
        rows=tuple(rows),
    )


@lru_cache(maxsize=4)
def load_profile_table(path: Path = TABLE_PATH) -> ProfileTable:
    """Load and check the Annex E table (the bundled edition unless ``path`` is given)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"annex E table {Path(path).name} cannot be read: {type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise ProfileError("annex E table must be a JSON object")
    return parse_profile_table(document)
