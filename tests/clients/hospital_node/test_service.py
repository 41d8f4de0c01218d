"""The node service without Flower: keys at init, enrolment, the TLS preflight and doctor checks."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clients.hospital_node.errors import NodeServiceError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.service import Check, NodeService, tls_handshake
from privacy.enrolment import EnrolmentBundle, EnrolmentRequest
from privacy.pki import create_ca, issue_server_certificate

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def service(tmp_path: Path) -> NodeService:
    node = NodeService(NodeHome.create(tmp_path / "node", name="hospital_1"))
    node.prepare_enrolment()
    return node


def _bundle(service: NodeService, tmp_path: Path, *, node: str = "hospital_1", fingerprint: str | None = None,
            address: str = "127.0.0.1:9092") -> Path:
    pki = tmp_path / "pki"
    if not (pki / "ca.crt").exists():
        create_ca(pki)
    path = tmp_path / f"bundle-{node}-{fingerprint is None}.toml"
    EnrolmentBundle(
        node=node, node_id=42, fleet_address=address,
        auth_key_fingerprint=fingerprint or service.auth_key().fingerprint,
        ca_certificate=(pki / "ca.crt").read_text(),
    ).write(path)
    return path


def test_init_creates_an_owner_only_auth_key_and_a_request(service: NodeService) -> None:
    assert stat.S_IMODE(service.auth_key_path.stat().st_mode) == 0o600
    request = EnrolmentRequest.read(service.request_path)
    assert request.node == "hospital_1"
    assert request.auth_fingerprint == service.auth_key().fingerprint
    assert service.node.audit_public_key_path.exists()


def test_enrol_installs_the_ca_and_the_fleet_address(service: NodeService, tmp_path: Path) -> None:
    bundle = service.enrol(_bundle(service, tmp_path))
    assert service.ca_path.read_text() == (tmp_path / "pki" / "ca.crt").read_text()
    assert service.enrolment().fleet_address == "127.0.0.1:9092" == bundle.fleet_address


def test_enrol_refuses_a_bundle_for_another_node(service: NodeService, tmp_path: Path) -> None:
    with pytest.raises(NodeServiceError, match="is for node 'hospital_2', not 'hospital_1'"):
        service.enrol(_bundle(service, tmp_path, node="hospital_2"))
    assert not service.ca_path.exists()


def test_enrol_refuses_a_bundle_for_another_key(service: NodeService, tmp_path: Path) -> None:
    with pytest.raises(NodeServiceError, match="registers auth key SHA256:other, but this node's key is"):
        service.enrol(_bundle(service, tmp_path, fingerprint="SHA256:other"))


def test_enrol_twice_needs_replace(service: NodeService, tmp_path: Path) -> None:
    path = _bundle(service, tmp_path)
    service.enrol(path)
    with pytest.raises(NodeServiceError, match="enrolled already .* --replace"):
        service.enrol(path)
    service.enrol(path, replace=True)


def test_start_before_enrolment_says_how_to_enrol(service: NodeService) -> None:
    with pytest.raises(NodeServiceError, match="is not enrolled: send .*enrolment-request.toml"):
        service.start()


def _tls_server(folder: Path) -> tuple[str, threading.Event, socket.socket]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    context.set_alpn_protocols(["h2"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{sock.getsockname()[1]}", done, sock


@pytest.fixture
def server_pki(tmp_path: Path) -> Path:
    folder = tmp_path / "server"
    create_ca(folder)
    return folder


def _handshake(folder: Path, ca: Path, **issue: object) -> object:
    issue_server_certificate(folder, ca_dir=folder, replace=True, **issue)  # type: ignore[arg-type]
    address, done, sock = _tls_server(folder)
    try:
        return tls_handshake(address, ca_path=ca)
    finally:
        done.set()
        sock.close()


def test_handshake_verifies_against_the_alliance_ca(server_pki: Path) -> None:
    peer = _handshake(server_pki, server_pki / "ca.crt")
    assert 390 <= peer.days_left <= 397  # type: ignore[attr-defined]


def test_handshake_refuses_a_server_signed_by_another_ca(server_pki: Path, tmp_path: Path) -> None:
    other = create_ca(tmp_path / "other")
    with pytest.raises(NodeServiceError, match=r"refusing the coordinator .* \(unable to get local issuer certificate\)"):
        _handshake(server_pki, other.cert_path)


def test_handshake_refuses_an_expired_server_certificate(server_pki: Path) -> None:
    with pytest.raises(NodeServiceError, match=r"\(certificate has expired\); the operator must run `medfed coordinator renew`"):
        _handshake(server_pki, server_pki / "ca.crt", valid_from=datetime.now(UTC) - timedelta(days=9), days=2)


def test_handshake_to_a_closed_port_says_it_cannot_reach(tmp_path: Path, server_pki: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(NodeServiceError, match=f"cannot reach the coordinator at 127.0.0.1:{port}"):
        tls_handshake(f"127.0.0.1:{port}", ca_path=server_pki / "ca.crt")


def test_doctor_lists_each_check_and_fails_when_not_enrolled(service: NodeService) -> None:
    checks = {c.what: c for c in service.checks(connect=False)}
    assert checks["enrolment"].level == "fail"
    assert checks["auth key"].level == "ok"
    assert checks["privacy ledger"].level == "ok"
    assert checks["audit log"].level == "ok"
    assert checks["disk"].level in ("ok", "warn")


def test_doctor_reports_a_world_readable_auth_key(service: NodeService) -> None:
    service.auth_key_path.chmod(0o644)
    [check] = [c for c in service.checks(connect=False) if c.what == "auth key"]
    assert check.level == "fail" and "chmod 600" in check.detail


def test_doctor_reads_each_dataset(service: NodeService, cohort, make_entry) -> None:  # type: ignore[no-untyped-def]
    path = service.node.path / "cohort.csv"
    cohort.to_csv(path, index=False)
    service.node.register_dataset(make_entry(path=path))
    path.unlink()
    cohort.to_csv(path, index=False)
    [check] = [c for c in service.checks(connect=False) if c.what.startswith("dataset")]
    assert check.level == "ok" and "rows readable" in check.detail


def test_cli_doctor_exits_1_with_one_line_per_check(service: NodeService) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), "node", "doctor", "--home", str(service.node.path)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("fail  enrolment:") for line in lines)
    assert any(line.startswith("ok    privacy ledger:") for line in lines)


def test_cli_enrol_of_a_missing_bundle_is_one_line_exit_2(service: NodeService, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medfed"), "node", "enrol", str(tmp_path / "nope.toml"),
         "--home", str(service.node.path)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "does not exist" in done.stderr


def test_doctor_fails_a_dataset_whose_file_is_gone(service: NodeService, cohort, make_entry) -> None:  # type: ignore[no-untyped-def]
    path = service.node.path / "cohort.csv"
    cohort.to_csv(path, index=False)
    service.node.register_dataset(make_entry(path=path))
    path.unlink()
    [check] = [c for c in service.checks(connect=False) if c.what.startswith("dataset")]
    assert check.level == "fail" and "cohort.csv" in check.detail


def test_doctor_reports_policy_partners_budgets_and_a_ledger_missing_charges(service: NodeService, cohort, make_entry) -> None:  # type: ignore[no-untyped-def]
    from .conftest import govern

    entry = make_entry()
    cohort.to_csv(entry.path, index=False)
    service.node.register_dataset(entry)
    checks = {c.what: c for c in service.checks(connect=False)}
    assert checks["trusted partners"].level == "warn"
    assert checks["budget 'htn_cohort'"].level == "warn" and "not set" in checks["budget 'htn_cohort'"].detail
    govern(service.node, "htn_cohort")
    checks = {c.what: c for c in service.checks(connect=False)}
    assert (checks["trusted partners"].level, checks["trusted partners"].detail) == ("ok", "1 trusted")
    assert checks["budget 'htn_cohort'"].detail == "ε 50.000 of 50 left at δ 1e-05"
    assert checks["policy"].level == "ok"
    service.node.policy_path.write_text("[policy]\nmin_cohort_size = -1\n")
    assert {c.what: c for c in service.checks(connect=False)}["policy"].level == "fail"


# ---------------------------------------------------------------- file modes


def test_a_fresh_node_home_is_owner_only_whatever_the_umask(tmp_path: Path, cohort, make_entry) -> None:  # type: ignore[no-untyped-def]
    from privacy.ledger import PrivacyLedger

    from .conftest import govern

    previous = os.umask(0)
    try:
        node = NodeService(NodeHome.create(tmp_path / "node", name="hospital_1"))
        node.prepare_enrolment()
        node.enrol(_bundle(node, tmp_path))
        entry = make_entry()
        cohort.to_csv(entry.path, index=False)
        node.node.register_dataset(entry)
        govern(node.node, "htn_cohort")  # trusted partners, audit log, budget
        ledger = PrivacyLedger.open(node.node.ledger_path)  # open: its -wal and -shm files exist
    finally:
        os.umask(previous)
    home = node.node.path
    state = [home, *home.rglob("*")]
    ledger.close()
    assert {p.name for p in state} >= {
        "node.toml", "policy.toml", "trusted_partners.toml", "ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm",
        "audit.jsonl", "audit.jsonl.head", "keys", "fleet_auth.key", "node_audit.key", "tls", "ca.crt",
        "enrolment.toml", "enrolment-request.toml",
    }
    public = {p for p in state if p.suffix == ".pub"}
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in state if p.is_dir()} == {p: 0o700 for p in state if p.is_dir()}
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in state if p.is_file() and p not in public} == {
        p: 0o600 for p in state if p.is_file() and p not in public
    }
    assert {stat.S_IMODE(p.stat().st_mode) for p in public} == {0o644}
    assert [c for c in node.checks(connect=False) if c.what == "file modes"] == [
        Check("ok", "file modes", f"{home} and everything in it are owner only")
    ]


def test_doctor_flags_each_looser_mode_with_the_chmod_to_run(service: NodeService) -> None:
    home = service.node.path
    ledger = service.node.ledger_path
    home.chmod(0o755)
    ledger.chmod(0o644)
    (home / "logs").mkdir(mode=0o700)
    log = home / "logs" / "supernode.log"
    log.write_text("started\n")
    log.chmod(0o644)
    flagged = [(c.level, c.detail) for c in service.checks(connect=False) if c.what == "file modes"]
    assert flagged == [
        ("fail", f"folder {home} is mode 0755, open to other users; run `chmod 700 {home}`"),
        ("fail", f"file {ledger} is mode 0644, open to other users; run `chmod 600 {ledger}`"),
        ("warn", f"file {log} is mode 0644, open to other users; run `chmod 600 {log}`"),
    ]
    # Reported, never changed behind the owner's back.
    assert stat.S_IMODE(home.stat().st_mode) == 0o755 and stat.S_IMODE(ledger.stat().st_mode) == 0o644


def test_doctor_sums_up_beyond_ten_loose_paths(service: NodeService) -> None:
    cache = service.node.path / "imaging-cache"
    cache.mkdir(mode=0o700)
    for index in range(12):
        (cache / f"{index}.npy").write_bytes(b"x")
        (cache / f"{index}.npy").chmod(0o644)
    flagged = [c for c in service.checks(connect=False) if c.what == "file modes"]
    assert len(flagged) == 11 and {c.level for c in flagged} == {"fail"}
    assert flagged[-1].detail == (
        f"2 more paths in {service.node.path} are open to other users; run `chmod -R go-rwx {service.node.path}`"
    )


def test_init_makes_an_existing_folder_the_owners_alone(tmp_path: Path) -> None:
    folder = tmp_path / "chosen"
    folder.mkdir()
    folder.chmod(0o755)
    NodeHome.create(folder, name="hospital_2")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_doctor_warns_that_an_older_policys_accountant_is_ignored(service: NodeService) -> None:
    service.node.policy_path.write_text('[policy]\naccountant = "prv"\n')
    checks = {c.what: c for c in service.checks(connect=False)}
    assert checks["policy"].level == "ok"
    assert checks["policy accountant"].level == "warn"
    assert checks["policy accountant"].detail == (
        "policy.accountant = 'prv' is ignored: the ledger composes with PLD only; remove the line from policy.toml"
    )


def test_start_with_an_unknown_executor_mode_names_it_before_anything_starts(service: NodeService, tmp_path: Path) -> None:
    service.enrol(_bundle(service, tmp_path))
    with pytest.raises(NodeServiceError, match="executor must be one of warm, on-demand; found 'lazy'"):
        service.start(executor="lazy")
    assert service.pid() is None


def test_the_on_demand_executor_is_part_of_the_service_command(service: NodeService, tmp_path: Path) -> None:
    bundle = service.enrol(_bundle(service, tmp_path))
    argv = service.service_argv(bundle, executor="on-demand", executor_idle_seconds=120)
    assert argv[argv.index("--executor"):][:4] == ["--executor", "on-demand", "--executor-idle", "120"]
