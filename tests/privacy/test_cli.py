"""`medfed keys`: new and fingerprint through the Typer app."""

from __future__ import annotations

import stat
from pathlib import Path

from typer.testing import CliRunner

from privacy.cli import keys_app
from privacy.errors import KeyFileError
from privacy.keys import fingerprint, load_private_key, load_public_key

runner = CliRunner()


def test_new_writes_a_key_pair_and_prints_paths_and_fingerprint(tmp_path: Path) -> None:
    result = runner.invoke(keys_app, ["new", "--out", str(tmp_path / "keys"), "--name", "acme_research"])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "keys" / "acme_research.key", tmp_path / "keys" / "acme_research.pub"
    key = load_public_key(public)
    assert result.output.splitlines() == [
        f"private key: {private} (keep it secret; never send it)",
        f"public key:  {public} (give this to the node officers)",
        f"fingerprint: {fingerprint(key)}",
    ]
    assert load_private_key(private).public_key() == key
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["new", "--out", str(tmp_path), "--name", "lab"]
    assert runner.invoke(keys_app, args).exit_code == 0
    result = runner.invoke(keys_app, args)
    assert isinstance(result.exception, KeyFileError)
    assert "already exists; keys are never overwritten" in str(result.exception)


def test_fingerprint_prints_the_public_keys_fingerprint(tmp_path: Path) -> None:
    runner.invoke(keys_app, ["new", "--out", str(tmp_path), "--name", "lab"])
    result = runner.invoke(keys_app, ["fingerprint", str(tmp_path / "lab.pub")])
    assert result.exit_code == 0
    assert result.output.strip() == fingerprint(load_public_key(tmp_path / "lab.pub"))


def test_fingerprint_of_a_missing_file_is_a_key_file_error(tmp_path: Path) -> None:
    result = runner.invoke(keys_app, ["fingerprint", str(tmp_path / "none.pub")])
    assert isinstance(result.exception, KeyFileError)
    assert "does not exist" in str(result.exception)


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(keys_app, [])
    assert "new" in result.output and "fingerprint" in result.output
