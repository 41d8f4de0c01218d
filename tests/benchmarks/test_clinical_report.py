"""The clinical report on a small generated alliance: files, MLflow run, small-site check, DP band, node path.

Slow (about a minute together): one task end to end with the DP rows in process, then one
DP row through the real node path on three sites.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.report_module import clinical_report

pytestmark = pytest.mark.slow

TASK = "diabetes_onset"


def _module():  # type: ignore[no-untyped-def]
    return clinical_report()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("clinical-report")
    code = _module().main(["--out", str(out), "--task", TASK, "--hospitals", "6", "--scale", "0.5", "--repeats", "3",
                           "--dp-path", "in-process"])
    return code, out


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / TASK / "report.csv").open() as handle:
        return {row["row"]: row for row in csv.DictReader(handle)}


def test_the_report_files_are_written(report: tuple[int, Path]) -> None:
    _, out = report
    folder = out / TASK
    assert {"report.md", "report.csv", "reliability.png", "per_site.png"} <= {p.name for p in folder.iterdir()}
    for image in ("reliability.png", "per_site.png"):
        assert (folder / image).read_bytes().startswith(b"\x89PNG")
    text = (folder / "report.md").read_text()
    assert "Threshold for sensitivity/specificity/PPV/NPV" in text and "Small sites (fewer than 300 patients)" in text
    rows = _rows(out)
    assert list(rows) == ["local-only", "pooled", "federated", "federated, DP ε≈1", "federated, DP ε≈4",
                          "oracle (generator's true risk)"]
    for row in rows.values():
        assert float(row["auc_low"]) < float(row["auc"]) < float(row["auc_high"])
        assert math.isfinite(float(row["calibration_slope"])) and 0.0 <= float(row["sensitivity"]) <= 1.0
    # The DP rows were charged about their targets (DP-SGD alone, composed by PLD as a ledger does).
    assert float(rows["federated, DP ε≈1"]["epsilon_charged"]) == pytest.approx(1.0, abs=0.02)
    assert float(rows["federated, DP ε≈4"]["epsilon_charged"]) == pytest.approx(4.0, abs=0.05)


def test_the_mlflow_run_holds_the_metrics_and_artifacts(report: tuple[int, Path]) -> None:
    from mlflow.tracking import MlflowClient

    _, out = report
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("clinical-report")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == TASK and run.info.status == "FINISHED"
    assert {"federated.auc", "local_only.auc", "oracle.auc", "federated.calibration_slope", "check.holds"} <= set(run.data.metrics)
    assert run.data.metrics["check.holds"] == 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.md", "report.csv", "reliability.png", "per_site.png"}


def test_federated_beats_local_only_at_the_small_sites(report: tuple[int, Path]) -> None:
    code, out = report
    assert code == 0  # the script's own check held
    rows = _rows(out)
    # The split the nodes use (seed 0): within-site pairs at the small sites.
    assert float(rows["federated"]["small_sites_auc"]) > float(rows["local-only"]["small_sites_auc"])


def test_the_dp_rows_lie_in_a_band_below_the_federated_row(report: tuple[int, Path]) -> None:
    _, out = report
    rows = _rows(out)
    federated = float(rows["federated"]["auc"])
    for name in ("federated, DP ε≈1", "federated, DP ε≈4"):
        auc = float(rows[name]["auc"])
        # Below (noise and clipping cost discrimination), not far below, and better than chance;
        # a DP row above the non-DP one would mean the noise went missing.
        assert federated - 0.25 <= auc <= federated + 0.03, (name, auc, federated)
        assert auc > 0.55
    assert float(rows["oracle (generator's true risk)"]["auc"]) >= federated - 0.02


def test_a_dp_row_through_the_node_path_charges_each_ledger_what_was_planned(tmp_path: Path) -> None:
    cr = _module()
    from experiments.cost import plan_privacy
    from medfed.synth_omop import write_omop_alliance

    alliance = write_omop_alliance(tmp_path / "alliance", n_hospitals=3, seed=11, patients_scale=0.5)
    spec = cr.spec_for_task(TASK)
    sites = [s for s in (cr.load_site(site, spec, tmp_path / "scratch").arrays() for site in alliance) if s is not None]
    result = cr.dp_node_path(spec, cr.schedule_of(spec), sites, 4.0, workdir=tmp_path / "dp", alliance=alliance)

    planned = plan_privacy(cr.dp_spec(spec, 4.0))
    assert "not accepted" not in result.path
    assert result.charged == pytest.approx({s.name: planned.epsilon_charged_per_site for s in sites})
    assert result.noise_multiplier == pytest.approx(planned.noise_multiplier)
    scores = np.concatenate([cr.scores_of(result.model, s.x_val) for s in sites])
    labels = np.concatenate([s.y_val for s in sites]).astype(np.int8)
    from models.clinical_metrics import auc_delong

    assert 0.55 <= auc_delong(scores, labels).auc <= 0.95
