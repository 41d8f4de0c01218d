"""`medfed node score`: score this hospital's current patients with approved weights, locally.

Mounted by ``clients.hospital_node.cli``; user mistakes raise node errors, which
``medfed.cli.main`` prints as one line with exit code 2.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import typer

from clients.hospital_node.errors import ScoringError

__all__ = ["score"]

_HOME_ENVVAR = "MEDFED_NODE_HOME"  # as clients.hospital_node.cli.HOME_ENVVAR, which imports this module


def _as_of(text: str | None) -> date:
    if text is None:
        return date.today()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ScoringError(f"--as-of must be a date (YYYY-MM-DD); found {text!r}") from None


def score(
    weights: Path = typer.Argument(..., help="The final_model.safetensors of an approved experiment."),
    home: Path = typer.Option(..., "--home", envvar=_HOME_ENVVAR, help="The node home folder."),
    dataset: str = typer.Option(..., "--dataset", help="The registered OMOP dataset whose patients to score."),
    as_of: str | None = typer.Option(None, "--as-of", help="The scoring date, YYYY-MM-DD (default: today)."),
    threshold: float = typer.Option(0.2, "--threshold", help="Flag patients whose risk is above this."),
    out: Path | None = typer.Option(
        None, "--out", help="Owner-only folder for scores.csv and scores.html (default: <home>/scoring/<dataset>-<date>)."
    ),
) -> None:
    """Score the dataset's current patients with approved weights; write a CSV and an HTML page. Nothing leaves the node."""
    from clients.hospital_node.data.scoring import approved_weights, omop_connection, score_patients
    from clients.hospital_node.home import NodeHome

    day = _as_of(as_of)
    if not 0.0 <= threshold <= 1.0:
        raise ScoringError(f"--threshold must be a risk in [0, 1]; found {threshold}")
    node = NodeHome.open(home)
    entry = node.dataset(dataset)
    approved = approved_weights(node, weights, dataset=dataset)  # before any patient data is opened
    with omop_connection(entry) as connection:
        result = score_patients(
            node, approved, dataset=dataset, connection=connection, as_of=day, threshold=threshold, out=out
        )
    record = result.record
    typer.echo(
        f"scored {record.patients_scored} patients of dataset {dataset!r} on {day.isoformat()}: "
        f"{record.patients_flagged} flagged, {record.patients_with_alerts} with rule alerts"
    )
    typer.echo(f"  {result.csv_path}")
    typer.echo(f"  {result.html_path}")
    typer.echo(f"  keys map back to patients in {result.lookup_path} (keep it inside the hospital)")
