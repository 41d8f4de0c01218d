"""A local Flower deployment: one SuperLink and N SuperNodes as real processes on loopback.

Used by ``medfed demo``, the integration tests and the benchmarks. It launches Flower's
own executables (``flower-superlink``, ``flower-supernode``); it is not a process manager
for production. Every process gets its own session so it can be stopped as a group
(Flower's SuperExec children included), and its output goes to a log file, never to a
pipe we would have to drain.

Readiness: the SuperLink is ready when ``GET /health`` on its HTTP port answers 200; the
SuperNodes are ready when ``flwr supernode ls`` lists the expected number as online.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.errors import ClusterError

__all__ = ["LocalCluster", "free_port", "flower_env"]

logger = logging.getLogger(__name__)

CONNECTION = "medfed-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: our executables first, telemetry and update checks off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


class LocalCluster:
    """A SuperLink and SuperNodes on loopback, stopped together by `stop()` (or `with`)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        self.http_port = 0
        self.fleet_port = 0
        self._processes: list[_Process] = []

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
        """Start ``flower-superlink`` (insecure, loopback only) and wait for its health check."""
        self.http_port, self.fleet_port = free_port(), free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.control_address}"\ninsecure = true\n'
        )
        process = self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host", "127.0.0.1",
                "--port", str(self.http_port),
                "--fleet-api-address", self.fleet_address,
                "--database", str(self.workdir / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
            ],
            self.flwr_home,
        )
        deadline = time.monotonic() + timeout
        url = f"http://{self.control_address}/health"
        while True:
            self._check_alive(process)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"the SuperLink did not answer {url} within {timeout:g} s; see {process.log_path}")
            time.sleep(0.2)

    def start_supernode(self, name: str, home: Path) -> None:
        """Start ``flower-supernode`` for the node home `home`, dialling the SuperLink's Fleet port."""
        if not self.fleet_port:
            raise ClusterError("start the SuperLink before any SuperNode")
        node_flwr_home = self.workdir / "nodes" / name
        node_flwr_home.mkdir(parents=True, exist_ok=True)
        self._spawn(
            f"supernode-{name}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink", self.fleet_address,
                "--port", str(free_port()),
                "--node-config", f'home="{home.resolve()}"',
            ],
            node_flwr_home,
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this SuperLink."""
        return subprocess.run(
            ["flwr", *args],
            capture_output=True,
            text=True,
            env=flower_env(self.flwr_home),
            cwd=self.workdir,
            timeout=timeout,
            check=False,
        )

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json", timeout=30)
        try:
            nodes = json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_for_nodes(self, count: int, *, timeout: float = 90.0) -> None:
        """Wait until `count` SuperNodes are online; fail early if a node process died."""
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            for process in self._processes:
                self._check_alive(process)
            if time.monotonic() > deadline:
                raise ClusterError(f"fewer than {count} SuperNodes came online within {timeout:g} s; see {self.workdir / 'logs'}")
            time.sleep(0.5)

    def _check_alive(self, process: _Process) -> None:
        code = process.popen.poll()
        if code is not None:
            raise ClusterError(f"{process.name} exited with code {code}; see {process.log_path}")

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._processes]

    def stop(self, *, grace: float = 10.0) -> None:
        """Stop every process group this cluster started: SIGTERM, then SIGKILL after `grace`."""
        for process in reversed(self._processes):
            _signal_group(process.popen, signal.SIGTERM)
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
        self._processes.clear()


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
