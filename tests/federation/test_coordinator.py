"""The coordinator home without processes: init, its files, refusals and renewal."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from federation.coordinator import Coordinator, CoordinatorConfig
from federation.errors import CoordinatorError
from privacy.errors import CertificateError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    return Coordinator.init(tmp_path / "coord", hosts=["coordinator.alliance.example"], addresses=["10.0.0.5"])


def test_init_writes_ca_certificate_and_config(coordinator: Coordinator) -> None:
    info = coordinator.check_certificate()
    assert {"coordinator.alliance.example", "localhost"} <= set(info.dns_names)
    assert {"10.0.0.5", "127.0.0.1"} <= set(info.ip_addresses)
    config = tomllib.loads((coordinator.home / "coordinator.toml").read_text())["coordinator"]
    assert config["fleet_address"] == "coordinator.alliance.example:9092"
    assert config["control_address"] == "127.0.0.1:9093"
    assert stat.S_IMODE((coordinator.pki_dir / "ca.key").stat().st_mode) == 0o600


def test_flwr_config_uses_an_absolute_root_certificate_path(coordinator: Coordinator) -> None:
    text = (coordinator.flwr_home / "config.toml").read_text()
    connection = tomllib.loads(text)["superlink"]["medfed-coordinator"]
    assert Path(connection["root-certificates"]).is_absolute()
    assert connection["address"] == "127.0.0.1:9093"
    assert "insecure" not in connection


def test_init_twice_is_refused(coordinator: Coordinator) -> None:
    with pytest.raises(CoordinatorError, match="is a coordinator home already"):
        Coordinator.init(coordinator.home)


def test_init_refuses_a_control_address_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError, match="must be on loopback .* --expose-control-on"):
        Coordinator.init(tmp_path / "c", control_address="10.0.0.5:9093")
    assert not (tmp_path / "c" / "pki").exists()


def test_start_refuses_to_expose_control_without_the_acknowledgement(coordinator: Coordinator) -> None:
    with pytest.raises(CoordinatorError, match="refusing to expose the unauthenticated control API on 10.0.0.5:9093"):
        coordinator.start(expose_control_on="10.0.0.5:9093")
    assert coordinator.pid() is None


def test_superlink_command_is_tls_with_node_auth_and_no_insecure(coordinator: Coordinator) -> None:
    argv = coordinator.superlink_argv("127.0.0.1:9093")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--database"):
        assert flag in argv
    assert "--insecure" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--database") + 1] == str(coordinator.home / "state.db")


def test_start_refuses_an_expired_certificate(coordinator: Coordinator) -> None:
    from datetime import UTC, datetime, timedelta

    from privacy.pki import issue_server_certificate

    issue_server_certificate(coordinator.pki_dir, ca_dir=coordinator.pki_dir, replace=True,
                             valid_from=datetime.now(UTC) - timedelta(days=5), days=1)
    with pytest.raises(CertificateError, match="expired on"):
        coordinator.start()
    assert coordinator.pid() is None


def test_renew_issues_a_new_certificate_with_the_same_names(coordinator: Coordinator) -> None:
    before = coordinator.check_certificate()
    after = coordinator.renew(days=30)
    assert after.fingerprint != before.fingerprint
    assert set(after.dns_names) == set(before.dns_names)
    assert coordinator.check_certificate().expires_soon is False or after.days_left < 30


def test_open_of_a_folder_without_config_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError, match="is not a coordinator home .* `medfed coordinator init`"):
        Coordinator.open(tmp_path)


def test_invalid_config_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError) as caught:
        CoordinatorConfig.from_mapping({"coordinator": {"hosts": "x", "fleet_bnd": "1"}}, source="c.toml")
    text = str(caught.value)
    assert "coordinator.fleet_bnd is not a known field" in text
    assert "coordinator.fleet_address is missing" in text
    assert "coordinator.hosts must be a list of strings" in text


def test_enrol_needs_a_running_superlink(coordinator: Coordinator, tmp_path: Path) -> None:
    from clients.hospital_node.home import NodeHome
    from clients.hospital_node.service import NodeService

    service = NodeService(NodeHome.create(tmp_path / "node", name="hospital_1"))
    service.prepare_enrolment()
    with pytest.raises(CoordinatorError, match="the SuperLink is not running; start it with `medfed coordinator start`"):
        coordinator.enrol(service.request_path, out=tmp_path / "bundle.toml")


def test_cli_refusal_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    medfed = Path(sys.executable).parent / "medfed"
    done = subprocess.run(
        [str(medfed), "coordinator", "init", "--home", str(tmp_path / "c"), "--address", "not-an-ip"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "'not-an-ip' is not an IP address" in done.stderr


# ---------------------------------------------------------------- file modes and the partners' connection


def test_a_fresh_coordinator_home_is_the_operators_alone_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        coordinator = Coordinator.init(tmp_path / "coord", addresses=["10.0.0.5"])
    finally:
        os.umask(previous)
    paths = [coordinator.home, *coordinator.home.rglob("*")]
    certificates = {coordinator.ca_path, coordinator.server_cert_path}
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {p: 0o700 for p in paths if p.is_dir()}
    files = {p: stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()}
    assert {p: m for p, m in files.items() if p not in certificates} == {p: 0o600 for p in files if p not in certificates}
    assert {files[p] for p in certificates} == {0o644}
    assert coordinator.status().loose_modes == ()


def test_status_flags_each_looser_mode_with_the_chmod_to_run(coordinator: Coordinator) -> None:
    state = coordinator.home / "state.db"
    state.write_bytes(b"")
    state.chmod(0o644)
    coordinator.home.chmod(0o755)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), "coordinator", "status", "--home", str(coordinator.home)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    home = coordinator.home
    assert f"fail  file modes: folder {home} is mode 0755, open to other users; run `chmod 700 {home}`" in lines
    assert f"fail  file modes: file {state} is mode 0644, open to other users; run `chmod 600 {state}`" in lines


def test_init_takes_the_fleet_bind_address_and_writes_the_partners_connection(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), "coordinator", "init", "--home", str(tmp_path / "c"),
         "--address", "10.0.0.5", "--fleet-bind", "10.0.0.5:9443"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    coordinator = Coordinator.open(tmp_path / "c")
    assert coordinator.config.fleet_bind == "10.0.0.5:9443"
    assert "--fleet-api-address" in (argv := coordinator.superlink_argv("127.0.0.1:9093"))
    assert argv[argv.index("--fleet-api-address") + 1] == "10.0.0.5:9443"
    partner = coordinator.partner_home
    connection = tomllib.loads((partner / "config.toml").read_text())["superlink"]
    assert connection["default"] == "medfed-coordinator"
    assert connection["medfed-coordinator"] == {
        "address": "127.0.0.1:9093", "root-certificates": str(partner / "ca.crt"),
    }
    assert (partner / "ca.crt").read_text() == coordinator.ca_path.read_text()
    assert f"FLWR_HOME={partner} medfed experiment submit SPEC --superlink medfed-coordinator" in done.stdout
