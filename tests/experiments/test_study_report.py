"""The study report: table width, CSV round trip, PNG plots, one tracked run with every artifact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from experiments.errors import ReportError
from experiments.study_report import (
    CSV_FIELDS,
    Estimate,
    ReportRow,
    log_report,
    metric_key,
    read_csv,
    render_table,
    write_csv,
    write_report,
)
from experiments.tracking import InMemoryTracker, MlflowTracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[ReportRow]:
    """One study of every kind, with a suppressed cell, NaNs, long labels and non-ASCII text."""
    rows = [
        ReportRow("patients", "count", ("40-49", "F"), "count", Estimate(1234.0, 1203.0, 1265.0, 3, note="census count")),
        ReportRow("hba1c_mean_of_diagnosed_diabetics", "mean", ("tier 3",), "mean",
                  Estimate(7.123456789, 6.9, 7.35, 2, note="ratio estimator; delta method, noise + sampling")),
        ReportRow("hba1c_sd", "sd", ("tier 3",), "sd", Estimate(1.2, 1.0, 1.5, 2)),
        ReportRow("gestational_age", "quantile", (), "q0.5", Estimate(39.1, 38.8, 39.4, 3, note="Woodruff")),
        ReportRow("smoking_stroke", "table", (), "exposed, outcome", Estimate(-2.0, 0.0, 9.0, 3)),
        ReportRow("smoking_stroke", "odds_ratio", (), "odds ratio",
                  Estimate(2.1, 1.4, 3.2, 3, note="Woolf; Haldane +0.5 on every cell")),
    ]
    for cell, p in ((("18-39", "F"), 0.05), (("18-39", "M"), 0.07), (("40-64", "F"), 0.21), (("65+", "M"), math.nan)):
        wilson = "Wilson score interval with the noise variance added; in [0, 1]"
        value = Estimate.suppressed_everywhere() if math.isnan(p) else Estimate(p, p - 0.02, p + 0.03, 3, note=wilson)
        rows.append(ReportRow("hypertension_prevalence_by_age_band_and_sex", "proportion", cell, "proportion", value))
    for i, height in enumerate([5.0, 40.0, -3.0]):
        rows.append(ReportRow("gestational_age", "histogram", ("all",), f"[{30 + 4 * i}, {34 + 4 * i})",
                              Estimate(height, max(height - 6, 0), height + 6, 3, note="census count; noise only"),
                              30.0 + 4 * i, 34.0 + 4 * i))
    for cell in (("stroke", "first"), ("stroke", "recurrent")):
        survival = 1.0
        for k in range(12):
            survival *= 0.97
            rows.append(ReportRow("one_year_survival_é", "survival", cell, f"S({30 * (k + 1)})",
                                  Estimate(survival, survival - 0.05, min(survival + 0.04, 1.0), 3),
                                  30.0 * k, 30.0 * (k + 1)))
    return rows


def _same(a: ReportRow, b: ReportRow) -> bool:
    def eq(x: float | None, y: float | None) -> bool:
        return x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y))

    va, vb = a.value, b.value
    return (
        (a.statistic, a.kind, a.cell, a.quantity) == (b.statistic, b.kind, b.cell, b.quantity)
        and eq(a.left, b.left) and eq(a.right, b.right)
        and all(eq(x, y) for x, y in ((va.estimate, vb.estimate), (va.lower, vb.lower), (va.upper, vb.upper)))
        and (va.sites, va.suppressed, va.note) == (vb.sites, vb.suppressed, vb.note)
    )


def test_csv_round_trips_every_field(tmp_path: Path) -> None:
    rows = _rows()
    back = read_csv(write_csv(rows, tmp_path / "estimates.csv"))
    assert len(back) == len(rows)
    assert all(_same(a, b) for a, b in zip(rows, back, strict=True))


def test_read_csv_names_a_bad_header_and_a_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("statistic,kind\n", encoding="utf-8")
    with pytest.raises(ReportError, match="the header must be statistic,kind,cell"):
        read_csv(path)
    write_csv(_rows()[:1], path)
    path.write_text(path.read_text(encoding="utf-8").replace("1234.0", "many"), encoding="utf-8")
    with pytest.raises(ReportError, match="line 2: field 'estimate' does not parse; found 'many'"):
        read_csv(path)


def test_row_refuses_an_unknown_kind() -> None:
    with pytest.raises(ReportError, match="row.kind must be one of count, sum"):
        ReportRow("x", "median", (), "median", Estimate(1, 0, 2, 1))


def test_table_fits_80_columns_and_numbers_its_notes() -> None:
    text = render_table(_rows(), title="Alliance study 7")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "Alliance study 7" in text and "suppressed" in text
    assert "[1] census count" in text
    assert "[1203, 1265]" in text


def test_write_report_writes_the_table_csv_and_one_png_per_plotted_statistic(tmp_path: Path) -> None:
    files = write_report(_rows(), tmp_path / "out")
    names = sorted(p.name for p in files.plots)
    assert names == [
        "histogram_gestational_age.png",
        "prevalence_hypertension_prevalence_by_age_band_and_sex.png",
        "survival_one_year_survival__.png",
    ]
    for path in files.plots:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert read_csv(files.csv)[0].statistic == "patients"
    assert files.table.read_text(encoding="utf-8").startswith("Study estimates")


def test_log_report_records_metrics_and_every_file_in_one_run(tmp_path: Path) -> None:
    tracker = InMemoryTracker()
    rows = _rows()
    log_report(tracker, rows, tmp_path / "out", experiment="studies", run_name="study-7", params={"query": {"epsilon": 1.0}})
    assert tracker.status == "FINISHED" and tracker.params == {"query.epsilon": "1.0"}
    assert set(tracker.files) == {f"study/{p.name}" for p in (tmp_path / "out").iterdir()}
    assert tracker.metrics["patients/40-49.F/count"] == {0: 1234.0}
    assert tracker.metrics["patients/40-49.F/count/lower"] == {0: 1203.0}
    assert not any(key.startswith("gestational_age/all/[") for key in tracker.metrics)  # bins stay in the CSV
    assert not any("65+" in key for key in tracker.metrics)  # suppressed everywhere


def test_metric_keys_use_only_characters_mlflow_accepts() -> None:
    row = ReportRow("km (stroke)", "survival", ("≥65", "F"), "S(365)", Estimate(0.8, 0.7, 0.9, 2))
    assert metric_key(row) == "km _stroke_/_65.F/S_365_"


def test_log_report_marks_the_run_failed_when_writing_fails(tmp_path: Path) -> None:
    tracker = InMemoryTracker()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(OSError):
        log_report(tracker, _rows(), blocker, experiment="studies", run_name="r", params={})
    assert tracker.status == "FAILED" and "Error" in tracker.reason


@pytest.mark.slow
def test_log_report_to_mlflow_keeps_every_artifact(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rows = _rows()
    run_id = log_report(MlflowTracker(uri), rows, tmp_path / "out", experiment="studies", run_name="study-7",
                        params={"query": {"dataset": "stroke_registry", "epsilon": 1.0}}, tags={"medfed.kind": "statistics"})
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"query.dataset": "stroke_registry", "query.epsilon": "1.0"}
    assert run.data.tags["medfed.kind"] == "statistics"
    assert run.data.metrics["smoking_stroke/all/odds ratio"] == 2.1
    logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "study")}
    assert set(logged) == {p.name for p in (tmp_path / "out").iterdir()}
    assert all(size > 0 for size in logged.values())
    downloaded = Path(client.download_artifacts(run_id, "study/estimates.csv", str(tmp_path / "back")))
    assert downloaded.read_bytes() == (tmp_path / "out" / "estimates.csv").read_bytes()
    assert CSV_FIELDS[0] == "statistic"
