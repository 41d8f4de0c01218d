"""A local Flower deployment: one SuperLink and N SuperNodes as real processes on loopback.

Used by ``medfed demo``, the integration tests and the benchmarks. It launches Flower's
own executables (``flower-superlink``, ``flower-supernode``); it is not a process manager
for production (``medfed coordinator`` and ``medfed node start`` are). Every process gets
its own session so it can be stopped as a group (Flower's SuperExec children included),
and its output goes to a log file, never to a pipe we would have to drain.

Secure by default, as a real alliance runs: a throwaway CA and server certificate in
``<workdir>/pki`` (``privacy.pki``), the SuperLink with TLS and
``--enable-supernode-auth``, and every SuperNode with its own EC key, registered with
``flwr supernode register`` before it starts. ``LocalCluster(workdir, insecure=True)``
runs without TLS or node authentication and warns every time it starts.

Readiness: the SuperLink is ready when ``GET /health`` on its HTTP port answers 200 (over
HTTPS verified against the CA when secure; a certificate that does not verify fails at
once); the SuperNodes are ready when ``flwr supernode ls`` lists the expected number as
online.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clients.hospital_node.runtime.supervisor import flower_env
from medfed.errors import ClusterError
from privacy.errors import CertificateError
from privacy.pki import (
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    check_certificate,
    create_ca,
    generate_node_auth_key,
    issue_server_certificate,
)

__all__ = ["LocalCluster", "flower_env", "free_port", "parse_register_output", "wait_for_health"]

logger = logging.getLogger(__name__)

CONNECTION = "medfed-local"
#: The longest Unix socket path used as given (Linux allows 107 bytes).
_SOCKET_PATH_MAX = 100
#: The name of each SuperNode's Fleet authentication key in its cluster folder.
NODE_AUTH_KEY = "fleet_auth"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class LocalCluster:
    """A SuperLink and SuperNodes on loopback, stopped together by `stop()` (or `with`).

    Parameters
    ----------
    workdir
        Logs, the SuperLink's state, the ``flwr`` CLI's home, the PKI and node keys.
    insecure
        Run without TLS and node authentication (warns on every start).
    pki_dir
        Use the CA and server certificate in this folder (``ca.crt``, ``server.pem``,
        ``server.key``) as they are, instead of a throwaway PKI in ``<workdir>/pki``.
    """

    def __init__(self, workdir: Path, *, insecure: bool = False, pki_dir: Path | None = None) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        self.insecure = insecure
        if insecure and pki_dir is not None:
            raise ClusterError("an insecure cluster has no PKI; pass insecure=True or pki_dir, not both")
        self.pki_dir = (pki_dir or self.workdir / "pki").resolve()
        self._own_pki = pki_dir is None
        self.http_port = 0
        self.fleet_port = 0
        self._processes: list[_Process] = []
        self._socket_dirs: list[Path] = []  # short folders for Unix sockets, removed at stop

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connection(self) -> str:
        """The name of this SuperLink in ``$FLWR_HOME/config.toml`` for the `flwr` CLI."""
        return CONNECTION

    @property
    def control_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def ca_path(self) -> Path:
        """The CA certificate that signed the SuperLink's certificate (secure mode)."""
        return self.pki_dir / CA_CERT_FILE

    def _ensure_pki(self) -> None:
        """A CA and server certificate for loopback: reused while valid, else made afresh."""
        if not self._own_pki:
            return
        server = self.pki_dir / SERVER_CERT_FILE
        if server.exists():
            try:
                if not check_certificate(server, ca_path=self.ca_path).expires_soon:
                    return
            except CertificateError as err:
                logger.info("replacing the local cluster's throwaway PKI: %s", err)
            # Ours alone, made for this cluster: replacing it loses nothing.
            shutil.rmtree(self.pki_dir)
        create_ca(self.pki_dir, common_name="medfed local cluster CA", days=90)
        issue_server_certificate(self.pki_dir, ca_dir=self.pki_dir, days=90)

    def _spawn(self, name: str, argv: Sequence[str], flwr_home: Path) -> _Process:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flower_env(flwr_home),
                cwd=self.workdir,
                start_new_session=True,
            )
        process = _Process(name, popen, log_path)
        self._processes.append(process)
        logger.debug("started %s (pid %s): %s", name, popen.pid, " ".join(argv))
        return process

    def start_superlink(self, *, timeout: float = 60.0) -> None:
        """Start ``flower-superlink`` on loopback and wait for its health check.

        Raises
        ------
        ClusterError
            If it exits, does not answer in time, or (secure mode) presents a certificate
            that does not verify against the CA; the process is then still stopped by
            :meth:`stop`.
        """
        if not self.http_port:  # a restart keeps the ports the SuperNodes dial and the control API's
            self.http_port, self.fleet_port = free_port(), free_port()
        if self.insecure:
            logger.warning("the local cluster runs WITHOUT TLS or node authentication (insecure=True)")
            security = ["--insecure"]
            connection = "insecure = true"
        else:
            self._ensure_pki()
            security = [
                "--ssl-ca-certfile", str(self.ca_path),
                "--ssl-certfile", str(self.pki_dir / SERVER_CERT_FILE),
                "--ssl-keyfile", str(self.pki_dir / SERVER_KEY_FILE),
                "--enable-supernode-auth",
            ]
            # Flower resolves a relative path against the config file's folder; be explicit.
            connection = f"root-certificates = {json.dumps(str(self.ca_path))}"
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.control_address}"\n{connection}\n'
        )
        process = self._spawn(
            "superlink",
            [
                "flower-superlink",
                *security,
                "--host", "127.0.0.1",
                "--port", str(self.http_port),
                "--fleet-api-address", self.fleet_address,
                "--database", str(self.workdir / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
            ],
            self.flwr_home,
        )
        scheme = "http" if self.insecure else "https"
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.ca_path))
        wait_for_health(
            f"{scheme}://{self.control_address}/health",
            context=context,
            timeout=timeout,
            alive=lambda: self._check_alive(process),
            log_path=process.log_path,
        )

    def stop_superlink(self, *, grace: float = 10.0) -> None:
        """Stop the SuperLink (its ServerApps die with it), as a coordinator restart does; the nodes keep dialling.

        :meth:`start_superlink` starts it again on the same ports and state database.
        """
        [process] = [p for p in self._processes if p.name == "superlink"]
        _signal_group(process.popen, signal.SIGTERM)
        try:
            process.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.popen, signal.SIGKILL)
            process.popen.wait(timeout=5)
        _signal_group(process.popen, signal.SIGKILL)  # the SuperExec and ServerApp children too
        self._processes.remove(process)

    def node_auth_key(self, name: str) -> Path:
        """The private Fleet auth key of SuperNode `name` (created on first use)."""
        folder = self.workdir / "nodes" / name / "keys"
        key = folder / f"{NODE_AUTH_KEY}.key"
        if not key.exists():
            generate_node_auth_key(folder, NODE_AUTH_KEY)
        return key

    def register_node(self, public_key: Path, name: str) -> int | None:
        """Register a SuperNode's public key; returns its node id, or None if it was registered already.

        A `flwr` call that times out under load is tried again (a registration that
        went through the first time then reads as "registered already").

        Raises
        ------
        ClusterError
            The registration failed, or `flwr` did not answer in time, every try.
        """
        out = self.flwr(
            "supernode", "register", str(public_key), CONNECTION, "--name", name, "--format", "json",
            timeout=60, attempts=3,
        )
        return parse_register_output(out, what=f"SuperNode {name!r}")

    def start_supernode(
        self,
        name: str,
        home: Path,
        *,
        auth_key: Path | None = None,
        register: bool = True,
        root_certificates: Path | None = None,
        plain_flower: bool = False,
        executor: str = "warm",
        executor_idle_seconds: float | None = None,
        fork_server: Path | None = None,
    ) -> None:
        """Start the node service for the node home `home`, dialling the SuperLink's Fleet port.

        The node service (:mod:`clients.hospital_node.runtime.supervisor`) is what
        `medfed node start` runs: a ``flower-supernode`` that executes no app bundle, and
        the node executor serving its tasks with the installed medfed ClientApp. In
        secure mode the node authenticates with `auth_key` (default: its own key in the
        cluster folder), registered first unless `register` is false, and trusts
        `root_certificates` (default: the cluster's CA). `plain_flower` starts a stock
        ``flower-supernode`` instead, which installs and runs each run's bundle: only for
        benchmarks of plain Flower apps, never for a medfed node home. `executor` and
        `executor_idle_seconds` choose when the node executor runs (``medfed node start
        --executor``): ``warm`` or ``on-demand``; with `fork_server` (from
        :meth:`start_executor_fork_server`) it is forked from that pre-imported parent.
        """
        from clients.hospital_node.runtime.supervisor import SupervisorConfig, supervisor_argv

        if not self.fleet_port:
            raise ClusterError("start the SuperLink before any SuperNode")
        node_flwr_home = self.workdir / "nodes" / name
        node_flwr_home.mkdir(parents=True, exist_ok=True)
        key: Path | None = None
        if not self.insecure:
            key = (auth_key or self.node_auth_key(name)).resolve()
            if register:
                self.register_node(key.with_suffix(".pub"), name)
        ca = None if self.insecure else (root_certificates or self.ca_path).resolve()
        if plain_flower:
            security = ["--insecure"] if ca is None else ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
            argv = [
                "flower-supernode", *security, "--superlink", self.fleet_address,
                "--port", str(free_port()), "--node-config", f'home="{home.resolve()}"',
            ]
        else:
            argv = supervisor_argv(
                SupervisorConfig(
                    home=home.resolve(), superlink=self.fleet_address, root_certificates=ca, auth_key=key, insecure=ca is None,
                    executor=executor, fork_server=fork_server,
                    **({} if executor_idle_seconds is None else {"executor_idle_seconds": executor_idle_seconds}),
                )
            )
        self._spawn(f"supernode-{name}", argv, node_flwr_home)

    def start_executor_fork_server(self, *, timeout: float = 120.0) -> Path:
        """Start one executor fork server for this cluster's nodes; its socket, once it answers.

        The nodes of a local cluster stand for hospitals that each have a host of their
        own; on one machine they may share one pre-imported parent for their executors
        (:mod:`clients.hospital_node.runtime.forkserver`), which a real alliance never does
        across hospitals.
        """
        from clients.hospital_node.runtime.forkserver import ping

        path = self.workdir / "forkserver" / "executors.sock"
        if len(str(path)) > _SOCKET_PATH_MAX:
            # A Unix socket's path has at most 107 bytes on Linux; a deep workdir (pytest's, a
            # CI checkout's) would not bind. A private folder under the temp dir stands in.
            folder = Path(tempfile.mkdtemp(prefix="medfed-fs-"))
            self._socket_dirs.append(folder)
            path = folder / "executors.sock"
        process = self._spawn(
            "executor-forkserver", [sys.executable, "-m", "clients.hospital_node.runtime.forkserver", "--socket", str(path)], self.flwr_home
        )
        deadline = time.monotonic() + timeout
        while not ping(path):
            self._check_alive(process)
            if time.monotonic() > deadline:
                raise ClusterError(f"the executor fork server did not answer within {timeout:g} s; see {process.log_path}")
            time.sleep(0.2)
        return path

    def flwr(self, *args: str, timeout: float = 120.0, attempts: int = 1) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this SuperLink, trying up to `attempts` times if it does not answer.

        Raises
        ------
        ClusterError
            `flwr` did not answer within `timeout` seconds, `attempts` times (an
            overloaded machine, or a SuperLink that stopped answering).
        """
        for attempt in range(1, attempts + 1):
            try:
                return subprocess.run(
                    ["flwr", *args],
                    capture_output=True,
                    text=True,
                    env=flower_env(self.flwr_home),
                    cwd=self.workdir,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:  # run() has killed and reaped the `flwr` process
                logger.warning("`flwr %s` did not answer within %g s (try %d of %d)", " ".join(args[:2]), timeout, attempt, attempts)
        tries = "once" if attempts == 1 else f"{attempts} times"
        raise ClusterError(
            f"`flwr {' '.join(args[:2])}` did not answer within {timeout:g} s, {tries}: the machine may be overloaded "
            f"or the SuperLink stuck; see {self.log_path('superlink')}"
        )

    def online_nodes(self, *, timeout: float = 30.0) -> int:
        """How many SuperNodes the SuperLink lists as online.

        Raises
        ------
        ClusterError
            `flwr supernode ls` did not answer within `timeout` seconds.
        """
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=timeout)
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for_nodes(self, count: int, *, timeout: float = 90.0) -> None:
        """Wait until `count` SuperNodes are online; fail early if a node process died.

        A listing that does not answer under load is asked again until the deadline.

        Raises
        ------
        ClusterError
            A process died, or fewer than `count` nodes were online by the deadline (with
            the last reason the listing gave, if it did not answer).
        """
        deadline = time.monotonic() + timeout
        problem = ""
        while True:
            remaining = deadline - time.monotonic()
            try:
                if self.online_nodes(timeout=max(1.0, min(30.0, remaining))) >= count:
                    return
                problem = ""
            except ClusterError as err:
                problem = f" ({err})"
            for process in self._processes:
                self._check_alive(process)
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"fewer than {count} SuperNodes came online within {timeout:g} s{problem}; see {self.workdir / 'logs'}"
                )
            time.sleep(0.5)

    def wait_for_exit(self, name: str, *, timeout: float = 60.0) -> int:
        """Wait until the process `name` (``superlink`` or ``supernode-<site>``) exits; its exit code."""
        [process] = [p for p in self._processes if p.name == name]
        try:
            return process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{name} still runs after {timeout:g} s; see {process.log_path}") from None

    def kill(self, name: str, *, timeout: float = 30.0) -> None:
        """SIGKILL the process group of `name` (``supernode-<site>``), as a crash or power cut would.

        The process stays listed, so :meth:`stop` still reaps whatever is left of its group.
        """
        [process] = [p for p in self._processes if p.name == name]
        _signal_group(process.popen, signal.SIGKILL)
        try:
            process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{name} survived SIGKILL for {timeout:g} s") from None

    def pause(self, name: str) -> None:
        """SIGSTOP the process group of `name` (``supernode-<site>``): a node that hangs, a straggler, until :meth:`resume`."""
        [process] = [p for p in self._processes if p.name == name]
        _signal_group(process.popen, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT the process group of `name`: the node goes on where :meth:`pause` stopped it."""
        [process] = [p for p in self._processes if p.name == name]
        _signal_group(process.popen, signal.SIGCONT)

    def log_path(self, name: str) -> Path:
        """The log file of process `name`."""
        return self.workdir / "logs" / f"{name}.log"

    def _check_alive(self, process: _Process) -> None:
        code = process.popen.poll()
        if code is not None:
            raise ClusterError(f"{process.name} exited with code {code}; see {process.log_path}")

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._processes]

    @property
    def named_pids(self) -> dict[str, int]:
        """Each running process's name (``superlink``, ``supernode-<site>``) and process id."""
        return {p.name: p.popen.pid for p in self._processes}

    def stop(self, *, grace: float = 10.0) -> None:
        """Stop every process group this cluster started: SIGTERM, then SIGKILL after `grace`.

        Descendants that left their group (the SuperExec starts each ServerApp in a
        session of its own) are found first and stopped the same way.
        """
        strays = _descendants([p.popen.pid for p in self._processes])
        for process in reversed(self._processes):
            _signal_group(process.popen, signal.SIGTERM)
            _signal_group(process.popen, signal.SIGCONT)  # a paused group acts on its SIGTERM only once it runs
        _signal_pids(strays, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in reversed(self._processes):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                _signal_group(process.popen, signal.SIGKILL)
                process.popen.wait(timeout=5)
            # Children of the group (SuperExec, app processes) may outlive the leader.
            _signal_group(process.popen, signal.SIGKILL)
        while (alive := [pid for pid in strays if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_pids(alive, signal.SIGKILL)
        self._processes.clear()
        for folder in self._socket_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._socket_dirs.clear()


def parse_register_output(out: subprocess.CompletedProcess[str], *, what: str) -> int | None:
    """The node id from ``flwr supernode register --format json``; None if the key was registered already.

    `flwr` exits 0 whether or not it succeeded, so the JSON decides.

    Raises
    ------
    ClusterError
        If the registration failed for any other reason.
    """
    try:
        answer = json.loads(out.stdout)
    except json.JSONDecodeError:
        answer = {}
    if isinstance(answer, dict) and answer.get("success"):
        return int(answer["node-id"])
    message = str(answer.get("error-message", "") if isinstance(answer, dict) else "") or out.stderr.strip()
    if "already in use" in message:
        return None
    last = message.strip().splitlines()[-1] if message.strip() else f"flwr exited with code {out.returncode}"
    raise ClusterError(f"could not register {what} with the SuperLink: {last}")


def wait_for_health(
    url: str,
    *,
    context: ssl.SSLContext | None,
    timeout: float,
    alive: Callable[[], None],
    log_path: Path,
) -> None:
    """Poll ``GET url`` until it answers 200; `alive` raises if the process died.

    A TLS certificate that does not verify is final, not a reason to wait: it raises at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise ClusterError(
                    f"the SuperLink at {url} presents a certificate that does not verify: "
                    f"{err.reason.verify_message}; see {log_path}"
                ) from None
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"the SuperLink did not answer {url} within {timeout:g} s; see {log_path}")
        time.sleep(0.2)


def _descendants(roots: Sequence[int]) -> list[int]:
    """Every living descendant of `roots`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
