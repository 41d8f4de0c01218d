"""The federated model's pooled calibration curve: a CSV and a PNG beside the run's other artifacts.

Rows come from the pooled noisy validation-score histograms (post-processing, see
:mod:`models.evaluation`): per score bin with patients in it, the bin's bounds, its
(noisy) number of patients, the predicted risk it stands for and the observed fraction
of positives. Nothing here reads patient data.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from experiments.study_report import new_figure

__all__ = ["CALIBRATION_CSV", "CALIBRATION_PNG", "CalibrationRow", "write_calibration"]

CALIBRATION_CSV = "calibration.csv"
CALIBRATION_PNG = "calibration.png"


class CalibrationRow(Protocol):
    """One bin of a calibration curve (models.evaluation.CalibrationBin has these)."""

    low: float
    high: float
    patients: float
    predicted: float
    observed: float


def write_calibration(rows: Sequence[CalibrationRow], directory: Path, *, auc: float) -> list[Path]:
    """Write ``calibration.csv`` and ``calibration.png`` into `directory`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / CALIBRATION_CSV
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["score_low", "score_high", "patients", "predicted_risk", "observed_risk"])
        for row in rows:
            writer.writerow([f"{row.low:.6g}", f"{row.high:.6g}", f"{row.patients:.0f}", f"{row.predicted:.6g}", f"{row.observed:.6g}"])
    figure = new_figure(5.0, 5.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    if rows:
        biggest = max(row.patients for row in rows) or 1.0
        axes.scatter(
            [row.predicted for row in rows],
            [row.observed for row in rows],
            s=[20 + 180 * row.patients / biggest for row in rows],
            color="C0",
            alpha=0.8,
            label="score bin (area: patients)",
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("predicted risk")
    axes.set_ylabel("observed fraction with the outcome")
    axes.set_title(f"pooled validation calibration (AUC {auc:.3f})")
    axes.legend(loc="upper left", fontsize="small")
    picture = directory / CALIBRATION_PNG
    figure.savefig(picture, format="png")
    return [table, picture]
