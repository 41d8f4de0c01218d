"""`medfed node privacy-check`: one-run auditing of a run's DP-SGD mechanism on the node's own data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from clients.hospital_node import cli as node_cli
from clients.hospital_node.errors import NodeHomeError, PrivacyCheckError
from clients.hospital_node.governance import approve
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.privacy_check import (
    AUDIT_KIND,
    audit_mechanism,
    find_run,
    run_privacy_check,
)
from clients.hospital_node.rounds import answer
from experiments.spec import ExperimentSpec
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from models.tabular import build_tabular_model
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.events import GAUSSIAN, DPEvent
from privacy.keys import load_public_key
from privacy.ledger import PrivacyLedger

from .conftest import OFFICER, example_spec, govern, signed_message

runner = CliRunner()
RUN = "77"
ROUNDS = 3  # x 20 steps (one epoch at sample rate 0.05): 60 DP-SGD steps, as a short run trains


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = int(RUN), 1, 1


def _spec(target_epsilon: float, *, rounds: int = ROUNDS) -> ExperimentSpec:
    """The example spec at `target_epsilon` over 60 DP-SGD steps: `rounds` rounds of 60 / rounds / 20 epochs."""
    return example_spec(
        federation={"rounds": rounds, "local_epochs": ROUNDS // rounds},
        privacy={"noise_multiplier": None, "target_epsilon": target_epsilon},
    )


def _home(folder: Path) -> NodeHome:
    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(cohort, index=False)
    home = NodeHome.create(folder / "home", name="hospital_4")
    home.register_dataset(
        DatasetEntry(name="htn_cohort", path=cohort, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    return home


def _train(home: NodeHome, spec: ExperimentSpec, rounds: int = ROUNDS) -> None:
    """Run `rounds` real training rounds of `spec` through the node's message handler."""
    govern(home, "htn_cohort", approve_spec=spec)
    model = build_tabular_model(spec.model.kind, len(FEATURES))
    for server_round in range(1, rounds + 1):
        message = signed_message(MessageType.TRAIN, spec, server_round=server_round, arrays=ArrayRecord(model.state_dict()))
        reply = answer("train", message, {"home": str(home.path)})
        assert not reply.has_error(), reply.error
        model.load_state_dict(reply.content["arrays"].to_torch_state_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> NodeHome:
    """A node home that trained run 77 of the example spec at epsilon 3 (three rounds)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = int(RUN), 1, 1
    home = _home(tmp_path_factory.mktemp("trained"))
    _train(home, _spec(3.0))
    return home


def _entries(home: NodeHome) -> int:
    return len(home.audit_log().entries())


def _copy(home: NodeHome, folder: Path) -> NodeHome:
    """A copy of `home` for a test that changes it (the dataset file stays where it is)."""
    shutil.copytree(home.path, folder / "home")
    return NodeHome.open(folder / "home")


def _run_charges(home: NodeHome) -> list[DPEvent]:
    with PrivacyLedger.open(home.ledger_path) as ledger:
        return [c.event for c in ledger.charges("htn_cohort") if c.run_id == RUN and c.round >= 1]


# ---------------------------------------------------------------- what the check finds and records


def test_the_check_retrains_the_runs_recorded_mechanism(trained: NodeHome) -> None:
    mechanism = find_run(trained, RUN)
    events = _run_charges(trained)
    assert [(p.noise_multiplier, p.sample_rate, p.steps) for p in mechanism.phases] == [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in events
    ]
    assert len(events) == ROUNDS and mechanism.steps == ROUNDS * 20
    # Clipping and learning rate are the spec's (the example's), read from the run's release records.
    assert (mechanism.max_grad_norm, mechanism.learning_rate, mechanism.delta) == (1.0, 0.5, 1e-5)
    # The charge beside the bound is this run's DP-SGD, as the ledger composes it; its other releases come on top.
    assert mechanism.epsilon_charged == epsilon(events, delta=1e-5, accountant=LEDGER_ACCOUNTANT)
    assert 2.9 < mechanism.epsilon_charged <= 3.0 < mechanism.epsilon_run < 3.1


def test_the_bound_is_recorded_beside_the_runs_charge_in_the_signed_audit_log(trained: NodeHome) -> None:
    before = _entries(trained)
    result = run_privacy_check(trained, RUN, seed=1)
    assert 0.1 < result.bound.epsilon < 1.5 and not result.exceeds_charge  # epsilon 3 (measured 0.37)
    assert (result.bound.canaries, result.bound.confidence, result.bound.delta, result.bound.options) == (1000, 0.95, 1e-5, 14)
    entries = trained.audit_log().entries()
    assert len(entries) == before + 1
    record = entries[-1]
    assert (record.kind, record.seq) == (AUDIT_KIND, result.audit_seq)
    assert record.payload == result.to_mapping()
    assert record.payload["epsilon_lower_bound"] == result.bound.epsilon
    assert record.payload["epsilon_charged"] == result.mechanism.epsilon_charged
    assert "Steinke, Nasr, Jagielski" in record.payload["method"] and "arXiv:2305.08846" in record.payload["method"]
    # What it holds: the run, the mechanism, canaries and guesses; no patient count, no row of data.
    assert set(record.payload) == {
        "run", "dataset", "spec_digest", "submission", "method", "mechanism", "canaries", "guess_options", "guesses",
        "correct", "k_plus", "k_minus", "confidence", "delta", "epsilon_lower_bound", "epsilon_charged", "epsilon_run",
        "accountant", "exceeds_charge", "by",
    }
    assert trained.audit_log().verify(load_public_key(trained.audit_public_key_path)).ok
    with PrivacyLedger.open(trained.ledger_path) as ledger:  # the check released nothing: no charge
        assert len(ledger.charges("htn_cohort")) == 1 + ROUNDS


def test_the_same_seed_gives_the_same_check(trained: NodeHome) -> None:
    first = run_privacy_check(trained, RUN, canaries=300, seed=5)
    second = run_privacy_check(trained, RUN, canaries=300, seed=5)
    assert first.bound == second.bound and first.audit_seq + 1 == second.audit_seq


def test_without_dp_the_same_schedule_is_bounded_far_higher(trained: NodeHome) -> None:
    from clients.hospital_node.privacy_check import _training_rows

    mechanism = find_run(trained, RUN)
    x, y = _training_rows(trained, mechanism, "test")
    kwargs = {"phases": mechanism.phases, "max_grad_norm": 1.0, "learning_rate": 0.5, "delta": 1e-5, "seed": 1}
    plain = audit_mechanism(x, y, private=False, **kwargs)
    private = audit_mechanism(x, y, **kwargs)
    # Without noise an excluded canary never moves: 400 of 400 guesses right, the most 1000 canaries show.
    assert (plain.guesses, plain.correct) == (400, 400)
    assert 3.8 < plain.epsilon < 4.5
    assert plain.epsilon > private.epsilon + 2.5


# ---------------------------------------------------------------- the epsilon sweep


@pytest.fixture(scope="module")
def sweep(trained: NodeHome, tmp_path_factory: pytest.TempPathFactory) -> dict[float, object]:
    """Checks (seed 1) of runs trained at epsilon 1, 3 and 8, and of the same schedule without DP."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = int(RUN), 1, 1
    results: dict[float, object] = {3.0: run_privacy_check(trained, RUN, seed=1)}
    for target in (1.0, 8.0):
        # The same 60 steps in one round of 3 epochs: one message to train instead of three.
        home = _home(tmp_path_factory.mktemp(f"eps{target:g}"))
        _train(home, _spec(target, rounds=1), rounds=1)
        results[target] = run_privacy_check(home, RUN, seed=1)
    return results


# Bands around what seed 1 measured (0.04, 0.37, 1.14); seeds 1-8 gave 0-0.28, 0.27-0.92, 0.98-1.97.
@pytest.mark.slow
@pytest.mark.parametrize(("target", "low", "high"), [(1.0, 0.0, 0.5), (3.0, 0.1, 1.5), (8.0, 0.5, 3.0)])
def test_a_dp_sgd_run_is_bounded_below_its_charge(sweep: dict[float, object], target: float, low: float, high: float) -> None:
    result = sweep[target]
    assert target * 0.98 < result.mechanism.epsilon_charged <= target  # the target the coordinator met
    assert low <= result.bound.epsilon <= high
    assert result.bound.epsilon < result.mechanism.epsilon_charged and not result.exceeds_charge


@pytest.mark.slow
def test_the_bound_grows_with_the_charged_epsilon_and_stays_far_below_no_dp(sweep: dict[float, object], trained: NodeHome) -> None:
    from clients.hospital_node.privacy_check import _training_rows

    bounds = [sweep[target].bound.epsilon for target in (1.0, 3.0, 8.0)]
    assert bounds == sorted(bounds)
    mechanism = find_run(trained, RUN)
    x, y = _training_rows(trained, mechanism, "test")
    plain = audit_mechanism(
        x, y, phases=mechanism.phases, max_grad_norm=1.0, learning_rate=0.5, delta=1e-5, private=False, seed=1
    )
    assert plain.epsilon > 2 * max(bounds) and plain.epsilon > 3.5


# ---------------------------------------------------------------- bad input: clear messages, nothing written


def test_an_unknown_run_is_refused_naming_the_runs_that_can_be_checked(trained: NodeHome) -> None:
    before = trained.audit_log_path.read_bytes()
    with pytest.raises(PrivacyCheckError, match=r"run '999' has no charge in this node's privacy ledger.*trained with DP-SGD: 77"):
        run_privacy_check(trained, "999")
    assert trained.audit_log_path.read_bytes() == before


def test_a_run_that_trained_no_model_is_refused(trained: NodeHome, tmp_path: Path) -> None:
    home = _copy(trained, tmp_path)
    with PrivacyLedger.open(home.ledger_path) as ledger:  # a statistics study's release, run 88
        ledger.charge("htn_cohort", run_id="88", round=1, noise_multiplier=2.0, sample_rate=1.0, steps=1, mechanism=GAUSSIAN)
    before = home.audit_log_path.read_bytes()
    with pytest.raises(PrivacyCheckError, match=r"run '88' trained no model with DP-SGD on dataset 'htn_cohort' \(its charges here are gaussian"):
        run_privacy_check(home, "88")
    assert home.audit_log_path.read_bytes() == before


def test_a_home_whose_audit_log_does_not_verify_is_refused(trained: NodeHome, tmp_path: Path) -> None:
    home = _copy(trained, tmp_path)
    lines = home.audit_log_path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"htn_cohort"', b'"htn_cohorT"', 1)
    home.audit_log_path.write_bytes(b"\n".join(lines))
    before = home.audit_log_path.read_bytes()
    with pytest.raises(PrivacyCheckError, match="audit log failed verification.*the privacy check ran nothing and wrote nothing"):
        run_privacy_check(home, RUN)
    assert home.audit_log_path.read_bytes() == before


def test_a_ledger_that_lacks_the_runs_charges_is_refused(trained: NodeHome, tmp_path: Path) -> None:
    home = _copy(trained, tmp_path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home.ledger_path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(PrivacyCheckError, match=r"the privacy ledger lacks \d+ charge\(s\) its audit log records"):
        run_privacy_check(home, RUN)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"canaries": 10}, r"--canaries must be an integer in 100\.\.100000; found 10"), ({"confidence": 1.0}, r"--confidence must be in \[0\.5, 1\)")],
)
def test_options_out_of_range_are_refused(trained: NodeHome, options: dict[str, float], message: str) -> None:
    before = trained.audit_log_path.read_bytes()
    with pytest.raises(PrivacyCheckError, match=message):
        run_privacy_check(trained, RUN, **options)
    assert trained.audit_log_path.read_bytes() == before


def test_a_run_without_recorded_instruction_takes_the_spec_its_request_recorded(tmp_path: Path) -> None:
    # The node met the spec (its request holds it), admitted the run (a submission entry), and
    # charged round 1 before recording its release (a crash: spend never hidden).
    home = _home(tmp_path)
    govern(home, "htn_cohort")
    spec = _spec(3.0)
    query = lambda: answer("query", signed_message(MessageType.QUERY, spec), {"home": str(home.path)})  # noqa: E731
    assert query().has_error()  # awaiting approval: the request is recorded
    approve(home, spec.digest(), dataset="htn_cohort", by=OFFICER)
    assert not query().has_error()
    with PrivacyLedger.open(home.ledger_path) as ledger:
        [reservation] = ledger.run_reservations("htn_cohort")
        [event] = reservation.events
        ledger.charge("htn_cohort", run_id=RUN, round=1, noise_multiplier=event.noise_multiplier, sample_rate=0.05,
                      steps=20, submission=reservation.submission)
    mechanism = find_run(home, RUN)
    assert (mechanism.max_grad_norm, mechanism.learning_rate, mechanism.spec_digest) == (1.0, 0.5, spec.digest())
    assert mechanism.instruction.features == tuple(spec.data.features or ()) and mechanism.steps == 20


# ---------------------------------------------------------------- the command


def test_the_command_prints_the_bound_beside_the_charge(trained: NodeHome) -> None:
    result = runner.invoke(node_cli.app, ["privacy-check", "--home", str(trained.path), "--run", RUN, "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"privacy check of run {RUN} on dataset 'htn_cohort'")
    assert "noise multiplier 0.979" in lines[2] and "60 steps over 3 round(s), clipping norm 1, learning rate 0.5" in lines[2]
    assert any(line.startswith("  empirical epsilon lower bound: 0.") and "at 95% confidence (delta 1e-05)" in line for line in lines)
    assert any(line.startswith("  epsilon charged for this run's DP-SGD: 2.99") for line in lines)
    assert lines[-1].endswith("nothing left the node")


def test_the_command_prints_json_for_machines(trained: NodeHome) -> None:
    result = runner.invoke(
        node_cli.app, ["privacy-check", "--home", str(trained.path), "--run", RUN, "--seed", "2", "--canaries", "200", "--json"]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    seq = printed.pop("audit_seq")
    [entry] = [e for e in trained.audit_log().entries() if e.seq == seq]
    assert printed == entry.payload and printed["canaries"] == 200


def test_the_command_exits_with_one_clear_line_on_bad_input(trained: NodeHome) -> None:
    before = trained.audit_log_path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "node", "privacy-check", "--home", str(trained.path), "--run", "999"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: run '999' has no charge in this node's privacy ledger") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert trained.audit_log_path.read_bytes() == before


def test_the_command_refuses_a_folder_that_is_no_node_home(tmp_path: Path) -> None:
    result = runner.invoke(node_cli.app, ["privacy-check", "--home", str(tmp_path / "nowhere"), "--run", RUN])
    assert isinstance(result.exception, NodeHomeError)
    assert not (tmp_path / "nowhere").exists()


def test_a_bound_above_the_charge_is_reported_as_a_finding(trained: NodeHome) -> None:
    from dataclasses import replace

    from clients.hospital_node.privacy_check import PrivacyCheckResult
    from clients.hospital_node.privacy_check_cli import report_lines

    checked = run_privacy_check(trained, RUN, canaries=200, seed=3)
    # What a leaky training would show: the same record with a bound above the run's charge.
    leaky = PrivacyCheckResult(checked.mechanism, replace(checked.bound, epsilon=4.0), checked.audit_seq)
    assert leaky.exceeds_charge and leaky.to_mapping()["exceeds_charge"] is True
    lines = report_lines(leaky)
    assert lines[-2].startswith("  FINDING: the lower bound is above the charged epsilon. At 95% confidence")
    assert not checked.exceeds_charge and lines[-1].endswith("nothing left the node")
