"""The executor fork server: one pre-imported parent that forks each node executor on a host, sharing its pages.

A node executor imports torch, Opacus, pandas and Flower (about 340 MB, 4 s). Where one
host runs several node services (an operator rehearsing a deployment, or one hospital
with several nodes), each would hold its own copy. This process imports all of it once,
freezes the garbage collector's view of those objects (``gc.freeze``: a collection would
otherwise write to every object and copy every page), and then forks a child per
request: the child is an ordinary node executor (:func:`executor.run`) whose imported
modules are the parent's pages, shared copy-on-write until written.

Trust: the parent runs only the medfed code installed here, imports nothing that arrives
with a run, and never holds a node's secret, data or keys: a request names a node home,
the SuperNode's runtime address and the secret *file*, which the child reads after the
fork. Each child serves exactly one node, in its own address space, with the same gate as
any executor. The socket (``0600`` in a ``0700`` folder) takes requests only from the
same OS user, the user the nodes run as. One fork server must never serve nodes of
different hospitals: a hospital's node runs under its own account on its own host, and
a parent shared across hospitals would be one process whose compromise reaches them all.

Protocol (one Unix-socket connection per executor, held open by the requesting node
service): the request is one JSON line with the requester's stdout and stderr passed as
file descriptors (``SCM_RIGHTS``, so the child logs to the node's own log); the answer is
``pid <n>``, and later ``exit <code>`` when the child ends. Closing the connection stops
the child (SIGTERM). ``{"ping": true}`` answers ``pong`` (readiness).

    python -m clients.hospital_node.runtime.forkserver --socket /run/medfed/executors.sock
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["ForkedExecutor", "main", "ping"]

logger = logging.getLogger(__name__)

_REQUEST_MAX = 8192
_KEYS = ("home", "runtime_api", "secret_file", "idle_exit")


def _warm_up() -> None:
    """Import everything a node executor imports while it serves, once, in the parent."""
    import flwr.app  # noqa: F401
    import flwr.common.serde  # noqa: F401
    import flwr.proto.runtime_pb2  # noqa: F401
    import flwr.supercore.inflatable.inflatable_utils  # noqa: F401
    import flwr.supercore.runtime  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import opacus  # noqa: F401

    import clients.hospital_node.client_app  # noqa: F401
    from clients.hospital_node.runtime import executor

    executor.check_flower_version()
    executor.warm_up()


class _Server:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.children: dict[int, socket.socket] = {}  # child pid -> its requester's connection
        self.selector = selectors.DefaultSelector()
        self.stopping = False

    def listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(128)
        self.selector.register(self.listener, selectors.EVENT_READ)

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.5):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._requester_gone(key.fileobj)  # type: ignore[arg-type]
            self._reap()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(10)
            data, fds, _flags, _addr = socket.recv_fds(conn, _REQUEST_MAX, 2)
        except OSError as err:
            logger.warning("a request could not be read: %s", err)
            conn.close()
            return
        try:
            request = _parse(data)
        except ValueError as err:
            _close_fds(fds)
            _send(conn, f"error {err}")
            conn.close()
            return
        if request.get("ping"):
            _close_fds(fds)
            _send(conn, "pong")
            conn.close()
            return
        if len(fds) != 2:
            _close_fds(fds)
            _send(conn, "error pass stdout and stderr with the request")
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(self, conn, fds, request)
        _close_fds(fds)
        self.children[pid] = conn
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ)
        _send(conn, f"pid {pid}")
        logger.info("forked node executor %d for %s", pid, request["home"])

    def _requester_gone(self, conn: socket.socket) -> None:
        """The node service closed its connection: stop its executor."""
        try:
            if conn.recv(64):
                return  # nothing else is expected; ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        for pid, child_conn in self.children.items():
            if child_conn is conn:
                _signal(pid, signal.SIGTERM)
        self.selector.unregister(conn)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:
                conn.setblocking(True)
                _send(conn, f"exit {code}")
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        self.stopping = True

    def close(self, *, grace: float = 10.0) -> None:
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for pid in self.children:
            _signal(pid, signal.SIGKILL)
        self.listener.close()
        self.path.unlink(missing_ok=True)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the request is not one JSON object") from None
    if not isinstance(request, dict):
        raise ValueError("the request is not one JSON object")
    if request.get("ping") is True:
        return request
    unknown = sorted(set(request) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    for key in ("home", "runtime_api", "secret_file"):
        if not isinstance(request.get(key), str) or not request[key]:
            raise ValueError(f"the request's {key} must be a non-empty string")
    idle = request.get("idle_exit")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0):
        raise ValueError(f"the request's idle_exit must be a number > 0 or null; found {idle!r}")
    return request


def _child(server: _Server, conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the forked child: become the node's executor, logging to the node's own output."""
    code = 1
    try:
        server.listener.close()
        for other in server.children.values():
            other.close()
        conn.close()
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        _close_fds(fds)
        server.selector.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        logging.getLogger().handlers.clear()  # the executor logs as itself, to the node's log
        gc.unfreeze()
        from clients.hospital_node.runtime.executor import run

        code = run(
            Path(request["home"]), request["runtime_api"], Path(request["secret_file"]),
            idle_exit=request.get("idle_exit"), warm_up=False,
        )
    except SystemExit as err:
        if isinstance(err.code, int):
            code = err.code
        else:
            print(err.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _send(conn: socket.socket, line: str) -> None:
    conn.sendall(line.encode("utf-8") + b"\n")


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------- the node service's side


class ForkedExecutor:
    """A node executor forked by the fork server at `socket_path`, handled like a ``subprocess.Popen``.

    The connection stays open while the executor runs: the fork server writes its exit
    code there, and closing it (this process dying included) stops the executor.

    Raises
    ------
    OSError
        The fork server is not there or refused the request (with its reason).
    """

    def __init__(self, socket_path: Path, *, home: Path, runtime_api: str, secret_file: Path, idle_exit: float | None) -> None:
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.settimeout(30)
        self._conn.connect(str(socket_path))
        request = {"home": str(home), "runtime_api": runtime_api, "secret_file": str(secret_file), "idle_exit": idle_exit}
        socket.send_fds(self._conn, [json.dumps(request).encode("utf-8")], [sys.stdout.fileno(), sys.stderr.fileno()])
        self._buffer = b""
        answer = self._line(blocking=True)
        if answer is None or not answer.startswith("pid "):
            self._conn.close()
            raise OSError(f"the executor fork server at {socket_path} refused: {answer or 'no answer'}")
        self.pid = int(answer.split()[1])
        self.returncode: int | None = None

    def _line(self, *, blocking: bool) -> str | None:
        while b"\n" not in self._buffer:
            try:
                self._conn.setblocking(blocking)
                chunk = self._conn.recv(256)
            except (BlockingIOError, TimeoutError):
                return None
            if not chunk:
                return ""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._line(blocking=False)
            if line is not None and line.startswith("exit "):
                self.returncode = int(line.split()[1])
            elif line == "":  # the fork server is gone; so is our way to learn the code
                _signal(self.pid, signal.SIGKILL)
                self.returncode = -signal.SIGKILL
            if self.returncode is not None:
                self._conn.close()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            _signal(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked executor {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return code


def ping(socket_path: Path, *, timeout: float = 2.0) -> bool:
    """Whether a fork server answers at `socket_path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(socket_path))
            conn.sendall(b'{"ping": true}')
            return conn.recv(16).startswith(b"pong")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medfed-executor-forkserver", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on (its folder is made 0700)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s medfed-forkserver: %(message)s", stream=sys.stdout)
    started = time.monotonic()
    _warm_up()
    gc.collect()
    gc.freeze()  # the imported objects stay where they are: a collection in a child copies no page
    server = _Server(args.socket.resolve())

    def on_signal(signum: int, _frame: object) -> None:
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        server.listen()
    except OSError as err:  # a path too long for a Unix socket, a folder we may not write
        print(f"medfed-forkserver: cannot listen on {server.path}: {err}; give --socket a shorter path "
              "(at most 107 bytes) in a folder this user owns", file=sys.stderr)
        return 2
    logger.info("ready on %s after %.1f s of imports", server.path, time.monotonic() - started)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    sys.exit(main())
