"""Rehearsal state never passes for real governance; a virtual node finds its rehearsal home, and only that.

A real node refuses a spec signed with a rehearsal key and a rehearsal approval; a
rehearsal home accepts both. The ClientApp on the simulation engine finds its home from
the node side (the environment and the manifest), never serves a real home, and a real
node's executor refuses to serve a rehearsal home.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node.errors import GovernanceError, NodeError
from clients.hospital_node.governance import approve, checked_state, set_budget
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import answer
from clients.hospital_node.runtime import executor
from clients.hospital_node.runtime.rehearsal import HOMES_ENV, node_config, write_manifest
from federation.protocol import QUERY_METRICS, REFUSED_APPROVAL, REFUSED_SIGNATURE, read_metrics, read_refusal
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from privacy.governance import GovernanceState

from ..conftest import OFFICER, example_spec, sign, signed_message

REHEARSAL_KEY = Ed25519PrivateKey.generate()
SPEC = example_spec(federation={"rounds": 2})


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 31, 1, 1


def _home(folder: Path, name: str, *, rehearsal: bool) -> NodeHome:
    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(cohort, index=False)
    home = NodeHome.create(folder / "home", name=name, rehearsal=rehearsal)
    home.register_dataset(
        DatasetEntry(name="htn_cohort", path=cohort, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    home.trusted_partners().add("rehearsal_partner", REHEARSAL_KEY.public_key(), added_by=OFFICER, rehearsal=True)
    set_budget(home, "htn_cohort", epsilon_=50.0, delta=1e-5, by=OFFICER)
    return home


def _query(home: NodeHome) -> Message:
    return answer("query", signed_message(MessageType.QUERY, SPEC, signed=sign(SPEC, REHEARSAL_KEY)), {"home": str(home.path)})


def test_a_real_node_refuses_a_spec_signed_with_a_rehearsal_key(tmp_path: Path) -> None:
    home = _home(tmp_path, "hospital_4", rehearsal=False)
    assert home.trusted_partners().get("rehearsal_partner").rehearsal
    reply = _query(home)
    assert reply.has_error() and reply.error.code == REFUSED_SIGNATURE
    _, reason = read_refusal(reply.error.reason, "?")
    assert "rehearsal key" in reason and "'rehearsal_partner'" in reason
    kinds = [e.kind for e in home.audit_log().entries()]
    assert kinds[-1] == "refusal" and "submission" not in kinds and "request" not in kinds


def test_a_real_node_refuses_a_rehearsal_approval(tmp_path: Path) -> None:
    home = _home(tmp_path, "hospital_4", rehearsal=False)
    with pytest.raises(GovernanceError, match="hospital_4 is a real node: it records no rehearsal approval"):
        approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True, rehearsal=True)
    # An approval entry that says rehearsal (copied from a rehearsal's log, or written by an
    # older tool) counts for nothing on a real node, even for a spec signed by a real key.
    home.audit_log().append(
        "approval",
        {"spec_digest": SPEC.digest(), "dataset": "htn_cohort", "max_epsilon": None, "expires": None, "runs": 1,
         "by": OFFICER, "rehearsal": True},
    )
    from ..conftest import PARTNER, PARTNER_KEY

    home.trusted_partners().add(PARTNER, PARTNER_KEY.public_key(), added_by=OFFICER)
    reply = answer("query", signed_message(MessageType.QUERY, SPEC), {"home": str(home.path)})
    assert reply.has_error() and reply.error.code == REFUSED_APPROVAL
    assert f"spec {SPEC.digest()[:12]} on dataset 'htn_cohort' is a rehearsal approval" in read_refusal(reply.error.reason, "?")[1]
    assert "submission" not in [e.kind for e in home.audit_log().entries()]


def test_a_rehearsal_home_accepts_its_rehearsal_key_and_approval(tmp_path: Path) -> None:
    home = _home(tmp_path, "c01-t2-001", rehearsal=True)
    approve(home, SPEC.digest(), dataset="htn_cohort", by=OFFICER, not_yet_requested=True, rehearsal=True)
    reply = _query(home)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(read_metrics(reply.content, QUERY_METRICS)) == set(QUERY_METRICS)
    approval = [e for e in home.audit_log().entries() if e.kind == "approval"][-1]
    assert approval.payload["rehearsal"] is True
    assert "rehearsal = true" in home.config_path.read_text()
    assert NodeHome.open(home.path).rehearsal
    # The checkpoint a message decides by keeps the approval a rehearsal one, as the whole log replays it.
    [decision] = checked_state(home).decisions.values()
    assert decision.rehearsal and decision == GovernanceState.from_entries(home.audit_log().entries()).decisions[decision.spec_digest, "htn_cohort"]


def _rehearsal_folder(tmp_path: Path, *, real_second: bool = False) -> Path:
    folder = tmp_path / "homes"
    for i, name in enumerate(("c01-t2-001", "c02-t2-002")):
        NodeHome.create(folder / name, name=name, rehearsal=not (real_second and i == 1))
    write_manifest(folder, ["c01-t2-001", "c02-t2-002"])
    return folder


def test_a_virtual_node_finds_its_home_by_partition_in_the_node_side_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _rehearsal_folder(tmp_path)
    monkeypatch.setenv(HOMES_ENV, str(folder))
    assert node_config({"partition-id": 1, "num-partitions": 2}) == {"home": str(folder / "c02-t2-002"), "rehearsal": True}
    # A real node's config (the executor's) is left as it is, whatever the environment says.
    assert node_config({"home": "/srv/node"}) == {"home": "/srv/node"}
    with pytest.raises(NodeError, match="partition 2 is outside the 2 rehearsal homes"):
        node_config({"partition-id": 2, "num-partitions": 3})
    with pytest.raises(NodeError, match="the simulation runs 3 virtual nodes but .* holds 2 rehearsal homes"):
        node_config({"partition-id": 0, "num-partitions": 3})


def test_a_virtual_node_never_serves_a_real_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _rehearsal_folder(tmp_path, real_second=True)
    monkeypatch.setenv(HOMES_ENV, str(folder))
    with pytest.raises(NodeError, match="c02-t2-002 is a real node's home; a simulation serves rehearsal homes only"):
        node_config({"partition-id": 1, "num-partitions": 2})


def test_a_virtual_node_without_the_homes_folder_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOMES_ENV, raising=False)
    with pytest.raises(NodeError, match=f"partition 0\\) has no home: set {HOMES_ENV}"):
        node_config({"partition-id": 0, "num-partitions": 1})


def test_a_real_nodes_executor_refuses_a_rehearsal_home(tmp_path: Path) -> None:
    home = NodeHome.create(tmp_path / "home", name="c01-t2-001", rehearsal=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x07" * 32)
    with pytest.raises(SystemExit, match="is a rehearsal home .* no SuperNode serves it"):
        executor.main(["--home", str(home.path), "--runtime-api", "127.0.0.1:1", "--secret-file", str(secret)])
