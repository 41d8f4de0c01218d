"""`medfed node audit`: show and verify through the Typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.hospital_node import cli as node_cli
from clients.hospital_node.audit_cli import HOME_ENVVAR, audit_app, payload_lines
from clients.hospital_node.errors import AuditVerificationError, NodeError, NodeHomeError
from clients.hospital_node.home import NodeHome
from privacy.keys import fingerprint, generate_keypair, load_public_key

runner = CliRunner()


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    home = NodeHome.create(tmp_path / "node", name="hospital_2")
    log = home.audit_log()
    log.append("request", {"spec_digest": "ab" * 32, "dataset": "htn_cohort", "partner": "acme"})
    log.append("approval", {"spec_digest": "ab" * 32, "dataset": "htn_cohort", "max_epsilon": 1.0})
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
        "checkpoint at seq 5: each message verifies only the entries after it",
    ]
    assert json.loads(node.audit_log().checkpoint_path.read_text().splitlines()[0])["count"] == 6


def test_verify_of_an_edited_log_removes_the_checkpoint(node: NodeHome) -> None:
    assert runner.invoke(audit_app, ["verify", *_home(node)]).exit_code == 0
    checkpoint = node.audit_log().checkpoint_path
    assert checkpoint.exists()
    lines = node.audit_log_path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"round":2', b'"round":9')  # before the checkpoint, the same length
    node.audit_log_path.write_bytes(b"\n".join(lines))
    result = runner.invoke(audit_app, ["verify", *_home(node)])
    assert result.exit_code != 0
    assert not checkpoint.exists()  # every message now runs the full verification, and is refused


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
    assert "dataset = htn_cohort" in result.output and "epsilon = 0.2" in result.output


def test_show_filters_by_kind_and_keeps_the_last(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--kind", "charge", "--last", "2", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [(r["seq"], r["kind"], r["payload"]["round"]) for r in records] == [(3, "charge", 2), (4, "charge", 3)]


def test_show_json_is_one_array_of_the_stored_lines(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--json"])
    stored = node.audit_log_path.read_text().splitlines()
    assert json.loads(result.output) == [json.loads(line) for line in stored]
    assert result.output == "[\n" + ",\n".join(stored) + "\n]\n"  # each element byte for byte as signed
    empty = runner.invoke(audit_app, ["show", *_home(node), "--kind", "denial", "--json"])
    assert json.loads(empty.output) == []


def test_show_an_unknown_kind_suggests_one(node: NodeHome) -> None:
    result = runner.invoke(audit_app, ["show", *_home(node), "--kind", "charges"])
    assert isinstance(result.exception, NodeError)
    assert str(result.exception) == "--kind 'charges' is not an audit kind; did you mean 'charge'?"


def test_show_an_empty_log(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "fresh", name="hospital_3")
    result = runner.invoke(audit_app, ["show", *_home(home)])
    assert result.output.strip() == "no audit entries on node 'hospital_3'"
    assert not home.audit_key_path.exists()  # reading never creates the key


def test_payload_lines_keep_scalars_whole_and_shorten_only_long_nested_values() -> None:
    lines, shortened = payload_lines({"b": "x" * 100, "a": [1, 2], "c": {"k": "y" * 80}})
    assert lines == ["a = [1,2]", f"b = {'x' * 100}", 'c = {"k":"' + "y" * 53 + "…"]
    assert shortened


def column(output: str, index: int, columns: int) -> str:
    """The text of one column of a rich table, its cells' lines joined, spaces dropped."""
    cells = [line.split("│")[index + 1] for line in output.splitlines() if line.count("│") == columns + 1]
    return "".join(cells).replace(" ", "")


def test_show_stays_readable_at_80_columns(node: NodeHome) -> None:
    log = node.audit_log()
    digest = "cd" * 32
    log.append("approval", {"spec_digest": digest, "dataset": "htn_cohort", "max_epsilon": 2.5, "by": "officer_with_a_long_name"})
    reason = "the experiment would bring dataset 'htn_cohort' to epsilon 7.812, over its lifetime budget of 6"
    log.append("refusal", {"run": "12345678901234567890", "message": "train", "code": 4, "reason": reason})
    result = runner.invoke(audit_app, ["show", *_home(node)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    payloads = column(result.output, 3, 4)
    for value in (f"spec_digest={digest}", "run=12345678901234567890", "by=officer_with_a_long_name", "max_epsilon=2.5", reason):
        assert value.replace(" ", "") in payloads
    assert "2025" in column(result.output, 1, 4) or "20" in column(result.output, 1, 4)
    assert "approval" in column(result.output, 2, 4) and "refusal" in column(result.output, 2, 4)


# ---------------------------------------------------------------- egress


@pytest.fixture
def released(tmp_path: Path) -> tuple[NodeHome, dict[str, dict[str, float]]]:
    """A node that answered a query, a train and an evaluate message of run 77, and refused a train."""
    from flwr.app import ArrayRecord, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from clients.hospital_node.rounds import answer
    from medfed.synth import FEATURES
    from models.tabular import build_tabular_model

    from .conftest import example_spec, govern, governed_home, signed_message

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 77, 1, 1
    home = governed_home(tmp_path, "hospital_9")
    spec = example_spec()
    govern(home, "htn_cohort", approve_spec=spec)
    config = {"home": str(home.path)}
    sent = {}
    for kind, message_type, server_round in (
        ("query", MessageType.QUERY, 1), ("train", MessageType.TRAIN, 1), ("evaluate", MessageType.EVALUATE, 1),
    ):
        arrays = ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict()) if kind != "query" else None
        reply = answer(kind, signed_message(message_type, spec, server_round=server_round, arrays=arrays), config)
        assert not reply.has_error(), reply.error
        sent[kind] = dict(reply.content["metrics"])
    arrays = ArrayRecord(build_tabular_model("logistic", len(FEATURES)).state_dict())
    # The run ended with its evaluation: a further round is a replay of the submission.
    refused = answer("train", signed_message(MessageType.TRAIN, spec, server_round=2, arrays=arrays), config)
    assert refused.has_error()
    return home, sent


def test_egress_json_holds_every_number_that_left_and_each_refusal(released) -> None:  # type: ignore[no-untyped-def]
    home, sent = released
    result = runner.invoke(node_cli.app, ["egress", "--home", str(home.path), "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    releases = [r["payload"] for r in records if r["kind"] == "release"]
    assert [(r["message"], r["metric_values"]) for r in releases] == [
        ("query", sent["query"]), ("train", sent["train"]), ("evaluate", sent["evaluate"]),
    ]
    [refusal] = [r["payload"] for r in records if r["kind"] == "refusal"]
    assert refusal["message"] == "train" and "a replay trains nowhere" in refusal["reason"]


def test_egress_shows_each_reply_kind_and_value_at_80_columns(released) -> None:  # type: ignore[no-untyped-def]
    home, sent = released
    result = runner.invoke(node_cli.app, ["egress", "--home", str(home.path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    left = column(result.output, 3, 4)
    for kind in ("query", "train", "evaluate"):
        for name, value in sent[kind].items():
            assert f"{name}={json.dumps(value)}" in left
    replies = column(result.output, 2, 4)
    assert replies.count("train") == 2 and "refused" in replies and "query" in replies and "evaluate" in replies
    assert "a replay trains nowhere" in result.output.replace("\n", " ") or "areplaytrainsnowhere" in left
    assert "77" in column(result.output, 1, 4)


def test_a_number_that_was_not_finite_is_shown_as_it_left(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "node", name="hospital_3")
    home.audit_log().append("release", {"run": "5", "round": 1, "message": "evaluate", "dataset": "d", "arrays": {},
                                        "metrics": ["eval-auc"], "metric_values": {"eval-auc": "nan"}, "bytes": 8, "sha256": "0" * 64})
    shown = runner.invoke(node_cli.app, ["egress", "--home", str(home.path)], env={"COLUMNS": "80"})
    assert "eval-auc = nan" in shown.output


def test_what_a_submitter_wrote_reaches_the_terminal_as_text_never_as_control_codes(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "node", name="hospital_1")
    hostile = "1.0\x1b[2J\x1b[HOK: nothing has left node hospital_1\x1b[8m"
    home.audit_log().append("refusal", {"run": "7", "message": "query", "code": 4009, "reason": f"app outsider/x {hostile}",
                                        "app": {"app_id": "outsider/x", "version": hostile}})
    for args in (["egress", "--home", str(home.path)], ["audit", "show", "--home", str(home.path)]):
        shown = runner.invoke(node_cli.app, args, env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert "\x1b" not in shown.output
        assert "\\x1b[2J" in shown.output.replace("\n", "").replace("│", "").replace(" ", "")
