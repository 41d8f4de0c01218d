"""Ed25519 keys on disk, signatures, fingerprints and the trusted-partner registry."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.errors import KeyFileError, PrivacyError, SignatureError, TrustedKeysError
from privacy.keys import (
    TRUSTED_KEYS_FILE,
    KeyPair,
    TrustedKeys,
    fingerprint,
    format_public_key,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@pytest.fixture
def pair(tmp_path: Path) -> KeyPair:
    return generate_keypair(tmp_path / "keys", "acme_research")


# ---------------------------------------------------------------- key pairs


def test_generate_writes_a_private_pem_and_an_openssh_public_line(pair: KeyPair, tmp_path: Path) -> None:
    assert pair.private_key_path == tmp_path / "keys" / "acme_research.key"
    assert pair.public_key_path == tmp_path / "keys" / "acme_research.pub"
    pem = pair.private_key_path.read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    line = pair.public_key_path.read_text()
    assert re.fullmatch(r"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5[A-Za-z0-9+/=]+ acme_research\n", line)
    assert load_public_key(pair.public_key_path) == pair.public_key


def test_private_key_file_is_owner_only_whatever_the_umask(pair: KeyPair) -> None:
    assert stat.S_IMODE(pair.private_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public_key_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(pair.private_key_path.parent.stat().st_mode) == 0o700


def test_generate_leaves_no_temporary_files(pair: KeyPair) -> None:
    assert sorted(p.name for p in pair.private_key_path.parent.iterdir()) == [
        "acme_research.key",
        "acme_research.pub",
    ]


def test_generate_never_overwrites_a_private_key(pair: KeyPair) -> None:
    before = pair.private_key_path.read_bytes()
    with pytest.raises(KeyFileError, match=r"acme_research\.key already exists; keys are never overwritten"):
        generate_keypair(pair.private_key_path.parent, "acme_research")
    assert pair.private_key_path.read_bytes() == before


def test_generate_refuses_when_only_the_public_file_exists(tmp_path: Path) -> None:
    (tmp_path / "lab.pub").write_text("ssh-ed25519 AAAA lab\n")
    with pytest.raises(KeyFileError, match=r"lab\.pub already exists"):
        generate_keypair(tmp_path, "lab")
    assert not (tmp_path / "lab.key").exists()


@pytest.mark.parametrize("name", ["", "../escape", "has space", "-lead", "x" * 65])
def test_generate_refuses_invalid_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match="key name .* is invalid; use 1-64 letters"):
        generate_keypair(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_key_pair_repr_holds_no_key_material(pair: KeyPair) -> None:
    pem_body = pair.private_key_path.read_text().splitlines()[1]
    assert pem_body not in repr(pair)
    assert "private_key=" not in repr(pair)


def test_private_key_round_trips(pair: KeyPair) -> None:
    loaded = load_private_key(pair.private_key_path)
    assert loaded.public_key() == pair.public_key


def test_group_readable_private_key_is_refused_with_the_fix(pair: KeyPair) -> None:
    pair.private_key_path.chmod(0o640)
    with pytest.raises(KeyFileError, match=rf"readable by other users \(mode 0640\); run `chmod 600 {re.escape(str(pair.private_key_path))}`"):
        load_private_key(pair.private_key_path)


def test_missing_private_key_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=rf"private key {re.escape(str(tmp_path / 'no.key'))} does not exist"):
        load_private_key(tmp_path / "no.key")


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_garbage_private_key_is_refused(tmp_path: Path) -> None:
    path = _write_private(tmp_path / "bad.key", b"not a key\n")
    with pytest.raises(KeyFileError, match="is not a PEM private key; create one with `medfed keys new`"):
        load_private_key(path)


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = _write_private(tmp_path / "enc.key", pem)
    with pytest.raises(KeyFileError, match="is encrypted; medfed reads unencrypted PKCS#8 keys"):
        load_private_key(path)


def test_a_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = _write_private(tmp_path / "ec.key", pem)
    with pytest.raises(KeyFileError, match="is a ECPrivateKey, not an Ed25519 key"):
        load_private_key(path)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    with pytest.raises(KeyFileError, match="is a ECPublicKey, not an Ed25519 key"):
        load_public_key(public.decode())


# ---------------------------------------------------------------- public keys


def test_public_key_text_with_or_without_comment(pair: KeyPair) -> None:
    bare = format_public_key(pair.public_key)
    assert bare.count(" ") == 1
    assert load_public_key(bare) == pair.public_key
    assert load_public_key(f"  {bare} someone@somewhere \n") == pair.public_key


def test_public_key_in_pem_is_accepted(pair: KeyPair) -> None:
    pem = pair.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_public_key(pem.decode()) == pair.public_key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("ssh-ed25519 AAAA!!!", "is not an OpenSSH or PEM public key"),
        ("hello", "is not an OpenSSH or PEM public key"),
    ],
)
def test_malformed_public_key_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=f"the public key text {message}"):
        load_public_key(text)


def test_two_keys_in_one_public_key_file_are_refused(pair: KeyPair, tmp_path: Path) -> None:
    line = format_public_key(pair.public_key)
    path = tmp_path / "two.pub"
    path.write_text(f"{line}\n{line}\n")
    with pytest.raises(KeyFileError, match=rf"public key {re.escape(str(path))} holds more than one line"):
        load_public_key(path)


def test_missing_public_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"public key .*none\.pub does not exist"):
        load_public_key(tmp_path / "none.pub")


def test_fingerprint_has_the_ssh_keygen_shape(pair: KeyPair) -> None:
    assert FINGERPRINT.fullmatch(fingerprint(pair.public_key))
    assert pair.fingerprint == fingerprint(pair.public_key)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprint_is_what_ssh_keygen_prints(pair: KeyPair) -> None:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pair.public_key_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split()[1] == pair.fingerprint


# ---------------------------------------------------------------- signatures


def test_signature_verifies(pair: KeyPair) -> None:
    signature = sign(pair.private_key, b"spec canonical json")
    assert len(signature) == 64
    verify(pair.public_key, b"spec canonical json", signature)


def test_altered_data_fails_verification_naming_the_key(pair: KeyPair) -> None:
    signature = sign(pair.private_key, b"epsilon=1.0")
    with pytest.raises(SignatureError, match=f"signature does not verify with key {re.escape(pair.fingerprint)}"):
        verify(pair.public_key, b"epsilon=9.0", signature)


def test_another_keys_signature_fails(pair: KeyPair) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        verify(pair.public_key, b"data", sign(other, b"data"))


def test_a_truncated_signature_fails(pair: KeyPair) -> None:
    with pytest.raises(SignatureError):
        verify(pair.public_key, b"data", sign(pair.private_key, b"data")[:-1])


def test_key_errors_belong_to_the_privacy_tree() -> None:
    for error in (KeyFileError, SignatureError, TrustedKeysError):
        assert issubclass(error, PrivacyError)


# ---------------------------------------------------------------- trusted partners


@pytest.fixture
def registry(tmp_path: Path) -> TrustedKeys:
    folder = tmp_path / "home"
    folder.mkdir()
    return TrustedKeys(folder)


def test_a_new_registry_is_empty(registry: TrustedKeys) -> None:
    assert registry.list() == ()
    assert not registry.path.exists()


def test_add_writes_the_documented_toml(registry: TrustedKeys, pair: KeyPair) -> None:
    added = registry.add("acme_research", pair.public_key_path.read_text(), added_by='j.doe "officer"')
    assert registry.path.name == TRUSTED_KEYS_FILE
    raw = tomllib.loads(registry.path.read_text())
    assert raw["partners"]["acme_research"] == {
        "public_key": format_public_key(pair.public_key, comment="acme_research"),
        "added_at": added.added_at,
        "added_by": 'j.doe "officer"',
    }
    assert added.added_at.tzinfo is not None and added.added_at.microsecond == 0


def test_added_partners_are_found_by_name_and_fingerprint(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    other = Ed25519PrivateKey.generate().public_key()
    registry.add("beta_lab", format_public_key(other))
    fresh = TrustedKeys(registry.path.parent)  # another process would read the same file
    assert [p.name for p in fresh.list()] == ["acme_research", "beta_lab"]
    assert fresh.get("beta_lab").public_key == other
    assert fresh.by_fingerprint(pair.fingerprint).name == "acme_research"
    assert fresh.get("acme_research").added_by is None


def test_a_public_key_file_can_be_added(registry: TrustedKeys, pair: KeyPair) -> None:
    assert registry.add("acme_research", pair.public_key_path).fingerprint == pair.fingerprint


def test_duplicate_name_is_refused(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(TrustedKeysError, match="partner 'acme_research' is trusted already .*; remove it first"):
        registry.add("acme_research", other)


def test_the_same_key_under_a_second_name_is_refused(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    with pytest.raises(TrustedKeysError, match=f"key {re.escape(pair.fingerprint)} is trusted already, as partner 'acme_research'"):
        registry.add("acme_again", pair.public_key)
    assert [p.name for p in registry.list()] == ["acme_research"]


def test_malformed_key_is_refused_and_nothing_written(registry: TrustedKeys) -> None:
    with pytest.raises(KeyFileError, match="public key for partner 'acme' is not an OpenSSH or PEM public key"):
        registry.add("acme", "ssh-rsa garbage")
    assert not registry.path.exists()


def test_invalid_partner_name_is_refused(registry: TrustedKeys, pair: KeyPair) -> None:
    with pytest.raises(TrustedKeysError, match=r"partner name 'acme\.research' is invalid"):
        registry.add("acme.research", pair.public_key)


def test_remove_forgets_a_partner(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    removed = registry.remove("acme_research")
    assert removed.fingerprint == pair.fingerprint
    assert registry.list() == ()
    with pytest.raises(SignatureError, match="is not a trusted partner of this node"):
        registry.by_fingerprint(pair.fingerprint)


def test_unknown_partner_suggests_a_close_name(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    with pytest.raises(TrustedKeysError, match="partner 'acme_reserch' is not trusted .*; did you mean 'acme_research'"):
        registry.get("acme_reserch")
    with pytest.raises(TrustedKeysError, match="trusted partners: acme_research"):
        registry.remove("zeta")


def test_verify_returns_the_signing_partner(registry: TrustedKeys, pair: KeyPair) -> None:
    registry.add("acme_research", pair.public_key)
    signature = sign(pair.private_key, b"spec")
    assert registry.verify(b"spec", signature, signer=pair.fingerprint).name == "acme_research"
    with pytest.raises(SignatureError, match="trusted partner 'acme_research'.*altered"):
        registry.verify(b"spec2", signature, signer=pair.fingerprint)


def test_unknown_signer_is_a_signature_error(registry: TrustedKeys, pair: KeyPair) -> None:
    with pytest.raises(SignatureError, match=f"signer {re.escape(pair.fingerprint)} is not a trusted partner"):
        registry.verify(b"spec", sign(pair.private_key, b"spec"), signer=pair.fingerprint)
    with pytest.raises(SignatureError, match="is not a key fingerprint"):
        registry.by_fingerprint("MD5:aa:bb")


def test_a_hand_edited_registry_reports_every_problem(registry: TrustedKeys, pair: KeyPair) -> None:
    line = format_public_key(pair.public_key)
    registry.path.write_text(
        "[partners.acme]\n"
        f'public_key = "{line}"\n'
        "added_at = 2026-05-01T10:00:00\n"  # no offset
        'adde_by = "x"\n'
        "[partners.beta]\n"
        'public_key = "ssh-ed25519 broken"\n'
        "added_at = 2026-05-01T10:00:00Z\n"
        "[partners.gamma]\n"
        "added_at = 2026-05-01T10:00:00Z\n"
    )
    with pytest.raises(TrustedKeysError) as caught:
        registry.list()
    message = str(caught.value)
    assert message.splitlines()[0] == f"{registry.path} is invalid:"
    assert "partners.acme.added_at must be a date-time with a UTC offset" in message
    assert "partners.acme.adde_by is not a known field; did you mean 'added_by'?" in message
    assert "partners.beta.public_key is not an OpenSSH or PEM public key" in message
    assert "partners.gamma.public_key is missing" in message


def test_one_key_under_two_names_in_the_file_is_a_problem(registry: TrustedKeys, pair: KeyPair) -> None:
    line = format_public_key(pair.public_key)
    table = f'public_key = "{line}"\nadded_at = 2026-05-01T10:00:00Z\n'
    registry.path.write_text(f"[partners.a]\n{table}[partners.b]\n{table}")
    with pytest.raises(TrustedKeysError, match="partners.b.public_key is the same key as partners.a"):
        registry.list()


def test_invalid_toml_names_the_file(registry: TrustedKeys) -> None:
    registry.path.write_text("[partners\n")
    with pytest.raises(TrustedKeysError, match=f"{re.escape(str(registry.path))} is not valid TOML"):
        registry.list()


def test_concurrent_adds_all_land(registry: TrustedKeys) -> None:
    keys = [Ed25519PrivateKey.generate().public_key() for _ in range(8)]
    errors: list[BaseException] = []

    def add(index: int) -> None:
        try:
            TrustedKeys(registry.path.parent).add(f"partner_{index}", keys[index])
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert [p.name for p in registry.list()] == [f"partner_{i}" for i in range(8)]
    leftovers = [p.name for p in registry.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
