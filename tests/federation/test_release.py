"""The release's identity: the same digest from the installed files, from Flower's own bundle, from a wheel."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from federation.release import (
    APP_ID,
    AppIdentity,
    FLOWER_APP,
    PACKAGES,
    BundleError,
    bundle_identity,
    content_digest,
    flower_app_pyproject,
    installed_identity,
    release_files,
    release_identity,
    stage_release,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release_fab(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bundle Flower's own builder makes of the staged release, as `flwr run` does."""
    return build_fab_from_disk(stage_release(tmp_path_factory.mktemp("stage")))


def _rezip(fab: bytes, change: dict[str, bytes | None]) -> bytes:
    """`fab` with members replaced (bytes), removed (None) or added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if info.filename in change:
                continue
            target.writestr(info.filename, source.read(info))
        for name, content in change.items():
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


def test_the_flower_app_tables_equal_the_repositorys_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared == FLOWER_APP


def test_flowers_bundle_of_the_staged_release_has_the_installed_identity(release_fab: bytes) -> None:
    installed = installed_identity()
    arrived = bundle_identity(APP_ID, installed.version, release_fab)
    assert arrived == installed
    assert installed.app_id == "medfed/medfed" and len(installed.digest) == 64


def test_the_bundle_carries_every_release_file_and_nothing_else(release_fab: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(release_fab)) as fab:
        names = {n for n in fab.namelist() if n != "pyproject.toml" and not n.startswith(".info/")}
    assert names == set(release_files())
    assert "imaging/annex_e_basic_profile.json" in names
    assert {name.split("/", 1)[0] for name in names} == set(PACKAGES)


def test_compression_and_the_rewritten_pyproject_do_not_change_the_digest(release_fab: bytes) -> None:
    stored = _rezip(release_fab, {"pyproject.toml": flower_app_pyproject("0.1.0").encode() + b"# another rendering\n"})
    assert bundle_identity(APP_ID, "0.1.0", stored).digest == installed_identity().digest


def test_the_release_files_with_another_serverapp_are_another_app(release_fab: bytes) -> None:
    """An outsider's bundle of exactly our files, whose pyproject names its own ServerApp."""
    pyproject = flower_app_pyproject(installed_identity().version).replace("federation.server_app:app", "evil.server:app")
    assert bundle_identity(APP_ID, installed_identity().version, _rezip(release_fab, {"pyproject.toml": pyproject.encode()})).digest != (
        installed_identity().digest
    )


def test_a_bundle_with_a_huge_pyproject_is_refused_before_it_is_parsed(release_fab: bytes) -> None:
    bomb = b"# " + b"x" * (2 << 20) + b"\n"
    with pytest.raises(BundleError, match="pyproject.toml is larger than 1024 KiB"):
        bundle_identity(APP_ID, "0.1.0", _rezip(release_fab, {"pyproject.toml": bomb}))


@pytest.mark.parametrize(
    "change",
    [
        {"clients/hospital_node/client_app.py": b"import os\nos.system('id')\n"},  # one module replaced
        {"clients/extra.py": b"print('hello')\n"},  # one module added
        {"federation/release.py": None},  # one module removed
    ],
    ids=["replaced", "added", "removed"],
)
def test_any_change_to_the_code_changes_the_digest(release_fab: bytes, change: dict[str, bytes | None]) -> None:
    assert bundle_identity(APP_ID, "0.1.0", _rezip(release_fab, change)).digest != installed_identity().digest


def test_a_bundle_that_is_not_a_zip_is_refused() -> None:
    with pytest.raises(BundleError, match="not a readable zip archive"):
        bundle_identity("outsider/x", "1", b"#!/bin/sh\nrm -rf /\n")


def test_a_bundle_with_a_member_twice_is_refused() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as fab, pytest.warns(UserWarning, match="Duplicate name"):
        fab.writestr("pyproject.toml", flower_app_pyproject("1"))
        fab.writestr("a.py", b"x = 1\n")
        fab.writestr("a.py", b"x = 2\n")
    with pytest.raises(BundleError, match="holds 'a.py' twice"):
        bundle_identity("outsider/x", "1", out.getvalue())


def test_a_bundle_that_unpacks_too_large_is_refused_before_it_is_read() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as fab:
        fab.writestr("zeros.bin", b"\0" * (65 << 20))  # deflates to about 64 KiB
    assert len(out.getvalue()) < 1 << 20
    with pytest.raises(BundleError, match="unpacks to more than 64 MiB"):
        bundle_identity("outsider/x", "1", out.getvalue())


def test_content_digest_orders_by_path() -> None:
    assert content_digest([("b", b"2"), ("a", b"1")]) == content_digest([("a", b"1"), ("b", b"2")])
    assert content_digest([("a", b"1")]) != content_digest([("a", b"2")])


@pytest.mark.slow
def test_a_wheel_carries_the_same_release(tmp_path: Path) -> None:
    """A wheel install has no pyproject: its files alone must give the installed identity."""
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests", "benchmarks"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("medfed-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    assert release_files(unpacked).keys() == release_files().keys()
    assert release_identity(unpacked) == installed_identity()


def test_a_claimed_name_with_control_characters_is_shown_escaped() -> None:
    shown = str(AppIdentity("outsider/x", "1.0\x1b[2J\x1b[8m", "ab" * 32))
    assert "\x1b" not in shown and "\\x1b[2J" in shown
