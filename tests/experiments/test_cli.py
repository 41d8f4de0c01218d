"""`medfed experiment validate` and `cost`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from experiments.cli import app
from experiments.cost import plan_privacy
from experiments.errors import SpecError
from experiments.spec import ExperimentSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "experiments" / "examples" / "hypertension.toml"

runner = CliRunner()


@pytest.fixture
def bad_spec(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    text = EXAMPLE.read_text().replace("rounds = 5", "rounds = 0").replace("delta = 1e-5", "delta = 1.5")
    path.write_text(text)
    return path


def test_validate_prints_the_name_and_the_digest() -> None:
    result = runner.invoke(app, ["validate", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    spec = ExperimentSpec.from_toml(EXAMPLE)
    assert result.output == (
        f"ok: htn-onset-logistic ({spec.digest()[:12]})\n"
        "secure aggregation: off (the coordinator sees each site's DP-noised update)\n"
    )


def test_validate_and_cost_show_secure_aggregation(tmp_path: Path) -> None:
    path = tmp_path / "secagg.toml"
    text = EXAMPLE.read_text().replace("min_nodes = 2", "min_nodes = 3\nsecure_aggregation = true\nsecagg_reconstruction_threshold = 2")
    path.write_text(text)
    shown = "SecAgg+ (key shares to every node of the round, reconstruction threshold 2; the coordinator sees only the sum)"
    validated = runner.invoke(app, ["validate", str(path)])
    assert validated.exit_code == 0, validated.output
    assert validated.output.splitlines()[1] == f"secure aggregation: {shown}"
    costed = runner.invoke(app, ["cost", str(path)], env={"COLUMNS": "200"})
    assert costed.exit_code == 0, costed.output
    assert "secure aggregation" in costed.output and "SecAgg+ (key shares to every node" in costed.output
    as_json = json.loads(runner.invoke(app, ["cost", "--json", str(path)]).output)
    assert as_json["secure_aggregation"] == {"enabled": True, "num_shares": None, "reconstruction_threshold": 2}


def test_validate_raises_the_spec_error_with_every_problem(bad_spec: Path) -> None:
    result = runner.invoke(app, ["validate", str(bad_spec)])
    assert isinstance(result.exception, SpecError)
    assert result.exception.problems == (
        "federation.rounds must be >= 1; found 0",
        "privacy.delta must be < 1; found 1.5",
    )
    assert result.output == ""


def test_cost_prints_the_plan_as_a_table() -> None:
    result = runner.invoke(app, ["cost", str(EXAMPLE)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    plan = plan_privacy(ExperimentSpec.from_toml(EXAMPLE))
    lines = {line.strip("│ ").split("│")[0].strip(): line.strip("│ ").split("│")[-1].strip()
             for line in result.output.splitlines() if line.count("│") == 3}
    assert lines == {
        "noise multiplier σ": "1.000",
        "sample rate q": "0.05",
        "steps per round": "20 (1 local epoch × 20 steps)",
        "rounds": "5",
        "total steps": "100",
        "δ": "1e-05",
        "ε per site, planning estimate (PRV)": f"{plan.epsilon_per_site:.3f}",
        "ε of the DP-SGD rounds per site (PLD)": f"{plan.epsilon_training_charged_per_site:.3f}",
        "ε of the training-set size (once, discrete Laplace)": "0.1",
        "ε of the validation-score histogram (discrete Laplace)": "0.5 once, final model",
        "ε charged per site (PLD)": f"{plan.epsilon_charged_per_site:.3f}",
        "secure aggregation": "off (the coordinator sees each site's DP-noised update)",
    }


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_cost_names_the_target_the_noise_came_from(tmp_path: Path) -> None:
    path = tmp_path / "target.toml"
    text = EXAMPLE.read_text().replace("noise_multiplier = 1.0", "target_epsilon = 4.0")
    path.write_text(text.replace('accountant = "prv"', 'accountant = "rdp"'))
    result = runner.invoke(app, ["cost", str(path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "(from target ε = 4)" in result.output


def test_cost_json_is_the_plan() -> None:
    result = runner.invoke(app, ["cost", "--json", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    expected = asdict(plan_privacy(ExperimentSpec.from_toml(EXAMPLE)))
    expected["secure_aggregation"] = {"enabled": False, "num_shares": None, "reconstruction_threshold": None}
    assert json.loads(result.output) == expected


def test_no_arguments_show_the_commands() -> None:
    result = runner.invoke(app, [])
    assert "validate" in result.output and "cost" in result.output


def test_medfed_reports_a_bad_spec_in_one_block_with_exit_code_2(bad_spec: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "experiment", "validate", str(bad_spec)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"error: {bad_spec} has 2 problems:\n"
        "  federation.rounds must be >= 1; found 0\n"
        "  privacy.delta must be < 1; found 1.5\n"
    )
    assert "Traceback" not in done.stderr
