"""Cohort building at hospital scale: `build_cohort` against a plain DuckDB group-by over the same readings.

One synthetic hospital is written straight to Parquet by DuckDB (``COPY (SELECT ... FROM
range(n)) TO ...``): ``--patients`` people (default 1,000,000), each with an observation
period, some conditions, drugs and smoking observations, and ``--readings`` measurement
rows (default 100,000,000; stored by person, as an export by patient is) spread over
2022-2024: home and wearable systolic and diastolic pressure, glucose and heart rate, and
clinic (EHR) BMI and pressure, each with its unit; one reading in ``IMPLAUSIBLE_EVERY``
holds an impossible value, which the node's validation drops. Then, each in a fresh
process under the same DuckDB ``memory_limit`` and thread count:

- three plain baselines, each one group-by over ``measurement.parquet`` of avg, sample sd
  and count per person and concept: ``plain_all`` over every reading; ``plain_same`` over
  the readings the cohort reads (the four signals' device and self-reported readings in
  the 90-day window before the index date, and EHR BMI in the 365-day look-back);
  ``plain_signals`` over the signals' window alone;
- ``summaries``: the same per-person summaries the cohort's covariates are (mean, sd,
  slope, share above threshold, days with a reading, last EHR BMI), hand-written as two
  group-bys, without the cohort's target, exclusion, label or reshaping: what the
  covariates cost by themselves;
- ``cohort``: the node's own path. The folder is opened as the node opens a source
  (:func:`clients.hospital_node.data.sources.open_snapshot`: validated, clean views),
  then :func:`clients.hospital_node.data.cohorts.build_cohort` runs for
  ``hypertension_onset`` at 2024-01-01 with age, sex_male, sbp/dbp mean, sd, slope,
  frac_above, days, glucose_mean, heart_rate_mean, bmi_last, history_obesity. The
  validation is timed apart (it runs once per snapshot, before any cohort) and reported
  beside the cohort.

Each variant runs ``--repeats`` times, interleaved (plain_all, ..., cohort, plain_all, ...),
and the script reports the median wall seconds of each, the median CPU seconds (user +
system: on a shared VM they move much less with other work than wall time), the cohort's
ratio to every other variant in both, and each timed part's peak resident memory
(Linux's VmHWM, reset before the part, so the validation's peak is not the cohort's). Data generation
is reused when the folder holds a hospital of the same size written with the concept
ids the code reads today (``meta.json``; data written under older ids would match none of
the filters and make every variant look fast).

Run from the repository root:
``python benchmarks/cohort_build.py [--patients N] [--readings N] [--memory-limit 4GB] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.clinical_tasks import (  # noqa: E402
    CONCEPTS,
    TYPE_DEVICE,
    TYPE_EHR,
    TYPE_SELF_REPORT,
    CohortDefinition,
)

TABLES = ("person", "observation_period", "visit_occurrence", "condition_occurrence",
          "measurement", "observation", "drug_exposure")
INDEX = dt.date(2024, 1, 1)
SNAPSHOT = dt.date(2026, 1, 1)  # the day the node opens the hospital's snapshot: nothing is in its future
WINDOW = (-90, 0)
LOOKBACK_DAYS = 365  # CohortDefinition's default look-back: bmi_last and history_obesity
SIGNALS = ("sbp", "dbp", "glucose", "heart_rate")
COVARIATES = [
    "age", "sex_male",
    *[f"{s}_{summary}" for s in ("sbp", "dbp") for summary in ("mean", "sd", "slope", "frac_above", "days")],
    "glucose_mean", "heart_rate_mean", "bmi_last", "history_obesity",
]


def cid(name: str) -> int:
    return CONCEPTS[name].concept_id


def generate(folder: Path, *, patients: int, readings: int, threads: int, memory_limit: str) -> None:
    """Write the hospital's seven tables as Parquet with DuckDB, without holding them in Python."""
    import duckdb

    folder.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}; SET memory_limit = '{memory_limit}'; "
                f"SET temp_directory = '{folder / 'spill'}'; SET preserve_insertion_order = false")
    # hash(i, salt) gives repeatable pseudo-random draws per row.
    h = "CAST(hash(range, {salt}) % {n} AS BIGINT)"
    per_person = max(1, readings // patients)
    out = {t: str(folder / f"{t}.parquet") for t in TABLES}
    con.execute(f"""COPY (SELECT range AS person_id,
        CAST(CASE WHEN {h.format(salt=1, n=2)} = 0 THEN {cid('male')} ELSE {cid('female')} END AS INTEGER) AS gender_concept_id,
        CAST(1940 + {h.format(salt=2, n=66)} AS INTEGER) AS year_of_birth,
        CAST(1 + {h.format(salt=3, n=12)} AS INTEGER) AS month_of_birth,
        CAST(1 + {h.format(salt=4, n=28)} AS INTEGER) AS day_of_birth,
        NULL::TIMESTAMP AS birth_datetime, NULL::BIGINT AS care_site_id, NULL::BIGINT AS location_id
        FROM range({patients})) TO '{out['person']}' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT range AS observation_period_id, range AS person_id,
        DATE '2019-01-01' + CAST({h.format(salt=5, n=1200)} AS INTEGER) AS observation_period_start_date,
        DATE '2025-12-31' - CAST({h.format(salt=6, n=900)} AS INTEGER) AS observation_period_end_date,
        {TYPE_EHR} AS period_type_concept_id
        FROM range({patients})) TO '{out['observation_period']}' (FORMAT parquet)""")
    conditions = [cid(c) for c in ("hypertension", "obesity", "hyperlipidemia", "type2_diabetes")]
    con.execute(f"""COPY (SELECT range AS condition_occurrence_id, CAST({h.format(salt=7, n=patients)} AS BIGINT) AS person_id,
        CAST(list_extract({conditions}, 1 + CAST({h.format(salt=8, n=len(conditions))} AS INTEGER)) AS INTEGER) AS condition_concept_id,
        DATE '2019-01-01' + CAST({h.format(salt=9, n=2555)} AS INTEGER) AS condition_start_date,
        NULL::DATE AS condition_end_date, {TYPE_EHR} AS condition_type_concept_id
        FROM range({patients // 2})) TO '{out['condition_occurrence']}' (FORMAT parquet)""")
    drugs = [cid(d) for d in ("amlodipine", "lisinopril", "metformin")]
    con.execute(f"""COPY (SELECT range AS drug_exposure_id, CAST({h.format(salt=10, n=patients)} AS BIGINT) AS person_id,
        CAST(list_extract({drugs}, 1 + CAST({h.format(salt=11, n=len(drugs))} AS INTEGER)) AS INTEGER) AS drug_concept_id,
        DATE '2019-01-01' + CAST({h.format(salt=12, n=2555)} AS INTEGER) AS drug_exposure_start_date,
        DATE '2019-01-01' + CAST({h.format(salt=12, n=2555)} AS INTEGER) + 30 AS drug_exposure_end_date, {TYPE_EHR} AS drug_type_concept_id
        FROM range({patients // 10})) TO '{out['drug_exposure']}' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT range AS observation_id, CAST({h.format(salt=13, n=patients)} AS BIGINT) AS person_id,
        {cid('current_smoker')} AS observation_concept_id,
        DATE '2019-01-01' + CAST({h.format(salt=14, n=2555)} AS INTEGER) AS observation_date,
        {TYPE_EHR} AS observation_type_concept_id, NULL::DOUBLE AS value_as_number
        FROM range({patients // 5})) TO '{out['observation']}' (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT range AS visit_occurrence_id, range AS person_id, 9202 AS visit_concept_id,
        DATE '2023-06-01' AS visit_start_date, DATE '2023-06-01' AS visit_end_date, {TYPE_EHR} AS visit_type_concept_id
        FROM range(0)) TO '{out['visit_occurrence']}' (FORMAT parquet)""")
    # Readings: mostly home and wearable signals, some clinic values; times spread over 2022-2024.
    kinds = [("sbp", TYPE_DEVICE, 125.0, 18.0), ("dbp", TYPE_DEVICE, 80.0, 11.0),
             ("heart_rate", TYPE_DEVICE, 72.0, 12.0), ("glucose", TYPE_SELF_REPORT, 6.0, 1.5),
             ("sbp", TYPE_SELF_REPORT, 128.0, 18.0), ("dbp", TYPE_SELF_REPORT, 82.0, 11.0),
             ("bmi", TYPE_EHR, 27.0, 5.0), ("sbp", TYPE_EHR, 130.0, 18.0)]
    concepts = [cid(k[0]) for k in kinds]
    units = [cid(CONCEPTS[k[0]].unit) for k in kinds]
    types = [k[1] for k in kinds]
    means = [k[2] for k in kinds]
    sds = [k[3] for k in kinds]
    pick = f"1 + CAST({h.format(salt=15, n=len(kinds))} AS INTEGER)"
    con.execute(f"""COPY (
        SELECT range AS measurement_id, CAST(range // {per_person} AS BIGINT) % {patients} AS person_id,
               CAST(list_extract({concepts}, k) AS INTEGER) AS measurement_concept_id,
               CAST(ts AS DATE) AS measurement_date, ts AS measurement_datetime,
               CAST(list_extract({types}, k) AS INTEGER) AS measurement_type_concept_id,
               CASE WHEN {h.format(salt=18, n=IMPLAUSIBLE_EVERY)} = 0 THEN {IMPLAUSIBLE_VALUE!r}
                    ELSE round(list_extract({means}, k) + list_extract({sds}, k) * ({h.format(salt=16, n=2001)} - 1000) / 577.0, 1)
               END AS value_as_number,
               CAST(list_extract({units}, k) AS INTEGER) AS unit_concept_id
        FROM (SELECT range, {pick} AS k,
                     TIMESTAMP '2022-01-01' + to_seconds(CAST({h.format(salt=17, n=3 * 365 * 86400)} AS BIGINT)) AS ts
              FROM range({readings}))
        ) TO '{out['measurement']}' (FORMAT parquet, ROW_GROUP_SIZE 122880)""")
    (folder / "meta.json").write_text(json.dumps(data_identity(patients, readings)))


#: One reading in IMPLAUSIBLE_EVERY holds IMPLAUSIBLE_VALUE, outside every signal's plausible range:
#: the node's validation drops those rows, as it drops a hospital's device errors.
IMPLAUSIBLE_EVERY = 10_000
IMPLAUSIBLE_VALUE = 5000.0

#: Every concept the generator writes. A cached hospital is reused only when these ids are the
#: ones the code reads today: data written under older ids matches none of the cohort's filters.
GENERATED_CONCEPTS = ("male", "female", "hypertension", "obesity", "hyperlipidemia", "type2_diabetes",
                      "amlodipine", "lisinopril", "metformin", "current_smoker", "sbp", "dbp", "glucose",
                      "heart_rate", "bmi")


def data_identity(patients: int, readings: int) -> dict[str, Any]:
    """What a generated folder must match to be reused: its size and the concept ids it holds."""
    return {"patients": patients, "readings": readings,
            "concepts": {name: cid(name) for name in GENERATED_CONCEPTS},
            "types": [TYPE_DEVICE, TYPE_SELF_REPORT, TYPE_EHR],
            "units": {name: cid(CONCEPTS[name].unit) for name in ("sbp", "dbp", "glucose", "heart_rate", "bmi")},
            "implausible_every": IMPLAUSIBLE_EVERY, "drug_end": True}


def connect(folder: Path, *, threads: int, memory_limit: str) -> Any:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}; SET memory_limit = '{memory_limit}'; "
                f"SET temp_directory = '{folder / 'spill'}'")
    return con


_PLAIN = """SELECT person_id, measurement_concept_id, avg(value_as_number) AS mean,
       stddev_samp(value_as_number) AS sd, count(*) AS readings
FROM {readings}
GROUP BY person_id, measurement_concept_id"""


def _signal_readings(folder: Path) -> str:
    """The device and self-reported readings of the four signals in the 90-day window (by date, as the cohort's)."""
    index = f"DATE '{INDEX.isoformat()}'"
    return f"""read_parquet('{folder / 'measurement.parquet'}')
WHERE measurement_concept_id IN ({', '.join(str(cid(s)) for s in SIGNALS)})
  AND measurement_type_concept_id IN ({TYPE_DEVICE}, {TYPE_SELF_REPORT})
  AND measurement_date >= {index} - {-WINDOW[0]} AND measurement_date < {index}"""


def _bmi_readings(folder: Path) -> str:
    """The EHR BMI values of the 365-day look-back (what ``bmi_last`` reads)."""
    index = f"DATE '{INDEX.isoformat()}'"
    return f"""read_parquet('{folder / 'measurement.parquet'}')
WHERE measurement_concept_id = {cid('bmi')} AND measurement_type_concept_id = {TYPE_EHR}
  AND measurement_date >= {index} - {LOOKBACK_DAYS} AND measurement_date < {index}"""


@contextmanager
def plain_all(folder: Path, *, threads: int, memory_limit: str) -> Iterator[Callable[[], int]]:
    """The plain group-by over the file: avg, sd and count of every reading, per person and concept."""
    con = connect(folder, threads=threads, memory_limit=memory_limit)
    query = _PLAIN.format(readings=f"read_parquet('{folder / 'measurement.parquet'}')")
    yield lambda: con.sql(query).to_arrow_table().num_rows


@contextmanager
def plain_same(folder: Path, *, threads: int, memory_limit: str) -> Iterator[Callable[[], int]]:
    """The plain group-by over the readings the cohort reads: the signals' window and the EHR BMI look-back."""
    con = connect(folder, threads=threads, memory_limit=memory_limit)
    columns = "person_id, measurement_concept_id, value_as_number"
    readings = (f"(SELECT {columns} FROM {_signal_readings(folder)} "
                f"UNION ALL SELECT {columns} FROM {_bmi_readings(folder)})")
    query = _PLAIN.format(readings=readings)
    yield lambda: con.sql(query).to_arrow_table().num_rows


@contextmanager
def plain_signals(folder: Path, *, threads: int, memory_limit: str) -> Iterator[Callable[[], int]]:
    """The plain group-by over the signals' window alone (no look-back): the strictest baseline."""
    con = connect(folder, threads=threads, memory_limit=memory_limit)
    query = _PLAIN.format(readings=_signal_readings(folder))
    yield lambda: con.sql(query).to_arrow_table().num_rows


@contextmanager
def summaries(folder: Path, *, threads: int, memory_limit: str) -> Iterator[Callable[[], int]]:
    """The same per-person summaries the cohort's covariates are, hand-written, without the cohort logic.

    Per person and signal over the window: mean, sd, slope (3 readings over 7 days, per 30
    days), share at or above the threshold, days with a reading; and the last EHR BMI of the
    look-back, all by date as the cohort's. Long (person, signal) rows, no target,
    exclusion, label or reshaping.
    """
    from models.clinical_tasks import SIGNALS as SIGNAL_DEFS

    con = connect(folder, threads=threads, memory_limit=memory_limit)
    index = f"DATE '{INDEX.isoformat()}'"
    t = f"CAST(measurement_date - {index} AS DOUBLE)"
    thresholds = " ".join(f"WHEN {cid(s)} THEN {SIGNAL_DEFS[s].threshold}" for s in SIGNALS)
    signals = f"""
        SELECT person_id, measurement_concept_id, avg(value_as_number) AS mean,
               stddev_samp(value_as_number) AS sd,
               CASE WHEN count(*) >= 3 AND max({t}) - min({t}) >= 7 THEN 30 * regr_slope(value_as_number, {t}) END AS slope,
               avg(CAST(value_as_number >= CASE measurement_concept_id {thresholds} END AS DOUBLE)) AS frac_above,
               count(DISTINCT measurement_date) / {-WINDOW[0]}.0 AS days
        FROM {_signal_readings(folder)}
        GROUP BY person_id, measurement_concept_id"""
    bmi = f"""
        SELECT person_id, max({{'t': measurement_date, 'v': value_as_number}}).v AS bmi_last
        FROM {_bmi_readings(folder)}
        GROUP BY person_id"""
    yield lambda: con.sql(signals).to_arrow_table().num_rows + con.sql(bmi).to_arrow_table().num_rows


@contextmanager
def cohort(folder: Path, *, threads: int, memory_limit: str) -> Iterator[Callable[[], int]]:
    """The node's own path: the folder opened as a validated snapshot, then ``build_cohort``."""
    from clients.hospital_node.data.cohorts import build_cohort
    from clients.hospital_node.data.sources import OmopSource, open_snapshot

    definition = CohortDefinition.from_mapping({
        "task": "hypertension_onset", "index_date": INDEX.isoformat(), "covariates": COVARIATES,
        "reading_window_days": list(WINDOW)})
    with open_snapshot(OmopSource("folder", str(folder)), scratch=folder / "scratch", today=SNAPSHOT) as snapshot:
        snapshot.connection.execute(f"SET threads = {threads}; SET memory_limit = '{memory_limit}'")
        yield lambda: build_cohort(snapshot.connection, definition).num_rows


VARIANTS = {"plain_all": plain_all, "plain_same": plain_same, "plain_signals": plain_signals,
            "summaries": summaries, "cohort": cohort}


def child(variant: str, folder: Path, *, threads: int, memory_limit: str) -> None:
    work = VARIANTS[variant]
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with work(folder, threads=threads, memory_limit=memory_limit) as run:
        # Before the timed part: a connection (plain, summaries); the snapshot's validation (cohort).
        setup, setup_cpu, setup_peak = time.perf_counter() - started, _cpu_seconds() - cpu_started, _peak_rss_mib()
        _reset_peak_rss()
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        rows = run()
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
        peak = _peak_rss_mib()
    print(json.dumps({"variant": variant, "seconds": seconds, "cpu_seconds": cpu, "rows": rows,
                      "peak_rss_mib": peak, "setup_seconds": setup, "setup_cpu_seconds": setup_cpu,
                      "setup_peak_rss_mib": setup_peak}))


def _peak_rss_mib() -> float:
    """The process's peak resident memory since start or since :func:`_reset_peak_rss` (Linux's VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start the peak over (Linux: writing 5 to clear_refs resets VmHWM), so a query's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared VM it moves much less with the load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _duckdb_version() -> str:
    import duckdb

    return str(duckdb.__version__)


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--readings", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medfed_cohort_bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    folder = args.workdir / f"p{args.patients}_r{args.readings}"
    if args.child:
        child(args.child, folder, threads=args.threads, memory_limit=args.memory_limit)
        return 0

    meta = folder / "meta.json"
    wanted = data_identity(args.patients, args.readings)
    if not meta.exists() or json.loads(meta.read_text()) != wanted:
        started = time.perf_counter()
        generate(folder, patients=args.patients, readings=args.readings, threads=args.threads,
                 memory_limit=args.memory_limit)
        print(f"generated {args.patients:,} patients, {args.readings:,} readings in "
              f"{time.perf_counter() - started:.1f} s ({folder})", flush=True)
    load_at_start = os.getloadavg()  # the VM is shared: a busy start explains a slow run
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--patients", str(args.patients),
                 "--readings", str(args.readings), "--threads", str(args.threads),
                 "--memory-limit", args.memory_limit, "--workdir", str(args.workdir)],
                check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[variant].append(result)
            setup = (f"  (after validating the snapshot: {result['setup_seconds']:.2f} s, "
                     f"{result['setup_cpu_seconds']:.2f} s CPU, peak RSS {result['setup_peak_rss_mib']:.0f} MiB)"
                     if variant == "cohort" else "")
            print(f"  {variant:13s} {result['seconds']:7.2f} s  {result['cpu_seconds']:7.2f} s CPU  peak RSS {result['peak_rss_mib']:7.0f} MiB  "
                  f"{result['rows']:,} rows{setup}", flush=True)
    summary = {
        variant: {"median_s": statistics.median(r["seconds"] for r in rs),
                  "median_cpu_s": statistics.median(r["cpu_seconds"] for r in rs),
                  "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "rows": rs[-1]["rows"],
                  "seconds": [r["seconds"] for r in rs],
                  "setup_median_s": statistics.median(r["setup_seconds"] for r in rs),
                  "setup_median_cpu_s": statistics.median(r["setup_cpu_seconds"] for r in rs),
                  "setup_peak_rss_mib": max(r["setup_peak_rss_mib"] for r in rs)}
        for variant, rs in runs.items()
    }
    ratios = {
        baseline: {"wall": summary["cohort"]["median_s"] / summary[baseline]["median_s"],
                   "cpu": summary["cohort"]["median_cpu_s"] / summary[baseline]["median_cpu_s"]}
        for baseline in VARIANTS if baseline != "cohort"
    }
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "duckdb": _duckdb_version(), "commit": _commit(),
        "load_average_start": load_at_start, "load_average": os.getloadavg(),
        "patients": args.patients, "readings": args.readings,
        "threads": args.threads, "memory_limit": args.memory_limit, "repeats": args.repeats,
        "variants": summary, "cohort_ratio_to": ratios,
    }
    for baseline, ratio in ratios.items():
        print(f"cohort / {baseline} = {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU")
    validation = summary["cohort"]
    print(f"goal: cohort <= 1.5x a plain group-by; the cohort's snapshot was validated first (once per "
          f"opening): {validation['setup_median_s']:.2f} s, {validation['setup_median_cpu_s']:.2f} s CPU, "
          f"peak RSS {validation['setup_peak_rss_mib']:.0f} MiB; load average {load_at_start} at start, "
          f"{os.getloadavg()} at end; DuckDB {report['duckdb']}, commit {report['commit']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
