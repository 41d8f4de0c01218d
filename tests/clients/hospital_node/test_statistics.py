"""Node-side evaluation of statistics queries against pure-Python and numpy oracles on generated data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.hospital_node.errors import ConnectorError
from clients.hospital_node.statistics import evaluate
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
    StatisticsQuery,
    Truth,
    filter_columns,
    parse_filter,
)

SENTINEL = "PHI-SENTINEL-4711"

COLUMNS: dict[str, dict[str, Any]] = {
    "age": {"type": "numeric", "lower": 18, "upper": 90, "bins": [18, 40, 65, 90]},
    "sex": {"type": "categorical", "levels": ["F", "M"]},
    "region": {"type": "categorical", "levels": ["north", "south", "east"]},
    "bmi": {"type": "numeric", "lower": 15, "upper": 45, "bins": [15, 25, 30, 45]},
    "smoker": {"type": "boolean"},
    "stroke": {"type": "boolean"},
    "days": {"type": "numeric", "lower": 0, "upper": 365, "bins": [0, 30, 90, 180, 365]},
    "died": {"type": "boolean"},
}
STATISTICS: list[dict[str, Any]] = [
    {"kind": "count"},
    {"kind": "sum", "column": "bmi"},
    {"kind": "mean", "column": "age"},
    {"kind": "variance", "column": "bmi"},
    {"kind": "proportion", "column": "smoker"},
    {"kind": "proportion", "column": "region", "level": "south"},
    {"kind": "histogram", "column": "bmi"},
    {"kind": "quantiles", "column": "age", "bins": [18, 30, 50, 70, 90], "probabilities": [0.5]},
    {"kind": "two_by_two", "exposure": "smoker", "outcome": "stroke"},
    {"kind": "kaplan_meier", "time": "days", "event": "died"},
]


def query(
    *, filter: str | None = None, group_by: list[str] | None = None, statistics: list[dict[str, Any]] | None = None
) -> StatisticsQuery:
    data: dict[str, Any] = {"dataset": "cohort", "group_by": ["sex", "age"] if group_by is None else group_by}
    if filter is not None:
        data["filter"] = filter
    statistics = STATISTICS if statistics is None else statistics
    mapping = {"data": data, "columns": COLUMNS, "statistics": statistics, "privacy": {"epsilon": 1.0, "delta": 1e-6}}
    # Declare only the columns some part uses (a query refuses the others).
    used = set(data["group_by"]) | {s.get(k) for s in statistics for k in ("column", "exposure", "outcome", "time", "event")}
    if filter is not None:
        used |= set(filter_columns(parse_filter(filter)))
    mapping["columns"] = {name: COLUMNS[name] for name in COLUMNS if name in used}
    return StatisticsQuery.from_mapping(mapping)


def generated(n: int, seed: int) -> pl.DataFrame:
    """Rows with missing values, out-of-bound values, values on bin edges, undeclared levels and 1/0 booleans."""
    rng = np.random.default_rng(seed)

    def maybe(values: list[Any], missing: float = 0.08) -> list[Any]:
        return [None if rng.random() < missing else v for v in values]

    age = rng.choice([10.0, 18.0, 25.5, 40.0, 64.9, 65.0, 89.0, 90.0, 95.0, float("nan")], n)
    bmi = np.round(rng.normal(28, 7, n), 1)
    bmi[rng.random(n) < 0.05] = 25.0  # on an edge
    days = np.round(rng.uniform(-10, 500, n))
    days[rng.random(n) < 0.05] = 365.0
    return pl.DataFrame(
        {
            "patient_id": [f"P{i:06d}" for i in range(n)],
            "age": maybe(age.tolist()),
            "sex": maybe(rng.choice(["F", "M", "X"], n, p=[0.48, 0.48, 0.04]).tolist()),
            "region": maybe(rng.choice(["north", "south", "east", "west"], n).tolist()),
            "bmi": maybe(bmi.tolist()),
            "smoker": maybe(rng.choice([0, 1, 2], n, p=[0.7, 0.28, 0.02]).tolist()),  # 2 is missing
            "stroke": maybe(rng.choice([False, True], n).tolist()),
            "days": maybe(days.tolist()),
            "died": maybe(rng.choice([False, True], n).tolist()),
            "secret": [SENTINEL] * n,  # undeclared: never read
        },
        schema_overrides={"age": pl.Float64, "bmi": pl.Float64, "days": pl.Float64, "smoker": pl.Int64},
    )


# ---------------------------------------------------------------- the oracle: plain Python, row by row


def typed(column: ColumnSpec, value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if column.type == "numeric":
        return float(value)
    if column.type == "boolean":
        if isinstance(value, bool):
            return value
        return {1: True, 0: False}.get(value)
    return str(value)


def kleene(expr: FilterExpr, row: dict[str, Any]) -> bool | None:
    if isinstance(expr, And):
        values = [kleene(e, row) for e in expr.operands]
        return False if False in values else (None if None in values else True)
    if isinstance(expr, Or):
        values = [kleene(e, row) for e in expr.operands]
        return True if True in values else (None if None in values else False)
    if isinstance(expr, Not):
        value = kleene(expr.operand, row)
        return None if value is None else not value
    if isinstance(expr, IsNull):
        return (row[expr.column] is not None) if expr.negated else (row[expr.column] is None)
    if isinstance(expr, Truth):
        return row[expr.column]
    if isinstance(expr, IsIn):
        value = row[expr.column]
        if value is None:
            return None
        found = value in [c.value for c in expr.values]
        return not found if expr.negated else found
    assert isinstance(expr, Compare)
    left = row[expr.left.column]
    right = row[expr.right.column] if isinstance(expr.right, Ref) else expr.right.value
    if left is None or right is None:
        return None
    return {"=": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
            ">": left > right, ">=": left >= right}[expr.op]


def bin_of(value: float, edges: tuple[float, ...]) -> int:
    value = min(max(value, edges[0]), edges[-1])
    for index in range(len(edges) - 1):
        if value < edges[index + 1]:
            return index
    return len(edges) - 2


def oracle(q: StatisticsQuery, frame: pl.DataFrame) -> list[np.ndarray]:
    specs = {c.name: c for c in q.columns}
    cells = q.n_cells
    out = [np.zeros(r.size, dtype=np.int64 if r.kind == "count" else np.float64) for r in q.releases()]
    for raw in frame.iter_rows(named=True):
        row = {name: typed(spec, raw[name]) for name, spec in specs.items()}
        if q.filter is not None and kleene(q.filter, row) is not True:
            continue
        cell = 0
        for group in q.group_by:
            value = row[group.column]
            if value is None:
                cell = None
                break
            if group.type == "categorical":
                if value not in group.levels:
                    cell = None
                    break
                index = group.levels.index(value)
            elif group.type == "boolean":
                index = int(value)
            else:
                index = bin_of(value, group.bins)
            cell = cell * group.size + index
        if cell is None:
            continue
        at = 0
        for statistic in q.statistics:
            kind = statistic.kind
            if kind == "count":
                out[at][cell] += 1
                at += 1
            elif kind in ("sum", "mean", "variance"):
                spec = specs[statistic.column]
                value = row[statistic.column]
                centred = None if value is None else min(max(value, spec.lower), spec.upper) - spec.center
                if centred is not None:
                    out[at][cell] += centred
                    if kind == "variance":
                        out[at + 1][cell] += centred * centred
                        out[at + 2][cell] += 1
                    else:
                        out[at + 1][cell] += 1
                at += 3 if kind == "variance" else 2
            elif kind == "proportion":
                value = row[statistic.column]
                if value is not None:
                    out[at][cell] += int(value is True if statistic.level is None else value == statistic.level)
                    out[at + 1][cell] += 1
                at += 2
            elif kind in ("histogram", "quantiles"):
                value = row[statistic.column]
                if value is not None:
                    bins = len(statistic.bins) - 1
                    out[at][cell * bins + bin_of(value, statistic.bins)] += 1
                at += 1
            elif kind == "two_by_two":
                exposed, outcome = row[statistic.exposure], row[statistic.outcome]
                if exposed is not None and outcome is not None:
                    out[at][cell * 4 + (0 if exposed else 2) + (0 if outcome else 1)] += 1
                at += 1
            else:
                time, event = row[statistic.time], row[statistic.event]
                if time is not None and event is not None:
                    upper = specs[statistic.time].upper
                    died = event and time <= upper  # past the end of follow-up: censored there
                    bins = len(statistic.bins) - 1
                    out[at][(0 if died else 1) * cells * bins + cell * bins + bin_of(time, statistic.bins)] += 1
                    out[at + 1][cell] += 1
                at += 2
    return out


def assert_equal(actual: list[np.ndarray], expected: list[np.ndarray], q: StatisticsQuery) -> None:
    assert len(actual) == len(expected) == len(q.releases())
    for release, got, want in zip(q.releases(), actual, expected):
        assert got.shape == (release.size,), release
        if release.kind == "count":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want, err_msg=f"{release.statistic}.{release.name}")
        else:
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6, err_msg=f"{release.statistic}.{release.name}")


# ---------------------------------------------------------------- every release against the oracle


@pytest.mark.parametrize("seed", [1, 2])
def test_every_release_matches_the_oracle(seed: int) -> None:
    frame = generated(3000, seed)
    q = query(filter="region != 'north' or bmi > 30")
    assert_equal(evaluate(q, frame), oracle(q, frame), q)


def test_without_filter_or_group_by_one_cell_holds_everything() -> None:
    frame = generated(500, 3)
    q = query(group_by=[])
    result = evaluate(q, frame)
    assert_equal(result, oracle(q, frame), q)
    assert result[0].tolist() == [500]  # the count


@pytest.mark.parametrize("group_by", [["smoker"], ["region", "smoker"], ["days"], ["bmi", "sex", "smoker"]])
def test_each_kind_of_group_by_matches_the_oracle(group_by: list[str]) -> None:
    frame = generated(1500, 4)
    q = query(group_by=group_by)
    assert_equal(evaluate(q, frame), oracle(q, frame), q)


def test_a_lazy_frame_a_data_frame_and_a_parquet_scan_agree(tmp_path: Path) -> None:
    frame = generated(800, 5)
    path = tmp_path / "cohort.parquet"
    frame.write_parquet(path)
    q = query(filter="not smoker")
    eager = evaluate(q, frame)
    for other in (evaluate(q, frame.lazy()), evaluate(q, pl.scan_parquet(path))):
        for release, a, b in zip(q.releases(), eager, other):
            if release.kind == "count":
                np.testing.assert_array_equal(a, b)
            else:  # float sums may add in another order
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_an_empty_dataset_gives_zero_vectors_of_the_right_shape() -> None:
    q = query()
    result = evaluate(q, generated(10, 6).clear())
    assert [v.size for v in result] == [r.size for r in q.releases()]
    assert all(not v.any() for v in result)


# ---------------------------------------------------------------- each rule, on data made for it


def test_counts_go_to_declared_cells_only() -> None:
    frame = pl.DataFrame({
        "sex": ["F", "F", "M", "X", None, "M"],
        "age": [20.0, 95.0, 64.99, 30.0, 30.0, None],
    })
    q = query(group_by=["sex", "age"], statistics=[{"kind": "count"}])
    # F: [18,40) gets 20, [65,90] gets 95 (clipped to 90); M: [40,65) gets 64.99; X, null sex, null age: no cell.
    assert evaluate(q, frame)[0].tolist() == [1, 0, 1, 0, 1, 0]


def test_sums_are_centred_and_clipped_and_nulls_are_left_out() -> None:
    frame = pl.DataFrame({"bmi": [15.0, 45.0, 60.0, 0.0, None, 30.0, float("nan")]})
    q = query(group_by=[], statistics=[{"kind": "variance", "column": "bmi"}])
    total, squares, count = evaluate(q, frame)
    # centre 30, clipped: 15 -> -15, 45 -> 15, 60 -> 45 -> 15, 0 -> 15 -> -15, 30 -> 0; null and NaN left out.
    assert total.tolist() == [0.0]
    assert squares.tolist() == [4 * 225.0]
    assert count.tolist() == [5]


def test_histogram_bins_are_half_open_but_the_last_and_match_numpy() -> None:
    values = [15.0, 24.999, 25.0, 29.9, 30.0, 44.0, 45.0, 50.0, 10.0, None]
    frame = pl.DataFrame({"bmi": values})
    q = query(group_by=[], statistics=[{"kind": "histogram", "column": "bmi"}])
    result = evaluate(q, frame)[0]
    clipped = np.clip([v for v in values if v is not None], 15, 45)
    expected, _ = np.histogram(clipped, bins=[15, 25, 30, 45])
    assert result.tolist() == expected.tolist() == [3, 2, 4]


def test_histograms_per_cell_are_row_major_and_each_patient_falls_in_one_bin() -> None:
    frame = generated(2000, 7)
    q = query(statistics=[{"kind": "count"}, {"kind": "histogram", "column": "bmi"}, {"kind": "proportion", "column": "sex", "level": "F"}])
    count, histogram, _, _ = evaluate(q, frame)
    per_cell = histogram.reshape(q.n_cells, 3)
    kept = frame.filter(pl.col("bmi").is_not_null())
    q_bmi = query(statistics=[{"kind": "count"}], filter="bmi is not null")
    assert per_cell.sum(axis=1).tolist() == evaluate(q_bmi, kept)[0].tolist()
    assert count.sum() <= len(frame)  # each patient in at most one cell


def test_a_patient_is_counted_once_per_cell() -> None:
    frame = generated(2000, 8)
    q = query(statistics=[{"kind": "count"}])
    counts = evaluate(q, frame)[0]
    typed_sex = frame["sex"].to_list()
    in_a_cell = sum(
        1 for sex, age in zip(typed_sex, frame["age"].to_list())
        if sex in ("F", "M") and age is not None and not math.isnan(age)
    )
    assert counts.sum() == in_a_cell


def test_proportions_of_booleans_coded_one_zero_treat_other_codes_as_missing() -> None:
    frame = pl.DataFrame({"smoker": [1, 0, 1, 2, None, 0]})
    q = query(group_by=[], statistics=[{"kind": "proportion", "column": "smoker"}])
    events, count = evaluate(q, frame)
    assert (events.tolist(), count.tolist()) == ([2], [4])


def test_a_categorical_level_proportion_counts_every_present_value() -> None:
    frame = pl.DataFrame({"region": ["south", "north", "west", None, "south"]})
    q = query(group_by=[], statistics=[{"kind": "proportion", "column": "region", "level": "south"}])
    events, count = evaluate(q, frame)
    assert (events.tolist(), count.tolist()) == ([2], [4])  # 'west' is present, so counted; null is not


def test_two_by_two_layout() -> None:
    frame = pl.DataFrame({
        "smoker": [True, True, True, False, False, False, False, None],
        "stroke": [True, False, False, True, False, False, False, True],
    })
    q = query(group_by=[], statistics=[{"kind": "two_by_two", "exposure": "smoker", "outcome": "stroke"}])
    # exposed & outcome, exposed & no outcome, unexposed & outcome, unexposed & no outcome
    assert evaluate(q, frame)[0].tolist() == [1, 2, 1, 3]


def test_kaplan_meier_events_then_censorings_with_follow_up_ending_at_the_upper_bound() -> None:
    frame = pl.DataFrame({
        "days": [5.0, 5.0, 29.9, 30.0, 364.0, 365.0, 400.0, 400.0, -3.0, None, 10.0],
        "died": [True, False, True, True, True, True, True, False, True, True, None],
    })
    q = query(group_by=[], statistics=[{"kind": "kaplan_meier", "time": "days", "event": "died"}])
    events, total = evaluate(q, frame)
    deaths, censored = events.reshape(2, 1, 4)
    # bins [0,30) [30,90) [90,180) [180,365]; -3 is clipped to 0; 400 died is censored at 365
    assert deaths.tolist() == [[3, 1, 0, 2]]
    assert censored.tolist() == [[1, 0, 0, 2]]
    assert total.tolist() == [9]  # missing time or event: left out


def test_kaplan_meier_per_cell_uses_both_halves_of_the_vector() -> None:
    frame = pl.DataFrame({
        "smoker": [True, False, True],
        "days": [10.0, 100.0, 200.0],
        "died": [True, True, False],
    })
    q = query(group_by=["smoker"], statistics=[{"kind": "kaplan_meier", "time": "days", "event": "died"}])
    events, total = evaluate(q, frame)
    assert events.reshape(2, 2, 4).tolist() == [
        [[0, 0, 1, 0], [1, 0, 0, 0]],  # deaths: non-smoker at 100, smoker at 10
        [[0, 0, 0, 0], [0, 0, 0, 1]],  # censorings: smoker at 200
    ]
    assert total.tolist() == [1, 2]


# ---------------------------------------------------------------- the filter


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("bmi > 25", [1]),
        ("not bmi > 25", [0]),  # null stays unknown under not
        ("bmi > 25 or smoker", [1, 2]),  # unknown or true is true
        ("bmi > 25 and smoker", []),
        ("bmi is null", [2, 3]),
        ("bmi is not null and region in ('north', 'south')", [0, 1]),
        ("region not in ('north',)", [1]),  # null is not 'not in' anything
        ("region != 'north'", [1]),
        ("not (region = 'north')", [1]),
        ("smoker = false", [0]),
        ("bmi < age", [0]),
    ],
)
def test_the_filter_follows_sqls_three_valued_logic(text: str, kept: list[int]) -> None:
    frame = pl.DataFrame({
        "bmi": [20.0, 30.0, None, float("nan")],
        "age": [40.0, 20.0, 50.0, 60.0],
        "smoker": [False, None, True, None],
        "region": ["north", "south", None, None],
    })
    q = query(group_by=[], statistics=[{"kind": "count"}], filter=text)
    assert evaluate(q, frame)[0].tolist() == [len(kept)]
    row_ids = [i for i, row in enumerate(frame.iter_rows(named=True))
               if kleene(q.filter, {n: typed(q.column(n), row[n]) for n in q.column_names}) is True]
    assert row_ids == kept


_NUMERIC = st.sampled_from(["age", "bmi", "days"])
_FILTER_LEAVES = st.one_of(
    st.builds(Compare, st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), st.builds(Ref, _NUMERIC),
              st.one_of(st.builds(Const, st.sampled_from([18, 25.0, 30, 40, 65.0, 90, 365, -1])), st.builds(Ref, _NUMERIC))),
    st.builds(IsNull, st.sampled_from(["age", "bmi", "smoker", "region"]), st.booleans()),
    st.builds(IsIn, st.just("region"), st.lists(st.builds(Const, st.sampled_from(["north", "south", "east"])), min_size=1, max_size=3).map(tuple), st.booleans()),
    st.builds(Truth, st.sampled_from(["smoker", "stroke", "died"])),
    st.builds(Compare, st.sampled_from(["=", "!="]), st.builds(Ref, st.just("sex")), st.builds(Const, st.sampled_from(["F", "M"]))),
)
_FILTERS = st.recursive(
    _FILTER_LEAVES,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(And, st.lists(inner, min_size=2, max_size=3).map(tuple)),
        st.builds(Or, st.lists(inner, min_size=2, max_size=3).map(tuple)),
    ),
    max_leaves=8,
)
_FRAME = generated(400, 9)


@given(_FILTERS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_filter_keeps_exactly_the_rows_the_oracle_keeps(expr: FilterExpr) -> None:
    q = query(filter=expr.render(), group_by=["sex"], statistics=[{"kind": "count"}, {"kind": "mean", "column": "bmi"}])
    assert_equal(evaluate(q, _FRAME), oracle(q, _FRAME), q)


# ---------------------------------------------------------------- what the node reads, and its errors


def test_no_undeclared_column_is_ever_read() -> None:
    def boom(series: pl.Series) -> pl.Series:
        raise AssertionError("an undeclared column was read")

    lazy = generated(100, 10).lazy().with_columns(pl.col("secret").map_batches(boom, return_dtype=pl.String))
    q = query()
    assert_equal(evaluate(q, lazy), oracle(q, generated(100, 10)), q)


def test_a_declared_column_missing_from_the_dataset_is_named() -> None:
    with pytest.raises(ConnectorError, match=r"dataset 'cohort' has no column 'stroke', which the query declares"):
        evaluate(query(), generated(50, 11).drop("stroke"))


def test_a_column_of_the_wrong_type_is_named_without_its_values() -> None:
    frame = generated(50, 12).with_columns(pl.lit(SENTINEL).alias("bmi"), pl.lit(SENTINEL).alias("died"))
    with pytest.raises(ConnectorError) as info:
        evaluate(query(), frame)
    message = str(info.value)
    assert message == (
        "dataset 'cohort' cannot be read as the query declares: column 'bmi' is String, which cannot be read as "
        "numeric; column 'died' is String, which cannot be read as boolean"
    )
    assert SENTINEL not in message


def test_integer_coded_categories_compare_as_text() -> None:
    frame = pl.DataFrame({"region": [1, 2, 2, None]})
    mapping = {
        "data": {"dataset": "cohort", "group_by": ["region"]},
        "columns": {"region": {"type": "categorical", "levels": ["1", "2"]}},
        "statistics": [{"kind": "count"}],
        "privacy": {"epsilon": 1.0, "delta": 1e-6},
    }
    assert evaluate(StatisticsQuery.from_mapping(mapping), frame)[0].tolist() == [1, 2]


def test_many_bins_and_levels_take_the_search_paths_and_agree_with_the_oracle() -> None:
    rng = np.random.default_rng(13)
    levels = [f"w{i}" for i in range(12)]
    frame = pl.DataFrame({
        "ward": rng.choice(levels + ["other", None], 3000).tolist(),
        "bmi": [None if rng.random() < 0.05 else float(v) for v in np.round(rng.normal(30, 9, 3000), 2)],
    })
    edges = [15 + 30 * i / 40 for i in range(41)]
    mapping = {
        "data": {"dataset": "cohort", "group_by": ["ward", "bmi"]},
        "columns": {
            "ward": {"type": "categorical", "levels": levels},
            "bmi": {"type": "numeric", "lower": 15, "upper": 45, "bins": edges},
        },
        "statistics": [{"kind": "count"}, {"kind": "histogram", "column": "bmi"}, {"kind": "mean", "column": "bmi"}],
        "privacy": {"epsilon": 1.0, "delta": 1e-6},
    }
    q = StatisticsQuery.from_mapping(mapping)
    assert_equal(evaluate(q, frame), oracle(q, frame), q)
