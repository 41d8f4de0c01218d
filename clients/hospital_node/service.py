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
import shlex
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
from clients.hospital_node.home import (
    AUDIT_LOG_FILE,
    CACHE_DIR,
    CONFIG_FILE,
    KEYS_DIR,
    LEDGER_FILE,
    DatasetEntry,
    NodeHome,
)
from clients.hospital_node.policy import POLICY_FILE
from clients.hospital_node.runtime.supervisor import DEFAULT_IDLE_SECONDS, SERVICE_PREFIX, flower_env
from privacy.enrolment import EnrolmentBundle, EnrolmentRequest
from privacy.errors import CertificateError, KeyFileError, PrivacyError
from privacy.keys import TRUSTED_KEYS_FILE
from privacy.pki import (
    EXPIRY_WARNING_DAYS,
    NodeAuthKey,
    generate_node_auth_key,
    load_node_auth_private_key,
    load_node_auth_public_key,
)
from privacy.private_files import create_private, loose_modes, make_private_folder, publish

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
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
_LOW_DISK_WARN = 1 << 30
_LOW_DISK_FAIL = 100 << 20
_MODES_SHOWN = 10
# What in a node home is secret or state (the rest is logs and Flower's own files).
_STATE_NAMES = (CONFIG_FILE, POLICY_FILE, TRUSTED_KEYS_FILE, KEYS_DIR, "tls", ENROLMENT_FILE, REQUEST_FILE, CACHE_DIR)
_STATE_PREFIXES = (LEDGER_FILE, AUDIT_LOG_FILE, f".{TRUSTED_KEYS_FILE}", f".{CONFIG_FILE}", f".{POLICY_FILE}")


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
        try:
            make_private_folder(self.ca_path.parent)
            publish(self.ca_path, bundle.ca_certificate)
            publish(self.enrolment_path, bundle.to_toml())
        except OSError as err:
            raise NodeServiceError(f"cannot install the enrolment in {self.node.path}: {err.strerror or err}") from err
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

    def service_argv(
        self, bundle: EnrolmentBundle, runtime_port: int = 0, *, executor: str = "warm", executor_idle_seconds: float = DEFAULT_IDLE_SECONDS
    ) -> list[str]:
        """The node service command: a SuperNode that runs no app bundle, and the node executor.

        Raises
        ------
        NodeServiceError
            `executor` is not a mode, or the idle time is not positive.
        """
        from clients.hospital_node.runtime.supervisor import SupervisorConfig, supervisor_argv

        try:
            config = SupervisorConfig(
                home=self.node.path,
                superlink=bundle.fleet_address,
                root_certificates=self.ca_path,
                auth_key=self.auth_key_path,
                runtime_port=runtime_port,
                executor=executor,
                executor_idle_seconds=executor_idle_seconds,
            )
        except ValueError as err:
            raise NodeServiceError(f"cannot start the node service: {err}") from None
        return supervisor_argv(config)

    def start(
        self,
        *,
        runtime_port: int = 0,
        foreground: bool = False,
        timeout: float = 60.0,
        executor: str = "warm",
        executor_idle_seconds: float = DEFAULT_IDLE_SECONDS,
    ) -> int:
        """Check the keys and the coordinator's certificate, start the node service, wait until it is accepted.

        The node service (:mod:`clients.hospital_node.runtime.supervisor`) runs
        ``flower-supernode`` in ``process`` isolation, so that it never installs or runs
        a run's app bundle, and the node executor that serves its tasks with the medfed
        ClientApp installed here. `runtime_port` is the SuperNode's loopback runtime port;
        0 (the default) picks a free one, so several nodes share a host without choosing.
        `executor` is ``warm`` (started at once and kept) or ``on-demand`` (started when the
        SuperNode holds a task, stopped after `executor_idle_seconds` without one).

        Returns the service's process id; with ``foreground`` it returns only once the
        service has exited (a SIGTERM or Ctrl-C to us stops it first).

        Raises
        ------
        NodeServiceError
            If the node is not enrolled, runs already, the coordinator's certificate does not
            verify, or the service exits or is not accepted in time (with its reason).
        """
        bundle = self.enrolment()
        argv = self.service_argv(bundle, runtime_port, executor=executor, executor_idle_seconds=executor_idle_seconds)
        running = self.pid()
        if running is not None:
            raise NodeServiceError(f"the node service runs already (pid {running}); stop it with `medfed node stop`")
        self.auth_key()
        peer = tls_handshake(bundle.fleet_address, ca_path=self.ca_path)
        if peer.days_left < EXPIRY_WARNING_DAYS:
            logger.warning("the coordinator's certificate expires in %d days; tell the alliance operator", peer.days_left)
        self._check_allowed_release()
        make_private_folder(self.log_path.parent)
        make_private_folder(self.flwr_home)
        create_private(self.log_path)
        offset = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=flower_env(self.flwr_home), cwd=self.node.path, start_new_session=True, umask=0o077,
            )
        publish(self.pid_path, f"{popen.pid}\n")
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
            raise NodeServiceError(f"the node service exited with code {code}: {self._last_error(offset)}")
        return code

    def _check_allowed_release(self) -> None:
        """Starting a node that would refuse every medfed run is a mistake worth stopping for."""
        from clients.hospital_node.runtime.allowed_apps import AllowedApps
        from federation.release import installed_identity

        installed = installed_identity()
        if not AllowedApps(self.node.path).allows(installed):
            raise NodeServiceError(
                f"the medfed release installed here, {installed}, is not on this node's allow-list, so the node "
                f"would refuse every run; allow it with `medfed node apps allow --home {self.node.path}`"
            )

    def _new_log(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _last_error(self, offset: int) -> str:
        """The most telling line of what the service printed since `offset`: Flower's reason, else ours."""
        text = _ANSI.sub("", self._new_log(offset))
        for pattern in (r"\[code: \d+\][^\n]*", r"CERTIFICATE_VERIFY_FAILED: [^:\n]*", r"error while attempting to bind on address[^\n]*"):
            match = re.search(pattern, text)
            if match:
                return match.group(0).strip()
        ours = [line.removeprefix(SERVICE_PREFIX).strip() for line in text.splitlines() if line.startswith(SERVICE_PREFIX)]
        ours = [line for line in ours if not line.startswith("SuperNode (pid")]
        if ours:
            return ours[-1]
        match = re.search(r"Exit Code: \d+[^\n]*", text)
        return match.group(0).strip() if match else f"see {self.log_path}"

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
                raise NodeServiceError(f"the node service stopped (exit code {code}): {self._last_error(offset)}; see {self.log_path}")
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
        yield from self._mode_checks()
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
        yield self._apps_check()
        yield from self._dataset_checks()
        yield self._audit_check()
        yield self._ledger_check()
        yield from self._governance_checks()
        yield self._disk_check()

    def _mode_checks(self) -> Iterator[Check]:
        """Anything in the home that other users may read or change, with the `chmod` that fixes it.

        Homes are not tightened behind the owner's back (a backup agent may read them by
        group, on purpose): the node reports, hospital IT decides. The home itself and
        its secrets and state fail; anything else (logs, Flower's files) warns, since the
        home's own mode already keeps others out of it.
        """
        home = self.node.path
        found = loose_modes(home, public=lambda path: path.suffix == ".pub" or path == self.ca_path)
        if not found:
            yield Check("ok", "file modes", f"{home} and everything in it are owner only")
            return

        def level(path: Path) -> str:
            top = path.relative_to(home).parts[:1]
            state = not top or top[0] in _STATE_NAMES or top[0].startswith(_STATE_PREFIXES)
            return "fail" if state else "warn"

        for loose in found[:_MODES_SHOWN]:
            yield Check(level(loose.path), "file modes", str(loose))
        rest = found[_MODES_SHOWN:]
        if rest:
            worst = "fail" if any(level(loose.path) == "fail" for loose in rest) else "warn"
            yield Check(worst, "file modes", f"{len(rest)} more paths in {home} are open to other users; "
                                             f"run `chmod -R go-rwx {shlex.quote(str(home))}`")

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

    def _apps_check(self) -> Check:
        """The installed release must be on the allow-list, or the node refuses every run."""
        from clients.hospital_node.runtime.allowed_apps import AllowedApps
        from federation.release import BundleError, installed_identity

        try:
            apps = AllowedApps(self.node.path).list()
            installed = installed_identity()
        except (NodeError, BundleError) as err:
            return Check("fail", "allowed apps", str(err))
        if not any(app.identity == installed for app in apps):
            return Check("fail", "allowed apps", f"the installed release {installed} is not allowed, so every run is refused; "
                                                 "`medfed node apps allow` allows it")
        others = len(apps) - 1
        return Check("ok", "allowed apps", f"serves {installed}" + (f" and {others} other release(s)" if others else ""))

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
            missing = governance.ledger_disagreement(self.node, entries)
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
        if entry.kind == "omop":
            assert entry.omop is not None
            from clients.hospital_node.data.sources import check_source

            check_source(entry.omop)  # no full read here: `medfed node source validate` does that
            return Check("ok", what, f"{entry.omop.describe()} in place (a full read: `medfed node source validate`)")
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
