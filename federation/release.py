"""The medfed release as a Flower App: the files its app bundle carries, and its identity.

A Flower run carries an app bundle (FAB: a zip of the app's files and its
``pyproject.toml``). A medfed node never installs or imports what a bundle holds; it runs
the medfed ClientApp its hospital installed, and only for runs whose bundle *is* a
release on the node's allow-list. This module is the half of the coordinator-node
contract that says what "is a release" means, so the partner's submission and the node
compute it with the same code:

- :func:`release_files` lists the files of the installed release (the modules of
  :data:`PACKAGES` and the imaging profile's JSON), found through the import system, so
  it works the same for a source checkout, an editable install and a wheel, none of
  which needs a ``pyproject.toml`` beside it;
- :func:`content_digest` is SHA-256 over the sorted ``(path, SHA-256 of content)`` pairs
  of those files and of :data:`APP_TABLES_ENTRY`, the canonical JSON of the app's
  ``pyproject.toml`` tables that matter (project name and version, and
  ``[tool.flwr.app]``: publisher, components, config, ``fab-include``). It ignores the
  zip's compression (which differs between zlib builds), the bytes of the
  ``pyproject.toml`` (Flower re-renders it while building; its *values* count) and the
  ``.info/`` manifest Flower derives from the rest. A bundle of the release's files
  whose ``pyproject.toml`` names another ServerApp is therefore another app;
- :func:`installed_identity` is the release's :class:`AppIdentity`: Flower's app id
  (``publisher/name``), the version, and that digest;
- :func:`bundle_identity` reads the same identity out of a bundle that arrived with a
  run, as data: the zip's members are hashed, never extracted, imported or run, with
  the number and size of members bounded;
- :func:`stage_release` writes the release as a Flower App folder for ``flwr run``, with
  :func:`flower_app_pyproject` (the ``[tool.flwr.app]`` tables of the repository's
  ``pyproject.toml``, which a test keeps equal).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "APP_ID",
    "APP_TABLES_ENTRY",
    "FLOWER_APP",
    "PACKAGES",
    "AppIdentity",
    "BundleError",
    "bundle_identity",
    "content_digest",
    "flower_app_pyproject",
    "installed_identity",
    "release_files",
    "release_identity",
    "stage_release",
]

#: The packages a release carries (the FAB's ``fab-include`` names exactly these).
PACKAGES = ("clients", "experiments", "federation", "imaging", "models", "privacy")
_DATA_FILES = ("imaging/*.json",)
PUBLISHER = "medfed"
PROJECT = "medfed"
#: Flower's app id of a medfed release: ``publisher/name``.
APP_ID = f"{PUBLISHER}/{PROJECT}"

#: The Flower App tables of the repository's ``pyproject.toml`` (a test keeps them equal).
FLOWER_APP: Mapping[str, Any] = {
    "publisher": PUBLISHER,
    "fab-include": [*(f"{package}/**/*.py" for package in PACKAGES), "imaging/**/*.json"],
    "components": {
        "serverapp": "federation.server_app:app",
        "clientapp": "clients.hospital_node.client_app:app",
    },
    "config": {
        "spec": "",
        "submission": "",
        "spec-signature": "",
        "spec-signer": "",
        "tracking-uri": "",
        "output-dir": "",
        "study-options": "",
    },
}

# Bundle members a node hashes: a release is well under these (about 1 MB in 150 files).
_MAX_MEMBERS = 4096
_MAX_UNPACKED_BYTES = 64 << 20
_MAX_PYPROJECT_BYTES = 1 << 20
#: The name under which the canonical app tables enter the content digest.
APP_TABLES_ENTRY = "pyproject.toml#app"
# Rewritten by Flower while building (pyproject.toml) or derived from the rest (.info/).
_NOT_CONTENT = ("pyproject.toml",)
_NOT_CONTENT_PREFIX = ".info/"


class BundleError(ValueError):
    """An app bundle that cannot be read as data (not a zip, too large, ambiguous)."""


@dataclass(frozen=True)
class AppIdentity:
    """Who an app bundle says it is (app id, version) and what it holds (content digest)."""

    app_id: str
    version: str
    digest: str

    def __str__(self) -> str:
        return f"{_safe(self.app_id)} {_safe(self.version)} (content {self.digest[:12]})"

    def to_mapping(self) -> dict[str, str]:
        return {"app_id": self.app_id, "version": self.version, "digest": self.digest}


def _safe(text: str, limit: int = 64) -> str:
    """A name a bundle claims, fit for a message or a log line: printable, short (ascii() otherwise)."""
    return text if text.isprintable() and len(text) <= limit else ascii(text[:limit])


def content_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over the sorted ``(path, SHA-256 of content)`` pairs of `files`.

    Raises
    ------
    BundleError
        If a path occurs twice.
    """
    hashes: dict[str, str] = {}
    for path, content in files:
        if path in hashes:
            raise BundleError(f"the bundle holds {path!r} twice")
        hashes[path] = hashlib.sha256(content).hexdigest()
    digest = hashlib.sha256()
    for path in sorted(hashes):
        digest.update(f"{path}\0{hashes[path]}\n".encode())
    return digest.hexdigest()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if len(locations) != 1:
        raise BundleError(f"cannot locate the installed package {package!r} of this medfed release")
    return Path(locations[0])


def release_files(root: Path | None = None) -> dict[str, Path]:
    """The release's files by bundle path (``federation/protocol.py`` ...), sorted.

    `root` is a folder holding the packages (a source checkout, an unpacked wheel); by
    default the installed packages are found through the import system.
    """
    found: dict[str, Path] = {}
    for package in PACKAGES:
        folder = root / package if root is not None else _package_dir(package)
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts:
                found[f"{package}/{path.relative_to(folder).as_posix()}"] = path
    for pattern in _DATA_FILES:
        package, glob = pattern.split("/", 1)
        folder = root / package if root is not None else _package_dir(package)
        for path in folder.glob(glob):
            found[f"{package}/{path.name}"] = path
    return dict(sorted(found.items()))


def release_version() -> str:
    """The installed medfed version (a source checkout without an install says so)."""
    try:
        return importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        raise BundleError("medfed is not installed in this environment; install it (pip install -e .)") from None


def app_tables(project: Mapping[str, Any], app: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a Flower App's name, version and ``[tool.flwr.app]`` tables."""
    payload = {"project": {"name": project.get("name"), "version": project.get("version")}, "app": app}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def release_identity(root: Path | None = None) -> AppIdentity:
    """The identity of the release whose packages lie under `root` (default: the installed ones)."""
    version = release_version()
    files = [(name, path.read_bytes()) for name, path in release_files(root).items()]
    files.append((APP_TABLES_ENTRY, app_tables({"name": PROJECT, "version": version}, FLOWER_APP)))
    return AppIdentity(APP_ID, version, content_digest(files))


@lru_cache(maxsize=1)
def installed_identity() -> AppIdentity:
    """The identity of the medfed release installed in this environment."""
    return release_identity()


def _bundle_app_tables(raw: bytes) -> bytes:
    """The canonical app tables of a bundle's ``pyproject.toml``, read as data."""
    import tomllib

    if len(raw) > _MAX_PYPROJECT_BYTES:
        raise BundleError(f"the app bundle's pyproject.toml is larger than {_MAX_PYPROJECT_BYTES >> 10} KiB")
    try:
        config = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise BundleError(f"the app bundle's pyproject.toml is not valid TOML ({err})") from None
    project = config.get("project", {})
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    if not isinstance(project, Mapping) or not isinstance(app, Mapping):
        raise BundleError("the app bundle's pyproject.toml has no [project] and [tool.flwr.app] tables")
    return app_tables(project, app)


def bundle_identity(fab_id: str, fab_version: str, fab: bytes) -> AppIdentity:
    """The identity of an app bundle that arrived with a run, read as data.

    Raises
    ------
    BundleError
        If the bundle is not a zip, holds too many or too large members, or a member twice.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except (zipfile.BadZipFile, ValueError) as err:
        raise BundleError(f"the app bundle is not a readable zip archive ({err})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > _MAX_MEMBERS:
            raise BundleError(f"the app bundle holds {len(members)} files, more than {_MAX_MEMBERS}")
        if sum(m.file_size for m in members) > _MAX_UNPACKED_BYTES:
            raise BundleError(f"the app bundle unpacks to more than {_MAX_UNPACKED_BYTES >> 20} MiB")
        pyprojects = [m for m in members if m.filename == "pyproject.toml"]
        if len(pyprojects) != 1:
            raise BundleError("the app bundle must hold exactly one pyproject.toml")
        if pyprojects[0].file_size > _MAX_PYPROJECT_BYTES:
            raise BundleError(f"the app bundle's pyproject.toml is larger than {_MAX_PYPROJECT_BYTES >> 10} KiB")
        try:
            # zipfile reads at most each member's declared size and checks its CRC.
            files = [
                (m.filename, archive.read(m))
                for m in members
                if m.filename not in _NOT_CONTENT and not m.filename.startswith(_NOT_CONTENT_PREFIX)
            ]
            files.append((APP_TABLES_ENTRY, _bundle_app_tables(archive.read(pyprojects[0]))))
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as err:
            raise BundleError(f"the app bundle cannot be read ({err})") from None
    return AppIdentity(fab_id, fab_version, content_digest(files))


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {type(value).__name__}")


def flower_app_pyproject(version: str | None = None) -> str:
    """The ``pyproject.toml`` of the release as a Flower App (what ``flwr run`` needs)."""
    lines = ["[project]", f"name = {_toml_value(PROJECT)}", f"version = {_toml_value(version or release_version())}", ""]
    lines += ["[tool.flwr.app]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in FLOWER_APP.items() if not isinstance(value, Mapping)]
    for table, values in FLOWER_APP.items():
        if isinstance(values, Mapping):
            lines += ["", f"[tool.flwr.app.{table}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def stage_release(into: Path) -> Path:
    """Write the installed release as a Flower App folder under `into`; returns that folder.

    ``flwr run`` builds the run's bundle from it, so its content digest is the installed
    release's (:func:`installed_identity`).
    """
    staged = into / "app"
    staged.mkdir(parents=True)
    (staged / "pyproject.toml").write_text(flower_app_pyproject(), encoding="utf-8")
    for name, path in release_files().items():
        target = staged / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return staged
