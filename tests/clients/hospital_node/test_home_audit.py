"""The node home's audit log and the key that signs it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from clients.hospital_node.errors import NodeHomeError
from clients.hospital_node.home import NodeHome
from privacy.errors import KeyFileError
from privacy.keys import load_public_key


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    return NodeHome.create(tmp_path / "node", name="hospital_1")


def test_audit_paths_live_in_the_home(node: NodeHome) -> None:
    assert node.audit_log_path == node.path / "audit.jsonl"
    assert node.audit_key_path == node.path / "keys" / "node_audit.key"
    assert node.audit_public_key_path == node.path / "keys" / "node_audit.pub"


def test_first_use_creates_the_audit_key_pair(node: NodeHome) -> None:
    assert not node.audit_key_path.exists()
    log = node.audit_log()
    assert stat.S_IMODE(node.audit_key_path.stat().st_mode) == 0o600
    entry = log.append("key", {"event": "audit key created"})
    assert log.path == node.audit_log_path
    assert log.verify(load_public_key(node.audit_public_key_path)).ok
    assert entry.seq == 0


def test_later_uses_keep_the_same_key(node: NodeHome) -> None:
    node.audit_log().append("key", {})
    key_bytes = node.audit_key_path.read_bytes()
    reopened = NodeHome.open(node.path).audit_log()
    reopened.append("approval", {"spec_hash": "ab" * 32})
    assert node.audit_key_path.read_bytes() == key_bytes
    result = reopened.verify(load_public_key(node.audit_public_key_path))
    assert result.ok and result.count == 2


def test_a_lost_key_is_never_silently_replaced(node: NodeHome) -> None:
    node.audit_log().append("key", {})
    node.audit_key_path.unlink()
    with pytest.raises(NodeHomeError, match="audit key .*node_audit.key is missing .*restore the key from backup"):
        node.audit_log()
    assert not node.audit_key_path.exists()


def test_an_exposed_key_is_refused(node: NodeHome) -> None:
    node.audit_log()
    node.audit_key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="run `chmod 600"):
        node.audit_log()
