"""`federation.fraction_per_round` and `federation.round_deadline_seconds`: validated by field, costed over a node's rounds."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from experiments.cli import app
from experiments.cost import plan_privacy
from experiments.errors import SpecError
from experiments.progress import SiteResult, results_table
from experiments.spec import ExperimentSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "experiments" / "examples" / "hypertension.toml"


def _spec(**federation: object) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE.read_text())
    mapping["federation"].update(federation)
    return ExperimentSpec.from_mapping(mapping, source="spec.toml")


@pytest.mark.parametrize(
    ("federation", "problem"),
    [
        ({"fraction_per_round": 0.0}, "federation.fraction_per_round must be > 0; found 0"),
        ({"fraction_per_round": 1.5}, "federation.fraction_per_round must be <= 1; found 1.5"),
        ({"round_deadline_seconds": 0.0}, "federation.round_deadline_seconds must be > 0; found 0"),
        (
            {"round_timeout_seconds": 60.0, "round_deadline_seconds": 90.0},
            "federation.round_deadline_seconds must be <= federation.round_timeout_seconds (60); found 90; "
            "a round never waits longer than its timeout",
        ),
    ],
)
def test_a_bad_fraction_or_deadline_is_named_by_field(federation: dict[str, object], problem: str) -> None:
    with pytest.raises(SpecError) as caught:
        _spec(**federation)
    assert caught.value.problems == (problem,)


def test_without_sampling_the_spec_digests_as_before() -> None:
    plain = _spec()
    assert "fraction_per_round" not in plain.canonical_json() and "round_deadline_seconds" not in plain.canonical_json()
    assert _spec(fraction_per_round=1.0).digest() == plain.digest()
    assert _spec(fraction_per_round=0.5).digest() != plain.digest()  # what the officer approves says so
    assert plain.federation.deadline_seconds == plain.federation.round_timeout_seconds


def test_the_preview_costs_a_node_over_its_scheduled_rounds_only(tmp_path: Path) -> None:
    every = plan_privacy(_spec(rounds=6))
    half = plan_privacy(_spec(rounds=6, fraction_per_round=0.5))
    third = plan_privacy(_spec(rounds=3))  # what a node of the sampled run trains: 3 rounds
    assert (half.rounds, half.rounds_per_node, half.total_steps) == (6, 3, 3 * half.steps_per_round)
    assert half.epsilon_charged_per_site == pytest.approx(third.epsilon_charged_per_site, rel=1e-12)
    assert half.epsilon_charged_per_site < every.epsilon_charged_per_site  # no amplification claimed, just fewer rounds
    path = tmp_path / "sampled.toml"
    path.write_text(EXAMPLE.read_text().replace("rounds = 5", "rounds = 6\nfraction_per_round = 0.5"))
    result = CliRunner().invoke(app, ["cost", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "3 of 6 (fraction_per_round 0.5; each site reserves and is charged these only" in result.output


def test_the_cli_refuses_a_bad_fraction_with_exit_code_2_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(EXAMPLE.read_text().replace("rounds = 5", "rounds = 5\nfraction_per_round = 2.0"))
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "experiment", "validate", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == f"error: {path} has 1 problem:\n  federation.fraction_per_round must be <= 1; found 2\n"


def test_the_final_table_shows_each_sites_rounds_when_sampled_or_late() -> None:
    results = {
        "hospital_1": SiteResult({}, 1.0, 2.0, {"rounds_scheduled": 2.0, "rounds_aggregated": 1.0, "rounds_late": 1.0, "rounds_no_reply": 0.0}),
        "hospital_2": SiteResult({}, 1.0, 2.0, {"rounds_scheduled": 2.0, "rounds_aggregated": 2.0, "rounds_late": 0.0, "rounds_no_reply": 0.0}),
    }
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(results_table("final", {}, results))
    text = console.export_text()
    assert "rounds replied late (charged, not aggregated)" in text and "rounds with no reply" in text
    on_time = {name: SiteResult({}, 1.0, 2.0, {**r.rounds, "rounds_late": 0.0, "rounds_aggregated": 2.0}) for name, r in results.items()}
    console = Console(width=200, record=True)
    console.print(results_table("final", {}, on_time))
    assert "rounds scheduled" not in console.export_text()  # nothing irregular, not sampled: the table as before
