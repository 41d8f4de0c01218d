"""The cohort-building benchmark on a small hospital: every variant runs, the cohort through a validated snapshot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.report_module import benchmark_module


def test_the_benchmark_runs_every_variant_and_the_cohort_goes_through_validation(tmp_path: Path) -> None:
    cohort_build = benchmark_module("cohort_build")
    out = tmp_path / "report.json"
    assert cohort_build.main(["--patients", "2000", "--readings", "200000", "--workdir", str(tmp_path),
                              "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert set(variants) == {"plain_all", "plain_same", "plain_signals", "summaries", "cohort"}
    # plain_all groups every reading: 2,000 people x the 5 concepts the generator writes.
    assert variants["plain_all"]["rows"] == 2000 * 5
    # The same readings as the cohort: the signals' window and the BMI look-back, one group per
    # (person, concept), more groups than the signals' window alone.
    assert variants["plain_signals"]["rows"] < variants["plain_same"]["rows"] <= 2000 * 5
    assert 0 < variants["cohort"]["rows"] < 2000
    # The cohort's snapshot is validated (and timed) apart, before the cohort is timed.
    assert variants["cohort"]["setup_median_s"] > 0
    assert set(report["cohort_ratio_to"]) == {"plain_all", "plain_same", "plain_signals", "summaries"}
