"""The node service: enrolment with the coordinator, the SuperNode process, and its health checks.

A hospital node dials out to the coordinator's gRPC Fleet API over TLS and proves who it
is with its own EC key (Flower's SuperNode authentication). In the node home::

    keys/fleet_auth.key, .pub    the node's Fleet auth key (EC P-384, OpenSSH; 0600)
    keys/node_audit.key, .pub    the audit log's Ed25519 key (see ``home``)
    enrolment-request.toml       what `medfed node init` asks the operator to register
    enrolment.toml               the operator's answer: node id, fleet address
    tls/ca.crt                   the alliance CA that signed the coordinator's certificate
    supernode.pid                the running SuperNode's process id
    logs/supernode.log           its output (the ClientApp's too)

Before it starts ``flower-supernode`` the service does a TLS handshake with the fleet
address, verified against the CA, so a wrong CA, an expired or misnamed certificate is
refused with a clear message instead of an endless retry loop. The SuperNode is ready
when its log shows the node id the coordinator assigned (Flower logs it once the
SuperLink has accepted the node's key).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clients.hospital_node.errors import NodeError, NodeServiceError
from clients.hospital_node.home import DatasetEntry, NodeHome
from privacy.enrolment import EnrolmentBundle, EnrolmentRequest
from privacy.errors import CertificateError, KeyFileError, PrivacyError
from privacy.pki import (
    EXPIRY_WARNING_DAYS,
    NodeAuthKey,
    generate_node_auth_key,
    load_node_auth_private_key,
    load_node_auth_public_key,
)

__all__ = [
    "AUTH_KEY_NAME",
    "Check",
    "NodeService",
    "TlsPeer",
    "tls_handshake",
]

logger = logging.getLogger(__name__)

AUTH_KEY_NAME = "fleet_auth"
REQUEST_FILE = "enrolment-request.toml"
ENROLMENT_FILE = "enrolment.toml"
DEFAULT_RUNTIME_PORT = 9094
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
_LOW_DISK_WARN = 1 << 30
_LOW_DISK_FAIL = 100 << 20


@dataclass(frozen=True)
class Check:
    """One line of `medfed node doctor`: ``ok``, ``warn`` or ``fail``, what, and why."""

    level: str
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level:<5} {self.what}: {self.detail}"


@dataclass(frozen=True)
class TlsPeer:
    """What a verified TLS handshake learned about the server."""

    address: str
    not_after: datetime
    subject: str

    @property
    def days_left(self) -> int:
        return int((self.not_after - datetime.now(UTC)).total_seconds() // 86400)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise NodeServiceError(f"fleet address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def tls_handshake(address: str, *, ca_path: Path, timeout: float = 5.0) -> TlsPeer:
    """Connect to ``address`` and complete a TLS handshake, verifying the server against the CA.

    Raises
    ------
    NodeServiceError
        If the address cannot be reached, or its certificate does not verify (wrong CA,
        expired, or not issued for that host name): the message says which.
    """
    host, port = _split(address)
    context = ssl.create_default_context(cafile=str(ca_path))
    context.set_alpn_protocols(["h2"])  # gRPC speaks HTTP/2
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or str(err)
        hint = {
            "unable to get local issuer certificate": "the coordinator's certificate was not signed by the alliance CA "
            f"in {ca_path}; ask the operator for a new enrolment bundle",
            "certificate has expired": "the operator must run `medfed coordinator renew` and restart the coordinator",
        }.get(reason, "")
        raise NodeServiceError(
            f"refusing the coordinator at {address}: its TLS certificate does not verify ({reason})"
            + (f"; {hint}" if hint else "")
        ) from None
    except ssl.SSLError as err:
        raise NodeServiceError(f"TLS handshake with {address} failed: {err.reason or err}") from None
    except OSError as err:
        raise NodeServiceError(f"cannot reach the coordinator at {address}: {err.strerror or err}") from None
    not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(cert.get("notAfter"))), UTC)
    subject = ",".join(f"{k}={v}" for part in cert.get("subject", ()) for k, v in part)
    return TlsPeer(address, not_after, subject)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our executables first, telemetry and update checks off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class NodeService:
    """Enrolment, the SuperNode process and its checks, for one node home."""

    def __init__(self, node: NodeHome) -> None:
        self.node = node

    # ------------------------------------------------------------------ paths
    @property
    def keys_dir(self) -> Path:
        return self.node.path / "keys"

    @property
    def auth_key_path(self) -> Path:
        return self.keys_dir / f"{AUTH_KEY_NAME}.key"

    @property
    def auth_public_key_path(self) -> Path:
        return self.keys_dir / f"{AUTH_KEY_NAME}.pub"

    @property
    def request_path(self) -> Path:
        return self.node.path / REQUEST_FILE

    @property
    def enrolment_path(self) -> Path:
        return self.node.path / ENROLMENT_FILE

    @property
    def ca_path(self) -> Path:
        return self.node.path / "tls" / "ca.crt"

    @property
    def pid_path(self) -> Path:
        return self.node.path / "supernode.pid"

    @property
    def log_path(self) -> Path:
        return self.node.path / "logs" / "supernode.log"

    @property
    def flwr_home(self) -> Path:
        return self.node.path / "flwr-home"

    # ------------------------------------------------------------------ enrolment
    def prepare_enrolment(self) -> EnrolmentRequest:
        """Create the node's auth key and audit key (if missing) and write the enrolment request.

        Raises
        ------
        KeyFileError
            If a key file exists already or cannot be written.
        EnrolmentError
            If the request file exists already.
        """
        from privacy.keys import generate_keypair, load_public_key

        auth = generate_node_auth_key(self.keys_dir, AUTH_KEY_NAME)
        if not self.node.audit_public_key_path.exists():
            generate_keypair(self.keys_dir, self.node.audit_key_path.stem)
        request = EnrolmentRequest(
            node=self.node.name,
            auth_public_key=auth.public_key,
            audit_public_key=load_public_key(self.node.audit_public_key_path),
        )
        request.write(self.request_path)
        logger.info("node %s: enrolment request %s (auth key %s)", self.node.name, self.request_path, auth.fingerprint)
        return request

    def auth_key(self) -> NodeAuthKey:
        """The node's auth key pair, checked (0600, OpenSSH, EC on a NIST curve, halves match)."""
        private = load_node_auth_private_key(self.auth_key_path)
        public = load_node_auth_public_key(self.auth_public_key_path)
        if private.public_key() != public:
            raise KeyFileError(f"{self.auth_public_key_path} is not the public half of {self.auth_key_path}")
        return NodeAuthKey(AUTH_KEY_NAME, self.auth_key_path, self.auth_public_key_path, public)

    def enrol(self, bundle_path: Path, *, replace: bool = False) -> EnrolmentBundle:
        """Install the coordinator's enrolment bundle: the CA certificate and the fleet address.

        Raises
        ------
        EnrolmentError
            If the bundle file is invalid.
        NodeServiceError
            If it is for another node or another key, or the node is enrolled already
            and ``replace`` is false.
        """
        bundle = EnrolmentBundle.read(bundle_path)
        if bundle.node != self.node.name:
            raise NodeServiceError(
                f"enrolment bundle {bundle_path} is for node {bundle.node!r}, not {self.node.name!r}"
            )
        key = self.auth_key()
        if bundle.auth_key_fingerprint != key.fingerprint:
            raise NodeServiceError(
                f"enrolment bundle {bundle_path} registers auth key {bundle.auth_key_fingerprint}, but this node's key "
                f"is {key.fingerprint}; send {self.request_path} to the operator again"
            )
        if self.enrolment_path.exists() and not replace:
            raise NodeServiceError(
                f"node {self.node.name!r} is enrolled already ({self.enrolment_path}); pass --replace to install a new bundle"
            )
        self.ca_path.parent.mkdir(mode=0o755, exist_ok=True)
        _replace_file(self.ca_path, bundle.ca_certificate)
        _replace_file(self.enrolment_path, bundle.to_toml())
        logger.info("node %s enrolled as SuperNode %d; fleet %s", self.node.name, bundle.node_id, bundle.fleet_address)
        return bundle

    def enrolment(self) -> EnrolmentBundle:
        """The installed enrolment, or a NodeServiceError saying how to enrol."""
        if not self.enrolment_path.exists():
            raise NodeServiceError(
                f"node {self.node.name!r} is not enrolled: send {self.request_path} to the alliance operator "
                "and install their answer with `medfed node enrol <bundle>`"
            )
        return EnrolmentBundle.read(self.enrolment_path)

    # ------------------------------------------------------------------ process
    def pid(self) -> int | None:
        """The SuperNode's process id if it runs (a stale PID file is removed)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self.pid_path.unlink(missing_ok=True)
            return None
        except PermissionError:
            pass
        return pid

    def supernode_argv(self, bundle: EnrolmentBundle, runtime_port: int) -> list[str]:
        return [
            "flower-supernode",
            "--superlink", bundle.fleet_address,
            "--root-certificates", str(self.ca_path),
            "--auth-supernode-private-key", str(self.auth_key_path),
            "--port", str(runtime_port),
            "--node-config", f"home={json.dumps(str(self.node.path))}",
        ]

    def start(self, *, runtime_port: int = DEFAULT_RUNTIME_PORT, foreground: bool = False, timeout: float = 60.0) -> int:
        """Check the keys and the coordinator's certificate, start the SuperNode, wait until it is accepted.

        Returns its process id; with ``foreground`` it returns only once the SuperNode has
        exited (a SIGTERM or Ctrl-C to us stops it first).

        Raises
        ------
        NodeServiceError
            If the node is not enrolled, runs already, the coordinator's certificate does not
            verify, or the SuperNode exits or is not accepted in time (with its reason).
        """
        bundle = self.enrolment()
        running = self.pid()
        if running is not None:
            raise NodeServiceError(f"the SuperNode runs already (pid {running}); stop it with `medfed node stop`")
        self.auth_key()
        peer = tls_handshake(bundle.fleet_address, ca_path=self.ca_path)
        if peer.days_left < EXPIRY_WARNING_DAYS:
            logger.warning("the coordinator's certificate expires in %d days; tell the alliance operator", peer.days_left)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            popen = subprocess.Popen(
                self.supernode_argv(bundle, runtime_port),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=flower_env(self.flwr_home), cwd=self.node.path, start_new_session=True,
            )
        self.pid_path.write_text(f"{popen.pid}\n")
        try:
            self._wait_accepted(popen, bundle, offset, timeout)
        except BaseException:
            self._stop_group(popen.pid, popen)
            raise
        logger.info("SuperNode %d running (pid %d), connected to %s", bundle.node_id, popen.pid, bundle.fleet_address)
        if not foreground:
            return popen.pid
        try:
            code = popen.wait()
        except KeyboardInterrupt:
            self._stop_group(popen.pid, popen)
            return 0
        self.pid_path.unlink(missing_ok=True)
        if code != 0:
            raise NodeServiceError(f"flower-supernode exited with code {code}: {self._last_error(offset)}")
        return code

    def _new_log(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _last_error(self, offset: int) -> str:
        text = _ANSI.sub("", self._new_log(offset))
        for pattern in (r"\[code: \d+\][^\n]*", r"CERTIFICATE_VERIFY_FAILED: [^:\n]*", r"Exit Code: \d+[^\n]*"):
            match = re.search(pattern, text)
            if match:
                return match.group(0).strip()
        return f"see {self.log_path}"

    def _wait_accepted(self, popen: subprocess.Popen[bytes], bundle: EnrolmentBundle, offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            match = _NODE_ID_LINE.search(self._new_log(offset))
            if match:
                if int(match.group(1)) != bundle.node_id:
                    raise NodeServiceError(
                        f"the coordinator accepted this node as SuperNode {match.group(1)}, but the enrolment "
                        f"says {bundle.node_id}; ask the operator to check the registration"
                    )
                return
            code = popen.poll()
            if code is not None:
                raise NodeServiceError(
                    f"the coordinator refused this node (flower-supernode exited with code {code}): "
                    f"{self._last_error(offset)}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise NodeServiceError(f"the SuperNode was not accepted within {timeout:g} s; see {self.log_path}")
            time.sleep(0.2)

    def _stop_group(self, pid: int, popen: subprocess.Popen[bytes] | None = None, *, grace: float = 15.0) -> bool:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid_path.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + grace
        killed = False
        while True:
            if popen is not None and popen.poll() is not None:
                break
            if popen is None:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            if time.monotonic() > deadline:
                killed = True
                break
            time.sleep(0.1)
        # The SuperExec and ClientApp processes of the group may outlive the leader.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if popen is not None:
            popen.wait(timeout=5)
        self.pid_path.unlink(missing_ok=True)
        return killed

    def stop(self, *, grace: float = 15.0) -> int | None:
        """Stop the SuperNode's process group (SIGTERM, wait); returns its pid, None if not running."""
        pid = self.pid()
        if pid is None:
            return None
        if self._stop_group(pid, grace=grace):
            logger.warning("the SuperNode (pid %d) did not stop within %g s and was killed", pid, grace)
        return pid

    # ------------------------------------------------------------------ checks
    def checks(self, *, connect: bool = True) -> Iterator[Check]:
        """Every health check, one :class:`Check` each; `medfed node doctor` prints them."""
        yield Check("ok", "node home", f"{self.node.path} (node {self.node.name!r})")
        bundle: EnrolmentBundle | None = None
        try:
            bundle = self.enrolment()
        except (NodeError, PrivacyError) as err:
            yield Check("fail", "enrolment", str(err))
        else:
            yield Check("ok", "enrolment", f"SuperNode {bundle.node_id}, dials {bundle.fleet_address}")
        try:
            key = self.auth_key()
        except PrivacyError as err:
            yield Check("fail", "auth key", str(err))
        else:
            if bundle is not None and bundle.auth_key_fingerprint != key.fingerprint:
                yield Check("fail", "auth key", f"{key.fingerprint} is not the key the coordinator registered "
                                                f"({bundle.auth_key_fingerprint})")
            else:
                yield Check("ok", "auth key", f"{key.fingerprint}, mode 0600")
        if bundle is not None:
            yield from self._coordinator_checks(bundle, connect=connect)
        yield from self._dataset_checks()
        yield self._audit_check()
        yield self._ledger_check()
        yield from self._governance_checks()
        yield self._disk_check()

    def _coordinator_checks(self, bundle: EnrolmentBundle, *, connect: bool) -> Iterator[Check]:
        from privacy.pki import load_certificate

        try:
            ca = load_certificate(self.ca_path)
        except CertificateError as err:
            yield Check("fail", "CA certificate", str(err))
            return
        ca_days = (ca.not_valid_after_utc - datetime.now(UTC)).days
        yield Check("warn" if ca_days < EXPIRY_WARNING_DAYS else "ok", "CA certificate",
                    f"{ca.subject.rfc4514_string()}, {ca_days} days left")
        if connect:
            try:
                peer = tls_handshake(bundle.fleet_address, ca_path=self.ca_path)
            except NodeServiceError as err:
                yield Check("fail", "coordinator", str(err))
            else:
                level = "warn" if peer.days_left < EXPIRY_WARNING_DAYS else "ok"
                yield Check(level, "coordinator", f"TLS to {bundle.fleet_address} verified against the alliance CA; "
                                                  f"its certificate has {peer.days_left} days left")
        pid = self.pid()
        accepted = _NODE_ID_LINE.findall(self._new_log(0)) if pid is not None else []
        if pid is None:
            yield Check("warn", "registration", f"enrolled as SuperNode {bundle.node_id}; the SuperNode is not running "
                                                "(start it with `medfed node start`)")
        elif accepted and int(accepted[-1]) == bundle.node_id:
            yield Check("ok", "registration", f"SuperNode {bundle.node_id} accepted by the coordinator (pid {pid})")
        else:
            yield Check("fail", "registration", f"the SuperNode (pid {pid}) has not been accepted as {bundle.node_id}; "
                                                f"see {self.log_path}")

    def _dataset_checks(self) -> Iterator[Check]:
        datasets = self.node.datasets()
        if not datasets:
            yield Check("warn", "datasets", "none registered; add one with `medfed node dataset add`")
        for name in sorted(datasets):
            yield _dataset_check(self.node, datasets[name])

    def _audit_check(self) -> Check:
        from privacy.keys import load_public_key

        if not self.node.audit_key_path.exists() and not self.node.audit_log_path.exists():
            return Check("ok", "audit log", "empty (nothing audited yet)")
        try:
            result = self.node.audit_log().verify(load_public_key(self.node.audit_public_key_path))
        except (NodeError, PrivacyError) as err:
            return Check("fail", "audit log", str(err))
        if not result.ok:
            return Check("fail", "audit log", f"{len(result.problems)} problems; run `medfed node audit verify`")
        return Check("ok", "audit log", f"{result.count} entries verify")

    def _ledger_check(self) -> Check:
        from privacy.ledger import PrivacyLedger

        try:
            with PrivacyLedger.open(self.node.ledger_path):
                pass
        except (PrivacyError, OSError) as err:
            return Check("fail", "privacy ledger", str(err))
        return Check("ok", "privacy ledger", f"{self.node.ledger_path} opens")

    def _governance_checks(self) -> Iterator[Check]:
        """Policy readable, partners trusted, budgets set, the ledger holding every recorded charge."""
        from clients.hospital_node import governance
        from privacy.ledger import PrivacyLedger

        try:
            policy = self.node.policy()
        except NodeError as err:
            yield Check("fail", "policy", str(err))
            return
        yield Check("ok", "policy", f"tasks {', '.join(policy.allowed_tasks)}; cohort >= {policy.min_cohort_size}; "
                                    f"ε <= {policy.max_epsilon_per_experiment:g} per experiment")
        if policy.ignored_accountant is not None:
            yield Check("warn", "policy accountant", f"policy.accountant = {policy.ignored_accountant!r} is ignored: the ledger "
                                                     "composes with PLD only; remove the line from policy.toml")
        try:
            partners = self.node.trusted_partners().list()
        except PrivacyError as err:
            yield Check("fail", "trusted partners", str(err))
        else:
            yield Check("ok" if partners else "warn", "trusted partners",
                        f"{len(partners)} trusted" if partners else "none: every spec is refused; `medfed node partners add`")
        try:
            entries = governance.verified_entries(self.node)
            rows = governance.budget_status(self.node, entries)
            with PrivacyLedger.open(self.node.ledger_path) as ledger:
                missing = governance.check_ledger(entries, ledger)
        except governance.Refusal as err:
            yield Check("fail", "budgets", err.reason)
            return
        except (NodeError, PrivacyError) as err:
            yield Check("fail", "budgets", str(err))
            return
        if missing:
            yield Check("fail", "ledger vs audit log", f"the ledger lacks {len(missing)} recorded charge(s) (first: {missing[0]})")
        for row in rows:
            what = f"budget {row.dataset!r}"
            if row.budget is None:
                yield Check("warn", what, "not set: every request on it is refused; `medfed node budget set`")
            elif row.open_reservations:
                yield Check("ok", what, f"ε {row.remaining:.3f} of {row.budget.epsilon:g} left at δ {row.budget.delta:g}; "
                                        f"{row.open_reservations} live run reservation(s) hold ε {row.reserved:.3f}")
            else:
                yield Check("ok", what, f"ε {row.remaining:.3f} of {row.budget.epsilon:g} left at δ {row.budget.delta:g}")

    def _disk_check(self) -> Check:
        free = shutil.disk_usage(self.node.path).free
        text = f"{free / (1 << 30):.1f} GiB free on the node home's disk"
        if free < _LOW_DISK_FAIL:
            return Check("fail", "disk", text)
        return Check("warn" if free < _LOW_DISK_WARN else "ok", "disk", text)


def _dataset_check(node: NodeHome, entry: DatasetEntry) -> Check:
    what = f"dataset {entry.name!r}"
    try:
        if entry.kind == "imaging":
            assert entry.imaging is not None
            if not entry.path.is_dir():
                return Check("fail", what, f"DICOM folder {entry.path} is missing")
            next(os.scandir(entry.path), None)
            with entry.imaging.labels.open("rb"):
                pass
            return Check("ok", what, "imaging folder and labels file readable")
        from clients.hospital_node.connectors import TabularConnector

        data = TabularConnector(entry).load()
        return Check("ok", what, f"{data.n_train + data.n_val} rows readable")
    except NodeError as err:
        return Check("fail", what, str(err))
    except OSError as err:
        return Check("fail", what, f"cannot read {err.filename}: {err.strerror or err}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _replace_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
