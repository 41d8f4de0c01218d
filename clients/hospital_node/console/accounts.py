"""Officer accounts of the console: named officers, each with a salted scrypt hash of a password.

``medfed node console init --home H --officer NAME`` adds (or, with ``--replace``, resets)
an account. The accounts live in ``keys/console_officers.json`` in the node home, and the
key that signs session cookies in ``keys/console_session.key``; both are written
owner-only (0600) and atomically, and the console refuses to start while either is open
to other users. There is no default account and no shared password: every decision the
console writes names the officer who logged in.

Passwords are hashed with the standard library's scrypt (RFC 7914) at n = 2**15, r = 8,
p = 1 (32 MiB, about 0.1 s per check); the parameters are stored with each hash so they
can be raised later without invalidating accounts.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clients.hospital_node.errors import ConsoleError

__all__ = ["MIN_PASSWORD_LENGTH", "OfficerAccounts", "session_key"]

ACCOUNTS_FILE = "console_officers.json"
SESSION_KEY_FILE = "console_session.key"
MIN_PASSWORD_LENGTH = 12

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_N, _R, _P = 2**15, 8, 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAXMEM = 64 * 1024 * 1024


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=_HASH_BYTES)


def _hash(password: str) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, _N, _R, _P)
    return "$".join(("scrypt", str(_N), str(_R), str(_P), base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def _matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        wanted = base64.b64decode(digest)
        return hmac.compare_digest(_scrypt(password, base64.b64decode(salt), int(n), int(r), int(p)), wanted)
    except ValueError:
        return False


@functools.cache
def _dummy() -> str:
    """Checked against when the officer name is unknown, so that a wrong name costs as long as a wrong password."""
    return _hash(secrets.token_hex(16))


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` owner-only (0600), whole or not at all."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _owner_only(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConsoleError(f"{path} is open to other users (mode {mode:04o}); run `chmod 600 {path}`")


@dataclass(frozen=True)
class Officer:
    """One officer account as stored: the name, its password hash and when it was made."""

    name: str
    password_hash: str
    created_at: str

    @property
    def tag(self) -> str:
        """A short digest of the stored hash: a session carries it, so a reset password ends old sessions."""
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]


class OfficerAccounts:
    """The officer accounts of one node home (``keys/console_officers.json``)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "keys" / ACCOUNTS_FILE

    def _read(self) -> dict[str, Officer]:
        if not self.path.exists():
            return {}
        _owner_only(self.path)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {
                name: Officer(name, str(entry["password"]), str(entry.get("created_at", "")))
                for name, entry in raw["officers"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConsoleError(f"{self.path} is not a valid officer accounts file ({err}); "
                               "recreate the accounts with `medfed node console init`") from None

    def names(self) -> list[str]:
        """The officers who may log in, sorted."""
        return sorted(self._read())

    def get(self, name: str) -> Officer | None:
        return self._read().get(name)

    def add(self, name: str, password: str, *, replace: bool = False) -> Officer:
        """Add officer `name` (or reset their password with `replace`); written whole at 0600.

        Raises
        ------
        ConsoleError
            A bad name, a short password, or an existing officer without `replace`.
        """
        if not _NAME.fullmatch(name):
            raise ConsoleError(f"--officer {name!r} is not a valid officer name; use letters, digits, '.', '_' or '-' "
                               "(at most 64, starting with a letter or digit)")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ConsoleError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters; "
                               f"found {len(password)}; nothing was written")
        officers = self._read()
        if name in officers and not replace:
            raise ConsoleError(f"officer {name!r} already has an account in {self.path}; "
                               "pass --replace to set a new password")
        officers[name] = Officer(name, _hash(password), datetime.now(UTC).isoformat(timespec="seconds"))
        document = {"officers": {n: {"password": o.password_hash, "created_at": o.created_at} for n, o in sorted(officers.items())}}
        _write_private(self.path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
        return officers[name]

    def check(self, name: str, password: str) -> Officer | None:
        """The officer if `password` is theirs, else None (an unknown name takes as long as a wrong password)."""
        officer = self._read().get(name)
        if officer is None:
            _matches(password, _dummy())
            return None
        return officer if _matches(password, officer.password_hash) else None


def session_key(home: Path, *, create: bool = False) -> bytes:
    """The key that signs this node's console session cookies (``keys/console_session.key``, 0600).

    Created by ``console init``; a node home that has none cannot serve the console.
    """
    path = Path(home) / "keys" / SESSION_KEY_FILE
    if not path.exists():
        if not create:
            raise ConsoleError(f"{path} is missing; create an officer account with `medfed node console init` first")
        _write_private(path, secrets.token_bytes(32))
    _owner_only(path)
    key = path.read_bytes()
    if len(key) < 32:
        raise ConsoleError(f"{path} is shorter than 32 bytes; delete it and run `medfed node console init` again")
    return key
