"""The node's allow-list of app bundles: which runs its installed ClientApp serves.

A Flower run carries an app bundle (FAB). The node never installs or imports it; it
serves a run with the medfed ClientApp its hospital installed, and only when the run's
bundle is a release listed here (``allowed_apps.toml`` in the node home, mode 0600)::

    [[app]]
    app_id = "medfed/medfed"
    version = "0.1.0"
    digest = "9c1e..."      # federation.release.content_digest of the bundle's files
    added_by = "hospital-it"
    added_at = "2026-12-06T10:00:00+00:00"

``NodeHome.create`` (and so `medfed node init`) writes the installed release; hospital
IT changes the list with `medfed node apps allow|remove` (each change an audit entry).
A missing file allows nothing: every run is refused.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.hospital_node.errors import NodeHomeError
from federation.release import AppIdentity
from privacy.keys import toml_string
from privacy.private_files import publish

if TYPE_CHECKING:
    from clients.hospital_node.home import NodeHome

__all__ = ["ALLOWED_APPS_FILE", "AllowedApp", "AllowedApps", "allow_app", "remove_app"]

ALLOWED_APPS_FILE = "allowed_apps.toml"
_KEYS = ("app_id", "version", "digest", "added_by", "added_at")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEADER = """\
# The app bundles this node serves with the medfed ClientApp its hospital installed.
# A run whose bundle is not listed here is refused before any data or key is touched.
# Change it with `medfed node apps allow|remove` (audited), not by hand.
"""


@dataclass(frozen=True)
class AllowedApp:
    """One allowed release: its identity, and who allowed it when."""

    identity: AppIdentity
    added_by: str
    added_at: datetime


class AllowedApps:
    """The allow-list in a node home, read fresh on every call."""

    def __init__(self, home: Path) -> None:
        self.path = home / ALLOWED_APPS_FILE

    def list(self) -> list[AllowedApp]:
        """The allowed releases; empty if the file is missing.

        Raises
        ------
        NodeHomeError
            If the file is unreadable or invalid (every problem at once, by field).
        """
        try:
            raw = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise NodeHomeError(f"{self.path} is unreadable: {err}; fix it or allow the release again") from None
        return _parse(self.path, raw)

    def allows(self, identity: AppIdentity) -> bool:
        return any(app.identity == identity for app in self.list())

    def add(self, identity: AppIdentity, *, by: str) -> AllowedApp:
        """Allow `identity` (a no-op returning the existing entry if it is listed already)."""
        current = self.list()
        for app in current:
            if app.identity == identity:
                return app
        entry = AllowedApp(identity, by, datetime.now(UTC).replace(microsecond=0))
        self._write([*current, entry])
        return entry

    def remove(self, digest_prefix: str) -> AllowedApp:
        """Remove the one release whose digest starts with `digest_prefix` (8+ hex characters).

        Raises
        ------
        NodeHomeError
            If the prefix is too short or matches no release, or more than one.
        """
        prefix = digest_prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
            raise NodeHomeError(f"give at least 8 hex characters of the release's digest; found {digest_prefix!r}")
        current = self.list()
        matches = [app for app in current if app.identity.digest.startswith(prefix)]
        if len(matches) != 1:
            listed = ", ".join(str(app.identity) for app in current) or "none"
            what = "no allowed release" if not matches else f"{len(matches)} allowed releases"
            raise NodeHomeError(f"digest prefix {prefix!r} matches {what}; allowed: {listed}")
        self._write([app for app in current if app is not matches[0]])
        return matches[0]

    def _write(self, apps: Sequence[AllowedApp]) -> None:
        lines = [_HEADER]
        for app in apps:
            values = {**app.identity.to_mapping(), "added_by": app.added_by, "added_at": app.added_at.isoformat()}
            lines += ["[[app]]", *(f"{key} = {toml_string(values[key])}" for key in _KEYS), ""]
        publish(self.path, "\n".join(lines))


def _parse(path: Path, raw: Mapping[str, Any]) -> list[AllowedApp]:
    problems: list[str] = []
    unknown = sorted(set(raw) - {"app"})
    problems += [f"{key} is not a known table; the file holds [[app]] tables only" for key in unknown]
    tables = raw.get("app", [])
    if not isinstance(tables, list):
        problems.append("app must be an array of tables ([[app]])")
        tables = []
    apps = []
    for index, table in enumerate(tables):
        where = f"app[{index}]"
        if not isinstance(table, dict):
            problems.append(f"{where} must be a table")
            continue
        problems += [f"{where}.{key} is not a known field; known: {', '.join(_KEYS)}" for key in sorted(set(table) - set(_KEYS))]
        missing = [key for key in _KEYS if not isinstance(table.get(key), str) or not table.get(key)]
        problems += [f"{where}.{key} is missing or not a string" for key in missing]
        if missing:
            continue
        if not _DIGEST.fullmatch(table["digest"]):
            problems.append(f"{where}.digest must be 64 lowercase hex characters; found {table['digest']!r}")
            continue
        try:
            added_at = datetime.fromisoformat(table["added_at"])
        except ValueError:
            problems.append(f"{where}.added_at must be an ISO 8601 time; found {table['added_at']!r}")
            continue
        apps.append(AllowedApp(AppIdentity(table["app_id"], table["version"], table["digest"]), table["added_by"], added_at))
    if problems:
        raise NodeHomeError(f"{path} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return apps


def allow_app(home: NodeHome, identity: AppIdentity, *, by: str) -> AllowedApp:
    """Allow `identity` on the node and record it in the signed audit log (``app`` entry)."""
    apps = AllowedApps(home.path)
    before = apps.list()
    entry = apps.add(identity, by=by)
    if entry not in before:
        _audit(home, apps, before, {"action": "allow", **identity.to_mapping(), "by": by})
    return entry


def remove_app(home: NodeHome, digest_prefix: str, *, by: str) -> AllowedApp:
    """Stop serving the release whose digest starts with `digest_prefix`; audited (``app`` entry)."""
    apps = AllowedApps(home.path)
    before = apps.list()
    removed = apps.remove(digest_prefix)
    _audit(home, apps, before, {"action": "remove", **removed.identity.to_mapping(), "by": by})
    return removed


def _audit(home: NodeHome, apps: AllowedApps, before: Sequence[AllowedApp], payload: dict[str, str]) -> None:
    """Record the change; if it cannot be recorded, the change is undone (no unaudited allow-list)."""
    try:
        home.audit_log().append("app", payload)
    except BaseException:
        apps._write(before)
        raise
