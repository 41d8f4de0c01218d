"""Node-side evaluation of a statistics query: the exact vector of every release, with polars.

:func:`evaluate` is a pure function of a validated
:class:`~privacy.query.StatisticsQuery` and the registered dataset as a polars frame
(lazy or not). It returns, for each release of :meth:`~privacy.query.StatisticsQuery.releases`
in that order, the exact (un-noised) vector in the release's layout (``release.shape``,
row-major, flattened): integer counts as int64, sums as float64. Noise, suppression and
what leaves the node are decided after it, from these vectors and the release plan; no
value computed here ever leaves the node as it is.

The plan, lazily, so that polars reads only what it needs (projection pushdown on a
Parquet scan):

1. **select the declared columns only**, each typed as declared: numeric as float64 (NaN
   is missing), boolean from true/false or 1/0 (anything else is missing), categorical as
   text; the frame's other columns are never read;
2. **filter** with the query's filter (:func:`filter_expression`, SQL's three-valued
   logic: a row is kept only when the filter is true);
3. **clip** every numeric column a statistic or the group-by reads to its bounds (after
   the filter, which compares values as read); a Kaplan-Meier time above its upper bound
   is censored there;
4. **cell index** of each row from the group-by (declared levels; declared bins of the
   clipped value); rows in no cell (a missing group value, an undeclared level) drop out;
5. **aggregate**: releases with several values per cell (histogram, 2x2 table,
   Kaplan-Meier events) count rows by (cell, slot); the first of them shares its
   ``group_by`` with every per-cell aggregate (counts, sums), which are then summed over
   each cell's slots (one pass over the rows instead of two); all plans are collected
   together;
6. **dense vectors** in cell order, zero for cells no row fell in.

One row per patient (the connector refuses duplicated ids), so a patient is counted at
most once per release and cell. Errors (a declared column missing from the dataset, or of
a type it cannot be read as) are :class:`~clients.hospital_node.errors.ConnectorError`
naming the dataset and columns, never a value.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from clients.hospital_node.errors import ConnectorError
from privacy.query import (
    And,
    ColumnSpec,
    Compare,
    Const,
    FilterExpr,
    IsIn,
    IsNull,
    Not,
    Or,
    Ref,
    Release,
    Statistic,
    StatisticsQuery,
    Truth,
)

__all__ = ["evaluate", "filter_expression"]

# Internal column names hold ':' so that no declared column (an identifier) can be named so.
_CELL = "medfed:cell"
_KEY = "medfed:key"


def _event(index: int) -> str:
    """The column of statistic `index`'s Kaplan-Meier event flag, censored at the end of follow-up."""
    return f"medfed:event:{index}"


def evaluate(query: StatisticsQuery, frame: pl.LazyFrame | pl.DataFrame) -> list[np.ndarray]:
    """The exact vector of every release of `query` over `frame`, in release order.

    Parameters
    ----------
    query
        A validated query (:meth:`StatisticsQuery.from_mapping`).
    frame
        The registered dataset, one row per patient; only the columns `query` declares
        are read.

    Returns
    -------
    list of numpy.ndarray
        One flat vector per release (``len == release.size``, layout ``release.shape``
        row-major): int64 for counts, float64 for sums.

    Raises
    ------
    ConnectorError
        A declared column is missing from `frame`, or its type cannot be read as declared.
    """
    lazy = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    rows = _prepared(query, lazy)
    releases = query.releases()
    cells = query.n_cells
    statistics = {statistic.name: statistic for statistic in query.statistics}  # names are unique
    per_cell: list[tuple[int, pl.Expr]] = []
    keyed: list[tuple[int, _Keyed]] = []
    for index, release in enumerate(releases):
        plan = _aggregate(query, statistics[release.statistic], release, cells)
        if isinstance(plan, _Keyed):
            keyed.append((index, plan))
        else:
            per_cell.append((index, plan.alias(str(index))))
    out: list[np.ndarray | None] = [None] * len(releases)
    cell = pl.col(_CELL).cast(pl.Int64)
    plans = []
    if keyed:
        # The first keyed release and every per-cell aggregate share one group_by, over
        # (cell, slot) with an extra slot per cell for rows the release leaves out: per-cell
        # values are the sums over a cell's slots. Each other keyed release counts its own.
        slots = keyed[0][1].slots + 1
        finest = cell * slots + keyed[0][1].within.cast(pl.Int64).fill_null(slots - 1)
        plans.append(rows.group_by(finest.alias(_KEY)).agg(pl.len().alias("len"), *(e for _, e in per_cell)))
    elif per_cell:
        plans.append(rows.group_by(cell.alias(_KEY)).agg(*(e for _, e in per_cell)))
    for index, plan in keyed[1:]:
        key = (cell * plan.slots + plan.within.cast(pl.Int64)).alias(_KEY)
        plans.append(rows.select(key).drop_nulls().group_by(_KEY).agg(pl.len().alias("len")))
    results = iter(pl.collect_all(plans))
    if keyed:
        grouped = next(results)
        owner, slot = np.divmod(grouped[_KEY].to_numpy(), slots)
        counted = slot < slots - 1
        index, plan = keyed[0]
        out[index] = _dense(releases[index], plan.place(owner[counted], slot[counted]), grouped["len"].to_numpy()[counted])
        for index, _ in per_cell:
            values = grouped[str(index)].to_numpy().astype(np.float64)
            out[index] = _typed_vector(releases[index], np.bincount(owner, weights=values, minlength=cells))
    elif per_cell:
        grouped = next(results)
        for index, _ in per_cell:
            out[index] = _dense(releases[index], grouped[_KEY].to_numpy(), grouped[str(index)].to_numpy())
    for index, plan in keyed[1:]:
        grouped = next(results)
        owner, slot = np.divmod(grouped[_KEY].to_numpy(), plan.slots)
        out[index] = _dense(releases[index], plan.place(owner, slot), grouped["len"].to_numpy())
    assert all(vector is not None for vector in out)
    return [vector for vector in out if vector is not None]


def filter_expression(expr: FilterExpr, query: StatisticsQuery) -> pl.Expr:
    """The polars predicate of a filter, over the declared columns typed as :func:`evaluate` types them.

    Comparisons with a missing value are null (unknown), ``and``/``or``/``not`` follow
    Kleene's logic as SQL does, and ``in``/``not in`` of a missing value is unknown too.
    """
    if isinstance(expr, And):
        return functools.reduce(operator.and_, (filter_expression(e, query) for e in expr.operands))
    if isinstance(expr, Or):
        return functools.reduce(operator.or_, (filter_expression(e, query) for e in expr.operands))
    if isinstance(expr, Not):
        return ~filter_expression(expr.operand, query)
    if isinstance(expr, IsNull):
        column = pl.col(expr.column)
        return column.is_not_null() if expr.negated else column.is_null()
    if isinstance(expr, Truth):
        return pl.col(expr.column)
    if isinstance(expr, IsIn):
        spec = query.column(expr.column)
        column = pl.col(expr.column)
        values = pl.Series([_literal(spec, value) for value in expr.values], dtype=_DTYPES[spec.type])
        found = pl.when(column.is_null()).then(None).otherwise(column.is_in(values.implode()))
        return ~found if expr.negated else found
    assert isinstance(expr, Compare)
    left = pl.col(expr.left.column)
    right = (
        pl.col(expr.right.column)
        if isinstance(expr.right, Ref)
        else pl.lit(_literal(query.column(expr.left.column), expr.right), dtype=_DTYPES[query.column(expr.left.column).type])
    )
    return _OPERATORS[expr.op](left, right)


_DTYPES = {"numeric": pl.Float64, "boolean": pl.Boolean, "categorical": pl.String}
_OPERATORS = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _literal(column: ColumnSpec, value: Const) -> float | bool | str:
    if column.type == "numeric":
        return float(value.value)
    return value.value


# ---------------------------------------------------------------- the rows


def _prepared(query: StatisticsQuery, lazy: pl.LazyFrame) -> pl.LazyFrame:
    """Declared columns, typed, filtered, clipped, with each row's cell; rows in no cell dropped."""
    schema = lazy.collect_schema()
    missing = [name for name in query.column_names if name not in schema]
    if missing:
        raise ConnectorError(
            f"dataset {query.dataset!r} has no column {', '.join(map(repr, missing))}, which the query declares"
        )
    problems = [problem for column in query.columns if (problem := _type_problem(column, schema[column.name]))]
    if problems:
        raise ConnectorError(f"dataset {query.dataset!r} cannot be read as the query declares: {'; '.join(problems)}")
    rows = lazy.select(_typed(column, schema[column.name]) for column in query.columns)
    if query.filter is not None:
        rows = rows.filter(filter_expression(query.filter, query))
    # A Kaplan-Meier time past the end of follow-up (its upper bound) is censored there:
    # decided on the time as read, before it is clipped.
    for index, statistic in enumerate(query.statistics):
        if statistic.kind == "kaplan_meier":
            assert statistic.time is not None and statistic.event is not None
            event = pl.col(statistic.event)
            within = event & (pl.col(statistic.time) <= query.column(statistic.time).upper)
            # A missing event flag stays missing (Kleene's null & false would be false).
            rows = rows.with_columns(pl.when(event.is_null()).then(None).otherwise(within).alias(_event(index)))
    clipped = {
        name for statistic in query.statistics for name in statistic.columns
    } | {group.column for group in query.group_by}
    rows = rows.with_columns(
        pl.col(column.name).clip(column.lower, column.upper)
        for column in query.columns
        if column.type == "numeric" and column.name in clipped
    )
    cell = pl.lit(0, dtype=pl.UInt32)
    stride = query.n_cells
    for group in query.group_by:
        stride //= group.size
        if group.type == "categorical":
            assert group.levels is not None
            position = _level(pl.col(group.column), group.levels)
        elif group.type == "boolean":
            position = pl.col(group.column).cast(pl.UInt32)
        else:
            assert group.bins is not None
            position = _bin(pl.col(group.column), group.bins)
        cell = cell + position * stride
    return rows.with_columns(cell.alias(_CELL)).filter(pl.col(_CELL).is_not_null())


def _type_problem(column: ColumnSpec, dtype: pl.DataType) -> str | None:
    if column.type == "categorical":
        if dtype.is_numeric() or dtype in (pl.String, pl.Boolean) or isinstance(dtype, (pl.Categorical, pl.Enum)):
            return None
    elif column.type == "numeric":
        if dtype.is_numeric():
            return None
    elif dtype == pl.Boolean or dtype.is_numeric():
        return None
    return f"column {column.name!r} is {dtype}, which cannot be read as {column.type}"


def _typed(column: ColumnSpec, dtype: pl.DataType) -> pl.Expr:
    value = pl.col(column.name)
    if column.type == "numeric":
        value = value.cast(pl.Float64)
        return (value.fill_nan(None) if dtype.is_float() or dtype.is_decimal() else value).alias(column.name)
    if column.type == "categorical":
        return value.cast(pl.String).alias(column.name)
    if dtype == pl.Boolean:
        return value
    # 1/0 coded: anything else (2, 0.5, NaN) is missing rather than silently true.
    return pl.when(value == 1).then(True).when(value == 0).then(False).otherwise(None).alias(column.name)


# Up to this many inner edges a bin index is a sum of comparisons (one cheap pass each,
# about 4x faster than a search at 5 bins); beyond it, a binary search per value.
_COMPARED_EDGES = 16
# Up to this many levels a level's index is a chain of equalities; beyond it, a cast to
# an enum of the levels (a hash lookup).
_COMPARED_LEVELS = 8


def _bin(value: pl.Expr, edges: Sequence[float]) -> pl.Expr:
    """Bin index of a clipped value: ``[e0, e1) ... [e(k-1), ek]``; null for a missing value."""
    inner = [float(edge) for edge in edges[1:-1]]
    if not inner:
        return pl.when(value.is_not_null()).then(pl.lit(0, dtype=pl.UInt32))
    if len(inner) <= _COMPARED_EDGES:
        # A missing value stays missing: null propagates through +.
        return functools.reduce(operator.add, ((value >= edge).cast(pl.UInt32) for edge in inner))
    series = pl.Series(inner, dtype=pl.Float64)
    return pl.when(value.is_not_null()).then(pl.lit(series).search_sorted(value, side="right").cast(pl.UInt32))


def _level(value: pl.Expr, levels: Sequence[str]) -> pl.Expr:
    """Index of a text value among the declared levels; null for a missing or undeclared value."""
    if len(levels) <= _COMPARED_LEVELS:
        chain: Any = pl.when(value == levels[0]).then(pl.lit(0, dtype=pl.UInt32))
        for index, level in enumerate(levels[1:], start=1):
            chain = chain.when(value == level).then(pl.lit(index, dtype=pl.UInt32))
        return chain.otherwise(None)
    return value.cast(pl.Enum(list(levels)), strict=False).to_physical().cast(pl.UInt32)


# ---------------------------------------------------------------- the releases


@dataclass(frozen=True)
class _Keyed:
    """A count vector with several values per cell: each row's slot within its cell, and where it goes.

    ``within`` is the row's slot in ``0 .. slots - 1``, null when the row does not count;
    ``place(cell, slot)`` is the position of each (cell, slot) in the release's vector.
    """

    within: pl.Expr
    slots: int
    place: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _aggregate(query: StatisticsQuery, statistic: Statistic, release: Release, cells: int) -> pl.Expr | _Keyed:
    """How one release is computed: a per-cell aggregate, or a count by slot within each cell."""
    kind = statistic.kind
    if kind == "count":
        return pl.len()
    if kind in ("sum", "mean", "variance", "sd"):
        assert statistic.column is not None
        value = pl.col(statistic.column)
        centred = value - query.column(statistic.column).center
        if release.name == "count":
            return value.count()
        if release.transform == "centred_square":
            return (centred * centred).sum()
        return centred.sum()
    if kind == "proportion":
        assert statistic.column is not None
        value = pl.col(statistic.column)
        if release.name == "count":
            return value.count()
        hit = value if statistic.level is None else value == statistic.level
        return hit.cast(pl.UInt32).sum()
    if kind in ("histogram", "quantiles"):
        assert statistic.column is not None and statistic.bins is not None
        bins = len(statistic.bins) - 1
        return _Keyed(_bin(pl.col(statistic.column), statistic.bins), bins, lambda cell, slot: cell * bins + slot)
    if kind == "two_by_two":
        assert statistic.exposure is not None and statistic.outcome is not None
        # exposed & outcome, exposed & no outcome, unexposed & outcome, unexposed & no outcome
        unexposed = (~pl.col(statistic.exposure)).cast(pl.UInt32)
        no_outcome = (~pl.col(statistic.outcome)).cast(pl.UInt32)
        return _Keyed(unexposed * 2 + no_outcome, 4, lambda cell, slot: cell * 4 + slot)
    assert kind == "kaplan_meier" and statistic.time is not None and statistic.bins is not None
    time, event = pl.col(statistic.time), pl.col(_event(query.statistics.index(statistic)))
    if release.name == "total":
        return (time.is_not_null() & event.is_not_null()).cast(pl.UInt32).sum()
    bins = len(statistic.bins) - 1
    # Slots: events in bins 0..bins-1, then censorings; the vector holds every cell's
    # events, then every cell's censorings (shape (2, cells, bins)).
    within = (~event).cast(pl.UInt32) * bins + _bin(time, statistic.bins)
    return _Keyed(within, 2 * bins, lambda cell, slot: (slot // bins) * (cells * bins) + cell * bins + slot % bins)


def _dense(release: Release, where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The release's full vector: `values` at positions `where`, zero elsewhere."""
    vector = np.zeros(release.size, dtype=np.int64 if release.kind == "count" else np.float64)
    vector[where.astype(np.int64)] = values
    return vector


def _typed_vector(release: Release, values: np.ndarray) -> np.ndarray:
    """A per-cell vector summed in float64 as the release's type (counts are exact below 2**53)."""
    return np.rint(values).astype(np.int64) if release.kind == "count" else values
