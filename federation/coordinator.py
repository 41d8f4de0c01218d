"""The coordinator home: the alliance's SuperLink, its PKI, and the nodes it enrolled.

``medfed coordinator`` runs Flower's ``flower-superlink`` for real: TLS on both of its
ports, SuperNode authentication on, SQLite state, no runtime dependency installation,
no telemetry. A coordinator home holds::

    coordinator.toml       where the SuperLink listens and what nodes dial
    pki/ca.crt, ca.key     the alliance CA (the key signs server certificates only)
    pki/server.pem, .key   the SuperLink's certificate (renewed by `renew`)
    state.db               SuperLink state: runs, registered SuperNodes
    superlink.pid          the running SuperLink's process id
    logs/superlink.log     its output
    flwr-home/config.toml  the `flwr` CLI's connection to the control API
    partner/               the research partners' connection: a FLWR_HOME (config.toml, ca.crt)
    nodes/<name>.toml      each enrolled node: its auth and audit key fingerprints, node id

The home and everything in it is the operator's alone (folders 0700, files 0600; the
certificates 0644), created so whatever the umask; the SuperLink runs with umask 077 and
its state database is created 0600 before it opens it. ``status`` lists any looser mode
with the ``chmod`` that fixes it.

``coordinator.toml``::

    [coordinator]
    hosts = ["coordinator.alliance.example"]   # DNS names in the server certificate
    addresses = ["10.0.0.5"]                   # IP addresses in the server certificate
    fleet_bind = "0.0.0.0:9092"                # the gRPC Fleet API, facing the hospitals
    fleet_address = "coordinator.alliance.example:9092"   # what nodes dial
    control_address = "127.0.0.1:9093"         # the HTTP control/runtime API

The control API of open-source Flower has **no authentication**: anyone who reaches it
can submit runs or register nodes. It stays on loopback; :meth:`Coordinator.start`
refuses any other address unless the operator passes it explicitly *and* acknowledges
that it is unauthenticated.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.errors import CoordinatorError
from privacy.enrolment import EnrolmentBundle, EnrolmentRequest
from privacy.errors import CertificateError
from privacy.pki import (
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CertificateInfo,
    check_certificate,
    create_ca,
    issue_server_certificate,
    server_names,
)
from privacy.private_files import (
    FILE_MODE,
    FOLDER_MODE,
    LooseMode,
    create_private,
    loose_modes,
    make_private_folder,
    publish,
)

__all__ = [
    "CONFIG_FILE",
    "CONNECTION",
    "PARTNER_DIR",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorStatus",
    "flwr_connection",
    "is_loopback",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "coordinator.toml"
CONNECTION = "medfed-coordinator"
PARTNER_DIR = "partner"
STATE_DB = "state.db"
DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9093"
_KEYS = ("hosts", "addresses", "fleet_bind", "fleet_address", "control_address")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def _split(address: str, field: str) -> tuple[str, int]:
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise CoordinatorError(f"{field} must be HOST:PORT (e.g. 127.0.0.1:9093); found {address!r}")
    return match.group(1).strip("[]"), int(match.group(2))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class CoordinatorConfig:
    """``coordinator.toml``, validated."""

    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    fleet_bind: str
    fleet_address: str
    control_address: str

    def __post_init__(self) -> None:
        _split(self.fleet_bind, "coordinator.fleet_bind")
        _split(self.fleet_address, "coordinator.fleet_address")
        host, _ = _split(self.control_address, "coordinator.control_address")
        if not is_loopback(host):
            raise CoordinatorError(
                f"coordinator.control_address must be on loopback (the control API is unauthenticated); "
                f"found {self.control_address!r}. To expose it, pass --expose-control-on to `medfed coordinator start`"
            )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str) -> CoordinatorConfig:
        problems = [f"{key} is not a known table; expected [coordinator]" for key in raw if key != "coordinator"]
        body = raw.get("coordinator")
        if not isinstance(body, dict):
            raise CoordinatorError(f"{source} has no [coordinator] table")
        problems += [f"coordinator.{key} is not a known field; known: {', '.join(_KEYS)}" for key in body if key not in _KEYS]
        problems += [f"coordinator.{key} is missing" for key in _KEYS if key not in body]
        for key in ("hosts", "addresses"):
            value = body.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"coordinator.{key} must be a list of strings")
        if problems:
            raise CoordinatorError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
        try:
            return cls(
                hosts=tuple(body["hosts"]),
                addresses=tuple(body["addresses"]),
                fleet_bind=body["fleet_bind"],
                fleet_address=body["fleet_address"],
                control_address=body["control_address"],
            )
        except CoordinatorError as err:
            raise CoordinatorError(f"{source} is invalid: {err}") from None

    def to_toml(self) -> str:
        def strings(values: Sequence[str]) -> str:
            return "[" + ", ".join(json.dumps(v) for v in values) + "]"

        return (
            "# medfed coordinator: see `medfed coordinator --help`.\n"
            "[coordinator]\n"
            f"hosts = {strings(self.hosts)}\n"
            f"addresses = {strings(self.addresses)}\n"
            f"fleet_bind = {json.dumps(self.fleet_bind)}\n"
            f"fleet_address = {json.dumps(self.fleet_address)}\n"
            f"control_address = {json.dumps(self.control_address)}\n"
        )


@dataclass(frozen=True)
class CoordinatorStatus:
    """What `medfed coordinator status` reports."""

    running: bool
    pid: int | None
    healthy: bool
    certificate: CertificateInfo | None
    certificate_problem: str | None
    nodes: tuple[dict[str, Any], ...]
    loose_modes: tuple[LooseMode, ...] = ()  # paths of the home others may use, with their fix


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our executables first, telemetry and update checks off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Coordinator:
    """A coordinator home: create it with :meth:`init`, open it with :meth:`open`."""

    def __init__(self, home: Path, config: CoordinatorConfig) -> None:
        self.home = home
        self.config = config

    # ------------------------------------------------------------------ paths
    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def ca_path(self) -> Path:
        return self.pki_dir / CA_CERT_FILE

    @property
    def server_cert_path(self) -> Path:
        return self.pki_dir / SERVER_CERT_FILE

    @property
    def pid_path(self) -> Path:
        return self.home / "superlink.pid"

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.home / "flwr-home"

    @property
    def nodes_dir(self) -> Path:
        return self.home / "nodes"

    @property
    def state_db_path(self) -> Path:
        """The SuperLink's state database (``flower-superlink --database``)."""
        return self.home / STATE_DB

    # ------------------------------------------------------------------ set-up
    @classmethod
    def init(
        cls,
        home: Path,
        *,
        hosts: Sequence[str] = (),
        addresses: Sequence[str] = (),
        fleet_port: int = DEFAULT_FLEET_PORT,
        fleet_bind: str | None = None,
        fleet_address: str | None = None,
        control_address: str = DEFAULT_CONTROL_ADDRESS,
    ) -> Coordinator:
        """Create the home: the alliance CA, the SuperLink certificate and ``coordinator.toml``.

        Raises
        ------
        CoordinatorError
            If the folder is a coordinator home already, or an address is invalid.
        CertificateError
            If a host name or IP address cannot go into the certificate.
        """
        home = Path(home).expanduser().resolve()
        if (home / CONFIG_FILE).exists():
            raise CoordinatorError(f"{home / CONFIG_FILE} already exists; this folder is a coordinator home already")
        if not 0 < fleet_port < 65536:
            raise CoordinatorError(f"--fleet-port must be in 1..65535; found {fleet_port}")
        dial_host = next(iter([*hosts, *addresses]), "127.0.0.1")
        dial = f"[{dial_host}]" if ":" in dial_host else dial_host
        config = CoordinatorConfig(
            hosts=tuple(hosts),
            addresses=tuple(addresses),
            fleet_bind=fleet_bind or f"0.0.0.0:{fleet_port}",
            fleet_address=fleet_address or f"{dial}:{fleet_port}",
            control_address=control_address,
        )
        # Check names and addresses before anything is written.
        if (home / "pki").exists() and any((home / "pki").iterdir()):
            raise CoordinatorError(f"{home / 'pki'} already holds files; choose an empty folder")
        server_names(config.hosts, config.addresses)  # every bad name, before anything is written
        try:
            make_private_folder(home)
            os.chmod(home, FOLDER_MODE)  # it becomes the coordinator's home now, even if it existed
        except OSError as err:
            raise CoordinatorError(f"cannot create coordinator home {home}: {err.strerror or err}") from None
        pki = home / "pki"
        create_ca(pki)
        issue_server_certificate(pki, ca_dir=pki, hosts=config.hosts, addresses=config.addresses)
        coordinator = cls(home, config)
        coordinator._write(home / CONFIG_FILE, config.to_toml())
        coordinator._write_flwr_config(config.control_address)
        coordinator._write_partner_connection(config.control_address)
        logger.info("created coordinator home %s", home)
        return coordinator

    @classmethod
    def open(cls, home: Path) -> Coordinator:
        """Open an existing coordinator home.

        Raises
        ------
        CoordinatorError
            If it has no ``coordinator.toml`` or the file is invalid.
        """
        home = Path(home).expanduser().resolve()
        path = home / CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CoordinatorError(
                f"{home} is not a coordinator home ({CONFIG_FILE} is missing); create one with `medfed coordinator init`"
            ) from None
        except OSError as err:
            raise CoordinatorError(f"cannot read {path}: {err.strerror or err}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise CoordinatorError(f"{path} is not valid TOML: {err}") from None
        return cls(home, CoordinatorConfig.from_mapping(raw, source=str(path)))

    @property
    def partner_home(self) -> Path:
        """The research partners' FLWR_HOME: a ``config.toml`` naming this SuperLink, and the CA."""
        return self.home / PARTNER_DIR

    def _write(self, path: Path, text: str) -> None:
        """Write a file of this home whole and owner only."""
        try:
            make_private_folder(path.parent)
            publish(path, text)
        except OSError as err:
            raise CoordinatorError(f"cannot write {path}: {err.strerror or err}") from None

    def _write_flwr_config(self, control_address: str) -> None:
        self._write(self.flwr_home / "config.toml", flwr_connection(control_address, self.ca_path))

    def _write_partner_connection(self, control_address: str) -> None:
        """The connection a research partner's `flwr` (and `medfed experiment submit`) uses."""
        ca = self.partner_home / CA_CERT_FILE
        self._write(ca, self.ca_path.read_text(encoding="ascii"))
        self._write(self.partner_home / "config.toml", flwr_connection(control_address, ca))

    # ------------------------------------------------------------------ certificate
    def check_certificate(self) -> CertificateInfo:
        """The server certificate, checked against the CA (warns within 30 days of expiry)."""
        return check_certificate(self.server_cert_path, ca_path=self.ca_path)

    def renew(self, *, days: int | None = None) -> CertificateInfo:
        """Re-issue the server certificate (fresh key, same names); restart the SuperLink to use it."""
        kwargs = {} if days is None else {"days": days}
        issued = issue_server_certificate(
            self.pki_dir, ca_dir=self.pki_dir, hosts=self.config.hosts, addresses=self.config.addresses,
            replace=True, **kwargs,
        )
        return issued.info()

    # ------------------------------------------------------------------ process
    def pid(self) -> int | None:
        """The SuperLink's process id if it is running (a stale PID file is removed)."""
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

    def _control(self, expose_control_on: str | None, acknowledged: bool) -> str:
        if expose_control_on is None:
            return self.config.control_address
        host, _ = _split(expose_control_on, "--expose-control-on")
        if not is_loopback(host) and not acknowledged:
            raise CoordinatorError(
                f"refusing to expose the unauthenticated control API on {expose_control_on}; "
                "add --i-understand-the-control-api-is-unauthenticated to do it anyway"
            )
        if not is_loopback(host):
            logger.warning(
                "the control API listens on %s WITHOUT authentication: anyone who reaches it can submit runs "
                "and register nodes; firewall it to the operators' network", expose_control_on,
            )
        return expose_control_on

    def superlink_argv(self, control_address: str) -> list[str]:
        host, port = _split(control_address, "control address")
        return [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.ca_path),
            "--ssl-certfile", str(self.server_cert_path),
            "--ssl-keyfile", str(self.pki_dir / SERVER_KEY_FILE),
            "--enable-supernode-auth",
            "--host", host,
            "--port", str(port),
            "--fleet-api-address", self.config.fleet_bind,
            "--database", str(self.state_db_path),
            "--disable-runtime-dependency-installation",
        ]

    def start(
        self,
        *,
        expose_control_on: str | None = None,
        i_understand_the_control_api_is_unauthenticated: bool = False,
        foreground: bool = False,
        timeout: float = 60.0,
    ) -> int:
        """Start the SuperLink and wait until it answers its health check over TLS.

        Returns its process id; with ``foreground`` it returns only once the SuperLink
        has exited (a SIGTERM or Ctrl-C to us stops it first), with its exit code.

        Raises
        ------
        CoordinatorError
            If it runs already, the control address is refused, it exits or is not
            ready in time.
        CertificateError
            If the server certificate is expired or not signed by the CA.
        """
        control = self._control(expose_control_on, i_understand_the_control_api_is_unauthenticated)
        running = self.pid()
        if running is not None:
            raise CoordinatorError(f"the SuperLink runs already (pid {running}); stop it with `medfed coordinator stop`")
        info = self.check_certificate()
        if info.expires_soon:
            logger.warning("the server certificate expires in %d days; run `medfed coordinator renew`", info.days_left)
        self._write_flwr_config(control)
        try:
            # SQLite gives the database's -wal and -shm files its mode: created 0600 first.
            create_private(self.state_db_path)
            make_private_folder(self.log_path.parent)
            log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        except OSError as err:
            raise CoordinatorError(f"cannot prepare {self.home} for the SuperLink: {err.strerror or err}") from None
        with os.fdopen(log_fd, "ab") as log:
            popen = subprocess.Popen(
                self.superlink_argv(control),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flower_env(self.flwr_home),
                cwd=self.home,
                start_new_session=True,
                umask=0o077,  # whatever Flower writes (its state, its executors' files) is ours alone
            )
        self._write(self.pid_path, f"{popen.pid}\n")
        try:
            self._wait_ready(popen, control, timeout)
        except BaseException:
            self._stop_group(popen.pid, popen)
            raise
        logger.info("SuperLink running (pid %d): fleet %s, control %s", popen.pid, self.config.fleet_bind, control)
        if not foreground:
            return popen.pid
        try:
            code = popen.wait()
        except KeyboardInterrupt:
            self._stop_group(popen.pid, popen)
            return 0
        self.pid_path.unlink(missing_ok=True)
        if code != 0:
            raise CoordinatorError(f"flower-superlink exited with code {code}; see {self.log_path}")
        return code

    def _wait_ready(self, popen: subprocess.Popen[bytes], control: str, timeout: float) -> None:
        host, port = _split(control, "control address")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        url = f"https://{'[' + host + ']' if ':' in host else host}:{port}/health"
        context = ssl.create_default_context(cafile=str(self.ca_path))
        deadline = time.monotonic() + timeout
        while True:
            code = popen.poll()
            if code is not None:
                raise CoordinatorError(f"flower-superlink exited with code {code} while starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except urllib.error.URLError as err:
                if isinstance(err.reason, ssl.SSLCertVerificationError):
                    raise CoordinatorError(
                        f"the SuperLink's certificate does not verify at {url}: {err.reason.verify_message}"
                    ) from None
            except (ConnectionError, TimeoutError, ssl.SSLError):
                pass
            if time.monotonic() > deadline:
                raise CoordinatorError(f"the SuperLink did not answer {url} within {timeout:g} s; see {self.log_path}")
            time.sleep(0.2)

    def _stop_group(self, pid: int, popen: subprocess.Popen[bytes] | None = None, *, grace: float = 15.0) -> bool:
        """SIGTERM the process group, wait, SIGKILL what is left; True if it had to kill."""
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid_path.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + grace
        killed = False
        while True:
            if popen is not None:
                if popen.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            if time.monotonic() > deadline:
                killed = True
                break
            time.sleep(0.1)
        # Children of the group (SuperExec, ServerApp processes) may outlive the leader.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if popen is not None:
            popen.wait(timeout=5)
        self.pid_path.unlink(missing_ok=True)
        return killed

    def stop(self, *, grace: float = 15.0) -> int | None:
        """Stop the SuperLink's process group cleanly; returns the pid it stopped (None if not running)."""
        pid = self.pid()
        if pid is None:
            return None
        if self._stop_group(pid, grace=grace):
            logger.warning("the SuperLink (pid %d) did not stop within %g s and was killed", pid, grace)
        return pid

    # ------------------------------------------------------------------ control API
    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this coordinator's control API.

        Raises
        ------
        CoordinatorError
            `flwr` did not answer within `timeout` seconds (an overloaded host or a stuck SuperLink).
        """
        try:
            return subprocess.run(
                ["flwr", *args], capture_output=True, text=True, env=flower_env(self.flwr_home),
                cwd=self.home, timeout=timeout, check=False, umask=0o077,
            )
        except subprocess.TimeoutExpired:
            raise CoordinatorError(
                f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s; the SuperLink may be overloaded "
                f"or stuck: see {self.log_path}, and try again"
            ) from None

    def _require_running(self) -> None:
        if self.pid() is None:
            raise CoordinatorError("the SuperLink is not running; start it with `medfed coordinator start`")

    def nodes(self) -> tuple[dict[str, Any], ...]:
        """The SuperNodes the SuperLink knows, as `flwr supernode ls` lists them."""
        self._require_running()
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            answer = json.loads(out.stdout)
        except json.JSONDecodeError:
            answer = {}
        if not answer.get("success"):
            raise CoordinatorError(f"cannot list SuperNodes: {_flwr_error(out, answer)}")
        return tuple(answer.get("nodes", []))

    def enrol(self, request_path: Path, *, out: Path) -> EnrolmentBundle:
        """Register a node's auth key with the running SuperLink and write its enrolment bundle.

        Raises
        ------
        EnrolmentError
            If the request file is invalid.
        CoordinatorError
            If the SuperLink is not running, the node name or key is taken, or `flwr` fails.
        """
        request = EnrolmentRequest.read(request_path)
        self._require_running()
        record_path = self.nodes_dir / f"{request.node}.toml"
        if record_path.exists():
            recorded = tomllib.loads(record_path.read_text(encoding="utf-8")).get("node", {})
            raise CoordinatorError(
                f"node {request.node!r} is enrolled already (node id {recorded.get('node_id')}, "
                f"auth key {recorded.get('auth_key_fingerprint')}); remove {record_path} and unregister it first"
            )
        key_file = self.home / "nodes" / f".{request.node}.pub"
        self._write(key_file, request.auth_openssh + "\n")
        try:
            result = self.flwr("supernode", "register", str(key_file), CONNECTION, "--name", request.node, "--format", "json")
        finally:
            key_file.unlink(missing_ok=True)
        try:
            answer = json.loads(result.stdout)
        except json.JSONDecodeError:
            answer = {}
        if not answer.get("success"):
            message = _flwr_error(result, answer)
            if "already in use" in message:
                raise CoordinatorError(
                    f"the auth key of {request.node!r} ({request.auth_fingerprint}) is registered already, "
                    "under another enrolment; each node needs its own key"
                )
            raise CoordinatorError(f"could not register node {request.node!r}: {message}")
        node_id = int(answer["node-id"])
        bundle = EnrolmentBundle(
            node=request.node,
            node_id=node_id,
            fleet_address=self.config.fleet_address,
            auth_key_fingerprint=request.auth_fingerprint,
            ca_certificate=self.ca_path.read_text(encoding="ascii"),
        )
        bundle.write(out)
        self._write(
            record_path,
            "[node]\n"
            f"name = {json.dumps(request.node)}\n"
            f"node_id = {node_id}\n"
            f"auth_key_fingerprint = {json.dumps(request.auth_fingerprint)}\n"
            f"auth_public_key = {json.dumps(request.auth_openssh)}\n"
            f"audit_key_fingerprint = {json.dumps(request.audit_fingerprint)}\n"
            f"enrolled_at = {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n",
        )
        logger.info("enrolled node %s as SuperNode %d (%s)", request.node, node_id, request.auth_fingerprint)
        return bundle

    def status(self) -> CoordinatorStatus:
        """Whether the SuperLink runs and answers, its certificate, and the SuperNodes it knows."""
        pid = self.pid()
        certificate: CertificateInfo | None = None
        problem: str | None = None
        try:
            certificate = self.check_certificate()
        except CertificateError as err:
            problem = str(err)
        healthy = False
        nodes: tuple[dict[str, Any], ...] = ()
        if pid is not None:
            host, port = _split(self.config.control_address, "control address")
            try:
                context = ssl.create_default_context(cafile=str(self.ca_path))
                with urllib.request.urlopen(f"https://{host}:{port}/health", timeout=3, context=context) as response:
                    healthy = response.status == 200
            except (OSError, ssl.SSLError):
                healthy = False
            if healthy:
                try:
                    nodes = self.nodes()
                except CoordinatorError as err:
                    logger.warning("%s", err)
        return CoordinatorStatus(pid is not None, pid, healthy, certificate, problem, nodes, self.loose_modes())

    def loose_modes(self) -> tuple[LooseMode, ...]:
        """Every path of the home that other users may read or change (certificates may be read).

        Reported, never changed behind the operator's back: `medfed coordinator status`
        prints each with the ``chmod`` that fixes it.
        """
        certificates = {self.ca_path, self.server_cert_path}
        return tuple(loose_modes(self.home, public=lambda path: path in certificates))


def flwr_connection(control_address: str, ca_path: Path) -> str:
    """A `flwr` ``config.toml`` whose default connection, :data:`CONNECTION`, is this SuperLink's control API.

    Flower requires ``root-certificates`` to be an absolute path: a copy of the file
    moved elsewhere needs that line changed to where ``ca.crt`` then lies.
    """
    host, port = _split(control_address, "control address")
    # The certificate names 127.0.0.1 and localhost; a wildcard bind is reached on loopback.
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\naddress = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(ca_path.resolve()))}\n"
    )


def _flwr_error(out: subprocess.CompletedProcess[str], answer: Mapping[str, Any]) -> str:
    message = str(answer.get("error-message", "")) or out.stderr.strip() or f"flwr exited with code {out.returncode}"
    lines = [line for line in message.strip().splitlines() if line.strip() and not line.startswith("Using SuperLink")]
    return lines[-1] if lines else message.strip()
