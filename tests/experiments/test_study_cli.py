"""`medfed study validate`, `cost` and `submit`'s mistakes: clear errors naming the field, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from experiments.errors import SpecError, SubmissionError
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
        "answers: each site's noisy answer, in plain (each is DP on its own)\n"
    )


@pytest.fixture
def secure_study(tmp_path: Path) -> Path:
    path = tmp_path / "secure.toml"
    path.write_text(EXAMPLE.read_text() + "\n[federation]\nsecure_aggregation = true\n")
    return path


def test_validate_and_cost_say_that_the_answers_are_securely_aggregated(secure_study: Path) -> None:
    shown = runner.invoke(app, ["validate", str(secure_study)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.endswith(
        "answers: securely aggregated (SecAgg+, federation.secure_aggregation = true): the coordinator sees only the "
        "totals over the sites, at least 2\n"
    )
    assert json.loads(runner.invoke(app, ["cost", "--json", str(secure_study)]).output)["secure_aggregation"] is True
    assert json.loads(runner.invoke(app, ["cost", "--json", str(EXAMPLE)]).output)["secure_aggregation"] is False


def test_a_bad_federation_table_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad_federation.toml"
    path.write_text(EXAMPLE.read_text() + "\n[federation]\nsecure_aggregation = \"yes\"\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert isinstance(result.exception, SpecError)
    assert list(result.exception.problems) == ["federation.secure_aggregation must be true or false; found 'yes'"]


def test_submit_refuses_too_few_sites_for_secure_aggregation_before_signing(secure_study: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["submit", str(secure_study), "--superlink", "nowhere", "--key", str(tmp_path / "missing.key"),
              "--submissions-dir", str(tmp_path / "subs"), "--min-sites", "1"],
    )
    assert isinstance(result.exception, SubmissionError)
    assert str(result.exception).startswith(
        "--min-sites 1 is too few for a study with federation.secure_aggregation = true: SecAgg+ sums the answers of "
        "at least 2 sites"
    )
    assert not (tmp_path / "subs").exists()


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
