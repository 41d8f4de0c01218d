"""Private files: created owner only whatever the umask, and every looser mode found with its fix."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from privacy.private_files import create_private, loose_modes, make_private_folder, publish


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask there is: modes must not depend on it."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
def test_folders_and_their_missing_parents_are_created_0700(tmp_path: Path) -> None:
    made = make_private_folder(tmp_path / "a" / "b" / "c")
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", made)] == [0o700] * 3


def test_an_existing_folder_is_left_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    make_private_folder(folder)
    assert _mode(folder) == 0o755


@pytest.mark.usefixtures("open_umask")
def test_publish_writes_0600_and_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.toml"
    publish(path, "one\n")
    publish(path, "two\n")
    assert path.read_text() == "two\n" and _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.toml"]  # no temporary file left


def test_publish_without_replace_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    publish(path, b"first", replace=False)
    with pytest.raises(FileExistsError):
        publish(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


@pytest.mark.usefixtures("open_umask")
def test_create_private_makes_an_empty_0600_file_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    assert create_private(path) is True
    path.write_bytes(b"data")
    assert create_private(path) is False
    assert path.read_bytes() == b"data" and _mode(path) == 0o600


def test_loose_modes_name_each_path_and_the_chmod_that_fixes_it(tmp_path: Path) -> None:
    home = make_private_folder(tmp_path / "home")
    secret, public, fine = home / "ledger.sqlite", home / "audit.pub", home / "policy.toml"
    for path, mode in ((secret, 0o644), (public, 0o644), (fine, 0o600)):
        path.write_text("x")
        path.chmod(mode)
    logs = home / "logs"
    logs.mkdir()
    logs.chmod(0o755)
    (home / "link").symlink_to(secret)  # a link's own mode means nothing: not reported
    found = loose_modes(home, public=lambda p: p.suffix == ".pub")
    assert [(f.path, f.wanted) for f in found] == [(secret, 0o600), (logs, 0o700)]
    assert str(found[0]) == f"file {secret} is mode 0644, open to other users; run `chmod 600 {secret}`"
    assert found[1].fix == f"chmod 700 {logs}"


def test_a_public_file_may_be_read_but_never_written_by_others(tmp_path: Path) -> None:
    home = make_private_folder(tmp_path / "home")
    ca = home / "ca.crt"
    ca.write_text("cert")
    ca.chmod(0o666)
    [found] = loose_modes(home, public=lambda p: p.name == "ca.crt")
    assert found.wanted == 0o644
    assert "writable by other users" in str(found)


def test_a_loose_home_folder_is_reported_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    assert [f.path for f in loose_modes(home)] == [home]
