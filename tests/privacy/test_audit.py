"""The audit log: appending, the documented line format, and verify() naming each kind of tampering."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.audit import (
    AUDIT_KINDS,
    GENESIS_HASH,
    PROBLEM_KINDS,
    AuditLog,
    AuditProblem,
    AuditVerification,
)
from privacy.errors import AuditEntryError, AuditError, PrivacyError
from privacy.keys import generate_keypair, load_private_key

N_ENTRIES = 6
APPENDS_PER_PROCESS = 6


def _payload(i: int) -> dict[str, object]:
    return {"dataset": "htn_cohort", "run_id": "run-7", "round": i, "epsilon": 0.25 * i, "note": "café ✓"}


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def _six_entries(key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    audit = AuditLog(tmp_path_factory.mktemp("template") / "audit.jsonl", signing_key=key)
    for i in range(N_ENTRIES):
        audit.append("charge", _payload(i))
    return audit.path.read_bytes(), audit.head_path.read_bytes()


@pytest.fixture
def log(tmp_path: Path, key: Ed25519PrivateKey, _six_entries: tuple[bytes, bytes]) -> AuditLog:
    """A log of six charge entries, seq 0-5 (a copy of one written once per module, as fsyncs are slow)."""
    audit = AuditLog(tmp_path / "audit.jsonl", signing_key=key)
    audit.path.write_bytes(_six_entries[0])
    audit.head_path.write_bytes(_six_entries[1])
    audit.path.chmod(0o640)
    audit.head_path.chmod(0o640)
    return audit


def _lines(log: AuditLog) -> list[bytes]:
    data = log.path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def _rewrite(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(line + b"\n" for line in lines))


def _problems(log: AuditLog, key: Ed25519PrivateKey) -> list[tuple[int, int | None, str]]:
    result = log.verify(key.public_key())
    assert not result.ok
    return [(p.line, p.seq, p.kind) for p in result.problems]


def _record(line: bytes) -> dict[str, object]:
    return json.loads(line)


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hash(record: dict[str, object]) -> str:
    content = {k: record[k] for k in ("seq", "time", "kind", "payload", "prev")}
    return hashlib.sha256(_canonical(content)).hexdigest()


# ---------------------------------------------------------------- appending


def test_entries_chain_from_64_zeros(log: AuditLog) -> None:
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(N_ENTRIES))
    assert entries[0].prev == GENESIS_HASH == "0" * 64
    assert [e.prev for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert entries[3].payload == _payload(3)
    assert entries[3].kind == "charge"
    assert entries[3].time.utcoffset() is not None


def test_each_line_is_the_documented_canonical_json(log: AuditLog, key: Ed25519PrivateKey) -> None:
    line = _lines(log)[2]
    record = _record(line)
    assert sorted(record) == ["hash", "kind", "payload", "prev", "seq", "sig", "time"]
    assert line == _canonical(record)  # sorted keys, compact, ASCII
    assert record["hash"] == _hash(record)
    signature = base64.b64decode(str(record["sig"]))
    key.public_key().verify(signature, b"medfed audit entry v1\n" + str(record["hash"]).encode())


def test_append_returns_what_was_written(log: AuditLog) -> None:
    entry = log.append("approval", {"spec_hash": "ab" * 32, "officer": "j.doe"})
    assert entry.seq == N_ENTRIES
    assert entry.to_json().encode() == _lines(log)[-1]
    assert log.entries()[-1] == entry


def test_head_record_holds_count_and_last_hash(log: AuditLog) -> None:
    head = json.loads(log.head_path.read_text())
    assert head["count"] == N_ENTRIES
    assert head["last"] == log.entries()[-1].hash
    assert log.head_path.name == "audit.jsonl.head"


def test_a_new_log_verifies_empty(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    result = AuditLog(tmp_path / "audit.jsonl").verify(key.public_key())
    assert result == AuditVerification(count=0, last_hash=None, problems=())
    assert result.ok


def test_an_untouched_log_verifies(log: AuditLog, key: Ed25519PrivateKey) -> None:
    result = log.verify(key.public_key())
    assert result.ok
    assert result.count == N_ENTRIES
    assert result.last_hash == log.entries()[-1].hash


def test_a_read_only_log_refuses_to_append(log: AuditLog) -> None:
    reader = AuditLog(log.path)
    assert reader.read_only
    assert len(reader.entries()) == N_ENTRIES
    with pytest.raises(AuditError, match="opened read-only"):
        reader.append("charge", {})


def test_unknown_kind_suggests_a_close_one(log: AuditLog) -> None:
    with pytest.raises(AuditEntryError, match="audit kind 'aproval' is unknown; did you mean 'approval'"):
        log.append("aproval", {})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"when": {1, 2}}, "audit payload payload.when is a set"),
        ({"eps": float("nan")}, "audit payload payload.eps must be a finite number"),
        ({"nested": {3: "x"}}, "payload.nested has a key of type int"),
        (["not", "an", "object"], "an audit payload must be a JSON object; found list"),
        ({"blob": "x" * 70_000}, "the most is 65536"),
    ],
)
def test_payloads_must_be_small_json_objects(log: AuditLog, payload: object, message: str) -> None:
    with pytest.raises(AuditEntryError, match=message):
        log.append("charge", payload)  # type: ignore[arg-type]
    assert len(log.entries()) == N_ENTRIES


def test_tuples_in_payloads_are_stored_as_lists(log: AuditLog) -> None:
    entry = log.append("release", {"shape": (3, 4), "digest": "sha256:00"})
    assert entry.payload["shape"] == [3, 4]


def test_audit_errors_belong_to_the_privacy_tree() -> None:
    assert issubclass(AuditError, PrivacyError)
    assert issubclass(AuditEntryError, AuditError) and issubclass(AuditEntryError, ValueError)


def test_every_governance_event_has_a_kind() -> None:
    assert AUDIT_KINDS == (
        "request", "approval", "denial", "revocation", "refusal",
        "release", "charge", "deidentification", "key", "budget", "app", "submission", "policy", "scoring",
        "privacy_check",
    )  # fmt: skip


def test_log_and_head_are_not_world_readable(log: AuditLog) -> None:
    for path in (log.path, log.head_path):
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0


def test_a_new_log_and_its_head_are_owner_only_whatever_the_umask(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    previous = os.umask(0)
    try:
        audit = AuditLog(tmp_path / "audit.jsonl", signing_key=key)
        audit.append("charge", _payload(0))
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (audit.path, audit.head_path)} == {0o600}


# ---------------------------------------------------------------- tampering, one kind each


def test_edited_payload_is_edited(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"round":2', b'"round":0')
    _rewrite(log, lines)
    result = log.verify(key.public_key())
    assert result.problems == (
        AuditProblem(3, 2, "edited", "hash does not match its content: it was changed after it was signed"),
    )
    assert str(result.problems[0]) == (
        "line 3 (seq 2): edited — hash does not match its content: it was changed after it was signed"
    )


def test_edited_and_rehashed_entry_is_edited(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    record = _record(lines[2])
    record["payload"] = {**_payload(2), "epsilon": 0.0}
    record["hash"] = _hash(record)
    lines[2] = _canonical(record)
    _rewrite(log, lines)
    assert _problems(log, key) == [(3, 2, "edited")]
    assert "its hash recomputed" in log.verify(key.public_key()).problems[0].detail


def test_deleted_middle_entry_is_deleted(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    del lines[3]
    _rewrite(log, lines)
    result = log.verify(key.public_key())
    assert result.problems == (AuditProblem(4, 4, "deleted", "seq 3 is missing before it"),)


def test_deleted_first_entries_are_deleted(log: AuditLog, key: Ed25519PrivateKey) -> None:
    _rewrite(log, _lines(log)[2:])
    result = log.verify(key.public_key())
    assert result.problems == (AuditProblem(1, 2, "deleted", "seq 0-1 are missing before it"),)


def test_deleted_last_entry_is_truncated(log: AuditLog, key: Ed25519PrivateKey) -> None:
    last_hash = log.entries()[-1].hash
    _rewrite(log, _lines(log)[:-1])
    result = log.verify(key.public_key())
    assert result.problems == (
        AuditProblem(
            6,
            5,
            "truncated",
            f"the signed head records 6 entries (last hash {last_hash[:12]}), but the log holds "
            "entries up to seq 4: seq 5 was deleted or lost",
        ),
    )


def test_emptied_log_is_truncated(log: AuditLog, key: Ed25519PrivateKey) -> None:
    log.path.write_bytes(b"")
    assert _problems(log, key) == [(1, 0, "truncated")]
    log.path.unlink()
    assert _problems(log, key) == [(1, 0, "truncated")]


def test_forged_entry_with_a_taken_seq_is_inserted(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    before = _record(lines[2])
    forged: dict[str, object] = {
        "seq": 3,
        "time": before["time"],
        "kind": "approval",
        "payload": {"spec_hash": "ff" * 32},
        "prev": before["hash"],
    }
    forged["hash"] = _hash(forged)
    forged["sig"] = base64.b64encode(Ed25519PrivateKey.generate().sign(b"x")).decode()
    lines.insert(3, _canonical(forged))
    _rewrite(log, lines)
    result = log.verify(key.public_key())
    assert result.problems == (
        AuditProblem(4, 3, "inserted", "it is not signed by the node key, and seq 3 is line 5"),
    )


def test_forged_entry_after_the_last_is_inserted(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    last = _record(lines[-1])
    forged: dict[str, object] = {
        "seq": N_ENTRIES,
        "time": last["time"],
        "kind": "release",
        "payload": {},
        "prev": last["hash"],
    }
    forged["hash"] = _hash(forged)
    forged["sig"] = last["sig"]  # a real signature, but over another hash
    _rewrite(log, [*lines, _canonical(forged)])
    assert _problems(log, key) == [(7, 6, "inserted")]
    assert "past the 6 entries of the signed head" in log.verify(key.public_key()).problems[0].detail


def test_copied_entry_is_inserted(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    _rewrite(log, [*lines[:4], lines[1], *lines[4:]])
    result = log.verify(key.public_key())
    assert result.problems == (AuditProblem(5, 1, "inserted", "it is a copy of line 2"),)


def test_swapped_entries_are_reordered(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(log, lines)
    result = log.verify(key.public_key())
    assert result.problems == (AuditProblem(3, 3, "reordered", "it belongs after seq 2 (line 4)"),)


def test_distant_swap_names_both_moved_entries(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    lines[1], lines[4] = lines[4], lines[1]
    _rewrite(log, lines)
    assert _problems(log, key) == [(2, 4, "reordered"), (5, 1, "reordered")]


def test_flipped_signature_byte_is_bad_signature(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    record = _record(lines[4])
    signature = bytearray(base64.b64decode(str(record["sig"])))
    signature[10] ^= 0x01
    record["sig"] = base64.b64encode(bytes(signature)).decode()
    lines[4] = _canonical(record)
    _rewrite(log, lines)
    result = log.verify(key.public_key())
    assert result.problems == (
        AuditProblem(
            5,
            4,
            "bad-signature",
            "its signature does not verify with the node key (its content is vouched for by the chain)",
        ),
    )


def test_flipped_signature_on_the_last_entry_is_bad_signature(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    record = _record(lines[-1])
    signature = bytearray(base64.b64decode(str(record["sig"])))
    signature[0] ^= 0x80
    record["sig"] = base64.b64encode(bytes(signature)).decode()
    lines[-1] = _canonical(record)
    _rewrite(log, lines)
    assert _problems(log, key) == [(6, 5, "bad-signature")]


def test_last_line_cut_halfway_is_truncated(log: AuditLog, key: Ed25519PrivateKey) -> None:
    data = log.path.read_bytes()
    last = _lines(log)[-1]
    log.path.write_bytes(data[: len(data) - 1 - len(last) // 2])
    result = log.verify(key.public_key())
    assert [(p.line, p.seq, p.kind) for p in result.problems] == [(6, 5, "truncated")]
    assert result.problems[0].detail.startswith("the last line is cut off")


def test_middle_line_cut_halfway_is_malformed(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    lines[2] = lines[2][: len(lines[2]) // 2]
    _rewrite(log, lines)
    assert _problems(log, key) == [(3, 2, "malformed")]


def test_reformatted_line_is_edited(log: AuditLog, key: Ed25519PrivateKey) -> None:
    lines = _lines(log)
    lines[1] = json.dumps(_record(lines[1]), indent=None).encode()  # spaces after ':' and ','
    _rewrite(log, lines)
    assert _problems(log, key) == [(2, 1, "edited")]
    assert "not in the form medfed writes" in log.verify(key.public_key()).problems[0].detail


def test_missing_head_is_reported(log: AuditLog, key: Ed25519PrivateKey) -> None:
    log.head_path.unlink()
    result = log.verify(key.public_key())
    assert [(p.line, p.seq, p.kind) for p in result.problems] == [(0, None, "truncated")]
    assert str(result.problems[0]).startswith("head record: truncated — audit.jsonl.head is missing")


def test_forged_head_is_bad_signature(log: AuditLog, key: Ed25519PrivateKey) -> None:
    head = json.loads(log.head_path.read_text())
    head["count"] = 5
    log.head_path.write_text(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")
    assert _problems(log, key) == [(0, None, "bad-signature")]


def test_another_key_is_one_problem_not_one_per_entry(log: AuditLog) -> None:
    stranger = Ed25519PrivateKey.generate()
    result = log.verify(stranger.public_key())
    assert [(p.line, p.seq, p.kind) for p in result.problems] == [(0, None, "bad-signature"), (1, 0, "bad-signature")]
    assert "no entry's signature verifies with key SHA256:" in result.problems[1].detail


def test_problem_kinds_are_the_documented_ones() -> None:
    assert PROBLEM_KINDS == ("edited", "deleted", "inserted", "reordered", "bad-signature", "malformed", "truncated")


# ---------------------------------------------------------------- appending after damage


def test_append_refuses_to_hide_a_deleted_last_entry(log: AuditLog, key: Ed25519PrivateKey) -> None:
    _rewrite(log, _lines(log)[:-1])
    with pytest.raises(AuditError, match="ends at seq 4 but its signed head records 6 entries .*appending is refused"):
        log.append("charge", {"round": 99})
    assert len(_lines(log)) == N_ENTRIES - 1


def test_append_refuses_without_the_head(log: AuditLog) -> None:
    log.head_path.unlink()
    with pytest.raises(AuditError, match="head record audit.jsonl.head is missing"):
        log.append("charge", {})


def test_append_refuses_a_head_signed_by_another_key(log: AuditLog, tmp_path: Path) -> None:
    other = AuditLog(log.path, signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="is not signed by this node's key"):
        other.append("charge", {})


def test_append_after_a_crash_mid_write_drops_the_partial_line(log: AuditLog, key: Ed25519PrivateKey) -> None:
    with log.path.open("ab") as handle:
        handle.write(b'{"hash":"12')  # a write cut off by a power cut; the head was not rewritten
    entry = log.append("charge", {"round": 6})
    assert entry.seq == N_ENTRIES
    assert log.verify(key.public_key()).ok


def test_append_after_a_crash_before_the_head_continues(log: AuditLog, key: Ed25519PrivateKey) -> None:
    old_head = log.head_path.read_bytes()
    log.append("charge", {"round": 6})
    log.head_path.write_bytes(old_head)  # the crash came between the entry and the head
    assert log.verify(key.public_key()).ok
    assert log.append("charge", {"round": 7}).seq == N_ENTRIES + 1
    assert log.verify(key.public_key()).ok


def test_append_completes_an_entry_that_lost_only_its_newline(log: AuditLog, key: Ed25519PrivateKey) -> None:
    old_head = log.head_path.read_bytes()
    log.append("charge", {"round": 6})
    log.head_path.write_bytes(old_head)
    log.path.write_bytes(log.path.read_bytes()[:-1])
    assert log.append("charge", {"round": 7}).seq == N_ENTRIES + 1
    assert log.verify(key.public_key()).count == N_ENTRIES + 2
    assert log.verify(key.public_key()).ok


def test_entries_skips_a_cut_off_last_line(log: AuditLog) -> None:
    with log.path.open("ab") as handle:
        handle.write(b'{"hash"')
    assert len(log.entries()) == N_ENTRIES


def test_entries_refuses_a_malformed_line(log: AuditLog) -> None:
    lines = _lines(log)
    lines[1] = b"garbage"
    _rewrite(log, lines)
    with pytest.raises(AuditError, match="line 2 of the audit log .* is not an audit entry"):
        log.entries()


def test_append_needs_the_folder(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(AuditError, match="folder .*missing.* does not exist"):
        AuditLog(tmp_path / "missing" / "audit.jsonl", signing_key=key).append("charge", {})


# ---------------------------------------------------------------- processes


def _append_from_another_process(log_path: str, key_path: str, worker: int, start: multiprocessing.synchronize.Event) -> None:
    # Runs in a spawned process, as a Flower ClientApp does: open, append, exit.
    start.wait(timeout=60)
    key = load_private_key(Path(key_path))
    for i in range(APPENDS_PER_PROCESS):
        AuditLog(Path(log_path), signing_key=key).append("charge", {"worker": worker, "i": i})


def test_concurrent_appends_from_processes_form_one_chain(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "keys", "node_audit")
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [
        context.Process(
            target=_append_from_another_process, args=(str(path), str(pair.private_key_path), i, start)
        )
        for i in range(4)
    ]
    try:
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    log = AuditLog(path)
    result = log.verify(pair.public_key)
    assert result.ok, [str(p) for p in result.problems]
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(4 * APPENDS_PER_PROCESS))
    expected = [(w, i) for w in range(4) for i in range(APPENDS_PER_PROCESS)]
    assert sorted((e.payload["worker"], e.payload["i"]) for e in entries) == expected


# ---------------------------------------------------------------- any change is seen


@pytest.fixture(scope="module")
def pristine() -> tuple[bytes, bytes, bytes]:
    """A small log with varied payloads, its head, and the raw public key."""
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as folder:
        log = AuditLog(Path(folder) / "audit.jsonl", signing_key=key)
        log.append("request", {"spec_hash": "ab" * 32, "partner": "acme", "datasets": ["htn_cohort"]})
        log.append("approval", {"epsilon_cap": 1.5e-05, "expires": "2026-12-31", "note": "ok – ünïcode"})
        log.append("charge", {"epsilon": 0.3, "delta": 1e-05, "steps": 120, "nested": {"a": [1, True, None]}})
        log.append("release", {"digest": "sha256:" + "0" * 64, "bytes": 123456})
        raw_public = key.public_key().public_bytes_raw()
        return log.path.read_bytes(), log.head_path.read_bytes(), raw_public


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_is_detected(pristine: tuple[bytes, bytes, bytes], data: st.DataObject) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    log_bytes, head_bytes, raw_public = pristine
    both = log_bytes + head_bytes
    position = data.draw(st.integers(0, len(both) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != both[position]), label="new byte")
    changed = bytearray(both)
    changed[position] = value
    with tempfile.TemporaryDirectory() as folder:
        log = AuditLog(Path(folder) / "audit.jsonl")
        log.path.write_bytes(bytes(changed[: len(log_bytes)]))
        log.head_path.write_bytes(bytes(changed[len(log_bytes) :]))
        result = log.verify(Ed25519PublicKey.from_public_bytes(raw_public))
    assert not result.ok


_LINE_EDITS = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, N_ENTRIES - 1), st.just(0)),
    st.tuples(st.just("swap"), st.integers(0, N_ENTRIES - 1), st.integers(0, N_ENTRIES - 1)),
    st.tuples(st.just("copy"), st.integers(0, N_ENTRIES - 1), st.integers(0, N_ENTRIES)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_LINE_EDITS, min_size=1, max_size=3))
def test_any_deletion_copy_or_reordering_of_lines_is_detected(
    _six_entries: tuple[bytes, bytes], key: Ed25519PrivateKey, edits: list[tuple[str, int, int]]
) -> None:
    lines = _six_entries[0].split(b"\n")[:-1]
    for action, first, second in edits:
        if not lines:
            break
        first %= len(lines)
        if action == "delete":
            del lines[first]
        elif action == "swap":
            second %= len(lines)
            lines[first], lines[second] = lines[second], lines[first]
        else:
            lines.insert(second % (len(lines) + 1), lines[first])
    with tempfile.TemporaryDirectory() as folder:
        log = AuditLog(Path(folder) / "audit.jsonl")
        _rewrite(log, lines)
        log.head_path.write_bytes(_six_entries[1])
        result = log.verify(key.public_key())
    unchanged = lines == _six_entries[0].split(b"\n")[:-1]
    assert result.ok == unchanged
    assert {p.kind for p in result.problems} <= {"deleted", "truncated", "reordered", "inserted"}


# ---------------------------------------------------------------- the checkpoint and the per-message check


def _checkpointed(log: AuditLog, key: Ed25519PrivateKey, *, then: int = 2) -> AuditLog:
    """`log` verified in full, a checkpoint at seq 5 with a small attachment, then `then` more entries."""
    position = log.verify(key.public_key()).position
    assert position is not None and position.count == N_ENTRIES
    assert log.advance_checkpoint(position, {"state": "at seq 5"})
    for i in range(then):
        log.append("release", _payload(N_ENTRIES + i))
    return log


def _tail_problems(log: AuditLog, key: Ed25519PrivateKey) -> list[tuple[int | None, str]]:
    result = log.verify_tail(key.public_key())
    assert not result.missing and not result.ok  # a checkpoint was found and refused, not absent
    return [(p.seq, p.kind) for p in result.problems]


def test_the_tail_check_returns_the_entries_after_the_checkpoint_and_its_attachment(log: AuditLog, key: Ed25519PrivateKey) -> None:
    _checkpointed(log, key)
    result = log.verify_tail(key.public_key())
    assert result.ok, result.problems
    assert [e.seq for e in result.entries] == [6, 7]
    assert result.entries == log.entries()[6:]
    assert result.checkpoint is not None and dict(result.checkpoint.attachment) == {"state": "at seq 5"}
    assert result.checkpoint.position.count == 6
    assert result.position is not None and (result.position.count, result.position.last) == (8, log.entries()[-1].hash)
    # Moved forward, the next check starts at seq 7 and finds nothing after it.
    assert log.advance_checkpoint(result.position, {"state": "at seq 7"})
    again = log.verify_tail(key.public_key())
    assert again.ok and again.entries == () and again.position == result.position


def test_without_a_checkpoint_the_tail_check_verifies_nothing(log: AuditLog, key: Ed25519PrivateKey) -> None:
    result = log.verify_tail(key.public_key())
    assert result.checkpoint is None and result.missing and not result.ok and result.problems == ()


def test_the_checkpoint_never_moves_back(log: AuditLog, key: Ed25519PrivateKey) -> None:
    early = log.verify(key.public_key()).position
    _checkpointed(log, key)
    later = log.verify(key.public_key()).position
    assert later is not None and early is not None
    assert log.advance_checkpoint(later, {"state": "at seq 7"})
    assert not log.advance_checkpoint(early, {"state": "at seq 5"})
    assert json.loads(log.checkpoint_path.read_text().splitlines()[0])["count"] == 8


def test_the_checkpoint_is_owner_only_and_signed_over_its_attachment(log: AuditLog, key: Ed25519PrivateKey) -> None:
    _checkpointed(log, key)
    assert stat.S_IMODE(log.checkpoint_path.stat().st_mode) == 0o600
    header, attachment, signature = log.checkpoint_path.read_bytes().split(b"\n")[:3]
    record = json.loads(header)
    assert sorted(record) == ["count", "end", "last", "start", "time"]
    assert record["last"] == log.entries()[5].hash and record["end"] == len(b"".join(line + b"\n" for line in _lines(log)[:6]))
    assert json.loads(attachment) == {"state": "at seq 5"}
    digest = hashlib.sha256(header + b"\n" + attachment).hexdigest().encode()
    key.public_key().verify(base64.b64decode(signature), b"medfed audit checkpoint v1\n" + digest)


def _edit_payload(line: bytes, **changes: object) -> bytes:
    record = _record(line)
    record["payload"] = {**record["payload"], **changes}  # type: ignore[dict-item]
    return _canonical(record)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        pytest.param(lambda ls: ls[:6] + [_edit_payload(ls[6], round=99)] + ls[7:], [(6, "edited")], id="edit-after"),
        pytest.param(lambda ls: ls[:6] + ls[7:], [(7, "deleted")], id="delete-after"),
        pytest.param(lambda ls: ls[:6] + [ls[7], ls[6]], [(7, "deleted"), (6, "reordered")], id="reorder-after"),
        pytest.param(lambda ls: ls[:6] + [ls[6], ls[6], ls[7]], [(6, "inserted")], id="copy-after"),
        pytest.param(lambda ls: ls[:7], [(7, "truncated")], id="last-deleted"),
        pytest.param(lambda ls: ls[1:], [(5, "edited")], id="deleted-before"),
        pytest.param(lambda ls: ls[:2] + [_edit_payload(ls[2], round=1000)] + ls[3:], [(5, "edited")], id="longer-edit-before"),
        pytest.param(lambda ls: ls[:5] + [_edit_payload(ls[5], round=7)] + ls[6:], [(5, "edited")], id="anchor-edited"),
        pytest.param(lambda ls: ls[:4], [(5, "truncated")], id="truncated-below"),
        pytest.param(lambda ls: [], [(5, "truncated")], id="emptied"),
    ],
)
def test_the_tail_check_catches_tampering_after_the_checkpoint_and_below_it(
    log: AuditLog, key: Ed25519PrivateKey, tamper, expected: list[tuple[int | None, str]]  # type: ignore[no-untyped-def]
) -> None:
    _checkpointed(log, key)
    _rewrite(log, tamper(_lines(log)))
    assert _tail_problems(log, key) == expected
    assert not log.verify(key.public_key()).ok  # and the full verification agrees


def test_an_edit_before_the_checkpoint_that_keeps_its_length_is_caught_by_the_full_verification_only(
    log: AuditLog, key: Ed25519PrivateKey
) -> None:
    _checkpointed(log, key)
    lines = _lines(log)
    lines[1] = _edit_payload(lines[1], round=7)  # 1 -> 7: the same bytes long, its stored hash kept
    _rewrite(log, lines)
    assert log.verify_tail(key.public_key()).ok  # documented: the tail check does not read it
    assert _problems(log, key) == [(2, 1, "edited")]


@pytest.mark.parametrize("forgery", ["other-key", "count-raised", "attachment-changed", "garbage"])
def test_a_forged_or_edited_checkpoint_is_caught(log: AuditLog, key: Ed25519PrivateKey, tmp_path: Path, forgery: str) -> None:
    _checkpointed(log, key)
    if forgery == "other-key":
        # Another key's checkpoint over this very log: a copy of the log signed by a stranger.
        stranger = AuditLog(tmp_path / "other.jsonl", signing_key=Ed25519PrivateKey.generate())
        stranger.path.write_bytes(log.path.read_bytes())
        position = log.verify(key.public_key()).position
        assert position is not None
        stranger.advance_checkpoint(position, {"state": "forged"})
        log.checkpoint_path.write_bytes(stranger.checkpoint_path.read_bytes())
    elif forgery == "garbage":
        log.checkpoint_path.write_text("{not json\n")
    else:
        header, attachment, signature, _ = log.checkpoint_path.read_bytes().split(b"\n")
        if forgery == "count-raised":
            header = _canonical({**json.loads(header), "count": 8})
        else:
            attachment = _canonical({"state": "approved everything"})
        log.checkpoint_path.write_bytes(b"\n".join([header, attachment, signature, b""]))
    expected = "malformed" if forgery == "garbage" else "bad-signature"
    assert _tail_problems(log, key) == [(None, expected)]


def test_a_head_rolled_back_behind_the_checkpoint_is_caught(log: AuditLog, key: Ed25519PrivateKey) -> None:
    old_head = log.head_path.read_bytes()  # records 6 entries
    _checkpointed(log, key, then=0)
    position = log.verify(key.public_key()).position
    log.append("release", _payload(6))
    log.append("release", _payload(7))
    assert position is not None
    assert log.advance_checkpoint(log.verify(key.public_key()).position, {"state": "at seq 7"})  # type: ignore[arg-type]
    log.head_path.write_bytes(old_head)
    assert _tail_problems(log, key) == [(None, "truncated")]


def test_dropping_the_checkpoint_leaves_the_full_verification(log: AuditLog, key: Ed25519PrivateKey) -> None:
    _checkpointed(log, key)
    log.drop_checkpoint()
    assert not log.checkpoint_path.exists()
    assert log.verify_tail(key.public_key()).checkpoint is None
