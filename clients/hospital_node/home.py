"""The node home: the folder that holds a hospital node's durable state.

A Flower ClientApp process lives for one message, so everything a node must remember
lives here, on the hospital's own disk: ``node.toml`` (the node's name and its dataset
registry), ``policy.toml`` (the officer's limits, :mod:`clients.hospital_node.policy`),
``trusted_partners.toml`` (the research partners' keys the officer trusts),
``ledger.sqlite`` (the privacy ledger), ``audit.jsonl`` (the signed audit log,
with its head record ``audit.jsonl.head``), ``keys/node_audit.key`` + ``.pub`` (the
key that signs it, created on first use) and ``allowed_apps.toml`` (the releases whose
runs the node serves, :mod:`clients.hospital_node.runtime.allowed_apps`; a new home
allows the medfed release installed here). ``node.toml`` looks like::

    [node]
    name = "hospital_1"

    [datasets.htn_cohort]
    path = "cohort.parquet"            # relative to the home, or absolute
    id_column = "patient_id"
    label_column = "htn_onset_1y"
    feature_columns = ["age", "bmi"]
    site_column = "site"               # optional; with site_value, keeps only that
    site_value = "hospital_1"          # site's rows of a multi-site file
    validation_fraction = 0.2
    split_seed = 0

    [datasets.chest_ct]
    kind = "imaging"                   # a folder of DICOM files; "tabular" is the default
    path = "/data/pacs-export/chest"   # the folder, as exported (identifiable)
    labels = "/data/chest_labels.csv"  # patient_id,label (and optionally issuer)
    modalities = ["CT"]                # optional series selection: modalities, body
    body_parts = ["CHEST"]             # parts and a Series Description pattern
    series_description = "axial"
    validation_fraction = 0.2
    split_seed = 0
    deid = { options = [], burned_in = { mode = "exclude" } }   # imaging.DeidConfig

    [datasets.ehr]
    kind = "omop"                      # OMOP CDM v5.4 tables (clients.hospital_node.data.sources)
    source = "postgres"                # "folder" (Parquet/CSV per table), "sqlite" or "postgres"
    location = "postgresql://reader@db.hospital.local:5432/cdm"   # a folder, a file, or a URL
    password_file = "secrets/cdm.pw"   # postgres only: owner-only (0600); relative to the home
    schema = "cdm"                     # postgres only; default "public"

It is parsed once, into frozen :class:`DatasetEntry` values, and every problem is
reported at once, by field. Registering a dataset validates its file first and then
replaces ``node.toml`` atomically, so a failed registration leaves it untouched;
registering an imaging dataset also de-identifies its folder into the node's cache
(``clients.hospital_node.imaging_connector``); registering an OMOP dataset opens it as a
snapshot and validates it (``clients.hospital_node.data``). An OMOP entry's ``path`` is the
folder where its snapshots are staged, ``<home>/omop-scratch/<name>`` (not written to
``node.toml``).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.hospital_node.data.sources import SOURCE_KINDS, OmopSource
from clients.hospital_node.errors import DatasetNotFoundError, NodeHomeError
from clients.hospital_node.policy import POLICY_FILE, NodePolicy
from privacy.keys import toml_string
from privacy.private_files import FOLDER_MODE, create_private, make_private_folder, publish

if TYPE_CHECKING:
    from clients.hospital_node.connectors import TabularData
    from clients.hospital_node.data.validation import ValidationReport
    from clients.hospital_node.imaging_connector import ImagingInventory
    from imaging.deid_config import DeidConfig
    from privacy.audit import AuditLog
    from privacy.keys import TrustedKeys

__all__ = [
    "AUDIT_KEY_NAME",
    "AUDIT_LOG_FILE",
    "CACHE_DIR",
    "CONFIG_FILE",
    "DATASET_KINDS",
    "KEYS_DIR",
    "LEDGER_FILE",
    "OMOP_SCRATCH_DIR",
    "DatasetEntry",
    "ImagingSource",
    "NodeHome",
    "toml_string",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "node.toml"
LEDGER_FILE = "ledger.sqlite"
AUDIT_LOG_FILE = "audit.jsonl"
KEYS_DIR = "keys"
CACHE_DIR = "imaging-cache"  # de-identified images and what is derived from them, per dataset
OMOP_SCRATCH_DIR = "omop-scratch"  # an OMOP dataset's staged snapshot while it is open, per dataset
AUDIT_KEY_NAME = "node_audit"

# Node and dataset names appear in paths, TOML table headers and audit records.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"

_TOP_KEYS = ("node", "datasets")
_NODE_KEYS = ("name", "rehearsal")
_REQUIRED_DATASET_KEYS = ("path", "id_column", "label_column", "feature_columns")
_OPTIONAL_DATASET_KEYS = ("site_column", "site_value", "validation_fraction", "split_seed")
_DATASET_KEYS = _REQUIRED_DATASET_KEYS + _OPTIONAL_DATASET_KEYS + ("kind",)
_REQUIRED_IMAGING_KEYS = ("kind", "path", "labels")
_OPTIONAL_IMAGING_KEYS = (
    "modalities", "body_parts", "series_description", "deid", "validation_fraction", "split_seed"
)
_IMAGING_KEYS = _REQUIRED_IMAGING_KEYS + _OPTIONAL_IMAGING_KEYS
_REQUIRED_OMOP_KEYS = ("kind", "source", "location")
_OPTIONAL_OMOP_KEYS = ("password_file", "schema", "validation_fraction", "split_seed")
_OMOP_KEYS = _REQUIRED_OMOP_KEYS + _OPTIONAL_OMOP_KEYS
DATASET_KINDS = ("tabular", "imaging", "omop")

_DEFAULT_VALIDATION_FRACTION = 0.2
_DEFAULT_SPLIT_SEED = 0
_MAX_SEED = 2**63  # TOML integers are 64-bit


def _unknown_key(field: str, key: str, known: Sequence[str]) -> str:
    message = f"{field} is not a known field"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message}; known fields: {', '.join(known)}"


def _is_utf8(text: str) -> bool:
    # Undecodable file names reach Python as lone surrogates; TOML cannot hold them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _listing(headline: str, problems: Sequence[str]) -> str:
    return headline + ":\n" + "\n".join(f"  - {problem}" for problem in problems)


def _name_problems(name: object) -> list[str]:
    if isinstance(name, str) and _NAME.fullmatch(name):
        return []
    return [f"dataset name {name!r} is invalid; use {_NAME_RULE}"]


def _column_problems(
    prefix: str,
    *,
    id_column: object,
    label_column: object,
    feature_columns: object,
    site_column: object,
    site_value: object,
) -> list[str]:
    """Problems with the declared columns; types and values, every one."""
    problems: list[str] = []
    roles: list[tuple[str, str]] = []
    for key, value in (("id_column", id_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{prefix}.{key} must be a non-empty column name")
        else:
            roles.append((key, value))

    features: list[str] = []
    if isinstance(feature_columns, str) or not isinstance(feature_columns, Sequence):
        problems.append(f"{prefix}.feature_columns must be a list of column names")
    elif not all(isinstance(c, str) and c.strip() for c in feature_columns):
        problems.append(f"{prefix}.feature_columns must hold non-empty column names only")
    elif not feature_columns:
        problems.append(f"{prefix}.feature_columns must name at least one column")
    else:
        features = list(feature_columns)
        repeated = sorted({c for c in features if features.count(c) > 1})
        if repeated:
            listed = ", ".join(map(repr, repeated))
            problems.append(f"{prefix}.feature_columns lists {listed} more than once")

    if (site_column is None) != (site_value is None):
        problems.append(
            f"{prefix}.site_column and {prefix}.site_value go together; set both or neither"
        )
    for key, value in (("site_column", site_column), ("site_value", site_value)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{prefix}.{key} must be a non-empty string")
    if isinstance(site_column, str) and site_column.strip():
        roles.append(("site_column", site_column))
    roles += [("feature_columns", c) for c in dict.fromkeys(features)]

    seen: dict[str, str] = {}
    for role, column in roles:
        first = seen.setdefault(column, role)
        if first != role:
            problems.append(f"column {column!r} is both {prefix}.{first} and {prefix}.{role}")
    texts = [column for _, column in roles]
    if isinstance(site_value, str):
        texts.append(site_value)
    if not all(_is_utf8(text) for text in texts):
        problems.append(f"{prefix} holds a column name or site value that is not valid UTF-8")
    return problems


def _split_problems(prefix: str, *, validation_fraction: object, split_seed: object) -> list[str]:
    problems: list[str] = []
    fraction = validation_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        problems.append(
            f"{prefix}.validation_fraction must be a number; found {type(fraction).__name__}"
        )
    elif not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        problems.append(f"{prefix}.validation_fraction must be in [0, 1); found {fraction}")
    seed = split_seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"{prefix}.split_seed must be an integer; found {type(seed).__name__}")
    elif not 0 <= seed < _MAX_SEED:
        problems.append(f"{prefix}.split_seed must be in [0, 2**63); found {seed}")
    return problems


def _table_problems(name: str, raw: Mapping[str, Any]) -> list[str]:
    """Every problem of one ``[datasets.<name>]`` table, types and values."""
    prefix = f"datasets.{name}"
    kind = raw.get("kind", "tabular")
    if kind not in DATASET_KINDS:
        hint = difflib.get_close_matches(str(kind), DATASET_KINDS, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return _name_problems(name) + [
            f"{prefix}.kind must be one of {', '.join(map(repr, DATASET_KINDS))}; found {kind!r}{suggestion}"
        ]
    if kind == "imaging":
        return _imaging_table_problems(name, raw)
    if kind == "omop":
        return _omop_table_problems(name, raw)
    problems = _name_problems(name)
    problems += [
        _unknown_key(f"{prefix}.{key}", key, _DATASET_KEYS)
        for key in raw
        if key not in _DATASET_KEYS
    ]
    problems += [f"{prefix}.{key} is missing" for key in _REQUIRED_DATASET_KEYS if key not in raw]
    path = raw.get("path")
    if "path" in raw and (not isinstance(path, str) or not path.strip()):
        problems.append(f"{prefix}.path must be a non-empty string")
    if "feature_columns" in raw and not isinstance(raw["feature_columns"], list):
        problems.append(f"{prefix}.feature_columns must be a list of column names")
    else:
        problems += _column_problems(
            prefix,
            id_column=raw.get("id_column", ""),
            label_column=raw.get("label_column", ""),
            feature_columns=raw.get("feature_columns", []),
            site_column=raw.get("site_column"),
            site_value=raw.get("site_value"),
        )
    problems += _split_problems(
        prefix,
        validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
        split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
    )
    # A missing field was already reported once; drop its "must be non-empty" echo.
    missing = {f"{prefix}.{key}" for key in _REQUIRED_DATASET_KEYS if key not in raw}
    problems = [p for p in problems if not any(p.startswith(f"{m} must") for m in missing)]
    return problems


def _strings_problems(field: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [f"{field} must be a list of strings"]
    if not all(isinstance(item, str) and item.strip() and _is_utf8(item) for item in value):
        return [f"{field} must hold non-empty strings only"]
    return []


def _deid_problems(field: str, deid: object) -> list[str]:
    if not isinstance(deid, Mapping):
        return [f"{field} must be a table of de-identification settings"]
    # Imported here: it pulls in pydicom, and only imaging datasets need it.
    from imaging.deid_config import DeidConfig
    from imaging.errors import ImagingConfigError

    try:
        DeidConfig.from_mapping(deid, prefix=field)
    except ImagingConfigError as err:
        return list(err.problems)
    return []


def _imaging_problems(
    prefix: str, *, labels: object, modalities: object, body_parts: object, series_description: object, deid: object
) -> list[str]:
    """Problems with the imaging-only settings of a registration; every one."""
    problems: list[str] = []
    if labels is None:
        pass  # not given: reported as missing by the caller
    elif not isinstance(labels, (str, Path)) or not str(labels).strip():
        problems.append(f"{prefix}.labels must be the path of a labels CSV file")
    elif not _is_utf8(str(labels)):
        problems.append(f"{prefix}.labels is not valid UTF-8 and cannot be written to node.toml")
    problems += _strings_problems(f"{prefix}.modalities", modalities)
    problems += _strings_problems(f"{prefix}.body_parts", body_parts)
    if not isinstance(series_description, str):
        problems.append(f"{prefix}.series_description must be a string (a regular expression)")
    else:
        from imaging.reading import compile_description

        try:
            compile_description(series_description)
        except ValueError as err:
            problems.append(f"{prefix}.series_description is not a valid regular expression (RE2 syntax): {err}")
    problems += _deid_problems(f"{prefix}.deid", deid)
    return problems


def _imaging_table_problems(name: str, raw: Mapping[str, Any]) -> list[str]:
    """Every problem of one ``[datasets.<name>]`` table of kind ``imaging``."""
    prefix = f"datasets.{name}"
    problems = _name_problems(name)
    for key in raw:
        if key in _IMAGING_KEYS:
            continue
        if key in _DATASET_KEYS:
            problems.append(f"{prefix}.{key} applies only to kind 'tabular'; an imaging dataset's labels file names its patients")
        else:
            problems.append(_unknown_key(f"{prefix}.{key}", key, _IMAGING_KEYS))
    problems += [f"{prefix}.{key} is missing" for key in _REQUIRED_IMAGING_KEYS if key not in raw]
    path = raw.get("path")
    if "path" in raw and (not isinstance(path, str) or not path.strip()):
        problems.append(f"{prefix}.path must be a non-empty string")
    problems += _imaging_problems(
        prefix,
        labels=raw.get("labels"),
        modalities=raw.get("modalities", []),
        body_parts=raw.get("body_parts", []),
        series_description=raw.get("series_description", ""),
        deid=raw.get("deid", {}),
    )
    problems += _split_problems(
        prefix,
        validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
        split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
    )
    return problems


def _omop_problems(prefix: str, *, source: object, location: object, password_file: object, schema: object) -> list[str]:
    """Problems with an OMOP source's settings; every one. Only the URL's shape: no connection."""
    problems: list[str] = []
    if source not in SOURCE_KINDS:
        hint = difflib.get_close_matches(str(source), SOURCE_KINDS, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append(f"{prefix}.source must be one of {', '.join(map(repr, SOURCE_KINDS))}; found {source!r}{suggestion}")
    if not isinstance(location, str) or not location.strip():
        problems.append(f"{prefix}.location must be a non-empty string: a folder, a SQLite file or a postgresql:// URL")
    elif not _is_utf8(location):
        problems.append(f"{prefix}.location is not valid UTF-8 and cannot be written to node.toml")
    elif source == "postgres":
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(location)
            has_password = parts.password is not None or "password=" in parts.query.lower()
        except ValueError:
            problems.append(f"{prefix}.location must be a postgresql:// URL; this one does not parse")
        else:
            if parts.scheme not in ("postgresql", "postgres"):
                problems.append(f"{prefix}.location must be a postgresql:// URL; found scheme {parts.scheme!r}")
            if has_password:
                problems.append(f"{prefix}.location holds a password; move it to {prefix}.password_file (mode 0600)")
    if source == "postgres":
        if password_file is None:
            problems.append(f"{prefix}.password_file is required for source 'postgres' (a file, mode 0600)")
        elif not isinstance(password_file, (str, Path)) or not str(password_file).strip():
            problems.append(f"{prefix}.password_file must be the path of a file")
        elif not _is_utf8(str(password_file)):
            problems.append(f"{prefix}.password_file is not valid UTF-8 and cannot be written to node.toml")
        if not isinstance(schema, str) or not schema.strip():
            problems.append(f"{prefix}.schema must be a non-empty schema name")
    else:
        if password_file is not None:
            problems.append(f"{prefix}.password_file applies only to source 'postgres'")
        if schema != "public":
            problems.append(f"{prefix}.schema applies only to source 'postgres'")
    return problems


def _omop_table_problems(name: str, raw: Mapping[str, Any]) -> list[str]:
    """Every problem of one ``[datasets.<name>]`` table of kind ``omop``."""
    prefix = f"datasets.{name}"
    problems = _name_problems(name)
    for key in raw:
        if key in _OMOP_KEYS:
            continue
        if key in _DATASET_KEYS or key in _IMAGING_KEYS:
            problems.append(f"{prefix}.{key} does not apply to kind 'omop'; its tables follow OMOP CDM v5.4")
        else:
            problems.append(_unknown_key(f"{prefix}.{key}", key, _OMOP_KEYS))
    problems += [f"{prefix}.{key} is missing" for key in _REQUIRED_OMOP_KEYS if key not in raw]
    if "source" in raw and "location" in raw:
        problems += _omop_problems(
            prefix,
            source=raw["source"],
            location=raw["location"],
            password_file=raw.get("password_file"),
            schema=raw.get("schema", "public"),
        )
    problems += _split_problems(
        prefix,
        validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
        split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
    )
    return problems


@dataclass(frozen=True)
class ImagingSource:
    """What makes an imaging dataset besides its DICOM folder (the entry's ``path``).

    Attributes
    ----------
    labels
        A CSV file with a ``patient_id`` and a 0/1 ``label`` column (and an optional
        ``issuer`` column, the Issuer of Patient ID, for exports that mix issuers):
        the hospital's own identifiers, which never leave the node.
    modalities, body_parts, series_description
        Which series belong to the dataset: accepted Modality and Body Part Examined
        values (empty: any) and a regular expression searched in the Series Description
        (empty: any). An experiment may narrow this selection, never widen it.
    deid
        The de-identification settings, as ``imaging.DeidConfig.from_mapping`` reads
        them; empty: the Basic Profile, images with burned-in text excluded.
    """

    labels: Path
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    series_description: str = ""
    deid: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            object.__setattr__(self, "labels", Path(self.labels))
        for name in ("modalities", "body_parts"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    def deid_config(self) -> DeidConfig:
        """The parsed de-identification settings (validated when the entry was built)."""
        from imaging.deid_config import DeidConfig

        return DeidConfig.from_mapping(self.deid)


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: where its data is and how to read it.

    A ``tabular`` entry names a file and its columns; an ``imaging`` entry names a DICOM
    folder and carries an :class:`ImagingSource`, and leaves the column fields empty; an
    ``omop`` entry carries an :class:`~clients.hospital_node.data.sources.OmopSource` and its
    ``path`` is the folder where its snapshots are staged. ``path`` is absolute; :meth:`from_mapping` resolves a relative ``path`` from
    ``node.toml`` against the node home. Constructing an invalid entry raises
    :class:`NodeHomeError` naming every bad field.
    """

    name: str
    path: Path
    id_column: str = ""
    label_column: str = ""
    feature_columns: tuple[str, ...] = ()
    site_column: str | None = None
    site_value: str | None = None
    validation_fraction: float = _DEFAULT_VALIDATION_FRACTION
    split_seed: int = _DEFAULT_SPLIT_SEED
    kind: str = "tabular"
    imaging: ImagingSource | None = None
    omop: OmopSource | None = None

    def __post_init__(self) -> None:
        # Accept any sequence of names and a str path; store the canonical types.
        if isinstance(self.feature_columns, Sequence) and not isinstance(self.feature_columns, str):
            object.__setattr__(self, "feature_columns", tuple(self.feature_columns))
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.validation_fraction, int) and not isinstance(
            self.validation_fraction, bool
        ):
            object.__setattr__(self, "validation_fraction", float(self.validation_fraction))
        prefix = f"datasets.{self.name}"
        problems = _name_problems(self.name)
        if not isinstance(self.path, Path) or not self.path.is_absolute():
            problems.append(f"{prefix}.path must be an absolute path; found {str(self.path)!r}")
        elif not _is_utf8(str(self.path)):
            problems.append(f"{prefix}.path is not valid UTF-8 and cannot be written to node.toml")
        if self.kind not in DATASET_KINDS:
            problems.append(f"{prefix}.kind must be one of {', '.join(map(repr, DATASET_KINDS))}; found {self.kind!r}")
        elif self.kind == "imaging":
            problems += self._imaging_problems(prefix)
        elif self.kind == "omop":
            problems += self._omop_problems(prefix)
        else:
            if self.omop is not None:
                problems.append(f"{prefix}.omop applies only to kind 'omop'")
            if self.imaging is not None:
                problems.append(f"{prefix}.imaging applies only to kind 'imaging'")
            problems += _column_problems(
                prefix,
                id_column=self.id_column,
                label_column=self.label_column,
                feature_columns=self.feature_columns,
                site_column=self.site_column,
                site_value=self.site_value,
            )
        problems += _split_problems(
            prefix, validation_fraction=self.validation_fraction, split_seed=self.split_seed
        )
        if problems:
            raise NodeHomeError(_listing(f"dataset registration {self.name!r} is invalid", problems))

    def _imaging_problems(self, prefix: str) -> list[str]:
        problems = []
        columns = (self.id_column, self.label_column, self.feature_columns, self.site_column, self.site_value)
        if any(columns):
            problems.append(
                f"{prefix}: id_column, label_column, feature_columns and the site filter apply only "
                "to kind 'tabular'; an imaging dataset's labels file names its patients"
            )
        if self.imaging is None:
            problems.append(f"{prefix}.imaging is required for kind 'imaging' (the labels file and settings)")
            return problems
        source = self.imaging
        if not source.labels.is_absolute():
            problems.append(f"{prefix}.labels must be an absolute path; found {str(source.labels)!r}")
        problems += _imaging_problems(
            prefix,
            labels=source.labels,
            modalities=source.modalities,
            body_parts=source.body_parts,
            series_description=source.series_description,
            deid=source.deid,
        )
        return problems

    def _omop_problems(self, prefix: str) -> list[str]:
        problems = []
        if any((self.id_column, self.label_column, self.feature_columns, self.site_column, self.site_value)):
            problems.append(
                f"{prefix}: id_column, label_column, feature_columns and the site filter apply only "
                "to kind 'tabular'; an OMOP dataset's tables follow OMOP CDM v5.4"
            )
        if self.imaging is not None:
            problems.append(f"{prefix}.imaging applies only to kind 'imaging'")
        source = self.omop
        if source is None:
            problems.append(f"{prefix}.omop is required for kind 'omop' (the source: folder, SQLite file or PostgreSQL)")
            return problems
        if source.kind != "postgres" and not Path(source.location).is_absolute():
            problems.append(f"{prefix}.location must be an absolute path; found {source.location!r}")
        if source.credentials_file is not None and not source.credentials_file.is_absolute():
            problems.append(f"{prefix}.password_file must be an absolute path; found {str(source.credentials_file)!r}")
        problems += _omop_problems(
            prefix,
            source=source.kind,
            location=source.location,
            password_file=source.credentials_file,
            schema=source.schema,
        )
        return problems

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the registration reads: id, label, features, then the site column.

        Empty for an imaging or OMOP dataset, which has no declared columns.
        """
        if self.kind in ("imaging", "omop"):
            return ()
        site = (self.site_column,) if self.site_column is not None else ()
        return (self.id_column, self.label_column, *self.feature_columns, *site)

    @classmethod
    def from_mapping(cls, name: str, raw: Mapping[str, Any], *, home: Path) -> DatasetEntry:
        """Parse the ``[datasets.<name>]`` table of ``node.toml``.

        Raises
        ------
        NodeHomeError
            Naming every bad field as ``datasets.<name>.<field>``.
        """
        problems = _table_problems(name, raw)
        if problems:
            raise NodeHomeError(_listing(f"dataset registration {name!r} is invalid", problems))
        if raw.get("kind") == "omop":
            location = raw["location"]
            if raw["source"] != "postgres":
                stored_location = Path(location).expanduser()
                location = str(stored_location if stored_location.is_absolute() else home / stored_location)
            password_file = raw.get("password_file")
            credentials = None
            if password_file is not None:
                stored_file = Path(password_file).expanduser()
                credentials = stored_file if stored_file.is_absolute() else home / stored_file
            return cls(
                name=name,
                path=home / OMOP_SCRATCH_DIR / name,
                kind="omop",
                omop=OmopSource(raw["source"], location, credentials, raw.get("schema", "public")),
                validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
                split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
            )
        path = raw["path"]
        stored = Path(path).expanduser()
        if raw.get("kind", "tabular") == "imaging":
            labels = Path(raw["labels"]).expanduser()
            return cls(
                name=name,
                path=stored if stored.is_absolute() else home / stored,
                kind="imaging",
                imaging=ImagingSource(
                    labels=labels if labels.is_absolute() else home / labels,
                    modalities=tuple(raw.get("modalities", ())),
                    body_parts=tuple(raw.get("body_parts", ())),
                    series_description=raw.get("series_description", ""),
                    deid=dict(raw.get("deid", {})),
                ),
                validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
                split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
            )
        return cls(
            name=name,
            path=stored if stored.is_absolute() else home / stored,
            id_column=raw["id_column"],
            label_column=raw["label_column"],
            feature_columns=tuple(raw["feature_columns"]),
            site_column=raw.get("site_column"),
            site_value=raw.get("site_value"),
            validation_fraction=raw.get("validation_fraction", _DEFAULT_VALIDATION_FRACTION),
            split_seed=raw.get("split_seed", _DEFAULT_SPLIT_SEED),
        )


@dataclass(frozen=True)
class _NodeConfig:
    name: str
    datasets: Mapping[str, DatasetEntry]
    # A rehearsal home (``medfed simulate``'s virtual hospitals) accepts rehearsal keys and
    # approvals and serves only the simulation engine; a real home refuses both.
    rehearsal: bool = False


def _parse_config(raw: Mapping[str, Any], *, home: Path) -> tuple[_NodeConfig | None, list[str]]:
    problems: list[str] = []
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(_unknown_key(key, key, _TOP_KEYS))

    name: str | None = None
    rehearsal = False
    node = raw.get("node")
    if node is None:
        problems.append("[node] table is missing")
    elif not isinstance(node, dict):
        problems.append("node must be a table")
    else:
        for key in node:
            if key not in _NODE_KEYS:
                problems.append(_unknown_key(f"node.{key}", key, _NODE_KEYS))
        value = node.get("name")
        if value is None:
            problems.append("node.name is missing")
        elif not isinstance(value, str) or not _NAME.fullmatch(value):
            problems.append(f"node.name {value!r} is invalid; use {_NAME_RULE}")
        else:
            name = value
        flag = node.get("rehearsal", False)
        if not isinstance(flag, bool):
            problems.append(f"node.rehearsal must be true or false; found {flag!r}")
        else:
            rehearsal = flag

    datasets: dict[str, DatasetEntry] = {}
    tables = raw.get("datasets", {})
    if not isinstance(tables, dict):
        problems.append("datasets must be a table of [datasets.<name>] tables")
        tables = {}
    for dataset_name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"datasets.{dataset_name} must be a table")
            continue
        table_problems = _table_problems(dataset_name, table)
        if table_problems:
            problems += table_problems
        else:
            datasets[dataset_name] = DatasetEntry.from_mapping(dataset_name, table, home=home)

    if problems or name is None:
        return None, problems
    return _NodeConfig(name=name, datasets=datasets, rehearsal=rehearsal), []


def _read_config(home: Path) -> _NodeConfig:
    """Read and validate ``node.toml``; every problem at once."""
    init_hint = f"create it with `medfed node init --home {home} --name <node name>`"
    if not home.exists():
        raise NodeHomeError(f"node home {home} does not exist; {init_hint}")
    if not home.is_dir():
        raise NodeHomeError(f"node home {home} is not a folder")
    config_path = home / CONFIG_FILE
    if not config_path.is_file():
        raise NodeHomeError(f"node home {home} has no {CONFIG_FILE}; {init_hint}")
    try:
        with config_path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise NodeHomeError(f"cannot read {config_path}: {reason}") from err
    except tomllib.TOMLDecodeError as err:
        raise NodeHomeError(f"{config_path} is not valid TOML: {err}") from err
    config, problems = _parse_config(raw, home=home)
    if config is None:
        raise NodeHomeError(_listing(f"{config_path} is invalid", problems))
    return config


def _stored_path(path: Path, home: Path) -> str:
    """Paths inside the home are stored relative to it, so the home can move."""
    try:
        return path.relative_to(home).as_posix()
    except ValueError:
        return str(path)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(value: object) -> str:
    """A TOML value on one line: strings, booleans, numbers, arrays and inline tables."""
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        items = [
            f"{key if _BARE_KEY.fullmatch(str(key)) else toml_string(str(key))} = {_toml_value(item)}"
            for key, item in value.items()
        ]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"cannot write a {type(value).__name__} to node.toml")


def _render_imaging(entry: DatasetEntry, home: Path) -> list[str]:
    source = entry.imaging
    assert source is not None  # an imaging entry always has one
    lines = [
        "",
        f"[datasets.{entry.name}]",
        'kind = "imaging"',
        f"path = {toml_string(_stored_path(entry.path, home))}",
        f"labels = {toml_string(_stored_path(source.labels, home))}",
    ]
    if source.modalities:
        lines.append(f"modalities = {_toml_value(list(source.modalities))}")
    if source.body_parts:
        lines.append(f"body_parts = {_toml_value(list(source.body_parts))}")
    if source.series_description:
        lines.append(f"series_description = {toml_string(source.series_description)}")
    lines += [
        f"validation_fraction = {float(entry.validation_fraction)!r}",
        f"split_seed = {int(entry.split_seed)}",
        f"deid = {_toml_value(dict(source.deid))}",
    ]
    return lines


def _render_omop(entry: DatasetEntry, home: Path) -> list[str]:
    source = entry.omop
    assert source is not None  # an OMOP entry always has one
    location = source.location if source.kind == "postgres" else _stored_path(Path(source.location), home)
    lines = [
        "",
        f"[datasets.{entry.name}]",
        'kind = "omop"',
        f"source = {toml_string(source.kind)}",
        f"location = {toml_string(location)}",
    ]
    if source.credentials_file is not None:
        lines.append(f"password_file = {toml_string(_stored_path(source.credentials_file, home))}")
    if source.kind == "postgres":
        lines.append(f"schema = {toml_string(source.schema)}")
    lines += [
        f"validation_fraction = {float(entry.validation_fraction)!r}",
        f"split_seed = {int(entry.split_seed)}",
    ]
    return lines


def _render_config(config: _NodeConfig, home: Path) -> str:
    lines = [
        "# medfed node home. `medfed node` rewrites this file: comments are not kept.",
        "",
        "[node]",
        f"name = {toml_string(config.name)}",
    ]
    if config.rehearsal:
        lines.append("rehearsal = true  # a virtual hospital of `medfed simulate`: never a real node")
    for name in sorted(config.datasets):
        entry = config.datasets[name]
        if entry.kind == "imaging":
            lines += _render_imaging(entry, home)
            continue
        if entry.kind == "omop":
            lines += _render_omop(entry, home)
            continue
        lines += [
            "",
            f"[datasets.{name}]",
            f"path = {toml_string(_stored_path(entry.path, home))}",
            f"id_column = {toml_string(entry.id_column)}",
            f"label_column = {toml_string(entry.label_column)}",
            "feature_columns = [",
            *(f"    {toml_string(column)}," for column in entry.feature_columns),
            "]",
        ]
        if entry.site_column is not None and entry.site_value is not None:
            lines += [
                f"site_column = {toml_string(entry.site_column)}",
                f"site_value = {toml_string(entry.site_value)}",
            ]
        lines += [
            f"validation_fraction = {float(entry.validation_fraction)!r}",
            f"split_seed = {int(entry.split_seed)}",
        ]
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: readers see the old file or the new one, never half, and never a looser mode."""
    try:
        publish(path, text)
    except OSError as err:
        raise NodeHomeError(f"cannot write {path}: {err.strerror or err}") from err


def _allow_installed_release(home: Path) -> None:
    """A new home serves runs of the medfed release installed here, and no other app."""
    from clients.hospital_node.runtime.allowed_apps import AllowedApps
    from federation.release import installed_identity

    apps = AllowedApps(home)
    if not apps.path.exists():
        apps.add(installed_identity(), by="medfed node init")


class NodeHome:
    """A hospital node's home folder and its dataset registry.

    Obtain one with :meth:`create` or :meth:`open`; the registry is read once and
    refreshed from disk by :meth:`register_dataset`.
    """

    def __init__(self, path: Path, config: _NodeConfig) -> None:
        self._path = path
        self._config = config

    @classmethod
    def create(cls, path: Path, *, name: str, rehearsal: bool = False) -> NodeHome:
        """Create the folder (if needed) and a ``node.toml`` naming the node.

        ``rehearsal`` makes it a virtual hospital of a rehearsal (``medfed simulate``):
        it accepts rehearsal keys and approvals, and no SuperNode serves it.

        Raises
        ------
        NodeHomeError
            If the name is invalid or the folder already holds a ``node.toml``.
        """
        home = Path(path).expanduser().resolve()
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise NodeHomeError(f"node name {name!r} is invalid; use {_NAME_RULE}")
        if home.exists() and not home.is_dir():
            raise NodeHomeError(f"node home {home} exists and is not a folder")
        config_path = home / CONFIG_FILE
        if config_path.exists():
            raise NodeHomeError(
                f"{config_path} already exists; this folder is a node home already "
                "(open it, or choose another folder)"
            )
        try:
            make_private_folder(home)
            # The folder becomes a node home now: owner only, even if it existed before.
            os.chmod(home, FOLDER_MODE)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise NodeHomeError(f"cannot create node home {home}: {reason}") from err
        config = _NodeConfig(name=name, datasets={}, rehearsal=rehearsal)
        _write_atomically(config_path, _render_config(config, home))
        if not (home / POLICY_FILE).exists():
            _write_atomically(home / POLICY_FILE, NodePolicy().render())
        _allow_installed_release(home)
        logger.info("created node home %s for node %s", home, name)
        return cls(home, config)

    @classmethod
    def open(cls, path: Path) -> NodeHome:
        """Open an existing node home.

        Raises
        ------
        NodeHomeError
            If the folder or ``node.toml`` is missing, or ``node.toml`` is invalid
            (every problem at once, by field).
        """
        home = Path(path).expanduser().resolve()
        return cls(home, _read_config(home))

    @property
    def path(self) -> Path:
        """The home folder (absolute)."""
        return self._path

    @property
    def rehearsal(self) -> bool:
        """Whether this is a rehearsal's virtual hospital (``[node] rehearsal = true``), not a real node."""
        return self._config.rehearsal

    @property
    def name(self) -> str:
        """The node's name, as recorded in ``node.toml``."""
        return self._config.name

    @property
    def config_path(self) -> Path:
        """``node.toml`` in the home."""
        return self._path / CONFIG_FILE

    @property
    def ledger_path(self) -> Path:
        """The node's privacy ledger database in the home, created empty with mode 0600 if missing.

        SQLite creates a database file with the umask's mode and gives its ``-wal`` and
        ``-shm`` files the database file's mode; created 0600 first, none of the three is
        ever readable by others. (An empty file is an empty database to SQLite.)

        Raises
        ------
        NodeHomeError
            If the file is missing and cannot be created (a read-only or full disk).
        """
        path = self._path / LEDGER_FILE
        try:
            create_private(path)
        except OSError as err:
            raise NodeHomeError(f"cannot create the privacy ledger {path}: {err.strerror or err}") from err
        return path

    @property
    def audit_log_path(self) -> Path:
        """The node's audit log (JSON Lines; its signed head sits beside it)."""
        return self._path / AUDIT_LOG_FILE

    @property
    def audit_key_path(self) -> Path:
        """The private key that signs the audit log (mode 0600)."""
        return self._path / KEYS_DIR / f"{AUDIT_KEY_NAME}.key"

    @property
    def audit_public_key_path(self) -> Path:
        """The audit key's public half, for `medfed node audit verify`."""
        return self._path / KEYS_DIR / f"{AUDIT_KEY_NAME}.pub"

    @property
    def policy_path(self) -> Path:
        """The officer's node policy (``policy.toml``)."""
        return self._path / POLICY_FILE

    def policy(self) -> NodePolicy:
        """The node policy; the defaults if ``policy.toml`` is missing."""
        return NodePolicy.read(self.policy_path)

    def trusted_partners(self) -> TrustedKeys:
        """The research partners whose signed specs this node's officer accepts."""
        from privacy.keys import TrustedKeys

        return TrustedKeys(self._path)

    def audit_log(self) -> AuditLog:
        """The node's audit log, open for appending; the first call creates the audit key pair.

        Raises
        ------
        NodeHomeError
            If the audit key is gone while its public key or the log remain: a new key
            could not continue the old log, so the key must be restored from backup.
        KeyFileError
            If the key file is unreadable, malformed or readable by other users.
        """
        # Imported here: the ClientApp imports this module on every message.
        from privacy.audit import AuditLog
        from privacy.errors import KeyFileError
        from privacy.keys import generate_keypair, load_private_key

        key_path = self.audit_key_path
        if not key_path.exists():
            left = [path for path in (self.audit_public_key_path, self.audit_log_path) if path.exists()]
            if left:
                listed = " and ".join(str(path) for path in left)
                still = "is" if len(left) == 1 else "are"
                raise NodeHomeError(
                    f"the node's audit key {key_path} is missing although {listed} {still} still there; "
                    "restore the key from backup (a new key cannot continue the old audit log)"
                )
            try:
                pair = generate_keypair(key_path.parent, AUDIT_KEY_NAME)
            except KeyFileError:
                if not key_path.exists():
                    raise
                # Another process created it first; use theirs.
            else:
                logger.info("created the audit key of node %s: %s", self.name, pair.fingerprint)
                return AuditLog(self.audit_log_path, signing_key=pair.private_key)
        return AuditLog(self.audit_log_path, signing_key=load_private_key(key_path))

    def datasets(self) -> dict[str, DatasetEntry]:
        """Registered datasets by name."""
        return dict(self._config.datasets)

    def dataset(self, name: str) -> DatasetEntry:
        """The registered dataset called ``name``.

        Raises
        ------
        DatasetNotFoundError
            If no dataset of that name is registered.
        """
        try:
            return self._config.datasets[name]
        except KeyError:
            raise DatasetNotFoundError(
                name, node=self.name, registered=self._config.datasets
            ) from None

    def register_dataset(
        self, entry: DatasetEntry, *, replace: bool = False
    ) -> TabularData | ImagingInventory | ValidationReport:
        """Validate the dataset's file, then record it in ``node.toml``.

        The file is read and checked through the connector first; ``node.toml`` is
        replaced atomically only if that succeeds. An imaging dataset's folder is
        de-identified into the node's cache then (an audited step), so that training
        later starts from de-identified images only.

        An OMOP dataset is opened as one snapshot and validated first; the snapshot's
        staged files are gone when this returns.

        Returns
        -------
        TabularData | ImagingInventory | ValidationReport
            The validated data (tabular), what was found (imaging) or the validation
            report (OMOP), so that callers can report its counts.

        Raises
        ------
        NodeHomeError
            If a dataset of that name is registered and ``replace`` is false.
        ConnectorError
            If the file cannot be read or does not fit the registration.
        """
        # Imported here: the connectors pull in pandas and pydicom, and the ClientApp
        # imports this module on every message.
        current = _read_config(self._path)
        if entry.name in current.datasets and not replace:
            raise NodeHomeError(
                f"dataset {entry.name!r} is already registered on node {current.name!r}; "
                "pass --replace to replace it"
            )
        if entry.kind == "omop":
            assert entry.omop is not None  # an OMOP entry always has one
            from clients.hospital_node.data.sources import open_snapshot

            with open_snapshot(entry.omop, scratch=entry.path) as snapshot:
                report = snapshot.report
            self._record(current, entry)
            logger.info(
                "registered OMOP dataset %s on node %s: %d rows kept, %d dropped by validation",
                entry.name, current.name, sum(t.kept for t in report.tables), report.rows_dropped,
            )
            return report
        if entry.kind == "imaging":
            from clients.hospital_node.imaging_connector import ImagingConnector

            inventory = ImagingConnector(self, entry).prepare()
            self._record(current, entry)
            logger.info(
                "registered imaging dataset %s on node %s: %d patients with images, %d labelled",
                entry.name,
                current.name,
                inventory.patients_with_images,
                inventory.patients_labelled,
            )
            return inventory
        from clients.hospital_node.connectors import TabularConnector

        data = TabularConnector(entry).load()
        updated = self._record(current, entry)
        logger.info(
            "registered dataset %s on node %s: %d training and %d validation rows",
            entry.name,
            updated.name,
            data.n_train,
            data.n_val,
        )
        return data

    def _record(self, current: _NodeConfig, entry: DatasetEntry) -> _NodeConfig:
        datasets = dict(current.datasets)
        datasets[entry.name] = entry
        updated = _NodeConfig(name=current.name, datasets=datasets, rehearsal=current.rehearsal)
        _write_atomically(self.config_path, _render_config(updated, self._path))
        self._config = updated
        return updated
