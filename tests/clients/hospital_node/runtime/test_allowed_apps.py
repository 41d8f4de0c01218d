"""The allow-list: a new home serves the installed release only; changes are audited; bad files say where."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from clients.hospital_node.errors import NodeHomeError
from clients.hospital_node.home import NodeHome
from clients.hospital_node.runtime.allowed_apps import ALLOWED_APPS_FILE, AllowedApps, allow_app, remove_app
from federation.release import AppIdentity, installed_identity

OTHER = AppIdentity("medfed/medfed", "0.2.0", "ab" * 32)


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return NodeHome.create(tmp_path / "node", name="hospital_1")


def test_a_new_home_serves_exactly_the_installed_release(home: NodeHome) -> None:
    [app] = AllowedApps(home.path).list()
    assert app.identity == installed_identity()
    assert app.added_by == "medfed node init"
    assert stat.S_IMODE((home.path / ALLOWED_APPS_FILE).stat().st_mode) == 0o600


def test_allowing_and_removing_a_release_is_audited(home: NodeHome) -> None:
    allow_app(home, OTHER, by="it-admin")
    assert AllowedApps(home.path).allows(OTHER)
    allow_app(home, OTHER, by="it-admin")  # already there: no second entry
    remove_app(home, OTHER.digest[:10], by="it-admin")
    assert not AllowedApps(home.path).allows(OTHER)
    entries = [e.payload for e in home.audit_log().entries() if e.kind == "app"]
    assert [(e["action"], e["digest"], e["by"]) for e in entries] == [("allow", OTHER.digest, "it-admin"), ("remove", OTHER.digest, "it-admin")]


def test_a_change_that_cannot_be_audited_is_undone(home: NodeHome) -> None:
    (home.path / "keys" / "node_audit.key").unlink(missing_ok=True)
    home.audit_log()  # creates the key and the log
    (home.path / "keys" / "node_audit.key").unlink()  # the key is gone, the log remains: appending fails
    with pytest.raises(NodeHomeError, match="audit key"):
        allow_app(home, OTHER, by="it-admin")
    assert not AllowedApps(home.path).allows(OTHER)


def test_removing_by_an_ambiguous_or_unknown_prefix_names_the_allowed_releases(home: NodeHome) -> None:
    with pytest.raises(NodeHomeError, match="matches no allowed release; allowed: medfed/medfed"):
        remove_app(home, "0123456789", by="it-admin")
    with pytest.raises(NodeHomeError, match="at least 8 hex characters"):
        remove_app(home, "ab", by="it-admin")


def test_a_missing_file_allows_nothing(home: NodeHome) -> None:
    (home.path / ALLOWED_APPS_FILE).unlink()
    assert AllowedApps(home.path).list() == []
    assert not AllowedApps(home.path).allows(installed_identity())


def test_an_invalid_file_lists_every_problem_by_field(home: NodeHome) -> None:
    (home.path / ALLOWED_APPS_FILE).write_text(
        '[[app]]\napp_id = "medfed/medfed"\nversion = "1"\ndigest = "short"\nadded_by = "x"\nadded_at = "2026-01-01"\n'
        '[[app]]\nappid = "typo"\n'
    )
    with pytest.raises(NodeHomeError) as caught:
        AllowedApps(home.path).list()
    message = str(caught.value)
    assert "app[0].digest must be 64 lowercase hex characters; found 'short'" in message
    assert "app[1].appid is not a known field" in message
    assert "app[1].app_id is missing or not a string" in message
