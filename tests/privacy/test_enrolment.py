"""Enrolment request and bundle files: round trips and every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from privacy.enrolment import EnrolmentBundle, EnrolmentRequest
from privacy.errors import EnrolmentError
from privacy.keys import generate_keypair
from privacy.pki import create_ca, generate_node_auth_key


@pytest.fixture
def request_file(tmp_path: Path) -> Path:
    auth = generate_node_auth_key(tmp_path / "keys", "fleet_auth")
    audit = generate_keypair(tmp_path / "keys", "node_audit")
    path = tmp_path / "request.toml"
    EnrolmentRequest(node="hospital_1", auth_public_key=auth.public_key, audit_public_key=audit.public_key).write(path)
    return path


def test_request_round_trips(request_file: Path) -> None:
    request = EnrolmentRequest.read(request_file)
    assert request.node == "hospital_1"
    assert request.auth_openssh.startswith("ecdsa-sha2-nistp384 ")
    assert request.audit_fingerprint.startswith("SHA256:")


def test_request_is_never_overwritten(request_file: Path) -> None:
    request = EnrolmentRequest.read(request_file)
    with pytest.raises(EnrolmentError, match="already exists"):
        request.write(request_file)


def test_bad_request_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[enrolment_request]\nnode = "bad name"\nauth_public_key = "ssh-ed25519 AAAA"\nextra = 1\n')
    with pytest.raises(EnrolmentError) as caught:
        EnrolmentRequest.read(path)
    text = str(caught.value)
    assert "enrolment_request.node must be" in text
    assert "enrolment_request.auth_public_key" in text
    assert "enrolment_request.extra is not a known field" in text
    assert "enrolment_request.audit_public_key is missing" in text


def test_a_certificate_given_as_request_is_named(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "pki")
    with pytest.raises(EnrolmentError, match="is not a TOML file"):
        EnrolmentRequest.read(ca.cert_path)


def test_a_bundle_given_as_request_says_it_is_the_wrong_file(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "pki")
    bundle = EnrolmentBundle(node="h1", node_id=5, fleet_address="coord:9092", auth_key_fingerprint="SHA256:x",
                             ca_certificate=ca.cert_path.read_text())
    bundle.write(tmp_path / "bundle.toml")
    with pytest.raises(EnrolmentError, match=r"has no \[enrolment_request\] table; is it the right file\?"):
        EnrolmentRequest.read(tmp_path / "bundle.toml")
    again = EnrolmentBundle.read(tmp_path / "bundle.toml")
    assert again.node_id == 5 and again.ca_fingerprint == bundle.ca_fingerprint


def test_missing_bundle_is_named(tmp_path: Path) -> None:
    with pytest.raises(EnrolmentError, match=r"enrolment bundle .*nope.toml does not exist"):
        EnrolmentBundle.read(tmp_path / "nope.toml")
