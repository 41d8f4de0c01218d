"""Private files: secrets and state that only their owner may read, created so and checked so.

A node home holds the privacy ledger, the audit log, keys, trusted partners, the policy
and a cache of de-identified images; a coordinator home holds the alliance CA key, the
SuperLink's key and its state database. Everything medfed writes there is created owner
only, whatever the umask:

- a file is written under a temporary name that :func:`tempfile.mkstemp` creates with
  mode 0600 (set again with ``fchmod``), then renamed or hard-linked into place, so no
  reader ever sees it half-written or with a looser mode (:func:`publish`);
- a folder is created with mode 0700 (:func:`make_private_folder`);
- an empty file that another program fills in later (a SQLite database: SQLite gives
  its ``-wal`` and ``-shm`` files the database file's mode) is created 0600 before that
  program opens it (:func:`create_private`).

Homes made by older releases, or changed by hand, are not tightened behind the owner's
back: :func:`loose_modes` lists every path looser than owner only, with the ``chmod``
that fixes it, and ``medfed node doctor`` and ``medfed coordinator status`` print them.
"""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "PUBLIC_FILE_MODE",
    "LooseMode",
    "create_private",
    "loose_modes",
    "make_private_folder",
    "publish",
]

FILE_MODE = 0o600
FOLDER_MODE = 0o700
PUBLIC_FILE_MODE = 0o644  # public keys and certificates: anyone may read, only the owner write

_GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


def make_private_folder(path: Path) -> Path:
    """Create `path` and any missing parent as folders of mode 0700; an existing folder is left as it is.

    Raises
    ------
    OSError
        If a folder cannot be created (the caller names what it was for).
    """
    path = Path(path)
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another process made it first
        os.chmod(folder, FOLDER_MODE)  # a umask such as 0277 must not leave it unusable
    return path


def publish(path: Path, data: bytes | str, *, mode: int = FILE_MODE, replace: bool = True) -> None:
    """Write `data` to a new file of `mode` beside `path`, then move it into place.

    Readers see the old file or the whole new one, never a part, and never a looser mode.
    Without `replace` an existing file wins (:class:`FileExistsError`).

    Raises
    ------
    OSError
        If the folder is missing, read-only or full (the caller names what it was for).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def create_private(path: Path) -> bool:
    """Create `path` as an empty file of mode 0600 unless it exists; True if it was created.

    Raises
    ------
    OSError
        If it cannot be created (read-only or missing folder, ...).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


@dataclass(frozen=True)
class LooseMode:
    """A path whose mode lets others in, and the mode it should have."""

    path: Path
    mode: int
    wanted: int
    folder: bool

    @property
    def fix(self) -> str:
        """The command that fixes it."""
        return f"chmod {self.wanted:o} {shlex.quote(str(self.path))}"

    def __str__(self) -> str:
        what = "folder" if self.folder else "file"
        who = "writable by" if self.mode & _GROUP_OTHER_WRITE else "open to"
        return f"{what} {self.path} is mode {self.mode:04o}, {who} other users; run `{self.fix}`"


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """`root` and everything under it, without following symbolic links."""
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return
    yield root, info
    if not stat.S_ISDIR(info.st_mode):
        return
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return  # an unreadable folder is reported by the checks that need it
    for entry in entries:
        yield from _walk(Path(entry.path))


def loose_modes(root: Path, *, public: Callable[[Path], bool] = lambda path: False) -> list[LooseMode]:
    """Every folder under `root` (itself included) that is not 0700, and every file that others may use.

    A file for which `public` is true (a public key, a certificate) may be readable by
    others, never writable. Symbolic links are neither followed nor reported (their own
    mode means nothing).
    """
    found: list[LooseMode] = []
    for path, info in _walk(Path(root)):
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            if mode & _GROUP_OTHER:
                found.append(LooseMode(path, mode, FOLDER_MODE, folder=True))
        elif stat.S_ISREG(info.st_mode):
            if public(path):
                if mode & _GROUP_OTHER_WRITE:
                    found.append(LooseMode(path, mode, PUBLIC_FILE_MODE, folder=False))
            elif mode & _GROUP_OTHER:
                found.append(LooseMode(path, mode, FILE_MODE, folder=False))
    return found
