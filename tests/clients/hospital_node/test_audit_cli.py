"""`medfed node audit`: show and verify through the Typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.hospital_node import cli as node_cli
from clients.hospital_node.audit_cli import HOME_ENVVAR, audit_app, payload_summary
from clients.hospital_node.errors import AuditVerificationError, NodeError, NodeHomeError
from clients.hospital_node.home import NodeHome
from privacy.keys import fingerprint, generate_keypair, load_public_key

runner = CliRunner()


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    home = NodeHome.create(tmp_path / "node", name="hospital_2")
    log = home.audit_log()
    log.append("request", {"spec_hash": "ab" * 32, "partner": "acme"})
    log.append("approval", {"spec_hash": "ab" * 32, "epsilon_cap": 1.0})
    for round_ in range(1, 4):
        log.append("charge", {"dataset": "htn_cohort", "round": round_, "epsilon": 0.1 * round_})
    log.append("release", {"digest": "sha256:" + "0" * 64, "bytes": 2048})
    return home


def _home(node: NodeHome) -> list[str]:
    return ["--home", str(node.path)]


def _last_hash(node: NodeHome) -> str:
    last = node.audit_log_path.read_bytes().split(b"\n")[-2]
    return str(json.loads(last)["hash"])


def test_home_envvar_matches_the_node_cli() -> None:
    assert HOME_ENVVAR == node_cli.HOME_ENVVAR


def test_verify_an_untouched_log(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["verify", *_home(node)])
    assert result.exit_code == 0, result.output
    last = _last_hash(node)
    key = load_public_key(node.audit_public_key_path)
    assert result.output.splitlines() == [
        f"audit log ok: 6 entries, head {last[:12]}",
        f"signed by node key {fingerprint(key)}",
    ]


def test_verify_an_edited_log_lists_each_problem(node: NodeHome) -> None:
    lines = node.audit_log_path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"round":2', b'"round":9')  # line 4, seq 3
    del lines[1]  # line 2, seq 1
    node.audit_log_path.write_bytes(b"\n".join(lines))
    result = runner.invoke(audit_app, ["verify", *_home(node)])
    error = result.exception
    assert isinstance(error, AuditVerificationError)
    assert isinstance(error, NodeError)  # so `medfed` prints it and exits 2
    assert error.problems == (
        "line 2 (seq 2): deleted — seq 1 is missing before it",
        "line 3 (seq 3): edited — hash does not match its content: it was changed after it was signed",
    )
    message = str(error)
    assert message.startswith(f"audit log {node.audit_log_path} failed verification, 2 problems:\n")
    assert "  line 3 (seq 3): edited — hash does not match its content" in message


def test_verify_against_the_officers_copy_of_the_key(node: NodeHome, tmp_path: Path) -> None:
    stranger = generate_keypair(tmp_path / "elsewhere", "not_the_node")
    result = runner.invoke(audit_app, ["verify", *_home(node), "--public-key", str(stranger.public_key_path)])
    assert isinstance(result.exception, AuditVerificationError)
    assert "no entry's signature verifies with key" in str(result.exception)
    officer_copy = tmp_path / "officer.pub"
    officer_copy.write_text(node.audit_public_key_path.read_text())
    assert runner.invoke(audit_app, ["verify", *_home(node), "--public-key", str(officer_copy)]).exit_code == 0


def test_verify_a_home_that_has_audited_nothing(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "fresh", name="hospital_3")
    result = runner.invoke(audit_app, ["verify", *_home(home)])
    assert result.exit_code == 0
    assert result.output.strip() == "audit log ok: 0 entries (nothing has been audited yet)"


def test_verify_without_the_public_key_asks_for_one(node: NodeHome) -> None:
    node.audit_public_key_path.unlink()
    result = runner.invoke(audit_app, ["verify", *_home(node)])
    assert isinstance(result.exception, NodeHomeError)
    assert "pass --public-key" in str(result.exception)


def test_show_lists_every_entry(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "audit log of node hospital_2" in result.output
    for kind in ("request", "approval", "charge", "release"):
        assert kind in result.output
    assert "dataset=htn_cohort, epsilon=0.2, round=2" in result.output


def test_show_filters_by_kind_and_keeps_the_last(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--kind", "charge", "--last", "2", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["seq"], r["kind"], r["payload"]["round"]) for r in records] == [(3, "charge", 2), (4, "charge", 3)]


def test_show_json_prints_the_stored_lines(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--json"])
    assert result.output.encode() == node.audit_log_path.read_bytes()


def test_show_an_unknown_kind_suggests_one(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--kind", "charges"])
    assert isinstance(result.exception, NodeError)
    assert str(result.exception) == "--kind 'charges' is not an audit kind; did you mean 'charge'?"


def test_show_an_empty_log(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "fresh", name="hospital_3")
    result = runner.invoke(audit_app, ["show", *_home(home)])
    assert result.output.strip() == "no audit entries on node 'hospital_3'"
    assert not home.audit_key_path.exists()  # reading never creates the key


def test_payload_summary_shortens_long_values() -> None:
    summary = payload_summary({"b": "x" * 40, "a": [1, 2], "c": {"k": None}})
    assert summary == f"a=[1,2], b={'x' * 23}…, c={{\"k\":null}}"
    assert len(payload_summary({f"k{i}": i for i in range(40)}, width=30)) == 30

