"""The node service process: one ``flower-supernode`` that runs no app, and the node executor beside it.

``medfed node start`` (and ``medfed.cluster.LocalCluster`` for the demo and the tests)
starts this process in a session of its own; it starts and watches its two children:

- ``flower-supernode --isolation process`` dials out to the coordinator. In ``process``
  isolation the SuperNode starts no SuperExec and so never installs or imports a run's
  app bundle; its runtime API (loopback only, on a free port unless one is given)
  answers only callers holding the SuperExec auth secret this process writes afresh at
  every start (``run/superexec.secret`` in the node home, 0600, removed at stop);
- the node executor (:mod:`clients.hospital_node.runtime.executor`), which serves every
  task with the medfed ClientApp installed here, for allowed releases only.

When the executor starts is the hospital's choice (``medfed node start --executor``):

- ``warm`` (the default): at once, and it stays up, torch and Opacus imported, so the
  first message of a run costs its training only;
- ``on-demand``: only when the SuperNode holds a task (this process asks the SuperNode's
  runtime API for pending tasks every second, signed with the same secret), and it
  stops after ``--executor-idle`` seconds without one. An idle node then costs the
  SuperNode and this process only (about 340 MB less), and the first message of a run
  waits for the executor's start and imports (a few seconds). Nothing else changes: it
  is the same executor, the hospital's own installed code, with the same gate; the
  pending-task check reads task records, never a message or an app bundle.

If the executor dies (killed for memory, a crash in a native library) it is started
again, after a pause that grows while it keeps dying; the task it held gets Flower's
"ClientApp crashed" reply once its token expires, so the SuperNode never stalls. If the
SuperNode exits, the executor is stopped and this process exits with the SuperNode's
code, after one line saying why (``medfed node service: ...``), for systemd or the
launcher to act on. SIGTERM or Ctrl-C stops both children.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clients.hospital_node.runtime.forkserver import ForkedExecutor
from privacy.private_files import make_private_folder, publish

__all__ = ["EXECUTOR_MODES", "SERVICE_PREFIX", "SupervisorConfig", "flower_env", "main", "supervisor_argv"]

logger = logging.getLogger(__name__)

#: Each line this process prints about the service starts with it (the launcher quotes them).
SERVICE_PREFIX = "medfed node service:"
RUN_DIR = "run"
SECRET_FILE = "superexec.secret"
RUNTIME_FILE = "runtime.json"
_PORT_ATTEMPTS = 5
_READY_SECONDS = 30.0
_BACKOFF_MAX = 30.0
_STOP_GRACE = 10.0
#: When the node executor runs: ``warm`` (always) or ``on-demand`` (while there are tasks).
EXECUTOR_MODES = ("warm", "on-demand")
DEFAULT_IDLE_SECONDS = 300.0
# On demand: how often the SuperNode is asked for pending tasks. It fetches messages from
# the coordinator every 3 s itself, so a second adds little to a run's first message.
_PENDING_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class SupervisorConfig:
    """How to start the node's SuperNode: where the coordinator is and how the node proves itself."""

    home: Path
    superlink: str
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    runtime_port: int = 0  # 0: a free loopback port, chosen at start
    executor: str = "warm"  # one of EXECUTOR_MODES
    executor_idle_seconds: float = DEFAULT_IDLE_SECONDS  # on-demand: stop after this long without a task
    # Fork the executor from this host's executor fork server (clients.hospital_node.runtime.forkserver)
    # instead of starting a process: several nodes of one hospital on one host share its imported pages.
    fork_server: Path | None = None

    def __post_init__(self) -> None:
        if self.insecure == (self.root_certificates is not None):
            raise ValueError("give either root_certificates (TLS) or insecure=True")
        if self.executor not in EXECUTOR_MODES:
            raise ValueError(f"executor must be one of {', '.join(EXECUTOR_MODES)}; found {self.executor!r}")
        if not self.executor_idle_seconds > 0:
            raise ValueError(f"executor idle time must be > 0 seconds; found {self.executor_idle_seconds!r}")


def supervisor_argv(config: SupervisorConfig) -> list[str]:
    """The command that starts the node service for `config` (with this interpreter)."""
    argv = [sys.executable, "-m", "clients.hospital_node.runtime.supervisor", "--home", str(config.home), "--superlink", config.superlink]
    if config.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(config.root_certificates)]
    if config.auth_key is not None:
        argv += ["--auth-key", str(config.auth_key)]
    if config.runtime_port:
        argv += ["--runtime-port", str(config.runtime_port)]
    if config.executor != "warm":
        argv += ["--executor", config.executor, "--executor-idle", f"{config.executor_idle_seconds:g}"]
    if config.fork_server is not None:
        argv += ["--executor-fork-server", str(config.fork_server)]
    return argv


def _say(text: str) -> None:
    print(f"{SERVICE_PREFIX} {text}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our executables first, telemetry and update checks off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _child_env(home: Path) -> dict[str, str]:
    """The node's children's environment: the launcher's FLWR_HOME, else the node home's own."""
    return flower_env(Path(os.environ.get("FLWR_HOME") or home / "flwr-home"))


class Supervisor:
    """Starts, watches and stops the SuperNode and the executor of one node home."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.run_dir = config.home / RUN_DIR
        self.secret_path = self.run_dir / SECRET_FILE
        self.port = config.runtime_port
        self.supernode: subprocess.Popen[bytes] | None = None
        self.executor: subprocess.Popen[bytes] | ForkedExecutor | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ start
    def _write_secret(self) -> None:
        make_private_folder(self.run_dir)
        publish(self.secret_path, secrets.token_bytes(32))

    def _supernode_argv(self) -> list[str]:
        config = self.config
        argv = ["flower-supernode", "--isolation", "process", "--superexec-auth-secret-file", str(self.secret_path)]
        if config.insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(config.root_certificates)]
        if config.auth_key is not None:
            argv += ["--auth-supernode-private-key", str(config.auth_key)]
        argv += ["--superlink", config.superlink, "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--node-config", f"home={json.dumps(str(config.home))}"]
        return argv

    def _start_supernode(self) -> None:
        """Start the SuperNode; on a free port that another process took first, try another."""
        chosen = not self.config.runtime_port
        for _attempt in range(_PORT_ATTEMPTS):
            if chosen:
                self.port = _free_port()
            elif _port_taken(self.port):
                raise _Fatal(f"the runtime port {self.port} on 127.0.0.1 is in use; give another with --port, or none")
            self.supernode = subprocess.Popen(
                self._supernode_argv(), env=_child_env(self.config.home), stdin=subprocess.DEVNULL, umask=0o077
            )
            deadline = time.monotonic() + _READY_SECONDS
            while time.monotonic() < deadline:
                if _listening(self.port):
                    publish(self.run_dir / RUNTIME_FILE, json.dumps({"runtime_port": self.port, "pid": os.getpid()}) + "\n")
                    return
                code = self.supernode.poll()
                if code is not None:
                    if chosen and _port_taken(self.port):
                        _say(f"runtime port {self.port} was taken before the SuperNode bound it; trying another")
                        break
                    raise _Fatal(f"flower-supernode exited with code {code} before its runtime API opened (see the lines above)")
                self._stopping.wait(0.1)
                if self._stopping.is_set():
                    return
            else:
                raise _Fatal(f"flower-supernode did not open its runtime API on 127.0.0.1:{self.port} within {_READY_SECONDS:g} s")
        else:
            raise _Fatal(f"no free runtime port after {_PORT_ATTEMPTS} attempts")

    def _start_executor(self) -> subprocess.Popen[bytes] | ForkedExecutor:
        idle_exit = self.config.executor_idle_seconds if self.config.executor == "on-demand" else None
        if self.config.fork_server is not None:
            try:
                return ForkedExecutor(
                    self.config.fork_server, home=self.config.home, runtime_api=f"127.0.0.1:{self.port}",
                    secret_file=self.secret_path, idle_exit=idle_exit,
                )
            except OSError as err:
                raise _Fatal(f"the executor fork server {self.config.fork_server} did not fork an executor: {err}") from None
        argv = [
            sys.executable, "-m", "clients.hospital_node.runtime.executor",
            "--home", str(self.config.home),
            "--runtime-api", f"127.0.0.1:{self.port}",
            "--secret-file", str(self.secret_path),
        ]
        if self.config.executor == "on-demand":
            argv += ["--idle-exit", f"{self.config.executor_idle_seconds:g}"]
        return subprocess.Popen(argv, env=_child_env(self.config.home), stdin=subprocess.DEVNULL, umask=0o077)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Start both children and watch them until the SuperNode exits or we are told to stop."""
        self._write_secret()
        try:
            self._start_supernode()
            if self._stopping.is_set():
                return 0
            assert self.supernode is not None
            if self.config.executor == "on-demand":
                _say(f"SuperNode (pid {self.supernode.pid}) runs no app; the node executor starts when it holds a task "
                     f"and stops after {self.config.executor_idle_seconds:g} s without one (runtime API 127.0.0.1:{self.port})")
                return self._watch_on_demand()
            self.executor = self._start_executor()
            _say(f"SuperNode (pid {self.supernode.pid}) runs no app; node executor (pid {self.executor.pid}) "
                 f"serves its runtime API on 127.0.0.1:{self.port}")
            return self._watch()
        except _Fatal as err:
            _say(str(err))
            return 1
        finally:
            self._stop_children()
            self.secret_path.unlink(missing_ok=True)

    def _watch(self) -> int:
        assert self.supernode is not None and self.executor is not None
        backoff, started = 1.0, time.monotonic()
        while not self._stopping.is_set():
            code = self.supernode.poll()
            if code is not None:
                _say(f"flower-supernode exited with code {code}; stopping the node executor")
                return code or 1
            executor_code = self.executor.poll()
            if executor_code is not None:
                if time.monotonic() - started > 5 * _BACKOFF_MAX:
                    backoff = 1.0  # it ran a good while: a fresh failure, not a crash loop
                _say(f"the node executor exited with code {executor_code}; starting it again in {backoff:g} s")
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, _BACKOFF_MAX)
                self.executor, started = self._start_executor(), time.monotonic()
            self._stopping.wait(0.2)
        return 0

    def _watch_on_demand(self) -> int:
        """Start the executor while the SuperNode holds tasks; it stops itself when idle."""
        assert self.supernode is not None
        pending = _PendingTasks(f"127.0.0.1:{self.port}", self.secret_path.read_bytes())
        backoff = 1.0
        try:
            while not self._stopping.is_set():
                code = self.supernode.poll()
                if code is not None:
                    _say(f"flower-supernode exited with code {code}; stopping the node executor")
                    return code or 1
                if self.executor is not None:
                    executor_code = self.executor.poll()
                    if executor_code == 0:
                        _say(f"the node executor stopped after {self.config.executor_idle_seconds:g} s without a task")
                        self.executor, backoff = None, 1.0
                    elif executor_code is not None:
                        _say(f"the node executor exited with code {executor_code}; it starts again for the next task, "
                             f"in {backoff:g} s at the earliest")
                        self.executor = None
                        if self._stopping.wait(backoff):
                            break
                        backoff = min(backoff * 2, _BACKOFF_MAX)
                elif pending.any():
                    self.executor = self._start_executor()
                    _say(f"the SuperNode holds a task: node executor started (pid {self.executor.pid})")
                self._stopping.wait(_PENDING_POLL_SECONDS if self.executor is None else 0.2)
        finally:
            pending.close()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def _stop_children(self) -> None:
        children = [p for p in (self.executor, self.supernode) if p is not None and p.poll() is None]
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)


class _Fatal(Exception):
    """The service cannot run; the message says why."""


class _PendingTasks:
    """Asks the SuperNode's runtime API whether it holds a task nobody serves yet.

    ``PullPendingTasks`` returns task records (ids, types, statuses), never a message or
    an app bundle; the SuperNode answers it only to holders of the SuperExec secret.
    Flower is imported here, in on-demand mode only, to keep a warm node's service small.
    """

    def __init__(self, runtime_address: str, secret: bytes) -> None:
        from flwr.proto.runtime_pb2 import PullPendingTasksRequest
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        from clients.hospital_node.runtime.executor import SUPEREXEC_METHODS

        self._request = PullPendingTasksRequest()
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,  # loopback; the secret authenticates us
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SUPEREXEC_METHODS),
            ],
        )

    def any(self) -> bool:
        try:
            return len(self._client.PullPendingTasks(self._request).tasks) > 0
        except Exception as err:  # noqa: BLE001 - asked again in a second; a dead SuperNode is seen by its exit
            logger.debug("asking the SuperNode for pending tasks failed: %s", err)
            return False

    def close(self) -> None:
        self._client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medfed-node-service", description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--superlink", required=True, help="the coordinator's Fleet API, HOST:PORT")
    parser.add_argument("--root-certificates", type=Path, help="the alliance CA certificate (TLS)")
    parser.add_argument("--auth-key", type=Path, help="the node's Fleet auth private key (OpenSSH)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local experiments only)")
    parser.add_argument("--runtime-port", type=int, default=0, help="the SuperNode's loopback runtime port (default: a free one)")
    parser.add_argument("--executor", default="warm", help=f"when the node executor runs: {' or '.join(EXECUTOR_MODES)}")
    parser.add_argument("--executor-idle", type=float, default=DEFAULT_IDLE_SECONDS,
                        help="on-demand: stop the executor after this many seconds without a task")
    parser.add_argument("--executor-fork-server", type=Path, help="fork the executor from this host's executor fork server (its socket)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s medfed-service: %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # on demand: one line per pending-task check otherwise
    try:
        config = SupervisorConfig(
            home=args.home.resolve(),
            superlink=args.superlink,
            root_certificates=args.root_certificates.resolve() if args.root_certificates else None,
            auth_key=args.auth_key.resolve() if args.auth_key else None,
            insecure=args.insecure,
            runtime_port=args.runtime_port,
            executor=args.executor,
            executor_idle_seconds=args.executor_idle,
            fork_server=args.executor_fork_server.resolve() if args.executor_fork_server else None,
        )
    except ValueError as err:
        _say(str(err))
        return 2
    supervisor = Supervisor(config)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
