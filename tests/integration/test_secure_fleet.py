"""Each refusal of the secure Fleet API, on real processes: one SuperLink, nodes that must not get in.

Every refusal is asserted on the refusing side's log: the SuperLink's for keys, the
SuperNode's for certificates.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from medfed.cluster import LocalCluster, flower_env, free_port
from medfed.errors import ClusterError
from privacy.pki import create_ca, generate_node_auth_key, issue_server_certificate

from .conftest import alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("secure")
    local = LocalCluster(workdir / "cluster")
    try:
        local.start_superlink()
        local.start_supernode("enrolled", workdir)
        local.wait_for_nodes(1)
        yield local, workdir
    finally:
        pids = local.pids
        local.stop()
        assert not [p for p in pids if alive(p)], "a Flower process outlived the cluster"


def _log(cluster: LocalCluster, name: str) -> str:
    return cluster.log_path(name).read_text(errors="replace")


def test_an_unenrolled_node_is_refused(cluster) -> None:
    local, workdir = cluster
    key = generate_node_auth_key(workdir / "unenrolled", "fleet_auth")
    local.start_supernode("unenrolled", workdir, auth_key=key.private_key_path, register=False)
    assert local.wait_for_exit("supernode-unenrolled") != 0
    assert "[code: 2004] Failed to activate SuperNode" in _log(local, "supernode-unenrolled")
    assert "No SuperNode found with the given public key" in _log(local, "superlink")
    assert local.online_nodes() == 1


def test_a_node_with_the_wrong_key_is_refused(cluster) -> None:
    local, workdir = cluster
    registered = generate_node_auth_key(workdir / "wrongkey", "registered")
    local.register_node(registered.public_key_path, "wrongkey")
    other = generate_node_auth_key(workdir / "wrongkey", "other")
    before = _log(local, "superlink").count("No SuperNode found with the given public key")
    local.start_supernode("wrongkey", workdir, auth_key=other.private_key_path, register=False)
    assert local.wait_for_exit("supernode-wrongkey") != 0
    assert "Failed to activate SuperNode" in _log(local, "supernode-wrongkey")
    assert _log(local, "superlink").count("No SuperNode found with the given public key") == before + 1


def test_a_node_without_a_key_is_refused(cluster) -> None:
    local, workdir = cluster
    node_home = local.workdir / "nodes" / "keyless"
    node_home.mkdir(parents=True)
    log_path = node_home / "supernode.log"
    # Output to a file: the orphaned SuperExec of a refused SuperNode keeps any pipe open.
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            ["flower-supernode", "--superlink", local.fleet_address, "--root-certificates", str(local.ca_path),
             "--port", str(free_port()), "--node-config", f'home="{workdir}"'],
            stdout=log, stderr=subprocess.STDOUT, env=flower_env(node_home), start_new_session=True,
        )
    try:
        assert popen.wait(timeout=60) != 0
    finally:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(timeout=5)
    assert "[code: 2001] SuperNode authentication is enabled" in log_path.read_text(errors="replace")


def test_a_node_given_another_ca_refuses_the_superlink(cluster) -> None:
    local, workdir = cluster
    other = create_ca(workdir / "other-ca")
    local.start_supernode("otherca", workdir, root_certificates=other.cert_path)
    assert local.wait_for_exit("supernode-otherca") != 0
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in _log(local, "supernode-otherca")


def test_control_requests_fail_on_the_fleet_port_while_the_fleet_port_works(cluster) -> None:
    local, _ = cluster
    config = local.flwr_home / "config.toml"
    config.write_text(config.read_text() + (
        f'\n[superlink.fleet-port]\naddress = "{local.fleet_address}"\n'
        f"root-certificates = {json.dumps(str(local.ca_path))}\n"
    ))
    out = local.flwr("supernode", "ls", "fleet-port", "--format", "json", timeout=60)
    answer = json.loads(out.stdout)
    assert answer["success"] is False
    assert "Connection to the SuperLink is unavailable" in answer["error-message"]
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{local.fleet_address}/health", timeout=5)
    assert local.online_nodes() == 1  # the enrolled node is still connected through the fleet port


def test_an_expired_server_certificate_is_refused(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_ca(pki)
    issue_server_certificate(pki, ca_dir=pki, valid_from=datetime.now(UTC) - timedelta(days=10), days=2)
    local = LocalCluster(tmp_path / "cluster", pki_dir=pki)
    try:
        with pytest.raises(ClusterError, match="does not verify: certificate has expired"):
            local.start_superlink()
        key = generate_node_auth_key(tmp_path / "late", "fleet_auth")
        # Registration itself needs TLS to the control API, which fails the same way.
        local.start_supernode("late", tmp_path, auth_key=key.private_key_path, register=False)
        assert local.wait_for_exit("supernode-late") != 0
        assert "CERTIFICATE_VERIFY_FAILED: certificate has expired" in _log(local, "supernode-late")
    finally:
        pids = local.pids
        local.stop()
        assert not [p for p in pids if alive(p)]


def test_coordinator_and_node_commands_enrol_start_and_stop(tmp_path: Path) -> None:
    medfed = str(Path(sys.executable).parent / "medfed")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([medfed, *args], capture_output=True, text=True, timeout=120, check=False)

    coord, node = tmp_path / "coord", tmp_path / "node"
    fleet_port, control = free_port(), f"127.0.0.1:{free_port()}"
    assert run("coordinator", "init", "--home", str(coord), "--host", "localhost",
               "--fleet-port", str(fleet_port), "--control-address", control).returncode == 0
    try:
        started = run("coordinator", "start", "--home", str(coord))
        assert started.returncode == 0, started.stderr
        assert run("node", "init", "--home", str(node), "--name", "hospital_1").returncode == 0
        enrolled = run("coordinator", "enrol", str(node / "enrolment-request.toml"), "--home", str(coord),
                       "--out", str(tmp_path / "bundle.toml"))
        assert enrolled.returncode == 0, enrolled.stderr
        assert run("node", "enrol", str(tmp_path / "bundle.toml"), "--home", str(node)).returncode == 0
        node_started = run("node", "start", "--home", str(node), "--port", str(free_port()))
        assert node_started.returncode == 0, node_started.stderr
        doctor = run("node", "doctor", "--home", str(node))
        assert "ok    coordinator: TLS to localhost:" in doctor.stdout
        assert "ok    registration: SuperNode" in doctor.stdout
        status = run("coordinator", "status", "--home", str(coord))
        assert "1 SuperNodes registered, 1 online" in status.stdout, status.stdout
        # The SuperLink's state (and its WAL) and everything Flower wrote are the operator's alone.
        assert f"ok    file modes: {coord} and everything in it are the operator's alone" in status.stdout, status.stdout
        assert status.returncode == 0, status.stdout
        assert stat.S_IMODE((coord / "state.db").stat().st_mode) == 0o600
        # From the "site" side (another loopback address) the Fleet port answers, the control port does not.
        site_side = "127.0.0.2"
        with socket.create_connection((site_side, fleet_port), timeout=5):
            pass
        with pytest.raises(OSError):
            socket.create_connection((site_side, int(control.rsplit(":", 1)[1])), timeout=5).close()
    finally:
        run("node", "stop", "--home", str(node))
        stopped = run("coordinator", "stop", "--home", str(coord))
    assert "stopped the SuperLink" in stopped.stdout
    assert not (coord / "superlink.pid").exists()
