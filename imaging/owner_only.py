"""Owner-only output: de-identified images and their derivatives are readable by their owner alone.

De-identified is not public: an image keeps quasi-identifiers (age band, dates shifted
per patient, the anatomy itself). Everything imaging writes is created mode 0600 (files)
and 0700 (folders), set explicitly at creation so no umask loosens it. ``imaging`` is a
leaf package and cannot use ``privacy.private_files``, which does the same for node and
coordinator state.
"""

from __future__ import annotations

import os

__all__ = ["FILE_MODE", "FOLDER_MODE", "make_folders", "open_new"]

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def make_folders(path: str | os.PathLike[str]) -> None:
    """Create `path` and any missing parent with mode 0700; existing folders are left as they are."""
    missing = []
    folder = os.fspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, FOLDER_MODE)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
            continue  # another process made it first
        os.chmod(folder, FOLDER_MODE)


def open_new(path: str | os.PathLike[str]) -> int:
    """A descriptor of a new file at `path`, mode 0600 (an existing file is truncated and keeps its inode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
