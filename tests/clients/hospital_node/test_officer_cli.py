"""The officer's views tell the truth: a ledger that disagrees with the audit log, what the
node would refuse, approvals nobody asked for, and the policy changed through the CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner, Result

from clients.hospital_node import governance
from clients.hospital_node.cli import app
from clients.hospital_node.errors import GovernanceError, NodeHomeError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.rounds import answer
from medfed.synth import FEATURES, generate_cohort
from models.tabular import build_tabular_model

from .conftest import OFFICER, example_spec, govern, governed_home, signed_message

SPEC = example_spec(federation={"rounds": 2})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 41, 1, 1


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return governed_home(tmp_path, "hospital_5")


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})


def _ask(home: NodeHome, kind: str = "query", server_round: int = 1) -> Message:
    arrays = ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict()) if kind != "query" else None
    kinds = {"query": MessageType.QUERY, "train": MessageType.TRAIN}
    return answer(kind, signed_message(kinds[kind], SPEC, server_round=server_round, arrays=arrays), {"home": str(home.path)})


def _trained_then_ledger_lost(home: NodeHome) -> None:
    """A charged training round, then ledger.sqlite deleted (and its WAL with it)."""
    _ask(home)  # records the request
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER)
    assert not _ask(home, "train").has_error()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home.ledger_path}{suffix}").unlink(missing_ok=True)


# ---------------------------------------------------------------- a ledger that disagrees with the audit log


def test_budget_with_the_ledger_deleted_warns_and_shows_no_remaining_budget(home: NodeHome) -> None:
    _trained_then_ledger_lost(home)
    shown = _cli("budget", "--home", str(home.path))
    assert shown.exit_code == 1
    assert "lacks 2 charge(s) that the signed audit log records" in " ".join(shown.stderr.split())
    row = next(line for line in shown.stdout.splitlines() if "htn_cohort" in line)
    assert "≥ 0.000" in row and "unknown" in row
    assert "50.000" not in shown.stdout  # the whole budget is never shown as remaining


def test_requests_with_the_ledger_deleted_warn_and_project_nothing(home: NodeHome) -> None:
    other = example_spec(federation={"rounds": 3})
    answer("query", signed_message(MessageType.QUERY, other), {"home": str(home.path)})  # pending
    _trained_then_ledger_lost(home)
    shown = _cli("requests", "--home", str(home.path))
    assert shown.exit_code == 1
    assert "lacks 2 charge(s)" in " ".join(shown.stderr.split())
    assert "unknown: the ledger disagrees with the audit log" in shown.stdout
    assert "at least ε 0.000 (the ledger is incomplete)" in shown.stdout


def test_the_evidence_pack_is_written_headed_by_the_disagreement(home: NodeHome, tmp_path: Path) -> None:
    _trained_then_ledger_lost(home)
    out = tmp_path / "pack"
    made = _cli("report", "--out", str(out), "--home", str(home.path))
    assert made.exit_code == 1
    assert "lacks 2 charge(s)" in " ".join(made.stderr.split())
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["ledger_check"]["ok"] is False and len(evidence["ledger_check"]["missing_charges"]) == 2
    assert evidence["warnings"] == ["the privacy ledger lacks 2 charge(s) the audit log records"]
    page = (out / "report.html").read_text()
    assert page.index("WARNING: the privacy ledger lacks 2 charge(s)") < page.index("Audit log verification")
    assert "DISAGREES" in page


def test_a_ledger_that_agrees_gives_clean_views(home: NodeHome, tmp_path: Path) -> None:
    _ask(home)
    governance.approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER)
    assert not _ask(home, "train").has_error()
    assert _cli("budget", "--home", str(home.path)).stderr == ""
    made = _cli("report", "--out", str(tmp_path / "pack"), "--home", str(home.path))
    assert made.exit_code == 0 and made.stderr == ""
    evidence = json.loads((tmp_path / "pack" / "evidence.json").read_text())
    assert evidence["ledger_check"] == {"ok": True, "missing_charges": []}
    replies = [(r["reply"], r["round"]) for r in evidence["replies"]]
    assert replies == [("query refused", None), ("train", 1)]  # awaiting approval, then the round
    [train] = [r for r in evidence["replies"] if r["reply"] == "train"]
    assert any(line.startswith("epsilon = ") for line in train["what_left"])
    assert any(line.startswith("num-examples = ") for line in train["what_left"])


# ---------------------------------------------------------------- approvals nobody asked for


def test_approving_a_full_hash_nobody_requested_needs_the_flag(home: NodeHome) -> None:
    digest = SPEC.digest()
    refused = _cli("approve", digest, "--dataset", "htn_cohort", "--home", str(home.path))
    assert isinstance(refused.exception, GovernanceError)
    assert str(refused.exception) == (
        f"nobody has requested spec {digest} on dataset 'htn_cohort' on this node; check the hash with the "
        "research partner, and pass --not-yet-requested to approve it before its request arrives"
    )
    assert [e.kind for e in home.audit_log().entries()].count("approval") == 0
    approved = _cli("approve", digest, "--dataset", "htn_cohort", "--not-yet-requested", "--home", str(home.path))
    assert approved.exit_code == 0, approved.output
    assert "no request for it has arrived yet" in approved.stdout


def test_a_full_hash_that_was_requested_is_approved_without_the_flag(home: NodeHome) -> None:
    _ask(home)
    assert _cli("approve", SPEC.digest(), "--dataset", "htn_cohort", "--home", str(home.path)).exit_code == 0


# ---------------------------------------------------------------- what the node will refuse, said ahead


def test_requests_and_approve_say_the_cohort_is_too_small_without_its_size(home: NodeHome) -> None:
    govern(home, "htn_cohort", min_cohort_size=100_000)
    _ask(home)
    data_rows = len(generate_cohort(2, n_hospitals=3, seed=7))
    shown = _cli("requests", "--home", str(home.path))
    assert "the node will refuse it" in shown.stdout
    assert "dataset 'htn_cohort' has fewer patients than the minimum cohort of 100000" in " ".join(shown.stdout.split())
    approved = _cli("approve", SPEC.digest()[:12], "--dataset", "htn_cohort", "--home", str(home.path))
    assert approved.exit_code == 0
    warning = " ".join(approved.stderr.split())
    assert "this node will still refuse it when it runs: dataset 'htn_cohort' has fewer patients" in warning
    for text in (shown.stdout, approved.stdout, approved.stderr):
        assert str(data_rows) not in text and str(round(data_rows * 0.8)) not in text


def test_policy_refusals_are_foreseen_by_rule(home: NodeHome) -> None:
    _ask(home)
    cost = governance.pending_requests(home)[0].cost
    assert _cli("policy", "set", "allowed_tasks=imaging-classification", "require_secure_aggregation=true",
                f"max_epsilon_per_experiment={cost / 2}", "--home", str(home.path)).exit_code == 0
    reasons = governance.foreseen_refusals(home, SPEC.digest(), "htn_cohort", max_epsilon=cost / 4)
    assert reasons == [
        "this node's policy does not allow task tabular-classification",
        "this node's policy requires secure aggregation; the spec does not use it",
        f"the experiment would cost epsilon {cost:.3f} on dataset 'htn_cohort', over this node's policy limit per "
        f"experiment of {cost / 2:g}",
        f"the experiment would cost epsilon {cost:.3f} on dataset 'htn_cohort', over the approval cap being set of "
        f"{cost / 4:g}",
    ]


def test_a_request_the_node_would_run_says_so(home: NodeHome) -> None:
    _ask(home)
    assert governance.foreseen_refusals(home, SPEC.digest(), "htn_cohort") == []
    assert "policy and cohort size allow it" in _cli("requests", "--home", str(home.path)).stdout


# ---------------------------------------------------------------- the policy


def test_policy_set_validates_audits_and_writes_owner_only(home: NodeHome) -> None:
    home.policy_path.chmod(0o644)
    changed = _cli("policy", "set", "min_cohort_size=250", "allowed_tasks=tabular-classification",
                   "--home", str(home.path), "--by", "j.doe")
    assert changed.exit_code == 0, changed.output
    assert "policy.min_cohort_size: 100 -> 250" in changed.stdout
    assert "policy.allowed_tasks: tabular-classification, imaging-classification, statistics -> tabular-classification" in changed.stdout
    policy = home.policy()
    assert (policy.min_cohort_size, policy.allowed_tasks) == (250, ("tabular-classification",))
    assert stat.S_IMODE(home.policy_path.stat().st_mode) == 0o600
    [entry] = [e for e in home.audit_log().entries() if e.kind == "policy"]
    assert entry.payload["by"] == "j.doe"
    assert entry.payload["changes"] == {
        "min_cohort_size": {"from": 100, "to": 250},
        "allowed_tasks": {"from": ["tabular-classification", "imaging-classification", "statistics"], "to": ["tabular-classification"]},
    }
    shown = _cli("policy", "show", "--home", str(home.path))
    assert f"as recorded in the audit log (seq {entry.seq}" in shown.stdout
    assert json.loads(_cli("policy", "show", "--json", "--home", str(home.path)).stdout)["min_cohort_size"] == 250


def test_policy_set_reports_every_bad_field_and_changes_nothing(home: NodeHome) -> None:
    before = home.policy_path.read_bytes()
    bad = _cli("policy", "set", "min_cohort_size=0", "reservation_hold_hours=-1", "require_secure_aggregation=maybe",
               "--home", str(home.path))
    assert isinstance(bad.exception, NodeHomeError)
    message = str(bad.exception)
    assert "policy.min_cohort_size must be an integer >= 1; found 0" in message
    assert "policy.reservation_hold_hours must be a number of hours in (0, 8760]; found -1.0" in message
    assert "policy.require_secure_aggregation must be true or false; found 'maybe'" in message
    unknown = _cli("policy", "set", "min_cohort=5", "--home", str(home.path))
    assert "policy.min_cohort is not a policy setting; did you mean 'min_cohort_size'?" in str(unknown.exception)
    assert home.policy_path.read_bytes() == before
    assert "policy" not in [e.kind for e in home.audit_log().entries()]


def test_policy_set_repairs_a_broken_file_field_by_field(home: NodeHome) -> None:
    home.policy_path.write_text("[policy]\nmin_cohort_size = -1\n")
    assert _cli("policy", "set", "min_cohort_size=120", "--home", str(home.path)).exit_code == 0
    assert home.policy().min_cohort_size == 120


def test_policy_show_warns_about_a_hand_edit(home: NodeHome) -> None:
    assert _cli("policy", "set", "min_cohort_size=250", "--home", str(home.path)).exit_code == 0
    home.policy_path.write_text(home.policy_path.read_text().replace("250", "5"))
    shown = _cli("policy", "show", "--home", str(home.path))
    assert "differs from the policy the audit log last recorded" in " ".join(shown.stderr.split())
    never = NodeHome.create(home.path.parent / "fresh", name="fresh")
    assert "no policy change is recorded in the audit log yet" in _cli("policy", "show", "--home", str(never.path)).stdout
