"""`medfed node console init`: named officer accounts, a salted scrypt hash each, in an owner-only file."""

from __future__ import annotations

import json
import stat

from typer.testing import CliRunner

from clients.hospital_node.cli import app as node_cli
from clients.hospital_node.console.accounts import OfficerAccounts
from clients.hospital_node.errors import ConsoleError
from clients.hospital_node.home import NodeHome

from .conftest import OFFICER


def _init(home: NodeHome, officer: str, typed: str, *extra: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(node_cli, ["console", "init", "--home", str(home.path), "--officer", officer, *extra], input=typed)


def test_init_stores_a_salted_hash_in_an_owner_only_file(home: NodeHome) -> None:
    made = _init(home, "erin", "a long enough passphrase\na long enough passphrase\n")
    assert made.exit_code == 0, made.output
    assert "officer 'erin' can log in to the console of node 'hospital_5'" in made.stdout
    accounts = OfficerAccounts(home.path)
    assert stat.S_IMODE(accounts.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((home.path / "keys" / "console_session.key").stat().st_mode) == 0o600
    stored = json.loads(accounts.path.read_text())["officers"]
    assert set(stored) == {OFFICER, "erin"}
    assert "a long enough passphrase" not in accounts.path.read_text()
    scheme, n, r, p, salt, _ = stored["erin"]["password"].split("$")
    assert (scheme, n, r, p) == ("scrypt", "32768", "8", "1")
    assert salt != stored[OFFICER]["password"].split("$")[4]
    assert accounts.check("erin", "a long enough passphrase") is not None
    assert accounts.check("erin", "a long enough passphrasE") is None


def test_two_different_passwords_write_nothing(home: NodeHome) -> None:
    before = OfficerAccounts(home.path).path.read_bytes()
    made = _init(home, "erin", "a long enough passphrase\na different passphrase\n")
    assert made.exit_code != 0
    assert isinstance(made.exception, ConsoleError) and str(made.exception) == "the two passwords differ; nothing was written"
    assert OfficerAccounts(home.path).path.read_bytes() == before


def test_a_short_password_is_refused(home: NodeHome) -> None:
    made = _init(home, "erin", "short\nshort\n")
    assert str(made.exception) == "the password must have at least 12 characters; found 5; nothing was written"
    assert OfficerAccounts(home.path).names() == [OFFICER]


def test_an_existing_officer_needs_replace(home: NodeHome) -> None:
    refused = _init(home, OFFICER, "")
    assert isinstance(refused.exception, ConsoleError)
    assert f"officer {OFFICER!r} already has an account" in str(refused.exception)
    replaced = _init(home, OFFICER, "another long passphrase\nanother long passphrase\n", "--replace")
    assert replaced.exit_code == 0
    assert OfficerAccounts(home.path).check(OFFICER, "another long passphrase") is not None


def test_an_officer_name_must_be_a_plain_name(home: NodeHome) -> None:
    made = _init(home, "bob smith<script>", "a long enough passphrase\na long enough passphrase\n")
    assert "is not a valid officer name" in str(made.exception)


def test_the_console_command_without_a_home_says_what_to_give() -> None:
    result = CliRunner().invoke(node_cli, ["console"], env={"MEDFED_NODE_HOME": ""})
    assert str(result.exception) == "--home is required (or set MEDFED_NODE_HOME)"


def test_only_a_loopback_address_is_served_without_a_warning() -> None:
    from clients.hospital_node.console.cli import allowed_hosts, host_warning

    assert host_warning("127.0.0.1") is None and host_warning("::1") is None and host_warning("localhost") is None
    warning = host_warning("0.0.0.0")
    assert warning is not None and "reachable from other machines over plain HTTP" in warning
    assert allowed_hosts("127.0.0.1")[:2] == ["127.0.0.1", "localhost"]
    assert allowed_hosts("10.1.2.3")[-1] == "10.1.2.3" and allowed_hosts("0.0.0.0") == ["*"]
