"""`medfed study validate`, `cost` and `submit`'s mistakes: clear errors naming the field, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from experiments.errors import SpecError
from experiments.study import StudySpec, study_cost
from experiments.study_cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "experiments" / "examples" / "htn_onset_survival.toml"

runner = CliRunner()


@pytest.fixture
def bad_study(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    text = (
        EXAMPLE.read_text()
        .replace('filter = "age >= 18"', 'filter = "age >= 18; drop table patients"')
        .replace("epsilon = 1.0", "epsilon = 0")
    )
    path.write_text(text)
    return path


def test_validate_prints_the_name_the_digest_and_the_plans_size() -> None:
    result = runner.invoke(app, ["validate", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    spec = StudySpec.from_toml(EXAMPLE)
    assert result.output == (
        f"ok: htn-onset-survival-by-sex ({spec.digest()[:12]})\n"
        "dataset 'htn_cohort': 1 statistic(s) over 2 cell(s), 2 DP release(s)\n"
    )


def test_cost_shows_each_release_and_the_charge_per_site() -> None:
    plan = study_cost(StudySpec.from_toml(EXAMPLE))
    table = runner.invoke(app, ["cost", str(EXAMPLE)], env={"COLUMNS": "120"})
    assert table.exit_code == 0, table.output
    assert "discrete-laplace" in table.output and f"ε = {plan.epsilon_charged_per_site:.3f}" in table.output
    as_json = json.loads(runner.invoke(app, ["cost", "--json", str(EXAMPLE)]).output)
    assert as_json["epsilon_charged_per_site"] == plan.epsilon_charged_per_site
    assert [(r["release"], r["mechanism"], r["scale"]) for r in as_json["releases"]] == [
        ("events", "discrete-laplace", 2.0), ("total", "discrete-laplace", 2.0)
    ]


def test_validate_raises_the_spec_error_naming_each_field(bad_study: Path) -> None:
    result = runner.invoke(app, ["validate", str(bad_study)])
    assert isinstance(result.exception, SpecError)
    problems = " ".join(result.exception.problems)
    assert "data.filter" in problems and "privacy.epsilon" in problems
    assert result.output == ""


def test_the_command_line_says_what_is_wrong_in_lines_without_a_traceback(bad_study: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "study", "validate", str(bad_study)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {bad_study} has 2 problems:\n")
    assert "data.filter" in done.stderr and "privacy.epsilon" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_experiment_spec_is_sent_to_medfed_experiment() -> None:
    result = runner.invoke(app, ["cost", str(ROOT / "experiments" / "examples" / "hypertension.toml")])
    assert isinstance(result.exception, SpecError)
    assert "use `medfed experiment` for it" in str(result.exception)


def test_submit_refuses_a_bad_study_before_signing_or_starting_anything(bad_study: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["submit", str(bad_study), "--superlink", "nowhere", "--key", str(tmp_path / "missing.key"),
              "--submissions-dir", str(tmp_path / "subs")],
    )
    assert isinstance(result.exception, SpecError)
    assert not (tmp_path / "subs").exists()
