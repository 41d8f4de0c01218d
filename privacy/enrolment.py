"""Enrolment files: how a hospital node and the coordinator exchange what each must trust.

A node asks to join with an **enrolment request** (``medfed node init`` writes it): its
name and two public keys, the EC key it authenticates to the SuperLink's Fleet API with
and the Ed25519 key that signs its audit log::

    [enrolment_request]
    node = "hospital_1"
    auth_public_key = "ecdsa-sha2-nistp384 AAAA... fleet_auth"
    audit_public_key = "ssh-ed25519 AAAA... node_audit"
    created_at = 2026-05-09T07:35:25Z

The operator registers the auth key (``medfed coordinator enrol``) and answers with an
**enrolment bundle**: the node id the SuperLink assigned, the fleet address to dial and
the alliance CA certificate that signed the SuperLink's certificate::

    [enrolment]
    node = "hospital_1"
    node_id = 7439890710427968256
    fleet_address = "coordinator.alliance.example:9092"
    auth_key_fingerprint = "SHA256:..."
    ca_certificate = "-----BEGIN CERTIFICATE-----\n..."   # PEM, as a multi-line string
    issued_at = 2026-05-09T08:00:00Z

Neither file holds a secret. Both are parsed once into frozen values; every problem is
reported at once, by field (:class:`~privacy.errors.EnrolmentError`). Each is written
exclusively: an existing file is never replaced.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.errors import EnrolmentError, KeyFileError
from privacy.keys import fingerprint, format_public_key, load_public_key
from privacy.pki import format_node_auth_public_key, load_node_auth_public_key, node_auth_fingerprint
from privacy.private_files import publish

__all__ = ["EnrolmentBundle", "EnrolmentRequest"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
_REQUEST_KEYS = ("node", "auth_public_key", "audit_public_key", "created_at")
_BUNDLE_KEYS = ("node", "node_id", "fleet_address", "auth_key_fingerprint", "ca_certificate", "issued_at")


def _unknown(field_name: str, key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
    return f"{field_name} is not a known field{hint}"


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_table(path: Path, table: str, what: str) -> tuple[Mapping[str, Any], list[str]]:
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnrolmentError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise EnrolmentError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise EnrolmentError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise EnrolmentError(f"{what} {path} is not a TOML file: {err}") from None
    problems = [_unknown(key, key, (table,)) for key in raw if key != table]
    body = raw.get(table)
    if not isinstance(body, dict):
        raise EnrolmentError(f"{what} {path} has no [{table}] table; is it the right file?")
    return body, problems


def _key_problems(body: Mapping[str, Any], prefix: str, keys: tuple[str, ...]) -> list[str]:
    """Unknown and missing keys of a table, and a node name that breaks the naming rule."""
    problems = [_unknown(f"{prefix}.{k}", k, keys) for k in body if k not in keys]
    problems += [f"{prefix}.{k} is missing" for k in keys if k not in body]
    node = body.get("node", "")
    if "node" in body and not (isinstance(node, str) and _NAME.fullmatch(node)):
        problems.append(f"{prefix}.node must be 1-64 letters, digits, '_' or '-'; found {node!r}")
    return problems


def _write_new(path: Path, text: str, what: str) -> None:
    """Write a new file whole, owner only (it says who may join the alliance); never replace one."""
    path = Path(path).expanduser()
    try:
        publish(path, text, replace=False)
    except FileExistsError:
        raise EnrolmentError(f"{what} {path} already exists; move it away or choose another file") from None
    except OSError as err:
        raise EnrolmentError(f"cannot write {what} {path}: {err.strerror or err}") from None


def _timestamp(body: Mapping[str, Any], key: str, prefix: str, problems: list[str]) -> datetime:
    value = body.get(key)
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    problems.append(f"{prefix}.{key} must be a date-time with a time zone, e.g. 2026-05-09T07:35:25Z")
    return datetime.now(UTC)


@dataclass(frozen=True)
class EnrolmentRequest:
    """A node's request to join: its name and public keys (no secret)."""

    node: str
    auth_public_key: ec.EllipticCurvePublicKey = field(repr=False)
    audit_public_key: Ed25519PublicKey = field(repr=False)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    @property
    def auth_fingerprint(self) -> str:
        return node_auth_fingerprint(self.auth_public_key)

    @property
    def audit_fingerprint(self) -> str:
        return fingerprint(self.audit_public_key)

    @property
    def auth_openssh(self) -> str:
        """The auth key as the OpenSSH line `flwr supernode register` reads."""
        return format_node_auth_public_key(self.auth_public_key, comment=self.node)

    def to_toml(self) -> str:
        return (
            "# medfed enrolment request: send this file to the alliance operator.\n"
            "[enrolment_request]\n"
            f'node = "{self.node}"\n'
            f'auth_public_key = "{format_node_auth_public_key(self.auth_public_key, comment="fleet_auth")}"\n'
            f'audit_public_key = "{format_public_key(self.audit_public_key, comment="node_audit")}"\n'
            f"created_at = {_utc(self.created_at)}\n"
        )

    def write(self, path: Path) -> None:
        """Write the request to a new file (never over an existing one)."""
        _write_new(path, self.to_toml(), "enrolment request")

    @classmethod
    def read(cls, path: Path) -> EnrolmentRequest:
        """Parse a request file; every problem at once.

        Raises
        ------
        EnrolmentError
            If the file is missing, not TOML, or any field is missing or invalid.
        """
        body, problems = _read_table(path, "enrolment_request", "enrolment request")
        prefix = "enrolment_request"
        problems += _key_problems(body, prefix, _REQUEST_KEYS)
        node = body.get("node", "")
        auth_key: ec.EllipticCurvePublicKey | None = None
        audit_key: Ed25519PublicKey | None = None
        if isinstance(body.get("auth_public_key"), str):
            try:
                auth_key = load_node_auth_public_key(body["auth_public_key"])
            except KeyFileError as err:
                problems.append(f"{prefix}.auth_public_key: {err}")
        elif "auth_public_key" in body:
            problems.append(f"{prefix}.auth_public_key must be one OpenSSH line")
        if isinstance(body.get("audit_public_key"), str):
            try:
                audit_key = load_public_key(body["audit_public_key"])
            except KeyFileError as err:
                problems.append(f"{prefix}.audit_public_key: {err}")
        elif "audit_public_key" in body:
            problems.append(f"{prefix}.audit_public_key must be one OpenSSH line")
        created = _timestamp(body, "created_at", prefix, problems) if "created_at" in body else datetime.now(UTC)
        if problems or auth_key is None or audit_key is None:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise EnrolmentError(f"enrolment request {path} is invalid:\n{listing}")
        return cls(node=node, auth_public_key=auth_key, audit_public_key=audit_key, created_at=created)


@dataclass(frozen=True)
class EnrolmentBundle:
    """The coordinator's answer: node id, fleet address and the alliance CA certificate."""

    node: str
    node_id: int
    fleet_address: str
    auth_key_fingerprint: str
    ca_certificate: str = field(repr=False)
    issued_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    @property
    def ca_fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.ca_certificate.encode("ascii"))
        return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()

    def to_toml(self) -> str:
        return (
            "# medfed enrolment bundle: install it with `medfed node enrol <this file>`.\n"
            "[enrolment]\n"
            f'node = "{self.node}"\n'
            f"node_id = {self.node_id}\n"
            f'fleet_address = "{self.fleet_address}"\n'
            f'auth_key_fingerprint = "{self.auth_key_fingerprint}"\n'
            f'ca_certificate = """\n{self.ca_certificate.strip()}\n"""\n'
            f"issued_at = {_utc(self.issued_at)}\n"
        )

    def write(self, path: Path) -> None:
        """Write the bundle to a new file (never over an existing one)."""
        _write_new(path, self.to_toml(), "enrolment bundle")

    @classmethod
    def read(cls, path: Path) -> EnrolmentBundle:
        """Parse a bundle file; every problem at once.

        Raises
        ------
        EnrolmentError
            If the file is missing, not TOML, or any field is missing or invalid.
        """
        body, problems = _read_table(path, "enrolment", "enrolment bundle")
        prefix = "enrolment"
        problems += _key_problems(body, prefix, _BUNDLE_KEYS)
        node = body.get("node", "")
        node_id = body.get("node_id", 0)
        if "node_id" in body and (isinstance(node_id, bool) or not isinstance(node_id, int) or node_id <= 0):
            problems.append(f"{prefix}.node_id must be a positive integer; found {node_id!r}")
        address = body.get("fleet_address", "")
        if "fleet_address" in body:
            match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
            if match is None or not 0 < int(match.group(1)) < 65536:
                problems.append(f"{prefix}.fleet_address must be HOST:PORT; found {address!r}")
        pem = body.get("ca_certificate", "")
        if "ca_certificate" in body:
            try:
                x509.load_pem_x509_certificate(pem.strip().encode("ascii"))
            except (ValueError, AttributeError, UnicodeEncodeError):
                problems.append(f"{prefix}.ca_certificate is not a PEM certificate")
        key_fp = body.get("auth_key_fingerprint", "")
        if "auth_key_fingerprint" in body and not (isinstance(key_fp, str) and key_fp.startswith("SHA256:")):
            problems.append(f"{prefix}.auth_key_fingerprint must be a 'SHA256:' fingerprint")
        issued = _timestamp(body, "issued_at", prefix, problems) if "issued_at" in body else datetime.now(UTC)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise EnrolmentError(f"enrolment bundle {path} is invalid:\n{listing}")
        return cls(
            node=node,
            node_id=node_id,
            fleet_address=address,
            auth_key_fingerprint=key_fp,
            ca_certificate=pem.strip() + "\n",
            issued_at=issued,
        )
