"""Cohort connector: a cohort built from a registered OMOP source, as training arrays.

A training instruction whose spec carries ``[data.cohort]`` names an OMOP source as its
dataset. The node opens one consistent snapshot of the source
(:func:`clients.hospital_node.data.sources.open_snapshot`: validated, cleaned views),
builds the cohort the spec defines (:func:`clients.hospital_node.data.cohorts.build_cohort`:
one row per unit of privacy, no look-ahead), and turns it into :class:`TabularData`:

- a missing covariate (no reading in the window, no lab in the look-back) takes its
  scaling center, so it enters the model as 0; the spec validator requires a scaling for
  every covariate of a cohort for that reason;
- every covariate is scaled as the spec says;
- rows are split by person id exactly as :mod:`clients.hospital_node.connectors` splits a
  flat table (the dataset registration's ``validation_fraction`` and ``split_seed``).

The privacy budget charged is the source's: the instruction's dataset is the source, so
every cohort built from it draws on the same ledger entry, as they hold the same patients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from clients.hospital_node.connectors import MIN_ROWS, TabularData, split_fraction
from clients.hospital_node.errors import ConnectorError
from federation.protocol import ProtocolError

if TYPE_CHECKING:
    import pyarrow as pa

    from clients.hospital_node.home import DatasetEntry
    from models.clinical_tasks import CohortDefinition
    from privacy.query import StatisticsQuery

__all__ = ["cohort_arrays", "load_cohort", "run_cohort", "study_cohort"]

logger = logging.getLogger(__name__)


def load_cohort(
    entry: DatasetEntry,
    definition: CohortDefinition,
    scaling: Mapping[str, tuple[float, float]],
    *,
    run: str,
    last: bool = False,
) -> TabularData:
    """Build ``definition`` from the OMOP source ``entry``, once per run, as split, scaled arrays.

    The first message of run ``run`` reads the source in one snapshot and keeps the built
    cohort in the dataset's staging folder (owner-only); the run's later messages read that copy, so every
    round of a run trains on the same patients even while the source changes (a PostgreSQL
    source is read as one consistent snapshot per run). ``last`` (the final evaluation)
    removes the copy once read; copies of runs that never ended go after
    :data:`_STALE_SECONDS`.
    """
    table = run_cohort(entry, definition, run=run, last=last)
    return cohort_arrays(
        table,
        source=f"cohort {definition.task!r} of dataset {entry.name!r}",
        label=definition.label,
        covariates=definition.covariates,
        scaling=scaling,
        validation_fraction=entry.validation_fraction,
        split_seed=entry.split_seed,
    )


_STALE_SECONDS = 7 * 24 * 3600


def run_cohort(entry: DatasetEntry, definition: CohortDefinition, *, run: str, last: bool = False) -> pa.Table:
    """The cohort of ``definition`` for run ``run``: built from one snapshot on first use, then kept.

    Kept owner-only in the dataset's staging folder until the run's ``last`` read.
    """
    import hashlib
    import json
    import os
    import time

    import pyarrow.parquet as pq

    from clients.hospital_node.data.cohorts import build_cohort
    from clients.hospital_node.data.sources import open_snapshot

    folder = entry.path / "cohorts"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("*.parquet"):
        if now - old.stat().st_mtime > _STALE_SECONDS:
            old.unlink(missing_ok=True)
    key = json.dumps([entry.name, run, definition.to_mapping()], sort_keys=True)
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.parquet"
    if path.exists():
        table = pq.read_table(path)
    else:
        assert entry.omop is not None  # an entry of kind "omop" carries its source
        with open_snapshot(entry.omop, scratch=entry.path) as snapshot:
            table = build_cohort(snapshot.connection, definition)
        partial = path.with_suffix(".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            pq.write_table(table, handle)
        partial.replace(path)
    if last:
        path.unlink(missing_ok=True)
    return table


def cohort_arrays(
    table: pa.Table,
    *,
    source: str,
    label: str,
    covariates: Sequence[str],
    scaling: Mapping[str, tuple[float, float]],
    validation_fraction: float,
    split_seed: int,
) -> TabularData:
    """A built cohort (``person_id``, ``index_date``, label, covariates) as split, scaled arrays.

    Raises
    ------
    ConnectorError
        If a covariate has no scaling, or the cohort is too small to split.
    """
    unscaled = [name for name in covariates if name not in scaling]
    if unscaled:
        raise ConnectorError(f"{source}: covariates without a scaling: {', '.join(unscaled)}")
    n_rows = table.num_rows
    if n_rows < MIN_ROWS:
        raise ConnectorError(f"{source} has {n_rows} patients; at least {MIN_ROWS} are needed")
    ids = table.column("person_id").to_pylist()
    columns = []
    for name in covariates:
        center, scale = scaling[name]
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
        missing = np.isnan(values)
        if missing.any():
            logger.info("%s: %d of %d rows have no %s; they take its scaling center", source, int(missing.sum()),
                        n_rows, name)
        columns.append((np.where(missing, center, values) - center) / scale)
    labels = table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
    fractions = np.fromiter((split_fraction(str(i), split_seed=split_seed) for i in ids), dtype=np.float64, count=n_rows)
    order = np.argsort(fractions, kind="stable")
    x = np.ascontiguousarray(np.column_stack(columns)[order], dtype=np.float32).reshape(-1, len(covariates))
    y = np.ascontiguousarray(labels[order])
    is_val = fractions[order] < validation_fraction
    if is_val.all():
        raise ConnectorError(f"{source}: validation_fraction {validation_fraction} leaves no training rows of {n_rows}")
    return TabularData(
        feature_names=tuple(covariates),
        x_train=np.ascontiguousarray(x[~is_val]),
        y_train=np.ascontiguousarray(y[~is_val]),
        x_val=np.ascontiguousarray(x[is_val]),
        y_val=np.ascontiguousarray(y[is_val]),
    )


def study_cohort(query: StatisticsQuery) -> CohortDefinition:
    """The cohort a study asks for: its covariates are the declared columns but the task's label."""
    from models.clinical_tasks import TASKS as CLINICAL_TASKS
    from models.clinical_tasks import CohortDefinition, CohortDefinitionError

    assert query.cohort is not None
    task = CLINICAL_TASKS.get(query.cohort.get("task"))
    covariates = [name for name in query.column_names if task is None or name != task.label]
    try:
        return CohortDefinition.from_mapping({**query.cohort, "covariates": covariates})
    except CohortDefinitionError as err:
        raise ProtocolError(f"the study's cohort cannot be built on this node: {err}") from None
