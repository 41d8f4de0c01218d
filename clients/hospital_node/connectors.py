"""Tabular connectors: read a registered dataset, validate it, split it by patient.

A connector turns a :class:`~clients.hospital_node.home.DatasetEntry` into
:class:`TabularData`: float32 arrays of the declared features and the binary label,
split into training and validation rows. Every check that can fail on a file is made
here, and all of a file's problems are reported at once:

- the file exists, is readable, and is CSV (``.csv``) or Parquet (``.parquet``, ``.pq``);
- every declared column is present;
- rows are kept only for the declared site, when a site filter is registered;
- features are numeric (booleans count) and finite, with no missing values;
- the label holds 0 and 1 only;
- ids are present and unique: one row per patient is what makes sample-level DP-SGD
  patient-level DP, so a duplicated patient is an error, never silently merged;
- at least :data:`MIN_ROWS` rows remain, and the split leaves some for training.

Only the declared columns are read, so undeclared columns of a hospital extract never
enter memory. Messages name the file, the columns and how many rows are affected;
they never hold a value read from the file.

The split is by patient id: a row goes to validation when
``sha256(f"{split_seed}:{id}")``, read as a fraction of 2**64, is below
``validation_fraction``. It does not depend on row order, and rows are ordered by that
hash, so the same patients give the same arrays whatever order the file lists them in.

:class:`InMemoryConnector` runs the same checks on a pandas frame, for tests.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.hospital_node.errors import ConnectorError
from clients.hospital_node.home import DatasetEntry

__all__ = [
    "MIN_ROWS",
    "SUPPORTED_SUFFIXES",
    "InMemoryConnector",
    "TabularConnector",
    "TabularData",
    "split_fraction",
]

logger = logging.getLogger(__name__)

MIN_ROWS = 10
SUPPORTED_SUFFIXES: Mapping[str, str] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

# Site values are listed in an error only when shared by this many rows: a value that
# many patients hold names a site, not a person.
_LISTABLE_SITE_ROWS = 10
_MAX_LISTED_SITES = 20


def split_fraction(patient_id: str, *, split_seed: int) -> float:
    """Where a patient falls in [0, 1) for the train/validation split.

    ``sha256(f"{split_seed}:{patient_id}")``, its first 8 bytes read as a fraction of 2**64.
    """
    digest = hashlib.sha256(f"{split_seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _float32_matrix(rows: np.ndarray, columns: int) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, columns)


@dataclass(frozen=True, eq=False)
class TabularData:
    """A dataset's features and label as float32 arrays, split by patient.

    ``x_*`` have one column per name in ``feature_names``; ``y_*`` hold 0.0 or 1.0.
    """

    feature_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def n_train(self) -> int:
        """Training rows (patients)."""
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        """Validation rows (patients)."""
        return len(self.y_val)

    def select(
        self,
        features: Sequence[str],
        scaling: Mapping[str, tuple[float, float]] | None = None,
    ) -> TabularData:
        """The requested features, in the requested order, each scaled if asked.

        Parameters
        ----------
        features
            Names of registered features, in the order the model expects them.
        scaling
            ``{feature: (center, scale)}``; each named feature becomes
            ``(x - center) / scale``. Features not named are left as they are.

        Raises
        ------
        ConnectorError
            If a feature is not registered, is requested twice, or a scaling is
            invalid or names a feature that is not requested.
        """
        scaling = dict(scaling or {})
        requested = list(features)
        problems: list[str] = []
        missing = [name for name in requested if name not in self.feature_names]
        if missing:
            problems.append(
                f"features not registered for this dataset: {', '.join(missing)}; "
                f"registered: {', '.join(self.feature_names)}"
            )
        if not requested:
            problems.append("no features requested")
        repeated = sorted({name for name in requested if requested.count(name) > 1})
        if repeated:
            problems.append(f"features requested more than once: {', '.join(repeated)}")
        unused = sorted(set(scaling) - set(requested))
        if unused:
            problems.append(f"scaling names features that are not requested: {', '.join(unused)}")
        for name, pair in sorted(scaling.items()):
            center, scale = pair
            if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
                problems.append(
                    f"scaling of {name!r} must have a finite center and a finite scale > 0; "
                    f"found ({center}, {scale})"
                )
        if problems:
            raise ConnectorError("cannot select features:\n" + "\n".join(f"  - {p}" for p in problems))

        index = [self.feature_names.index(name) for name in requested]
        center = np.array([scaling.get(name, (0.0, 1.0))[0] for name in requested], dtype=np.float64)
        scale = np.array([scaling.get(name, (0.0, 1.0))[1] for name in requested], dtype=np.float64)

        def pick(x: np.ndarray) -> np.ndarray:
            chosen = (x[:, index].astype(np.float64) - center) / scale
            return _float32_matrix(chosen, len(requested))

        return TabularData(
            feature_names=tuple(requested),
            x_train=pick(self.x_train),
            y_train=self.y_train.copy(),
            x_val=pick(self.x_val),
            y_val=self.y_val.copy(),
        )


class _Problems:
    """Problems found in one dataset, reported together."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, problem: str) -> None:
        self.items.append(problem)

    def raise_if_any(self) -> None:
        if self.items:
            details = "\n".join(f"  - {item}" for item in self.items)
            raise ConnectorError(f"{self.source} does not fit its registration:\n{details}")


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _site_filter(frame: pd.DataFrame, entry: DatasetEntry, problems: _Problems) -> pd.DataFrame:
    if entry.site_column is None or entry.site_column not in frame.columns:
        return frame
    column = frame[entry.site_column]
    present = column.notna()
    # Compare as text, so that a numeric site code matches its registered spelling.
    keep = present & (column.astype("string").fillna("") == entry.site_value)
    if keep.any():
        return frame.loc[keep]
    counts = column[present].astype("string").value_counts()
    message = (
        f"site filter kept no rows: no row of column {entry.site_column!r} "
        f"holds {entry.site_value!r}"
    )
    listable = counts[counts >= _LISTABLE_SITE_ROWS]
    if 0 < len(counts) <= _MAX_LISTED_SITES and len(listable) == len(counts):
        message += f"; the column holds: {', '.join(sorted(map(str, counts.index)))}"
    else:
        message += f"; the column holds {len(counts)} distinct values"
    problems.add(message)
    return frame.iloc[0:0]


def _numeric(column: pd.Series) -> tuple[np.ndarray, int, int, int]:
    """The column as float64, with counts of missing, non-numeric and infinite rows."""
    missing = int(column.isna().sum())
    if pd.api.types.is_bool_dtype(column.dtype) or pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = 0
    else:
        coerced = pd.to_numeric(column, errors="coerce")
        bad = int((coerced.isna() & column.notna()).sum())
        values = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = int(np.isinf(values).sum())
    return values, missing, bad, infinite


def _validate(frame: pd.DataFrame, entry: DatasetEntry, source: str) -> TabularData:
    problems = _Problems(source)
    absent = [column for column in entry.columns if column not in frame.columns]
    if absent:
        problems.add(f"missing columns: {', '.join(absent)}")

    frame = _site_filter(frame, entry, problems)
    n_rows = len(frame)

    ids: pd.Series | None = None
    if entry.id_column in frame.columns:
        raw_ids = frame[entry.id_column]
        missing_ids = int(raw_ids.isna().sum())
        if missing_ids:
            problems.add(f"id column {entry.id_column!r} has {_rows(missing_ids)} without an id")
        ids = raw_ids.astype("string")
        duplicated = ids[ids.notna()].duplicated(keep=False)
        if duplicated.any():
            n_ids = ids[ids.notna()][duplicated].nunique()
            problems.add(
                f"id column {entry.id_column!r} has {n_ids} ids on more than one row "
                f"({_rows(int(duplicated.sum()))}); a dataset must hold one row per patient, "
                "so aggregate visits and readings per patient before registering it"
            )

    columns: list[np.ndarray] = []
    for name in entry.feature_columns:
        if name not in frame.columns:
            continue
        values, missing, bad, infinite = _numeric(frame[name])
        if bad:
            problems.add(f"feature column {name!r} is not numeric: {_rows(bad)} hold non-numeric values")
        if missing:
            problems.add(f"feature column {name!r} has {_rows(missing)} with missing values")
        if infinite:
            problems.add(f"feature column {name!r} has {_rows(infinite)} with infinite values")
        columns.append(values)

    labels: np.ndarray | None = None
    if entry.label_column in frame.columns:
        values, missing, bad, _ = _numeric(frame[entry.label_column])
        other = int((~np.isin(values, (0.0, 1.0)) & ~np.isnan(values)).sum())
        if missing or bad or other:
            problems.add(
                f"label column {entry.label_column!r} must hold 0 or 1 only; "
                f"{_rows(missing + bad + other)} hold something else "
                f"({missing} missing, {bad} non-numeric, {other} other numbers)"
            )
        labels = values

    nothing_declared = len(absent) == len(entry.columns)
    site_failed = any(item.startswith("site filter") for item in problems.items)
    if n_rows < MIN_ROWS and not (nothing_declared or site_failed):
        where = " after the site filter" if entry.site_column is not None else ""
        problems.add(f"the dataset has {_rows(n_rows)}{where}; at least {MIN_ROWS} are needed")
    problems.raise_if_any()
    assert ids is not None and labels is not None  # guaranteed: no column was absent

    fractions = np.fromiter(
        (split_fraction(patient, split_seed=entry.split_seed) for patient in ids),
        dtype=np.float64,
        count=n_rows,
    )
    order = np.argsort(fractions, kind="stable")
    x = _float32_matrix(np.column_stack(columns)[order], len(columns))
    y = labels[order].astype(np.float32)
    is_val = fractions[order] < entry.validation_fraction
    if is_val.all():
        problems.add(
            f"validation_fraction {entry.validation_fraction} leaves no training rows "
            f"out of {_rows(n_rows)}"
        )
        problems.raise_if_any()
    data = TabularData(
        feature_names=entry.feature_columns,
        x_train=np.ascontiguousarray(x[~is_val]),
        y_train=np.ascontiguousarray(y[~is_val]),
        x_val=np.ascontiguousarray(x[is_val]),
        y_val=np.ascontiguousarray(y[is_val]),
    )
    logger.info(
        "loaded dataset %s: %d training and %d validation rows, %d features",
        entry.name,
        data.n_train,
        data.n_val,
        len(entry.feature_columns),
    )
    return data


class TabularConnector:
    """Reads a registered CSV or Parquet file (by suffix) into :class:`TabularData`."""

    def __init__(self, entry: DatasetEntry) -> None:
        self.entry = entry

    def load(self) -> TabularData:
        """Read, validate and split the dataset.

        Raises
        ------
        ConnectorError
            If the file cannot be read or does not fit its registration; every
            problem at once, naming columns and counting rows.
        """
        path = self.entry.path
        source = f"dataset {self.entry.name!r} ({path})"
        kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ConnectorError(
                f"{source}: cannot read files ending in {path.suffix or '(no suffix)'!r}; "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )
        if not path.exists():
            raise ConnectorError(f"{source}: the file does not exist")
        if not path.is_file():
            raise ConnectorError(f"{source}: not a file")
        frame = self._read(path, kind, source)
        return _validate(frame, self.entry, source)

    def _read(self, path: Path, kind: str, source: str) -> pd.DataFrame:
        wanted = set(self.entry.columns)
        try:
            if kind == "csv":
                # Ids stay text: "000123" must not become 123.
                return pd.read_csv(
                    path,
                    usecols=lambda column: column in wanted,
                    dtype={self.entry.id_column: "string"},
                )
            import pyarrow.parquet as pq

            present = [name for name in pq.read_schema(path).names if name in wanted]
            return pd.read_parquet(path, columns=present)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise ConnectorError(f"{source}: cannot read the file: {reason}") from None
        except (ValueError, ImportError, pd.errors.ParserError) as err:
            # The reader's own message may quote the file's content: name the failure only.
            raise ConnectorError(
                f"{source}: the file is not readable as {kind.upper()} ({type(err).__name__})"
            ) from None


class InMemoryConnector:
    """Validates and splits a pandas frame exactly as :class:`TabularConnector` does a file.

    ``entry.path`` is not read; it only names the dataset in messages.
    """

    def __init__(self, frame: pd.DataFrame, entry: DatasetEntry) -> None:
        self.frame = frame
        self.entry = entry

    def load(self) -> TabularData:
        """Validate and split the frame; see :meth:`TabularConnector.load`."""
        source = f"dataset {self.entry.name!r} (in-memory frame)"
        wanted = [column for column in self.frame.columns if column in set(self.entry.columns)]
        return _validate(self.frame.loc[:, wanted], self.entry, source)
