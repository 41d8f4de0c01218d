"""Node-side statistics query over 10 million rows: `evaluate` (and noise) against the same query in plain polars.

The query of issue 10's benchmark: a grouped count, mean and histogram. Cells are 5 age
bands x sex (10 cells); the mean and the histogram (8 bins) are of home systolic
pressure. Each variant runs on the same in-memory polars DataFrame of ``--rows``
generated rows (one per patient: age, sex_male coded 1/0, sbp_home_mean, and an
undeclared column the query must not read):

- ``plain``: the query as an analyst writes it directly in polars: age bands and
  pressure bins with ``bin_intervals`` (``cut`` before polars 2), one ``group_by`` for
  the count and mean, one for the histogram, collected together. No bounds, no clipping, no noise: the baseline every
  ratio is taken against;
- ``evaluate``: :func:`clients.hospital_node.statistics.evaluate` of the validated
  :class:`~privacy.query.StatisticsQuery` (typing, clipping, cell index, dense vectors),
  exact;
- ``evaluate+noise``: the same plus the noise of every release (OpenDP's samplers,
  ``privacy.mechanisms.add_noise``, imported before measuring), when
  ``privacy.mechanisms`` is there; skipped and said so otherwise.

For each it reports the median wall time of ``--repeats`` runs (variants interleaved
round-robin so that load from other processes spreads over all of them, after one
untimed warm-up each) and, from one run in a fresh process per variant (so that no
allocator holds memory from an earlier run), the peak resident memory above the
process's size once the data are in memory (Linux's VmHWM, reset through
``/proc/self/clear_refs``). It checks that ``evaluate`` and ``plain`` agree on the
counts and means before timing anything.

Run from the repository root: ``python benchmarks/statistics_query.py [--rows N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.hospital_node.statistics import evaluate  # noqa: E402
from privacy.query import StatisticsQuery  # noqa: E402

AGE_EDGES = [18, 40, 50, 60, 70, 90]
SBP_EDGES = [80, 100, 110, 120, 130, 140, 150, 160, 180]

QUERY = {
    "kind": "statistics",
    "data": {"dataset": "bench", "group_by": ["age", "sex_male"]},
    "columns": {
        "age": {"type": "numeric", "lower": 18, "upper": 90, "bins": AGE_EDGES},
        "sex_male": {"type": "boolean"},
        "sbp_home_mean": {"type": "numeric", "lower": 80, "upper": 180, "bins": SBP_EDGES},
    },
    "statistics": [
        {"kind": "count"},
        {"kind": "mean", "column": "sbp_home_mean"},
        {"kind": "histogram", "column": "sbp_home_mean"},
    ],
    "privacy": {"epsilon": 1.0, "delta": 1e-6},
}


def generate(rows: int, seed: int = 7) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    age = np.round(np.clip(rng.normal(50, 14, rows), 18, 90))
    sbp = np.round(np.clip(rng.normal(125, 12, rows) + 0.3 * (age - 50), 80, 180), 1)
    return pl.DataFrame({
        "age": age,
        "sex_male": (rng.random(rows) < 0.5).astype(np.int64),
        "sbp_home_mean": sbp,
        "fasting_glucose": np.round(rng.normal(5.5, 1.0, rows), 1),  # undeclared: never read
    })


def _binned(column: str, edges: Sequence[float]) -> pl.Expr:
    """Bin index as a polars user writes it: ``bin_intervals`` (polars 2), else ``cut`` (polars 1)."""
    if hasattr(pl.Expr, "bin_intervals"):
        return pl.col(column).bin_intervals(list(edges[1:-1]), labels=False)
    return pl.col(column).cut(list(edges[1:-1]), left_closed=True).to_physical()


def plain(frame: pl.DataFrame) -> list[pl.DataFrame]:
    banded = frame.lazy().with_columns(
        _binned("age", AGE_EDGES).alias("age_band"), _binned("sbp_home_mean", SBP_EDGES).alias("sbp_bin")
    )
    per_cell = banded.group_by("age_band", "sex_male").agg(pl.len(), pl.col("sbp_home_mean").mean())
    histogram = banded.group_by("age_band", "sex_male", "sbp_bin").len()
    return pl.collect_all([per_cell, histogram])


def noisy(query: StatisticsQuery) -> Callable[[pl.DataFrame], Any] | None:
    """`evaluate` followed by the noise of each release (OpenDP's samplers), if ``privacy.mechanisms`` exists."""
    try:
        from privacy.mechanisms import add_noise  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    releases = query.releases()
    add_noise(np.zeros(1, dtype=np.int64), mechanism="discrete-laplace", scale=1.0)  # OpenDP's import, not measured

    def run(frame: pl.DataFrame) -> Any:
        exact = evaluate(query, frame)
        return [add_noise(vector, mechanism=r.mechanism, scale=r.scale) for r, vector in zip(releases, exact)]

    return run


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(work: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and peak resident bytes above the size before `work`."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return seconds, max(0, _status("VmHWM") - before)


def agree(query: StatisticsQuery, frame: pl.DataFrame) -> None:
    """evaluate and plain give the same counts and means (the data lie within the bounds)."""
    count, total, n, _ = evaluate(query, frame)
    per_cell = plain(frame)[0].sort("age_band", "sex_male")
    assert count.tolist() == per_cell["len"].to_list() == n.tolist(), "counts differ"
    means = total / n + query.column("sbp_home_mean").center
    assert np.allclose(means, per_cell["sbp_home_mean"].to_numpy()), "means differ"


def variants(query: StatisticsQuery, frame: pl.DataFrame) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {"plain": lambda: plain(frame), "evaluate": lambda: evaluate(query, frame)}
    with_noise = noisy(query)
    if with_noise is not None:
        out["evaluate+noise"] = lambda: with_noise(frame)
    return out


def peak_in_fresh_process(name: str, rows: int) -> int:
    """Peak bytes of one run of variant `name` in a new process, above its size with the data loaded."""
    done = subprocess.run(
        [sys.executable, __file__, "--rows", str(rows), "--child", name],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return int(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run of one variant, for its peak memory
    args = parser.parse_args(argv)

    query = StatisticsQuery.from_mapping(QUERY)
    frame = generate(args.rows)
    if args.child:
        print(measure(variants(query, frame)[args.child])[1])
        return
    agree(query, frame)
    work_of = variants(query, frame)
    with_noise = "evaluate+noise" in work_of
    for work in work_of.values():
        work()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in work_of}
    for _ in range(args.repeats):
        for name, work in work_of.items():
            seconds[name].append(measure(work)[0])
    del frame, work_of
    peaks = {name: peak_in_fresh_process(name, args.rows) for name in seconds}

    base = statistics.median(seconds["plain"])
    results = {
        name: {
            "seconds": statistics.median(seconds[name]),
            "peak_mib": peaks[name] / 2**20,
            "ratio": statistics.median(seconds[name]) / base,
        }
        for name in seconds
    }
    print(f"{args.rows:,} rows, {query.n_cells} cells, {os.cpu_count()} CPUs, polars {pl.__version__}, "
          f"POLARS_MAX_THREADS={pl.thread_pool_size()}; median of {args.repeats}")
    print(f"{'variant':<16}{'seconds':>10}{'peak MiB':>10}{'x plain':>9}")
    for name, row in results.items():
        print(f"{name:<16}{row['seconds']:>10.3f}{row['peak_mib']:>10.0f}{row['ratio']:>9.2f}")
    if not with_noise:
        print("evaluate+noise: skipped (no samplers in privacy.mechanisms yet)")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "statistics_query",
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "polars": pl.__version__,
            "rows": args.rows,
            "repeats": args.repeats,
            "results": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
