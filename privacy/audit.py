"""The audit log: a node's append-only, hash-chained, signed record of what it decided and released.

One JSON object per line (JSON Lines), in the canonical form (sorted keys, no spaces,
ASCII), each holding:

- ``seq``: 0, 1, 2, ... in file order;
- ``time``: when it was appended, UTC, ``2026-05-09T07:35:25.123456Z``;
- ``kind``: one of :data:`AUDIT_KINDS`;
- ``payload``: a JSON object describing the event. **Callers must never put patient
  data in it**: names, run ids, spec hashes, dataset names, counts, epsilons, digests
  and sizes are fine; values read from patient records are not. ``medfed node audit
  show`` prints payloads as they are;
- ``prev``: the ``hash`` of the entry before it (64 zeros for the first);
- ``hash``: SHA-256 (hex) of the canonical JSON of ``{seq, time, kind, payload, prev}``;
- ``sig``: base64 of the node key's Ed25519 signature of the hash.

A chain alone cannot show that its last entries were cut off, so beside the log
(``<log>.head``) sits a signed *head record*: the entry count and the last hash,
rewritten atomically on every append. An append holds an exclusive ``flock`` on the
log from reading its tail to rewriting the head, so appends from concurrent processes
(Flower starts one per message) serialise. An append refuses to extend a log that no
longer matches its head, so a deletion cannot be hidden behind new entries.

:meth:`AuditLog.verify` recomputes everything and says, for each problem, which line
and what happened (:data:`PROBLEM_KINDS`). What it cannot see: someone holding the node
key can rewrite everything, and a log rolled back together with its head to an older
copy looks whole. Officers anchor against that by keeping the head hash that
``medfed node audit verify`` prints, for instance in an evidence pack.

A full verification reads the whole log: fine when a node starts, too slow for every
message of a node with a long history. So beside the log (``<log>.checkpoint``) the node
keeps a signed *checkpoint* of a verified end: the entry count, the last entry's hash
and byte offsets, and whatever state the node derived from the entries up to there
(:meth:`AuditLog.advance_checkpoint`). :meth:`AuditLog.verify_tail` then checks the
checkpoint's signature, that its entry is still at its offsets, every entry after it and
the head, at a cost that follows what was appended since, not the log's length; its
docstring (and ``docs/node_checks.md``) says exactly which tampering it catches and which
only :meth:`AuditLog.verify` does (an edit before the checkpoint that keeps its byte
length).

Signatures are domain-separated (``medfed audit entry v1`` / ``medfed audit head v1`` /
``medfed audit checkpoint v1`` prefixes), so a signature over an entry can never pass for
one over a head record, a checkpoint, or anything else the same key signs.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import difflib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.errors import AuditEntryError, AuditError
from privacy.keys import fingerprint
from privacy.private_files import FILE_MODE

__all__ = [
    "AUDIT_KINDS",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditLog",
    "AuditPosition",
    "AuditProblem",
    "AuditVerification",
    "CHECKPOINT_SUFFIX",
    "GENESIS_HASH",
    "HEAD_SUFFIX",
    "PROBLEM_KINDS",
    "TailVerification",
]

logger = logging.getLogger(__name__)

AUDIT_KINDS: tuple[str, ...] = (
    "request",
    "approval",
    "denial",
    "revocation",
    "refusal",
    "release",
    "charge",
    "deidentification",
    "key",
    "budget",
    "app",
    "submission",
    "policy",
    "scoring",
    "privacy_check",
)
PROBLEM_KINDS: tuple[str, ...] = (
    "edited",
    "deleted",
    "inserted",
    "reordered",
    "bad-signature",
    "malformed",
    "truncated",
)
GENESIS_HASH = "0" * 64
HEAD_SUFFIX = ".head"
CHECKPOINT_SUFFIX = ".checkpoint"

_ENTRY_CONTEXT = b"medfed audit entry v1\n"
_HEAD_CONTEXT = b"medfed audit head v1\n"
_CHECKPOINT_CONTEXT = b"medfed audit checkpoint v1\n"
_FIELDS = ("hash", "kind", "payload", "prev", "seq", "sig", "time")
_HEAD_FIELDS = ("count", "last", "sig")
_CHECKPOINT_FIELDS = ("count", "end", "last", "start", "time")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_PAYLOAD_BYTES = 64 * 1024
_DEFAULT_LOCK_TIMEOUT = 30.0
_TAIL_CHUNK = 64 * 1024


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _content_hash(seq: int, time_text: str, kind: str, payload: object, prev: str) -> str:
    content = {"seq": seq, "time": time_text, "kind": kind, "payload": payload, "prev": prev}
    return hashlib.sha256(_canonical(content).encode("ascii")).hexdigest()


def _decode_signature(text: str) -> bytes | None:
    """The signature's bytes, or None unless ``text`` is exactly their canonical base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Non-zero padding bits decode to the same bytes; only the canonical text counts.
    if len(raw) != 64 or base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def _signature_ok(public_key: Ed25519PublicKey, message: bytes, text: str) -> bool:
    raw = _decode_signature(text)
    if raw is None:
        return False
    try:
        public_key.verify(raw, message)
    except InvalidSignature:
        return False
    return True


def _entry_signed(public_key: Ed25519PublicKey, entry: AuditEntry) -> bool:
    return _signature_ok(public_key, _ENTRY_CONTEXT + entry.hash.encode("ascii"), entry.sig)


def _sign(private_key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def _plain_json(value: object, where: str) -> Any:
    """A JSON-only copy of ``value`` (str-keyed objects, lists, finite numbers, strings)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditEntryError(f"audit payload {where} must be a finite number; found {value}")
        return float(value)
    if isinstance(value, Mapping):
        copy: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditEntryError(
                    f"audit payload {where} has a key of type {type(key).__name__}; keys must be strings"
                )
            copy[key] = _plain_json(item, f"{where}.{key}")
        return copy
    if isinstance(value, list | tuple):
        return [_plain_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise AuditEntryError(
        f"audit payload {where} is a {type(value).__name__}; use JSON values only "
        "(objects, lists, strings, numbers, booleans, null)"
    )


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the audit log, as written (its hash and signature are not checked here)."""

    seq: int
    time: datetime  # timezone-aware, UTC
    kind: str
    payload: Mapping[str, Any]
    prev: str
    hash: str
    sig: str

    def to_json(self) -> str:
        """The entry's line in the log, without the newline."""
        return _canonical(
            {
                "seq": self.seq,
                "time": self.time.strftime(_TIME_FORMAT),
                "kind": self.kind,
                "payload": _plain_json(self.payload, "payload"),
                "prev": self.prev,
                "hash": self.hash,
                "sig": self.sig,
            }
        )


@dataclass(frozen=True)
class AuditProblem:
    """One thing :meth:`AuditLog.verify` found wrong.

    ``line`` is 1-based; 0 means the head record, -1 the checkpoint (the per-message
    check, :meth:`AuditLog.verify_tail`, says where by seq and byte instead). ``seq`` is the entry's place in the
    chain where it can be told (for a missing entry, the first one missing).
    ``kind`` is one of :data:`PROBLEM_KINDS`.
    """

    line: int
    seq: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        if self.line == 0:
            where = "head record"
        elif self.line == -1:
            where = "after the checkpoint" if self.seq is None else f"checkpoint check (seq {self.seq})"
        elif self.seq is None:
            where = f"line {self.line}"
        else:
            where = f"line {self.line} (seq {self.seq})"
        return f"{where}: {self.kind} — {self.detail}"


@dataclass(frozen=True)
class AuditPosition:
    """A place in the log: the first ``count`` entries, the last one's hash, and its line's bytes.

    ``start`` is the byte offset where entry ``count - 1``'s line begins and ``end`` the
    offset just past its newline, where the entries after it begin.
    """

    count: int
    last: str
    start: int
    end: int


@dataclass(frozen=True)
class AuditVerification:
    """What :meth:`AuditLog.verify` found: the number of lines, the last hash and any problems.

    When the log verified and holds entries, ``position`` is its verified end (what a
    checkpoint records) and ``entries`` the entries it verified, from the same read.
    """

    count: int
    last_hash: str | None
    problems: tuple[AuditProblem, ...]
    position: AuditPosition | None = field(default=None, compare=False)
    entries: tuple[AuditEntry, ...] = field(default=(), compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when the log and its head are whole and every entry is the node's."""
        return not self.problems


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Parsed:
    entry: AuditEntry
    payload: Any  # the payload exactly as parsed, for hashing
    time_text: str
    canonical: bool  # the line's bytes are exactly what medfed writes for its fields


def _parse_line(raw: bytes) -> _Parsed | str:
    """The entry on one line, or why it is not one."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return "not ASCII text"
    repeated = False

    def keep(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        obj = dict(items)
        repeated = repeated or len(obj) != len(items)  # within one object; nested objects may reuse names
        return obj

    try:
        record = json.loads(text, object_pairs_hook=keep)
    except ValueError:
        return "not a JSON object"
    if not isinstance(record, dict):
        return "not a JSON object"
    if repeated:
        return "a field appears twice"
    if tuple(sorted(record)) != _FIELDS:
        missing = sorted(set(_FIELDS) - set(record))
        extra = sorted(set(record) - set(_FIELDS))
        return f"fields differ from an entry's (missing: {missing or 'none'}; unexpected: {extra or 'none'})"
    seq, time_text, kind = record["seq"], record["time"], record["kind"]
    prev, digest, sig, payload = record["prev"], record["hash"], record["sig"], record["payload"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return "seq is not a non-negative integer"
    if not isinstance(time_text, str) or not _TIME.fullmatch(time_text):
        return "time is not a UTC time like 2026-05-09T07:35:25.123456Z"
    try:
        when = datetime.strptime(time_text, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return "time is not a valid date and time"
    if kind not in AUDIT_KINDS:
        return f"kind {kind!r} is not an audit kind"
    if not isinstance(payload, dict):
        return "payload is not a JSON object"
    for name, value in (("prev", prev), ("hash", digest)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return f"{name} is not 64 lowercase hex digits"
    if not isinstance(sig, str):
        return "sig is not a string"
    try:
        canonical = _canonical(record) == text
    except ValueError:  # NaN or Infinity smuggled into the payload
        return "payload holds a number JSON does not allow"
    entry = AuditEntry(
        seq=seq,
        time=when,
        kind=kind,
        payload=MappingProxyType(payload),
        prev=prev,
        hash=digest,
        sig=sig,
    )
    return _Parsed(entry=entry, payload=payload, time_text=time_text, canonical=canonical)


def _parse_head(raw: bytes) -> tuple[int, str, str] | str:
    """``(count, last, sig)`` of a head record, or why it is not one."""
    try:
        text = raw.decode("ascii")
        record = json.loads(text)
    except ValueError:
        return "not a JSON object"
    if not isinstance(record, dict) or tuple(sorted(record)) != _HEAD_FIELDS:
        return "not a head record (fields count, last, sig)"
    count, last, sig = record["count"], record["last"], record["sig"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return "count is not a non-negative integer"
    if not isinstance(last, str) or not _HEX64.fullmatch(last):
        return "last is not 64 lowercase hex digits"
    if not isinstance(sig, str):
        return "sig is not a string"
    if _canonical(record) + "\n" != text:
        return "its text is not in the form medfed writes"
    return count, last, sig


def _head_message(count: int, last: str) -> bytes:
    return _HEAD_CONTEXT + _canonical({"count": count, "last": last}).encode("ascii")


# ---------------------------------------------------------------- verification


@dataclass
class _Line:
    number: int
    torn: bool  # the last line, without its newline
    parsed: _Parsed | None
    start: int = 0  # byte offset of the line in the log
    end: int = 0  # byte offset just past its newline
    signed: bool = False  # the signature verifies over the stored hash
    intact: bool = False  # the stored hash is the hash of the content

    @property
    def entry(self) -> AuditEntry:
        assert self.parsed is not None
        return self.parsed.entry

    @property
    def authentic(self) -> bool:
        return self.parsed is not None and self.signed and self.intact


def _increasing_run(lines: Sequence[_Line]) -> list[_Line]:
    """The longest run of lines, in file order, whose seqs strictly increase."""
    tails: list[int] = []  # tails[k]: index into lines of the smallest tail of a run of length k+1
    before: list[int | None] = [None] * len(lines)
    for index, line in enumerate(lines):
        seq = line.entry.seq
        low, high = 0, len(tails)
        while low < high:
            middle = (low + high) // 2
            if lines[tails[middle]].entry.seq < seq:
                low = middle + 1
            else:
                high = middle
        before[index] = tails[low - 1] if low else None
        if low == len(tails):
            tails.append(index)
        else:
            tails[low] = index
    run: list[int] = []
    cursor = tails[-1] if tails else None
    while cursor is not None:
        run.append(cursor)
        cursor = before[cursor]
    return [lines[index] for index in reversed(run)]


def _seq_range(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


_EDITED = "hash does not match its content: it was changed after it was signed"
_EDITED_UNSIGNED = "hash does not match its content, and its signature does not verify"
_UNSIGNED = "its signature does not verify with the node key"


class _Verifier:
    """One verification of a log and its head; each step adds what it finds to ``problems``.

    The steps, in order: read every line; read the head; take the node's own entries
    (signature and content both check out) in the longest run of file order that agrees
    with their seqs as the backbone, so that any other of its entries was moved or
    copied; place the remaining lines (edited, forged, damaged) using the hashes that
    the backbone and the head vouch for; check the links between the node's entries;
    and finally account for the gaps in the sequence.
    """

    def __init__(
        self, data: bytes, head_data: bytes | None, *, head_name: str, public_key: Ed25519PublicKey
    ) -> None:
        self.public_key = public_key
        self.head_name = head_name
        self.problems: list[AuditProblem] = []
        self.lines = self._read_lines(data)
        self.head = self._read_head(head_data)
        self.holders: dict[int, _Line] = {}  # seq -> the line that stands for it
        self.unparsed = [line.number for line in self.lines if line.parsed is None]

    def run(self) -> AuditVerification:
        parsed = [line for line in self.lines if line.parsed is not None]
        if parsed and self.head is None and not any(line.signed for line in parsed):
            first = parsed[0]
            self.report(
                first.number,
                first.entry.seq,
                "bad-signature",
                f"no entry's signature verifies with key {fingerprint(self.public_key)}: the log was signed "
                "by another key (is this the node's audit key?), or every signature was replaced",
            )
            return self._result({})
        self._place_authentic()
        self._place_the_rest(self._vouched())
        self._check_links()
        return self._result(self._account_for_gaps())

    def report(self, line: int, seq: int | None, kind: str, detail: str) -> None:
        self.problems.append(AuditProblem(line=line, seq=seq, kind=kind, detail=detail))

    # ------------------------------------------------------------ reading

    def _read_lines(self, data: bytes) -> list[_Line]:
        pieces = data.split(b"\n")
        torn_tail = pieces[-1] != b""
        if not torn_tail:
            pieces.pop()
        lines: list[_Line] = []
        offset = 0
        for index, raw in enumerate(pieces):
            line = _Line(
                number=index + 1, torn=torn_tail and index == len(pieces) - 1, parsed=None, start=offset,
                end=offset + len(raw) + 1,
            )
            offset = line.end
            lines.append(line)
            parsed = _parse_line(raw)
            if isinstance(parsed, str):
                if line.torn:
                    cut = f"the last line is cut off ({len(raw)} bytes, {parsed})"
                    self.report(line.number, None, "truncated", cut)
                else:
                    self.report(line.number, None, "malformed", parsed)
                continue
            line.parsed = parsed
            entry = parsed.entry
            content = _content_hash(entry.seq, parsed.time_text, entry.kind, parsed.payload, entry.prev)
            line.intact = content == entry.hash
            line.signed = _entry_signed(self.public_key, entry)
            if line.torn:
                cut = "the last line lacks its newline: a write was cut off"
                self.report(line.number, entry.seq, "truncated", cut)
            if line.intact and not parsed.canonical:
                self.report(
                    line.number,
                    entry.seq,
                    "edited",
                    "its text was changed (it is not in the form medfed writes), "
                    "though its fields still match its hash",
                )
        return lines

    def _read_head(self, head_data: bytes | None) -> tuple[int, str] | None:
        if head_data is None:
            if self.lines:
                missing = f"{self.head_name} is missing, so deleting the last entries cannot be ruled out"
                self.report(0, None, "truncated", missing)
            return None
        parsed = _parse_head(head_data)
        if isinstance(parsed, str):
            self.report(0, None, "malformed", f"{self.head_name} is unreadable: {parsed}")
            return None
        count, last, signature = parsed
        if not _signature_ok(self.public_key, _head_message(count, last), signature):
            forged = f"{self.head_name}'s signature does not verify with the node key"
            self.report(0, None, "bad-signature", forged)
            return None
        return count, last

    # ------------------------------------------------------------ placing lines

    def _place_authentic(self) -> None:
        authentic = [line for line in self.lines if line.authentic]
        backbone = _increasing_run(authentic)
        in_backbone = {line.number for line in backbone}
        by_seq = {line.entry.seq: line for line in backbone}
        self.holders.update(by_seq)
        for line in authentic:
            if line.number in in_backbone:
                continue
            seq = line.entry.seq
            twin = self.holders.get(seq)
            if twin is not None and twin.entry.hash == line.entry.hash:
                self.report(line.number, seq, "inserted", f"it is a copy of line {twin.number}")
            elif twin is not None:
                self.report(
                    line.number,
                    seq,
                    "inserted",
                    f"a second entry signed as seq {seq} (the other is line {twin.number}): "
                    "the log mixes two chains",
                )
            else:
                self.holders[seq] = line
                after, upcoming = by_seq.get(seq - 1), by_seq.get(seq + 1)
                if after is not None:
                    where = f"it belongs after seq {seq - 1} (line {after.number})"
                elif upcoming is not None:
                    where = f"it belongs before seq {seq + 1} (line {upcoming.number})"
                else:
                    where = "it is out of place in the sequence"
                self.report(line.number, seq, "reordered", where)

    def _vouched(self) -> dict[str, int]:
        """Hashes that a later entry of the node's (its prev) or the signed head vouch for, with their seq.

        A line with such a hash held the node's entry at that seq, whatever happened to it since.
        """
        vouched: dict[str, int] = {}
        for line in self.holders.values():
            if line.entry.seq > 0:
                vouched.setdefault(line.entry.prev, line.entry.seq - 1)
        if self.head is not None and self.head[0] > 0:
            vouched.setdefault(self.head[1], self.head[0] - 1)
        return vouched

    def _in_place(self, line: _Line, seq: int) -> bool:
        """Whether ``line`` sits, in file order, between the placed entries around ``seq``."""
        lower = [held for s, held in self.holders.items() if s < seq]
        upper = [held for s, held in self.holders.items() if s > seq]
        below = max(lower, key=lambda held: held.entry.seq, default=None)
        above = min(upper, key=lambda held: held.entry.seq, default=None)
        return (below is None or below.number < line.number) and (above is None or above.number > line.number)

    def _place_the_rest(self, vouched: Mapping[str, int]) -> None:
        for line in self.lines:
            if line.parsed is None or line.authentic:
                continue
            entry = line.entry
            seq = vouched.get(entry.hash)
            if seq is not None and seq not in self.holders:
                self.holders[seq] = line
                if line.signed:
                    self.report(line.number, seq, "edited", _EDITED)
                elif line.intact:
                    self.report(
                        line.number,
                        seq,
                        "bad-signature",
                        f"{_UNSIGNED} (its content is vouched for by the chain)",
                    )
                else:
                    self.report(line.number, seq, "edited", _EDITED_UNSIGNED)
                continue
            seq = entry.seq
            if line.signed:
                # The node signed this hash, but the content changed and nothing vouches for its place.
                self.report(line.number, seq, "edited", _EDITED)
                within_head = self.head is None or seq < self.head[0]
                if seq not in self.holders and within_head and self._in_place(line, seq):
                    self.holders[seq] = line
                else:
                    self.unparsed.append(line.number)
                continue
            self._place_unsigned(line, seq)

    def _place_unsigned(self, line: _Line, seq: int) -> None:
        """A line the node key did not sign: forged, or one of the node's with a damaged signature."""
        if seq in self.holders:
            self.report(
                line.number,
                seq,
                "inserted",
                f"it is not signed by the node key, and seq {seq} is line {self.holders[seq].number}",
            )
        elif self.head is not None and seq >= self.head[0]:
            self.report(
                line.number,
                seq,
                "inserted",
                f"it is not signed by the node key, and lies past the {self.head[0]} entries "
                "of the signed head",
            )
        elif not self._in_place(line, seq):
            misplaced = "it is not signed by the node key, and is out of place in the sequence"
            self.report(line.number, seq, "inserted", misplaced)
        else:
            self.holders[seq] = line
            following = self.holders.get(seq + 1)
            if following is not None and following.authentic and following.entry.prev != line.entry.hash:
                self.report(
                    line.number,
                    seq,
                    "edited",
                    f"it is not signed by the node key: its content was changed and its hash recomputed "
                    f"(seq {seq + 1} on line {following.number} refers to a different entry)",
                )
            elif line.intact:
                self.report(line.number, seq, "bad-signature", _UNSIGNED)
            else:
                self.report(line.number, seq, "edited", _EDITED_UNSIGNED)

    # ------------------------------------------------------------ the chain as a whole

    def _check_links(self) -> None:
        """Links between the node's own entries; only the node key could have broken them."""
        for seq, line in sorted(self.holders.items()):
            if not line.authentic:
                continue
            if seq == 0 and line.entry.prev != GENESIS_HASH:
                unrooted = "seq 0 does not start a chain (its prev is not 64 zeros)"
                self.report(line.number, seq, "inserted", unrooted)
            before = self.holders.get(seq - 1)
            if before is not None and before.signed and before.entry.hash != line.entry.prev:
                self.report(
                    line.number,
                    seq,
                    "inserted",
                    f"its prev does not match the hash of seq {seq - 1} (line {before.number}): "
                    "the two were signed in different chains",
                )
        if self.head is not None and self.head[0] > 0:
            count, last = self.head
            held = self.holders.get(count - 1)
            if held is not None and held.signed and held.entry.hash != last:
                self.report(
                    held.number,
                    count - 1,
                    "edited",
                    f"its hash differs from the one the signed head records for seq {count - 1}",
                )

    def _account_for_gaps(self) -> dict[int, int]:
        """Report the seqs nothing stands for; returns each unreadable line's inferred seq.

        Each unreadable line between a gap's neighbours may stand for one missing seq;
        the rest were deleted, or, after the last entry, cut off.
        """
        held = sorted(self.holders)
        end = max(self.head[0] if self.head is not None else 0, held[-1] + 1 if held else 0)
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for seq in [*held, end]:
            if seq > cursor:
                gaps.append((cursor, seq - 1))
            cursor = max(cursor, seq + 1)
        unparsed = sorted(self.unparsed)
        used: set[int] = set()
        stands_for: dict[int, int] = {}
        for first, last in gaps:
            low = self.holders[first - 1].number if first > 0 else 0
            following = self.holders.get(last + 1)
            high = following.number if following is not None else len(self.lines) + 1
            low, high = min(low, high), max(low, high)
            wanted = last - first + 1
            free: list[int] = []
            # At most one more than wanted: enough to tell whether they match one to one.
            for number in unparsed[bisect.bisect_right(unparsed, low) :]:
                if number >= high or len(free) > wanted:
                    break
                if number not in used:
                    free.append(number)
            used.update(free[:wanted])
            if len(free) == wanted:
                stands_for.update({number: first + offset for offset, number in enumerate(free)})
            missing = wanted - len(free[:wanted])
            if missing:
                self._report_gap(first, last, missing, high, end_of_log=following is None)
        return stands_for

    def _report_gap(self, first: int, last: int, missing: int, line: int, *, end_of_log: bool) -> None:
        span = _seq_range(first, last)
        wanted = last - first + 1
        if end_of_log:
            assert self.head is not None  # only the head can make the sequence longer than the log
            count, head_hash = self.head
            holding = f"holds entries up to seq {first - 1}" if first else "holds no entries"
            self.report(
                len(self.lines) + 1,
                first,
                "truncated",
                f"the signed head records {count} entries (last hash {head_hash[:12]}), but the log "
                f"{holding}: {span} {'was' if wanted == 1 else 'were'} deleted or lost",
            )
        elif missing == wanted:
            verb = "is" if wanted == 1 else "are"
            self.report(line, last + 1, "deleted", f"{span} {verb} missing before it")
        else:
            partly = f"{missing} of the {wanted} entries {span} are missing before it"
            self.report(line, last + 1, "deleted", partly)

    def _result(self, stands_for: Mapping[int, int]) -> AuditVerification:
        problems = [
            AuditProblem(problem.line, stands_for[problem.line], problem.kind, problem.detail)
            if problem.seq is None and problem.line in stands_for
            else problem
            for problem in self.problems
        ]
        problems.sort(key=lambda problem: (problem.line, PROBLEM_KINDS.index(problem.kind)))
        last = self.lines[-1] if self.lines else None
        last_hash = last.entry.hash if last is not None and last.parsed is not None else None
        whole = [line for line in self.lines if not line.torn]
        position = None
        if whole and whole[-1].parsed is not None and not problems:
            anchor = whole[-1]
            position = AuditPosition(anchor.entry.seq + 1, anchor.entry.hash, anchor.start, anchor.end)
        return AuditVerification(
            count=len(self.lines),
            last_hash=last_hash,
            problems=tuple(problems),
            position=position,
            entries=tuple(line.entry for line in self.lines if line.parsed is not None) if not problems else (),
        )


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class AuditCheckpoint:
    """A verified place in the log, signed by the node key: :data:`CHECKPOINT_SUFFIX` beside the log.

    The node writes one after a full :meth:`AuditLog.verify` found no problem, and moves
    it forward after each :meth:`AuditLog.verify_tail` that found none. ``attachment`` is
    whatever state the node derived from the entries up to it (its governance state, its
    ledger's composition); it is signed with the rest, so it is as trustworthy as the
    verification that produced it.
    """

    position: AuditPosition
    time: datetime
    attachment: Mapping[str, Any]


@dataclass(frozen=True)
class TailVerification:
    """What :meth:`AuditLog.verify_tail` found.

    ``checkpoint`` is the signed checkpoint it started from. None with no problems: there
    is none, nothing was verified, and the caller runs the full :meth:`AuditLog.verify`;
    None with a problem (line -1): the checkpoint file is unreadable or forged. ``entries``
    are the entries after it, checked; ``position`` the verified end (the checkpoint's
    own when nothing follows it); ``problems`` what is wrong, in :class:`AuditProblem`
    terms (line -1 is the checkpoint file, 0 the head record).
    """

    checkpoint: AuditCheckpoint | None
    entries: tuple[AuditEntry, ...]
    position: AuditPosition | None
    problems: tuple[AuditProblem, ...]

    @property
    def ok(self) -> bool:
        """True when a checkpoint was found and everything the tail check covers is whole."""
        return self.checkpoint is not None and not self.problems

    @property
    def missing(self) -> bool:
        """True when there is no checkpoint at all (not a refused one): the full verification decides."""
        return self.checkpoint is None and not self.problems


def _checkpoint_header(position: AuditPosition, time_text: str) -> bytes:
    header = {"count": position.count, "last": position.last, "start": position.start, "end": position.end, "time": time_text}
    return _canonical(header).encode("ascii")


def _checkpoint_message(signed: bytes) -> bytes:
    """What the node key signs: the context line and the SHA-256 of the header and attachment lines, as written."""
    return _CHECKPOINT_CONTEXT + hashlib.sha256(signed).hexdigest().encode("ascii")


def _parse_checkpoint_header(line: bytes) -> dict[str, Any] | str:
    try:
        record = json.loads(line.decode("ascii"))
    except ValueError:
        return "its first line is not a JSON object"
    if not isinstance(record, dict) or tuple(sorted(record)) != _CHECKPOINT_FIELDS:
        return f"its first line is not a checkpoint header (fields {', '.join(_CHECKPOINT_FIELDS)})"
    for name in ("count", "start", "end"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} is not a non-negative integer"
    if record["count"] < 1 or record["end"] <= record["start"]:
        return "it covers no entry"
    if not isinstance(record["last"], str) or not _HEX64.fullmatch(record["last"]):
        return "last is not 64 lowercase hex digits"
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        return "time is not a UTC time"
    return record


def _parse_checkpoint(raw: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes, str] | str:
    """``(header, attachment, signed bytes, sig)`` of a checkpoint file, or why it is not one.

    Three lines: the header (count, last, start, end, time), the attachment, both as
    canonical JSON, and the signature over the exact bytes of the first two, so nothing
    is serialised again to check it.
    """
    lines = raw.split(b"\n")
    if len(lines) != 4 or lines[3] != b"":
        return "not three lines (header, attachment, signature)"
    header = _parse_checkpoint_header(lines[0])
    if isinstance(header, str):
        return header
    try:
        attachment = json.loads(lines[1].decode("ascii"))
        signature = lines[2].decode("ascii")
    except ValueError:
        return "its attachment is not JSON, or its signature not text"
    if not isinstance(attachment, dict):
        return "its attachment is not a JSON object"
    return header, attachment, lines[0] + b"\n" + lines[1], signature


class _TailVerifier:
    """The per-message check: the checkpoint, the entry it ends at, every entry after it, and the head.

    It reads the checkpoint file, the anchor entry's own bytes at the offsets the
    checkpoint records, the bytes after them, and the head record: never the entries
    before the checkpoint.
    """

    def __init__(self, name: str, head_name: str, public_key: Ed25519PublicKey, checkpoint: AuditCheckpoint) -> None:
        self.name = name
        self.head_name = head_name
        self.public_key = public_key
        self.checkpoint = checkpoint
        self.problems: list[AuditProblem] = []

    def report(self, line: int, seq: int | None, kind: str, detail: str) -> None:
        self.problems.append(AuditProblem(line=line, seq=seq, kind=kind, detail=detail))

    def run(self, size: int, anchor: bytes, tail: bytes, head_data: bytes | None) -> TailVerification:
        mark = self.checkpoint.position
        if size < mark.end:
            self.report(
                -1, mark.count - 1, "truncated",
                f"the log is {size} bytes, but its signed checkpoint covers {mark.end} bytes ({mark.count} entries): "
                "entries up to the checkpoint were deleted, or the log was cut or replaced",
            )
            return self._result((), None)
        self._check_anchor(anchor)
        if self.problems:  # the bytes after a moved anchor are no entries' boundaries: nothing more to read there
            return self._result((), None)
        entries, position = self._check_tail(tail)
        self._check_head(head_data, entries)
        return self._result(entries, position)

    def _check_anchor(self, anchor: bytes) -> None:
        mark = self.checkpoint.position
        seq = mark.count - 1
        parsed = _parse_line(anchor[:-1]) if anchor.endswith(b"\n") else "its line is not where the checkpoint records it"
        moved = (
            "the entries before it were edited, inserted or deleted (the bytes moved), or it was itself changed"
        )
        if isinstance(parsed, str):
            self.report(-1, seq, "edited", f"the entry the checkpoint ends at (seq {seq}) is not at byte {mark.start}: {moved}")
            return
        entry = parsed.entry
        if entry.seq != seq or entry.hash != mark.last:
            self.report(
                -1, seq, "edited",
                f"byte {mark.start} holds seq {entry.seq} (hash {entry.hash[:12]}), not the checkpoint's seq {seq} "
                f"(hash {mark.last[:12]}): {moved}",
            )
            return
        intact = _content_hash(entry.seq, parsed.time_text, entry.kind, parsed.payload, entry.prev) == entry.hash
        if not intact or not parsed.canonical:
            self.report(-1, seq, "edited", f"the entry the checkpoint ends at (seq {seq}) was changed after it was signed")
        elif not _entry_signed(self.public_key, entry):
            self.report(-1, seq, "bad-signature", f"the entry the checkpoint ends at (seq {seq}): {_UNSIGNED}")

    def _check_tail(self, tail: bytes) -> tuple[tuple[AuditEntry, ...], AuditPosition]:
        mark = self.checkpoint.position
        expected, prev = mark.count, mark.last
        position = mark
        seen: set[str] = {mark.last}
        entries: list[AuditEntry] = []
        pieces = tail.split(b"\n")
        torn = pieces.pop()
        offset = mark.end
        where = "after the checkpoint"
        for raw in pieces:
            start, offset = offset, offset + len(raw) + 1
            parsed = _parse_line(raw)
            if isinstance(parsed, str):
                self.report(-1, expected, "malformed", f"byte {start}, {where}: {parsed}")
                expected += 1
                continue
            entry = parsed.entry
            intact = _content_hash(entry.seq, parsed.time_text, entry.kind, parsed.payload, entry.prev) == entry.hash
            signed = _entry_signed(self.public_key, entry)
            if not intact:
                self.report(-1, entry.seq, "edited", _EDITED if signed else _EDITED_UNSIGNED)
            elif not signed:
                self.report(-1, entry.seq, "bad-signature", _UNSIGNED)
            elif not parsed.canonical:
                self.report(-1, entry.seq, "edited", "its text was changed (it is not in the form medfed writes)")
            if entry.seq > expected:
                self.report(-1, entry.seq, "deleted", f"{_seq_range(expected, entry.seq - 1)} missing before it ({where})")
            elif entry.seq < expected:
                kind = "inserted" if entry.hash in seen else "reordered"
                what = "a copy of an earlier entry" if entry.hash in seen else f"it belongs before seq {expected}"
                self.report(-1, entry.seq, kind, f"{what} ({where})")
            elif entry.prev != prev:
                self.report(-1, entry.seq, "inserted", f"its prev does not match the hash of seq {entry.seq - 1}: the chain breaks {where}")
            seen.add(entry.hash)
            expected, prev = entry.seq + 1, entry.hash
            entries.append(entry)
            position = AuditPosition(entry.seq + 1, entry.hash, start, offset)
        if torn:
            self.report(-1, expected, "truncated", f"the last line lacks its newline ({len(torn)} bytes): a write was cut off")
        return tuple(entries), position

    def _check_head(self, head_data: bytes | None, entries: Sequence[AuditEntry]) -> None:
        if head_data is None:
            self.report(0, None, "truncated", f"{self.head_name} is missing, so deleting the last entries cannot be ruled out")
            return
        parsed = _parse_head(head_data)
        if isinstance(parsed, str):
            self.report(0, None, "malformed", f"{self.head_name} is unreadable: {parsed}")
            return
        count, last, signature = parsed
        if not _signature_ok(self.public_key, _head_message(count, last), signature):
            self.report(0, None, "bad-signature", f"{self.head_name}'s signature does not verify with the node key")
            return
        mark = self.checkpoint.position
        hashes = {mark.count - 1: mark.last, **{entry.seq: entry.hash for entry in entries}}
        end = max(hashes) + 1
        if count < mark.count:
            self.report(
                0, None, "truncated",
                f"the signed head records {count} entries, fewer than the {mark.count} of the signed checkpoint: "
                "the head (and perhaps the log) was replaced by an older copy",
            )
        elif count > end:
            self.report(
                end + 1, end, "truncated",
                f"the signed head records {count} entries (last hash {last[:12]}), but the log holds entries up to "
                f"seq {end - 1}: {_seq_range(end, count - 1)} deleted or lost",
            )
        elif hashes.get(count - 1) != last:
            self.report(0, count - 1, "edited", f"its hash differs from the one the signed head records for seq {count - 1}")

    def _result(self, entries: tuple[AuditEntry, ...], position: AuditPosition | None) -> TailVerification:
        problems = tuple(self.problems)
        return TailVerification(self.checkpoint, entries if not problems else (), position if not problems else None, problems)


# ---------------------------------------------------------------- the log file


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def _publish(path: Path, data: bytes, *, what: str, sync_folder: bool = True) -> None:
    """Write `data` to `path` whole or not at all (a temporary file, fsync, rename), owner-only."""
    folder = path.parent
    try:
        handle = tempfile.NamedTemporaryFile("wb", dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False)
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(handle.name, FILE_MODE)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
        if sync_folder:
            directory = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power cut
            finally:
                os.close(directory)
    except OSError as err:
        raise AuditError(f"cannot write the {what} {path}: {err.strerror}") from err


def _read_tail(fd: int, size: int) -> tuple[bytes | None, bytes]:
    """The last complete line (without newline, None if there is none) and any bytes after it."""
    end = size
    buffer = b""
    position = size
    newlines: list[int] = []  # absolute offsets of the last two newlines, last first
    while position > 0 and len(newlines) < 2:
        start = max(0, position - _TAIL_CHUNK)
        chunk = os.pread(fd, position - start, start)
        buffer = chunk + buffer
        for index in range(len(chunk) - 1, -1, -1):
            if chunk[index] == 0x0A:
                newlines.append(start + index)
                if len(newlines) == 2:
                    break
        position = start
    base = end - len(buffer)
    if not newlines:
        return None, buffer
    last_newline = newlines[0]
    torn = buffer[last_newline + 1 - base :]
    line_start = newlines[1] + 1 if len(newlines) == 2 else 0
    return buffer[line_start - base : last_newline - base], torn


class AuditLog:
    """A node's audit log at ``path``, with its signed head at ``<path>.head``.

    Open with the node's private key to append; without one the log is read-only
    (``entries`` and ``verify`` only). Files are created by the first append.
    """

    def __init__(
        self,
        path: Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        lock_timeout: float = _DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self._path = Path(path).expanduser()
        self._head_path = self._path.with_name(self._path.name + HEAD_SUFFIX)
        self._signing_key = signing_key
        self._lock_timeout = lock_timeout

    @property
    def path(self) -> Path:
        """The JSON Lines file."""
        return self._path

    @property
    def head_path(self) -> Path:
        """The signed head record beside it."""
        return self._head_path

    @property
    def checkpoint_path(self) -> Path:
        """The signed checkpoint beside it (see :meth:`verify_tail`)."""
        return self._path.with_name(self._path.name + CHECKPOINT_SUFFIX)

    @property
    def read_only(self) -> bool:
        """True when opened without a signing key."""
        return self._signing_key is None

    def append(self, kind: str, payload: Mapping[str, Any]) -> AuditEntry:
        """Append one signed entry; safe across threads and processes.

        ``payload`` must hold no patient data (see the module docstring).

        Raises
        ------
        AuditEntryError
            If ``kind`` is not in :data:`AUDIT_KINDS` or the payload is not a JSON object.
        AuditError
            If the log is read-only, locked for too long, cannot be written, or no longer
            matches its signed head (then nothing is appended).
        """
        if self._signing_key is None:
            raise AuditError(f"the audit log {self._path} was opened read-only (without the node key)")
        if kind not in AUDIT_KINDS:
            close = difflib.get_close_matches(str(kind), AUDIT_KINDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; kinds: {', '.join(AUDIT_KINDS)}"
            raise AuditEntryError(f"audit kind {kind!r} is unknown{hint}")
        if not isinstance(payload, Mapping):
            raise AuditEntryError(f"an audit payload must be a JSON object; found {type(payload).__name__}")
        body = _plain_json(payload, "payload")
        size = len(_canonical(body))
        if size > _MAX_PAYLOAD_BYTES:
            raise AuditEntryError(
                f"audit payload is {size} bytes; the most is {_MAX_PAYLOAD_BYTES} "
                "(record digests, not content)"
            )
        key = self._signing_key
        with self._locked(write=True) as fd:
            last_seq, last_hash = self._prepare_tail(fd, key)
            seq = last_seq + 1
            time_text = datetime.now(UTC).strftime(_TIME_FORMAT)
            digest = _content_hash(seq, time_text, kind, body, last_hash)
            signature = _sign(key, _ENTRY_CONTEXT + digest.encode("ascii"))
            record = {
                "seq": seq,
                "time": time_text,
                "kind": kind,
                "payload": body,
                "prev": last_hash,
                "hash": digest,
                "sig": signature,
            }
            try:
                _write_all(fd, (_canonical(record) + "\n").encode("ascii"))
                os.fsync(fd)
            except OSError as err:
                raise AuditError(f"cannot append to the audit log {self._path}: {err.strerror}") from err
            self._write_head(key, count=seq + 1, last=digest)
        logger.debug("audit %s entry %d appended to %s", kind, seq, self._path)
        parsed = _parse_line(_canonical(record).encode("ascii"))
        assert isinstance(parsed, _Parsed)
        return parsed.entry

    def entries(self) -> tuple[AuditEntry, ...]:
        """Every entry, in file order, as written; signatures are not checked (see :meth:`verify`).

        A last line cut off by a crash mid-write is skipped with a warning.

        Raises
        ------
        AuditError
            If the log cannot be read, or a line is not an audit entry.
        """
        data, _ = self._snapshot()
        pieces = data.split(b"\n")
        torn = pieces.pop()
        if torn:
            logger.warning("%s ends with an incomplete line of %d bytes; skipping it", self._path, len(torn))
        entries: list[AuditEntry] = []
        for number, raw in enumerate(pieces, start=1):
            parsed = _parse_line(raw)
            if isinstance(parsed, str):
                raise AuditError(
                    f"line {number} of the audit log {self._path} is not an audit entry ({parsed}); "
                    "run `medfed node audit verify`"
                )
            entries.append(parsed.entry)
        return tuple(entries)

    def verify(self, public_key: Ed25519PublicKey) -> AuditVerification:
        """Check every entry, the chain and the head record against the node's public key.

        Raises
        ------
        AuditError
            If the files cannot be read or stay locked; tampering is reported, not raised.
        """
        data, head = self._snapshot()
        return _Verifier(data, head, head_name=self._head_path.name, public_key=public_key).run()

    def verify_tail(self, public_key: Ed25519PublicKey) -> TailVerification:
        """The per-message check: the signed checkpoint and what follows it, at a cost independent of what precedes it.

        Reads the checkpoint (its signature must verify with the node key), the bytes of
        the entry it ends at (at the offsets it records), every entry after it, and the
        head record, all under one shared lock. It catches:

        - a checkpoint that is not signed by the node key (forged, edited, another node's)
          or unreadable;
        - a log shorter than the checkpoint's end (truncation below the checkpoint, a log
          deleted or replaced by a shorter one);
        - an anchor entry (the checkpoint's last) that is not at its byte offset, does not
          carry the checkpoint's seq and hash, or was changed or re-signed: so any edit,
          insertion or deletion before the checkpoint that changes the byte length of the
          entries before it;
        - after the checkpoint, exactly what :meth:`verify` catches there: an edited,
          unsigned, malformed or non-canonical entry, a deleted, inserted, reordered or
          copied entry, a chain that does not link from the checkpoint's hash, a cut-off
          last line;
        - a head record that is missing, forged, older than the checkpoint, or records more
          entries (the last ones deleted) or another last hash.

        It does not read the entries before the anchor: an edit there that keeps their
        byte length (a digit changed in a payload, a hash recomputed) is caught only by
        :meth:`verify`, which the node runs at start and ``medfed node audit verify`` runs
        on demand. Nor can it tell a log, head and checkpoint rolled back together to an
        older copy (neither can :meth:`verify`).

        Returns ``checkpoint=None`` and nothing verified when there is no checkpoint: the
        caller then runs :meth:`verify`. A checkpoint file that exists but does not verify
        is a problem, never a reason to skip the check.

        Raises
        ------
        AuditError
            If the files cannot be read or stay locked.
        """
        try:
            raw = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return TailVerification(None, (), None, ())
        except OSError as err:
            raise AuditError(f"cannot read the audit checkpoint {self.checkpoint_path}: {err.strerror}") from err
        name = self.checkpoint_path.name
        parsed = _parse_checkpoint(raw)
        if isinstance(parsed, str):
            return self._refused_checkpoint("malformed", f"{name} is unreadable: {parsed}")
        header, attachment, signed, signature = parsed
        if not _signature_ok(public_key, _checkpoint_message(signed), signature):
            return self._refused_checkpoint(
                "bad-signature", f"{name}'s signature does not verify with the node key: it was forged or edited"
            )
        position = AuditPosition(header["count"], header["last"], header["start"], header["end"])
        when = datetime.strptime(header["time"], _TIME_FORMAT).replace(tzinfo=UTC)
        checkpoint = AuditCheckpoint(position, when, MappingProxyType(attachment))
        verifier = _TailVerifier(name, self._head_path.name, public_key, checkpoint)
        if not self._path.exists():
            return verifier.run(0, b"", b"", self._read_head_bytes())
        with self._locked(write=False) as fd:
            size = os.fstat(fd).st_size
            if size < position.end:
                return verifier.run(size, b"", b"", self._read_head_bytes())
            anchor = _pread_all(fd, position.start, position.end - position.start)
            tail = _pread_all(fd, position.end, size - position.end)
            head = self._read_head_bytes()
        return verifier.run(size, anchor, tail, head)

    def advance_checkpoint(self, position: AuditPosition, attachment: Mapping[str, Any]) -> bool:
        """Sign and write a checkpoint at `position`, a verified end of the log, with `attachment`.

        Call it only with a position that :meth:`verify` or :meth:`verify_tail` has just
        returned, and an attachment derived from the entries up to it. Under the log's
        exclusive lock it checks that the entry at `position` is still there, byte for
        byte where it was, and that the checkpoint on disk (if any) is behind it; the
        checkpoint never moves backwards. Appends after `position` are left for the next
        :meth:`verify_tail`. Returns whether it wrote one.

        Raises
        ------
        AuditError
            If the log is read-only, or the checkpoint cannot be written.
        """
        if self._signing_key is None:
            raise AuditError(f"the audit log {self._path} was opened read-only (without the node key)")
        try:
            attached = _canonical(attachment)
        except TypeError:  # a mapping or sequence JSON does not take as it is
            attached = _canonical(_plain_json(attachment, "attachment"))
        except ValueError as err:
            raise AuditEntryError(f"a checkpoint attachment must be finite JSON: {err}") from None
        signed = _checkpoint_header(position, datetime.now(UTC).strftime(_TIME_FORMAT)) + b"\n" + attached.encode("ascii")
        with self._locked(write=True) as fd:
            line = _pread_all(fd, position.start, position.end - position.start)
            parsed = _parse_line(line[:-1]) if line.endswith(b"\n") else None
            if not isinstance(parsed, _Parsed) or (parsed.entry.seq, parsed.entry.hash) != (position.count - 1, position.last):
                logger.warning("not moving the audit checkpoint of %s: its entry at byte %d changed", self._path, position.start)
                return False
            current = self._current_checkpoint_count()
            if current is not None and current >= position.count:
                return False
            signature = _sign(self._signing_key, _checkpoint_message(signed))
            _publish(self.checkpoint_path, signed + b"\n" + signature.encode("ascii") + b"\n", what="audit checkpoint", sync_folder=False)
        logger.debug("audit checkpoint of %s at seq %d", self._path, position.count - 1)
        return True

    def drop_checkpoint(self) -> None:
        """Remove the checkpoint, after a full verification found a problem: every later check is then the full one."""
        try:
            self.checkpoint_path.unlink(missing_ok=True)
        except OSError as err:
            raise AuditError(f"cannot remove the audit checkpoint {self.checkpoint_path}: {err.strerror}") from err

    def _refused_checkpoint(self, kind: str, detail: str) -> TailVerification:
        return TailVerification(None, (), None, (AuditProblem(-1, None, kind, detail),))

    def _current_checkpoint_count(self) -> int | None:
        try:
            with self.checkpoint_path.open("rb") as handle:
                header = _parse_checkpoint_header(handle.readline().rstrip(b"\n"))
        except OSError:
            return None
        return None if isinstance(header, str) else int(header["count"])

    # ------------------------------------------------------------ internals

    def _snapshot(self) -> tuple[bytes, bytes | None]:
        """The log and head as one consistent pair (under a shared lock)."""
        if not self._path.exists():
            return b"", self._read_head_bytes()
        with self._locked(write=False) as fd:
            size = os.fstat(fd).st_size
            chunks: list[bytes] = []
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks), self._read_head_bytes()

    def _read_head_bytes(self) -> bytes | None:
        try:
            return self._head_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise AuditError(f"cannot read the audit head record {self._head_path}: {err.strerror}") from err

    @contextmanager
    def _locked(self, *, write: bool) -> Iterator[int]:
        if write and not self._path.parent.is_dir():
            raise AuditError(
                f"cannot open the audit log {self._path}: folder {self._path.parent} does not exist"
            )
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT if write else os.O_RDONLY
        try:
            fd = os.open(self._path, flags, FILE_MODE)  # owner only, whatever the umask (it can only remove bits)
        except OSError as err:
            raise AuditError(f"cannot open the audit log {self._path}: {err.strerror}") from err
        try:
            operation = fcntl.LOCK_EX if write else fcntl.LOCK_SH
            deadline = time.monotonic() + self._lock_timeout
            while True:
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise AuditError(
                            f"the audit log {self._path} stayed locked by another process for "
                            f"{self._lock_timeout:g} s; try again, or find the process holding it"
                        ) from None
                    time.sleep(0.005)
            yield fd
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _prepare_tail(self, fd: int, key: Ed25519PrivateKey) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry (-1 and 64 zeros for none), after checking the head.

        A last line cut off by a crash mid-write was never acknowledged (the head was not
        rewritten), so it is removed; a whole entry missing only its newline is completed.
        """
        public_key = key.public_key()
        size = os.fstat(fd).st_size
        last_raw, torn = _read_tail(fd, size)
        tail: AuditEntry | None = None
        if last_raw is not None:
            parsed = _parse_line(last_raw)
            if isinstance(parsed, str):
                raise AuditError(
                    f"the last entry of the audit log {self._path} is unreadable ({parsed}); appending is "
                    "refused. Run `medfed node audit verify`"
                )
            tail = parsed.entry
        completed: AuditEntry | None = None
        if torn:
            candidate = _parse_line(torn)
            if (
                isinstance(candidate, _Parsed)
                and candidate.canonical
                and candidate.entry.seq == (tail.seq + 1 if tail else 0)
                and candidate.entry.prev == (tail.hash if tail else GENESIS_HASH)
                and _entry_signed(public_key, candidate.entry)
            ):
                completed = candidate.entry
        effective = completed if completed is not None else tail
        head = self._head_for_append(public_key)
        self._check_against_head(effective, head, public_key)
        try:
            if completed is not None:
                _write_all(fd, b"\n")
                os.fsync(fd)
                logger.warning("completed the last entry of %s, which had lost its newline", self._path)
            elif torn:
                os.ftruncate(fd, size - len(torn))
                os.fsync(fd)
                logger.warning(
                    "removed an incomplete last line of %d bytes from %s (a write cut off by a crash)",
                    len(torn),
                    self._path,
                )
        except OSError as err:
            raise AuditError(f"cannot repair the end of the audit log {self._path}: {err.strerror}") from err
        if effective is None:
            return -1, GENESIS_HASH
        return effective.seq, effective.hash

    def _head_for_append(self, public_key: Ed25519PublicKey) -> tuple[int, str] | None:
        raw = self._read_head_bytes()
        if raw is None:
            return None
        parsed = _parse_head(raw)
        if isinstance(parsed, str):
            raise AuditError(
                f"the audit head record {self._head_path} is unreadable ({parsed}); appending is refused. "
                "Run `medfed node audit verify`"
            )
        count, last, signature = parsed
        if not _signature_ok(public_key, _head_message(count, last), signature):
            raise AuditError(
                f"the audit head record {self._head_path} is not signed by this node's key; appending is "
                "refused. Run `medfed node audit verify`"
            )
        return count, last

    def _check_against_head(
        self, tail: AuditEntry | None, head: tuple[int, str] | None, public_key: Ed25519PublicKey
    ) -> None:
        if head is None and tail is None:
            return
        refuse = (
            "appending is refused so that the gap cannot be hidden. Run `medfed node audit verify` "
            "and tell the data-governance officer"
        )
        if head is None:
            raise AuditError(
                f"the audit log {self._path} holds entries but its head record {self._head_path.name} is "
                f"missing: its last entries may have been deleted; {refuse}"
            )
        count, last = head
        if tail is not None:
            if tail.seq == count - 1 and tail.hash == last:
                return
            # A crash between writing the entry and rewriting the head leaves the log one ahead.
            if (
                tail.seq == count
                and tail.prev == last
                and _entry_signed(public_key, tail)
            ):
                return
        ends = f"ends at seq {tail.seq}" if tail is not None else "is empty"
        raise AuditError(
            f"the audit log {self._path} {ends} but its signed head records {count} entries ending in "
            f"{last[:12]}: entries were deleted or changed; {refuse}"
        )

    def _write_head(self, key: Ed25519PrivateKey, *, count: int, last: str) -> None:
        record = {"count": count, "last": last, "sig": _sign(key, _head_message(count, last))}
        _publish(self._head_path, (_canonical(record) + "\n").encode("ascii"), what="audit head record")
