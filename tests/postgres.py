"""A real PostgreSQL server for tests, started from Debian's binaries in a temp folder (pytest fixtures).

The server runs as the ``postgres`` system user when the tests run as root (PostgreSQL
refuses root), listens on a unix socket in its own temporary folder and on a free loopback
port, and is stopped in ``finally``. Without the binaries the tests that need it are skipped
with how to install them (CI installs them: see ``.ci/run``). ``tests/clients/hospital_node/conftest.py``
imports the fixtures, so one server serves the whole session.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_READY_DEADLINE_S = 30.0


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its port, a role with a password and a database that role owns."""

    host: str
    port: int
    user: str
    password: str
    database: str
    admin_url: str  # superuser over the unix socket (trust): for the fixtures' own setup

    def url(self, database: str | None = None) -> str:
        """A URL without password, as a node registers it."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database or self.database}"

    def connect(self, database: str | None = None):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.url(database), password=self.password)


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin; "
                    "install them with `apt-get install postgresql` (CI does: .ci/run)")
    root = Path(tempfile.mkdtemp(prefix="medfed-pg-"))
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root but there is no `postgres` system user to run the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, socket_dir = root / "data", root
    port = _free_port()
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync", "-E", "UTF8",
                        # trust only over the socket in our private folder; passwords over TCP
                        "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True)
        server = subprocess.Popen(
            [*prefix, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
             "-k", str(socket_dir), "-c", "fsync=off", "-c", "password_encryption=scram-sha-256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + _READY_DEADLINE_S
        while True:
            probe = subprocess.run([str(bin_dir / "pg_isready"), "-h", str(socket_dir), "-p", str(port), "-q"])
            if probe.returncode == 0:
                break
            if server.poll() is not None:
                raise RuntimeError(f"postgres exited: {server.stderr.read().decode(errors='replace') if server.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready within {_READY_DEADLINE_S} s")
            time.sleep(0.1)  # a poll interval under a deadline, not a synchronising sleep
        import psycopg

        admin_url = f"host={socket_dir} port={port} user=postgres dbname=postgres"
        password = "pw-" + secrets.token_hex(8)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE medfed_reader LOGIN PASSWORD '{password}'")
            admin.execute("CREATE DATABASE omop OWNER medfed_reader")
        yield PostgresServer("127.0.0.1", port, "medfed_reader", password, "omop", admin_url)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            if server.stderr is not None:
                server.stderr.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database owned by the test role, dropped afterwards."""
    import psycopg

    name = "omop_" + secrets.token_hex(4)
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} OWNER {postgres_server.user}")
    try:
        yield name
    finally:
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_password_file(path: Path, password: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    os.chmod(path, mode)
    return path
