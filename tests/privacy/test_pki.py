"""The alliance PKI with real certificates: names, chains, expiry, key files and refusals."""

from __future__ import annotations

import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.errors import CertificateError, KeyFileError
from privacy.keys import generate_keypair
from privacy.pki import (
    check_certificate,
    create_ca,
    generate_node_auth_key,
    issue_server_certificate,
    load_certificate,
    load_node_auth_private_key,
    load_node_auth_public_key,
)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    create_ca(folder)
    issue_server_certificate(folder, ca_dir=folder, hosts=["coordinator.alliance.example"], addresses=["10.0.0.5"])
    return folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_names_every_host_and_address_plus_loopback(pki: Path) -> None:
    info = check_certificate(pki / "server.pem", ca_path=pki / "ca.crt")
    assert set(info.dns_names) == {"localhost", "coordinator.alliance.example"}
    assert set(info.ip_addresses) == {"127.0.0.1", "10.0.0.5"}
    assert info.issuer == "CN=medfed alliance CA"
    assert not info.is_ca and not info.expires_soon


def test_ca_is_an_ec_ca_certificate(pki: Path) -> None:
    ca = load_certificate(pki / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_chain_verifies_against_its_own_ca_only(pki: Path, tmp_path: Path) -> None:
    create_ca(tmp_path / "other")
    with pytest.raises(CertificateError, match="was not signed by the CA in .*other/ca.crt"):
        check_certificate(pki / "server.pem", ca_path=tmp_path / "other" / "ca.crt")


def test_expired_certificate_is_refused_with_its_date(pki: Path, tmp_path: Path) -> None:
    issue_server_certificate(tmp_path / "old", ca_dir=pki, valid_from=datetime.now(UTC) - timedelta(days=10), days=2)
    with pytest.raises(CertificateError, match="expired on .* renew it with `medfed coordinator renew`"):
        check_certificate(tmp_path / "old" / "server.pem", ca_path=pki / "ca.crt")


def test_certificate_expiring_within_30_days_passes_with_a_warning(pki: Path, tmp_path: Path, caplog) -> None:
    issue_server_certificate(tmp_path / "soon", ca_dir=pki, days=10)
    with caplog.at_level(logging.WARNING, logger="privacy.pki"):
        info = check_certificate(tmp_path / "soon" / "server.pem", ca_path=pki / "ca.crt")
    assert info.expires_soon and 8 <= info.days_left <= 10
    assert "expires in" in caplog.text and "medfed coordinator renew" in caplog.text


def test_private_keys_are_owner_only(pki: Path, tmp_path: Path) -> None:
    assert _mode(pki / "ca.key") == 0o600 and _mode(pki / "server.key") == 0o600
    assert _mode(pki / "ca.crt") == 0o644
    key = generate_node_auth_key(tmp_path / "keys", "fleet_auth")
    assert _mode(key.private_key_path) == 0o600


def test_nothing_is_overwritten_without_renewal(pki: Path) -> None:
    before = (pki / "server.pem").read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        create_ca(pki)
    with pytest.raises(CertificateError, match="already exists"):
        issue_server_certificate(pki, ca_dir=pki)
    assert (pki / "server.pem").read_bytes() == before


def test_renewal_replaces_the_pair_with_a_fresh_key(pki: Path) -> None:
    old_key = (pki / "server.key").read_bytes()
    renewed = issue_server_certificate(pki, ca_dir=pki, hosts=["coordinator.alliance.example"], replace=True)
    assert (pki / "server.key").read_bytes() != old_key
    assert _mode(pki / "server.key") == 0o600
    check_certificate(renewed.cert_path, ca_path=pki / "ca.crt")


def test_bad_names_are_all_reported_before_anything_is_written(tmp_path: Path) -> None:
    create_ca(tmp_path)
    with pytest.raises(CertificateError) as caught:
        issue_server_certificate(tmp_path, ca_dir=tmp_path, hosts=["bad host", "10.0.0.1"], addresses=["nope"])
    text = str(caught.value)
    assert "'bad host' is not a valid DNS name" in text
    assert "'10.0.0.1' is an IP address; pass it with --address" in text
    assert "'nope' is not an IP address" in text
    assert not (tmp_path / "server.pem").exists()


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match=r"certificate .*missing.crt does not exist"):
        load_certificate(tmp_path / "missing.crt")


def test_a_key_given_as_certificate_is_called_what_it_is(pki: Path) -> None:
    with pytest.raises(CertificateError, match="is a private key, not a PEM certificate"):
        load_certificate(pki / "server.key")


def test_node_auth_key_is_openssh_ec_on_a_nist_curve(tmp_path: Path) -> None:
    key = generate_node_auth_key(tmp_path, "fleet_auth")
    assert key.private_key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = key.public_key_path.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" fleet_auth")
    private = load_node_auth_private_key(key.private_key_path)
    assert private.public_key() == load_node_auth_public_key(key.public_key_path)
    # What flower-supernode does with it:
    loaded = serialization.load_ssh_private_key(key.private_key_path.read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)


def test_node_auth_key_is_never_overwritten(tmp_path: Path) -> None:
    generate_node_auth_key(tmp_path, "fleet_auth")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_node_auth_key(tmp_path, "fleet_auth")


def test_an_ed25519_key_is_refused_for_node_auth(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "audit")
    with pytest.raises(KeyFileError, match="not an EC key"):
        load_node_auth_public_key(pair.public_key_path)


def test_a_world_readable_node_auth_key_is_refused(tmp_path: Path) -> None:
    key = generate_node_auth_key(tmp_path, "fleet_auth")
    key.private_key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"readable by other users \(mode 0644\); run `chmod 600"):
        load_node_auth_private_key(key.private_key_path)
