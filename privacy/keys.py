"""Ed25519 keys: key pairs on disk, signatures, fingerprints and the trusted-partner registry.

Research partners sign the canonical form of their experiment specs; each node signs its
audit log. The primitives are `cryptography`'s; this module only decides how keys are
stored and named:

- a private key is an unencrypted PKCS#8 PEM file, ``<name>.key``, readable by its owner
  only (like ssh, a key that others may read is refused);
- a public key is one OpenSSH line, ``ssh-ed25519 AAAA... <name>``, in ``<name>.pub``;
- a fingerprint is what ``ssh-keygen -lf <name>.pub`` prints: ``SHA256:`` and the
  unpadded base64 of the SHA-256 of the key's OpenSSH wire blob, so an officer can
  compare it with the partner's over the phone or with ssh tooling.

A node's officer keeps the partners it trusts in :class:`TrustedKeys`, a TOML file in
the node home::

    [partners.acme_research]
    public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... acme_research"
    added_at = 2026-05-09T07:35:25Z
    added_by = "j.doe"                 # optional
"""

from __future__ import annotations

import base64
import difflib
import fcntl
import hashlib
import logging
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.errors import KeyFileError, SignatureError, TrustedKeysError
from privacy.private_files import FILE_MODE, PUBLIC_FILE_MODE, make_private_folder, publish

__all__ = [
    "KeyPair",
    "PRIVATE_KEY_SUFFIX",
    "PUBLIC_KEY_SUFFIX",
    "TRUSTED_KEYS_FILE",
    "TrustedKey",
    "TrustedKeys",
    "fingerprint",
    "format_public_key",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "read_private_file",
    "sign",
    "toml_string",
    "verify",
]

logger = logging.getLogger(__name__)

PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"
TRUSTED_KEYS_FILE = "trusted_partners.toml"

# Key and partner names become file names and TOML bare keys.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")

_PARTNER_KEYS = ("public_key", "added_at", "added_by", "rehearsal")
_REQUIRED_PARTNER_KEYS = ("public_key", "added_at")


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeyFileError(f"{what} {name!r} is invalid; use {_NAME_RULE}")
    return name


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


# ---------------------------------------------------------------- keys and signatures


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """The key's SHA-256 fingerprint as ``ssh-keygen -l`` prints it: ``SHA256:<base64>``."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def format_public_key(public_key: Ed25519PublicKey, *, comment: str | None = None) -> str:
    """The key as one OpenSSH line, ``ssh-ed25519 AAAA...``, with an optional comment."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    if comment:
        if any(char.isspace() for char in comment):
            raise ValueError("a public key comment cannot hold whitespace")
        line = f"{line} {comment}"
    return line


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    """Check that ``signature`` is ``public_key``'s signature of ``data``.

    Raises
    ------
    SignatureError
        If it is not (wrong key, altered data or a damaged signature).
    """
    try:
        public_key.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError(
            f"signature does not verify with key {fingerprint(public_key)}: "
            "the data was altered, or it was signed by another key"
        ) from None


@dataclass(frozen=True)
class KeyPair:
    """A key pair written by :func:`generate_keypair`; the private key is never in its repr."""

    name: str
    private_key_path: Path
    public_key_path: Path
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: Ed25519PublicKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The public key's ``SHA256:`` fingerprint."""
        return fingerprint(self.public_key)


def generate_keypair(directory: Path, name: str) -> KeyPair:
    """Create a new Ed25519 key pair as ``<directory>/<name>.key`` and ``<name>.pub``.

    The folder is created (mode 0700) if it does not exist. The private key file is
    mode 0600; the public key file holds one OpenSSH line whose comment is ``name``.

    Raises
    ------
    KeyFileError
        If the name is invalid, either file exists already (keys are never overwritten),
        or the files cannot be written.
    """
    _check_name(name, "key name")
    folder = Path(directory).expanduser()
    private_path = folder / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = folder / f"{name}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} already exists; keys are never overwritten. "
                "Choose another --name or folder, or move the old key away first"
            )
    try:
        make_private_folder(folder)
    except OSError as err:
        raise KeyFileError(f"cannot create key folder {folder}: {_reason(err)}") from err

    private_key = Ed25519PrivateKey.generate()
    public_key = private_key.public_key()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_line = format_public_key(public_key, comment=name) + "\n"
    try:
        publish(private_path, pem, mode=FILE_MODE, replace=False)
    except FileExistsError:
        raise KeyFileError(f"{private_path} already exists; keys are never overwritten") from None
    except OSError as err:
        raise KeyFileError(f"cannot write private key {private_path}: {_reason(err)}") from err
    try:
        publish(public_path, public_line.encode("ascii"), mode=PUBLIC_FILE_MODE, replace=False)
    except OSError as err:
        # Leave no private key without its public half (and no half-made pair).
        private_path.unlink(missing_ok=True)
        if isinstance(err, FileExistsError):
            raise KeyFileError(f"{public_path} already exists; keys are never overwritten") from None
        raise KeyFileError(f"cannot write public key {public_path}: {_reason(err)}") from err
    logger.info("created key pair %s in %s (%s)", name, folder, fingerprint(public_key))
    return KeyPair(
        name=name,
        private_key_path=private_path,
        public_key_path=public_path,
        private_key=private_key,
        public_key=public_key,
    )


def read_private_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of a secret file that only its owner may read; `error` names `what` and the path.

    A missing or unreadable file, something other than a regular file, or a file that
    group or others may read (fix with ``chmod 600``) raises `error`.
    """
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {_reason(err)}") from err
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise error(
            f"{what} {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {_reason(err)}") from err


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key that only its owner can read.

    Raises
    ------
    KeyFileError
        If the file is missing or unreadable, readable by group or others (fix with
        ``chmod 600``), encrypted, malformed, or not an Ed25519 key.
    """
    path = Path(path).expanduser()
    data = read_private_file(path, "private key", KeyFileError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"private key {path} is encrypted; medfed reads unencrypted PKCS#8 keys "
            "(protect them with file permissions and disk encryption)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"private key {path} is not a PEM private key; create one with `medfed keys new`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _parse_public_key(text: str, source: str) -> Ed25519PublicKey:
    stripped = text.strip()
    if not stripped:
        raise KeyFileError(f"{source} is empty; expected one line 'ssh-ed25519 AAAA...'")
    data = stripped.encode("utf-8", errors="replace")
    try:
        if stripped.startswith("-----BEGIN"):
            key: object = serialization.load_pem_public_key(data)
        elif "\n" in stripped:
            raise KeyFileError(
                f"{source} holds more than one line; expected one line 'ssh-ed25519 AAAA...'"
            )
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{source} is not an OpenSSH or PEM public key; expected one line 'ssh-ed25519 AAAA...'"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(source: Path | str) -> Ed25519PublicKey:
    """Read an Ed25519 public key from a file (a :class:`~pathlib.Path`) or from text (a ``str``).

    Both accept one OpenSSH line (``ssh-ed25519 AAAA... [comment]``) or a PEM
    ``PUBLIC KEY`` block.

    Raises
    ------
    KeyFileError
        If the file cannot be read, or the text is not an Ed25519 public key.
    """
    if isinstance(source, Path):
        path = source.expanduser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise KeyFileError(f"public key {path} does not exist") from None
        except OSError as err:
            raise KeyFileError(f"cannot read public key {path}: {_reason(err)}") from err
        return _parse_public_key(text, f"public key {path}")
    if isinstance(source, str):
        return _parse_public_key(source, "the public key text")
    raise TypeError(f"load_public_key takes a Path or a str; found {type(source).__name__}")


# ---------------------------------------------------------------- trusted partners


@dataclass(frozen=True)
class TrustedKey:
    """A research partner's public key, as the officer registered it."""

    name: str
    public_key: Ed25519PublicKey = field(repr=False)
    added_at: datetime  # timezone-aware, UTC
    added_by: str | None = None
    # A rehearsal key signs specs only for virtual hospitals (`medfed simulate`); a real node refuses it.
    rehearsal: bool = False

    @property
    def fingerprint(self) -> str:
        """The key's ``SHA256:`` fingerprint."""
        return fingerprint(self.public_key)

    @property
    def openssh(self) -> str:
        """The key as the OpenSSH line stored in the registry."""
        return format_public_key(self.public_key, comment=self.name)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string, escaped as the TOML 1.0 grammar requires."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError("a lone surrogate cannot be written to TOML")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _unknown_key(field_name: str, key: str, known: tuple[str, ...]) -> str:
    message = f"{field_name} is not a known field"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message}; known fields: {', '.join(known)}"


def _parse_partner(name: str, raw: object) -> tuple[TrustedKey | None, list[str]]:
    prefix = f"partners.{name}"
    if not isinstance(raw, dict):
        return None, [f"{prefix} must be a table"]
    problems: list[str] = []
    if not _NAME.fullmatch(name):
        problems.append(f"partner name {name!r} is invalid; use {_NAME_RULE}")
    problems += [
        _unknown_key(f"{prefix}.{key}", key, _PARTNER_KEYS) for key in raw if key not in _PARTNER_KEYS
    ]
    problems += [f"{prefix}.{key} is missing" for key in _REQUIRED_PARTNER_KEYS if key not in raw]
    public_key: Ed25519PublicKey | None = None
    text = raw.get("public_key")
    if "public_key" in raw:
        if not isinstance(text, str):
            problems.append(f"{prefix}.public_key must be a string 'ssh-ed25519 AAAA...'")
        else:
            try:
                public_key = _parse_public_key(text, f"{prefix}.public_key")
            except KeyFileError as err:
                problems.append(str(err))
    added_at = raw.get("added_at")
    if "added_at" in raw and not (isinstance(added_at, datetime) and added_at.tzinfo is not None):
        problems.append(f"{prefix}.added_at must be a date-time with a UTC offset, e.g. 2026-05-09T07:35:25Z")
    added_by = raw.get("added_by")
    if added_by is not None and not isinstance(added_by, str):
        problems.append(f"{prefix}.added_by must be a string")
    rehearsal = raw.get("rehearsal", False)
    if not isinstance(rehearsal, bool):
        problems.append(f"{prefix}.rehearsal must be true or false")
    if problems or public_key is None or not isinstance(added_at, datetime):
        return None, problems
    return (
        TrustedKey(
            name=name, public_key=public_key, added_at=added_at.astimezone(UTC), added_by=added_by, rehearsal=bool(rehearsal)
        ),
        [],
    )


def _render(partners: Mapping[str, TrustedKey]) -> str:
    lines = [
        "# Research partners whose signed experiments this node accepts.",
        "# `medfed` rewrites this file: comments are not kept.",
    ]
    for name in sorted(partners):
        partner = partners[name]
        lines += [
            "",
            f"[partners.{name}]",
            f"public_key = {toml_string(partner.openssh)}",
            f"added_at = {partner.added_at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        ]
        if partner.added_by is not None:
            lines.append(f"added_by = {toml_string(partner.added_by)}")
        if partner.rehearsal:
            lines.append("rehearsal = true")
    return "\n".join(lines) + "\n"


class TrustedKeys:
    """The trusted research-partner keys of a node, kept in ``<directory>/trusted_partners.toml``.

    Every call reads the file afresh, so separate processes see each other's changes.
    Changes hold an exclusive lock on a ``.lock`` file beside it and replace the file
    atomically, so a failed or concurrent change never leaves it half-written.
    A missing file is an empty registry.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = Path(directory).expanduser()
        self._path = self._directory / TRUSTED_KEYS_FILE

    @property
    def path(self) -> Path:
        """The registry file."""
        return self._path

    def list(self) -> tuple[TrustedKey, ...]:
        """Every trusted partner, by name."""
        partners = self._read()
        return tuple(partners[name] for name in sorted(partners))

    def get(self, name: str) -> TrustedKey:
        """The partner called ``name``.

        Raises
        ------
        TrustedKeysError
            If no partner of that name is trusted.
        """
        partners = self._read()
        try:
            return partners[name]
        except KeyError:
            raise TrustedKeysError(self._unknown(name, partners)) from None

    def by_fingerprint(self, key_fingerprint: str) -> TrustedKey:
        """The partner whose key has this ``SHA256:`` fingerprint.

        Raises
        ------
        SignatureError
            If no trusted partner holds that key: the signer is unknown to this node.
        """
        if not isinstance(key_fingerprint, str) or not _FINGERPRINT.fullmatch(key_fingerprint):
            raise SignatureError(
                f"signer {key_fingerprint!r} is not a key fingerprint; expected 'SHA256:' "
                "and 43 base64 characters, as `medfed keys fingerprint` prints"
            )
        for partner in self._read().values():
            if partner.fingerprint == key_fingerprint:
                return partner
        raise SignatureError(
            f"signer {key_fingerprint} is not a trusted partner of this node; "
            f"the officer must add the partner's public key to {self._path} first"
        )

    def verify(self, data: bytes, signature: bytes, *, signer: str) -> TrustedKey:
        """Check ``signature`` over ``data`` by the trusted partner whose key fingerprint is ``signer``.

        Returns
        -------
        TrustedKey
            The partner who signed.

        Raises
        ------
        SignatureError
            If the signer is not trusted, or the signature does not verify with their key.
        """
        partner = self.by_fingerprint(signer)
        try:
            verify(partner.public_key, data, signature)
        except SignatureError:
            raise SignatureError(
                f"signature does not verify with the key of trusted partner {partner.name!r} "
                f"({partner.fingerprint}): the signed data was altered or the signature is damaged"
            ) from None
        return partner

    def add(
        self, name: str, public_key: Ed25519PublicKey | Path | str, *, added_by: str | None = None, rehearsal: bool = False
    ) -> TrustedKey:
        """Trust ``public_key`` (a key, a ``.pub`` file, or OpenSSH/PEM text) as partner ``name``.

        ``rehearsal`` marks it a rehearsal key: its signatures count only on a rehearsal's
        virtual hospitals, and a real node refuses them.

        Raises
        ------
        TrustedKeysError
            If the name is invalid or taken, or the key is trusted already under another name.
        KeyFileError
            If the key file or text is not an Ed25519 public key.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TrustedKeysError(f"partner name {name!r} is invalid; use {_NAME_RULE}")
        if added_by is not None and (not added_by.strip() or "\n" in added_by):
            raise TrustedKeysError("added_by must be a non-empty single line, e.g. the officer's user name")
        if isinstance(public_key, Ed25519PublicKey):
            key = public_key
        elif isinstance(public_key, Path):
            key = load_public_key(public_key)
        else:
            key = _parse_public_key(public_key, f"public key for partner {name!r}")
        key_fingerprint = fingerprint(key)
        with self._locked():
            partners = self._read()
            if name in partners:
                raise TrustedKeysError(
                    f"partner {name!r} is trusted already ({partners[name].fingerprint}); "
                    "remove it first to replace its key"
                )
            for other in partners.values():
                if other.fingerprint == key_fingerprint:
                    raise TrustedKeysError(
                        f"key {key_fingerprint} is trusted already, as partner {other.name!r}"
                    )
            partner = TrustedKey(
                name=name,
                public_key=key,
                added_at=datetime.now(UTC).replace(microsecond=0),
                added_by=added_by,
                rehearsal=rehearsal,
            )
            partners[name] = partner
            self._write(partners)
        logger.info("trusted partner %s (%s) in %s", name, key_fingerprint, self._path)
        return partner

    def remove(self, name: str) -> TrustedKey:
        """Stop trusting partner ``name``; returns the removed entry.

        Raises
        ------
        TrustedKeysError
            If no partner of that name is trusted.
        """
        with self._locked():
            partners = self._read()
            if name not in partners:
                raise TrustedKeysError(self._unknown(name, partners))
            removed = partners.pop(name)
            self._write(partners)
        logger.info("removed trusted partner %s (%s) from %s", name, removed.fingerprint, self._path)
        return removed

    def _unknown(self, name: str, partners: Mapping[str, TrustedKey]) -> str:
        message = f"partner {name!r} is not trusted on this node ({self._path})"
        close = difflib.get_close_matches(name, list(partners), n=1)
        if close:
            return f"{message}; did you mean {close[0]!r}?"
        listed = ", ".join(sorted(partners)) if partners else "none"
        return f"{message}; trusted partners: {listed}"

    def _read(self) -> dict[str, TrustedKey]:
        try:
            with self._path.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise TrustedKeysError(f"cannot read {self._path}: {_reason(err)}") from err
        except tomllib.TOMLDecodeError as err:
            raise TrustedKeysError(f"{self._path} is not valid TOML: {err}") from err
        return self._parse(raw)

    def _parse(self, raw: Mapping[str, Any]) -> dict[str, TrustedKey]:
        problems = [_unknown_key(key, key, ("partners",)) for key in raw if key != "partners"]
        tables = raw.get("partners", {})
        partners: dict[str, TrustedKey] = {}
        if not isinstance(tables, dict):
            problems.append("partners must be a table of [partners.<name>] tables")
            tables = {}
        seen: dict[str, str] = {}
        for name, table in tables.items():
            partner, partner_problems = _parse_partner(name, table)
            problems += partner_problems
            if partner is None:
                continue
            first = seen.setdefault(partner.fingerprint, name)
            if first != name:
                problems.append(f"partners.{name}.public_key is the same key as partners.{first}")
            partners[name] = partner
        if problems:
            listing = "\n".join(f"  - {problem}" for problem in problems)
            raise TrustedKeysError(f"{self._path} is invalid:\n{listing}")
        return partners

    def _write(self, partners: Mapping[str, TrustedKey]) -> None:
        try:
            publish(self._path, _render(partners))  # owner only: who the node trusts is its officer's business
        except OSError as err:
            raise TrustedKeysError(f"cannot write {self._path}: {_reason(err)}") from err

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._directory.is_dir():
            raise TrustedKeysError(
                f"cannot change {self._path}: folder {self._directory} does not exist"
            )
        lock_path = self._directory / f".{TRUSTED_KEYS_FILE}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise TrustedKeysError(f"cannot lock {self._path}: {_reason(err)}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
