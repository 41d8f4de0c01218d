"""The alliance PKI: its certificate authority, the SuperLink's TLS certificate, node auth keys.

The Fleet API between hospitals and the coordinator runs over TLS, and the SuperLink
admits only SuperNodes whose EC public key the operator registered. This module makes
and checks the files that needs; the primitives are `cryptography`'s:

- the alliance CA: a self-signed EC P-384 certificate ``ca.crt`` and its key ``ca.key``;
- the SuperLink's server certificate ``server.pem`` (EC P-256, key ``server.key``),
  signed by the CA, with a subject alternative name for every host name and IP address
  the nodes dial, plus ``DNS:localhost`` and ``IP:127.0.0.1`` always: Flower's SuperExec
  reaches the SuperLink's runtime API on loopback with the same certificate;
- a node's Fleet authentication key: an EC P-384 key pair in OpenSSH format,
  ``<name>.key`` and ``<name>.pub``, as ``flower-supernode --auth-supernode-private-key``
  and ``flwr supernode register`` read them.

Private keys are written with mode 0600 and are never overwritten: creating a file that
exists raises :class:`~privacy.errors.KeyFileError` (or :class:`CertificateError`).
Only :func:`issue_server_certificate` with ``replace=True`` (the renewal command) replaces
a server certificate and key, atomically. :func:`check_certificate` checks a certificate
against the CA, its validity period and how many days it has left, and logs a warning
when fewer than :data:`EXPIRY_WARNING_DAYS` remain.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.errors import CertificateError, KeyFileError
from privacy.keys import read_private_file
from privacy.private_files import FILE_MODE, PUBLIC_FILE_MODE, make_private_folder, publish

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "EXPIRY_WARNING_DAYS",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "CertificateInfo",
    "IssuedCertificate",
    "NodeAuthKey",
    "check_certificate",
    "create_ca",
    "format_node_auth_public_key",
    "generate_node_auth_key",
    "issue_server_certificate",
    "load_certificate",
    "load_node_auth_private_key",
    "load_node_auth_public_key",
    "node_auth_fingerprint",
    "server_names",
]

logger = logging.getLogger(__name__)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
#: Certificates with fewer days left than this are reported as expiring.
EXPIRY_WARNING_DAYS = 30
CA_VALIDITY_DAYS = 3650
#: 397 days: the longest server certificate lifetime browsers and TLS stacks accept.
SERVER_VALIDITY_DAYS = 397

_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Backdate a little, so that a peer whose clock runs slightly behind accepts a new certificate.
_CLOCK_SKEW = timedelta(minutes=5)


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


# ---------------------------------------------------------------- files


def _refuse_existing(paths: Sequence[Path], error: type[Exception]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise error(
                f"{path} already exists; keys and certificates are never overwritten silently. "
                "Move it away first, or renew on purpose (`medfed coordinator renew`)"
            )


def _make_folder(folder: Path, error: type[Exception]) -> None:
    try:
        make_private_folder(folder)
    except OSError as err:
        raise error(f"cannot create folder {folder}: {_reason(err)}") from err


def _write_pair(
    key_path: Path, key_bytes: bytes, other_path: Path, other_bytes: bytes, *, replace: bool, error: type[Exception]
) -> None:
    """Write a private key (0600) and its public half or certificate (0644) as a pair."""
    try:
        publish(key_path, key_bytes, mode=FILE_MODE, replace=replace)
    except FileExistsError:
        raise error(f"{key_path} already exists; keys are never overwritten") from None
    except OSError as err:
        raise error(f"cannot write private key {key_path}: {_reason(err)}") from err
    try:
        publish(other_path, other_bytes, mode=PUBLIC_FILE_MODE, replace=replace)
    except OSError as err:
        if not replace:
            key_path.unlink(missing_ok=True)  # no private key without its other half
        if isinstance(err, FileExistsError):
            raise error(f"{other_path} already exists; it is never overwritten") from None
        raise error(f"cannot write {other_path}: {_reason(err)}") from err


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator needs to know about one certificate (no key material).

    ``days_left`` is counted from the ``checked_at`` time of :func:`check_certificate`
    (or :func:`load_certificate`'s caller) and is negative once it has expired.
    """

    path: Path
    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    fingerprint: str
    is_ca: bool
    checked_at: datetime
    warn_days: int = EXPIRY_WARNING_DAYS

    @property
    def days_left(self) -> int:
        """Whole days until the certificate expires (negative once it has)."""
        return int((self.not_after - self.checked_at) // timedelta(days=1))

    @property
    def expired(self) -> bool:
        return self.checked_at >= self.not_after

    @property
    def expires_soon(self) -> bool:
        """Valid now, but with fewer than ``warn_days`` days left: renew it."""
        return not self.expired and self.not_after - self.checked_at < timedelta(days=self.warn_days)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its private key as written to disk; the key is never in the repr."""

    cert_path: Path
    key_path: Path
    certificate: x509.Certificate = field(repr=False)
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def info(self, *, now: datetime | None = None) -> CertificateInfo:
        return _info(self.cert_path, self.certificate, _now(now), EXPIRY_WARNING_DAYS)


def _fingerprint(cert: x509.Certificate) -> str:
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _info(path: Path, cert: x509.Certificate, now: datetime, warn_days: int) -> CertificateInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns_names,
        ip_addresses=ips,
        fingerprint=_fingerprint(cert),
        is_ca=is_ca,
        checked_at=now,
        warn_days=warn_days,
    )


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate (the first, if the file holds a chain).

    Raises
    ------
    CertificateError
        If the file is missing or unreadable, or holds no PEM certificate (a private
        key, a public key or an OpenSSH key is named as what it is).
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"certificate {path} does not exist") from None
    except IsADirectoryError:
        raise CertificateError(f"certificate {path} is a folder, not a PEM file") from None
    except OSError as err:
        raise CertificateError(f"cannot read certificate {path}: {_reason(err)}") from err
    if b"-----BEGIN CERTIFICATE-----" not in data:
        found = _what_is(data)
        raise CertificateError(f"{path} is {found}, not a PEM certificate ('-----BEGIN CERTIFICATE-----')")
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise CertificateError(f"certificate {path} is damaged: its PEM block does not decode") from None


def _what_is(data: bytes) -> str:
    head = data.lstrip()[:64]
    if not head:
        return "empty"
    if b"PRIVATE KEY" in head:
        return "a private key"
    if b"PUBLIC KEY" in head:
        return "a public key"
    if head.startswith((b"ssh-", b"ecdsa-sha2-")):
        return "an OpenSSH public key"
    if b"CERTIFICATE REQUEST" in head:
        return "a certificate signing request"
    return "not PEM text"


def check_certificate(
    path: Path,
    *,
    ca_path: Path,
    now: datetime | None = None,
    warn_days: int = EXPIRY_WARNING_DAYS,
) -> CertificateInfo:
    """Check that the certificate at ``path`` was signed by the CA at ``ca_path`` and is valid now.

    A certificate with fewer than ``warn_days`` days left passes, is marked
    ``expires_soon`` and is logged as a warning.

    Raises
    ------
    CertificateError
        If either file is unusable, the CA certificate is not a CA, the certificate was
        signed by another CA, or it has expired or is not valid yet.
    """
    moment = _now(now)
    path = Path(path).expanduser()
    ca_path = Path(ca_path).expanduser()
    cert = load_certificate(path)
    ca = load_certificate(ca_path)
    ca_info = _info(ca_path, ca, moment, warn_days)
    if not ca_info.is_ca:
        raise CertificateError(f"{ca_path} is not a CA certificate (it has no basicConstraints CA:TRUE)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate {path} (issuer {cert.issuer.rfc4514_string()}) was not signed by the CA in "
            f"{ca_path} ({ca.subject.rfc4514_string()}); use the CA certificate of the alliance that issued it"
        ) from None
    for which, info in (("CA certificate", ca_info), ("certificate", _info(path, cert, moment, warn_days))):
        if info.expired:
            raise CertificateError(
                f"{which} {info.path} expired on {info.not_after:%Y-%m-%d %H:%M} UTC; "
                "renew it with `medfed coordinator renew`"
            )
        if moment < info.not_before:
            raise CertificateError(
                f"{which} {info.path} is not valid until {info.not_before:%Y-%m-%d %H:%M} UTC; "
                "check this machine's clock"
            )
    info = _info(path, cert, moment, warn_days)
    if info.expires_soon:
        logger.warning(
            "certificate %s expires in %d days (%s UTC); renew it with `medfed coordinator renew`",
            path, info.days_left, f"{info.not_after:%Y-%m-%d}",
        )
    return info


def create_ca(
    directory: Path,
    *,
    common_name: str = "medfed alliance CA",
    days: int = CA_VALIDITY_DAYS,
    valid_from: datetime | None = None,
) -> IssuedCertificate:
    """Create the alliance CA as ``<directory>/ca.crt`` and ``ca.key`` (mode 0600).

    Raises
    ------
    CertificateError
        If either file exists already, or they cannot be written.
    """
    if days < 1:
        raise CertificateError(f"a CA must be valid for at least 1 day; found {days}")
    folder = Path(directory).expanduser()
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    _refuse_existing((key_path, cert_path), CertificateError)
    _make_folder(folder, CertificateError)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _now(valid_from) - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_pair(key_path, _private_pem(key), cert_path, cert.public_bytes(serialization.Encoding.PEM),
                replace=False, error=CertificateError)
    logger.info("created CA %s in %s (%s)", common_name, folder, _fingerprint(cert))
    return IssuedCertificate(cert_path, key_path, cert, key)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_private_file(path, "CA key", CertificateError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError(f"CA key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"CA key {path} is a {type(key).__name__}, not an EC key")
    return key


def server_names(hosts: Sequence[str], addresses: Sequence[str]) -> list[x509.GeneralName]:
    """The subject alternative names of a server certificate: ``hosts`` and ``addresses``,
    plus ``localhost`` and ``127.0.0.1``.

    Raises
    ------
    CertificateError
        Listing every host name or address that is invalid.
    """
    problems: list[str] = []
    dns: list[str] = []
    for host in hosts:
        name = host.strip().rstrip(".").lower() if isinstance(host, str) else ""
        if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
            problems.append(f"host name {host!r} is not a valid DNS name (letters, digits, '-' and dots)")
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            problems.append(f"host name {host!r} is an IP address; pass it with --address")
            continue
        dns.append(name)
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for address in addresses:
        try:
            ips.append(ipaddress.ip_address(address.strip() if isinstance(address, str) else address))
        except ValueError:
            problems.append(f"address {address!r} is not an IP address (e.g. 10.0.0.5); pass host names with --host")
    if problems:
        raise CertificateError("cannot issue the server certificate:\n" + "\n".join(f"  - {p}" for p in problems))
    dns = list(dict.fromkeys(["localhost", *dns]))
    ips = list(dict.fromkeys([ipaddress.ip_address("127.0.0.1"), *ips]))
    return [*(x509.DNSName(n) for n in dns), *(x509.IPAddress(ip) for ip in ips)]


def issue_server_certificate(
    directory: Path,
    *,
    ca_dir: Path,
    hosts: Sequence[str] = (),
    addresses: Sequence[str] = (),
    days: int = SERVER_VALIDITY_DAYS,
    valid_from: datetime | None = None,
    replace: bool = False,
) -> IssuedCertificate:
    """Issue the SuperLink's certificate ``<directory>/server.pem`` and key ``server.key``.

    Signed by the CA in ``ca_dir`` (``ca.crt`` and ``ca.key``). Its subject alternative
    names are ``hosts`` (DNS) and ``addresses`` (IP), plus ``localhost`` and
    ``127.0.0.1`` always. A fresh key is made every time. With ``replace`` (renewal)
    an existing pair is replaced atomically; without it, an existing pair is an error.

    Raises
    ------
    CertificateError
        If a host name or address is invalid (all are reported), the CA is unusable or
        expired, or the files exist and ``replace`` is false.
    """
    if days < 1:
        raise CertificateError(f"a server certificate must be valid for at least 1 day; found {days}")
    folder = Path(directory).expanduser()
    cert_path, key_path = folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE
    names = server_names(hosts, addresses)
    if not replace:
        _refuse_existing((key_path, cert_path), CertificateError)
    ca_dir = Path(ca_dir).expanduser()
    ca_cert = load_certificate(ca_dir / CA_CERT_FILE)
    ca_key = _load_ca_key(ca_dir / CA_KEY_FILE)
    if ca_cert.public_key() != ca_key.public_key():
        raise CertificateError(f"{ca_dir / CA_KEY_FILE} is not the key of {ca_dir / CA_CERT_FILE}")
    start = _now(valid_from) - _CLOCK_SKEW
    end = start + timedelta(days=days)
    if start >= ca_cert.not_valid_after_utc:
        raise CertificateError(f"the CA {ca_dir / CA_CERT_FILE} has expired; create a new alliance CA")
    # A certificate cannot outlive the CA that vouches for it.
    end = min(end, ca_cert.not_valid_after_utc)
    _make_folder(folder, CertificateError)
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = next((n.value for n in names if isinstance(n, x509.DNSName) and n.value != "localhost"), "localhost")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_pair(key_path, _private_pem(key), cert_path, cert.public_bytes(serialization.Encoding.PEM),
                replace=replace, error=CertificateError)
    logger.info("%s server certificate %s (%s), valid until %s",
                "renewed" if replace else "issued", cert_path, _fingerprint(cert), f"{end:%Y-%m-%d}")
    return IssuedCertificate(cert_path, key_path, cert, key)


# ---------------------------------------------------------------- node authentication keys


@dataclass(frozen=True)
class NodeAuthKey:
    """A node's Fleet authentication key pair (EC, OpenSSH format); the key is never in the repr."""

    name: str
    private_key_path: Path
    public_key_path: Path
    public_key: ec.EllipticCurvePublicKey = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return node_auth_fingerprint(self.public_key)

    @property
    def openssh(self) -> str:
        """The public key as one OpenSSH line, ``ecdsa-sha2-nistp384 AAAA... <name>``."""
        return format_node_auth_public_key(self.public_key, comment=self.name)


def format_node_auth_public_key(public_key: ec.EllipticCurvePublicKey, *, comment: str | None = None) -> str:
    """The key as one OpenSSH line with an optional comment (no whitespace in it)."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")
    if comment:
        if any(char.isspace() for char in comment):
            raise ValueError("a public key comment cannot hold whitespace")
        line = f"{line} {comment}"
    return line


def node_auth_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """What ``ssh-keygen -lf`` prints for the key: ``SHA256:`` and unpadded base64."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def generate_node_auth_key(directory: Path, name: str) -> NodeAuthKey:
    """Create an EC P-384 key pair in OpenSSH format: ``<name>.key`` (0600) and ``<name>.pub``.

    Raises
    ------
    KeyFileError
        If the name is invalid, either file exists (keys are never overwritten), or the
        files cannot be written.
    """
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r} is invalid; use 1-64 letters, digits, '_' or '-'")
    folder = Path(directory).expanduser()
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    _refuse_existing((private_path, public_path), KeyFileError)
    _make_folder(folder, KeyFileError)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key()
    line = format_node_auth_public_key(public, comment=name) + "\n"
    _write_pair(private_path, private, public_path, line.encode("ascii"), replace=False, error=KeyFileError)
    logger.info("created node auth key %s in %s (%s)", name, folder, node_auth_fingerprint(public))
    return NodeAuthKey(name, private_path, public_path, public)


def _check_nist(key: object, source: str) -> ec.EllipticCurvePublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(
            f"{source} is a {type(key).__name__.removeprefix('_')}, not an EC key; "
            "Flower node authentication needs an EC key on a NIST curve (e.g. P-384)"
        )
    if not isinstance(key.curve, _NIST_CURVES):
        raise KeyFileError(f"{source} uses curve {key.curve.name}, not a NIST curve (P-256, P-384 or P-521)")
    return key


def load_node_auth_public_key(source: Path | str) -> ec.EllipticCurvePublicKey:
    """Read a node's auth public key: a file (a :class:`~pathlib.Path`) or one OpenSSH line (a ``str``).

    Raises
    ------
    KeyFileError
        If the file cannot be read, or it is not an OpenSSH EC public key on a NIST curve.
    """
    if isinstance(source, Path):
        path = source.expanduser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise KeyFileError(f"public key {path} does not exist") from None
        except OSError as err:
            raise KeyFileError(f"cannot read public key {path}: {_reason(err)}") from err
        label = f"public key {path}"
    else:
        text, label = source, "the node auth public key"
    stripped = text.strip()
    if not stripped or "\n" in stripped:
        raise KeyFileError(f"{label} must be one line 'ecdsa-sha2-nistp384 AAAA...'")
    try:
        key = serialization.load_ssh_public_key(stripped.encode("utf-8", errors="replace"))
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{label} is not an OpenSSH public key; expected 'ecdsa-sha2-nistp384 AAAA...'") from None
    return _check_nist(key, label)


def load_node_auth_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a node's auth private key (OpenSSH format, unencrypted, mode 0600).

    Raises
    ------
    KeyFileError
        If it is missing, readable by others, not an OpenSSH private key, or not EC/NIST.
    """
    path = Path(path).expanduser()
    data = read_private_file(path, "node auth key", KeyFileError)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"node auth key {path} is encrypted; Flower reads unencrypted keys only") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"node auth key {path} is not an OpenSSH private key; create one with `medfed node init`"
        ) from None
    _check_nist(key, f"node auth key {path}")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key
