"""A cache of preprocessed, de-identified arrays in the node home.

Entries are keyed by SHA-256 of the de-identified SOP Instance UID and the digest of the
preprocessing parameters, so nothing in the cache's names is an original identifier and a
change of parameters never returns a stale array. Only instances marked de-identified
(Patient Identity Removed = YES) are admitted. Writes go to a temporary file in the same
folder and are renamed into place: an entry is whole or absent, never half-written.
Entries are owner only (files 0600, folders 0700).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from imaging.errors import CacheError
from imaging.owner_only import make_folders
from imaging.preprocess import PreprocessConfig, preprocess_dataset

__all__ = ["PreprocessCache"]

logger = logging.getLogger(__name__)


class PreprocessCache:
    """Preprocessed arrays on disk, one ``.npy`` per (instance, parameters).

    Parameters
    ----------
    root
        The cache folder (created if missing), typically inside the node home.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            make_folders(self.root)
        except OSError as exc:
            raise CacheError(f"the cache folder cannot be created ({type(exc).__name__})") from None
        if not self.root.is_dir():
            raise CacheError("the cache path exists and is not a folder")

    @staticmethod
    def key(sop_instance_uid: str, config: PreprocessConfig) -> str:
        """The entry key: SHA-256 over the de-identified SOP UID and the parameter digest."""
        return hashlib.sha256(f"{sop_instance_uid}\x00{config.digest}".encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, sop_instance_uid: str, config: PreprocessConfig) -> np.ndarray | None:
        """The cached array, or None; an unreadable entry is dropped and reported as a miss."""
        path = self.path_for(self.key(sop_instance_uid, config))
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            logger.warning("dropping unreadable cache entry %s", path.name[:16])
            path.unlink(missing_ok=True)
            return None

    def put(self, sop_instance_uid: str, config: PreprocessConfig, array: np.ndarray) -> Path:
        """Store ``array`` atomically; returns its path."""
        path = self.path_for(self.key(sop_instance_uid, config))
        make_folders(path.parent)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".partial")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fp:
                np.save(fp, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(self, ds: Dataset, config: PreprocessConfig) -> np.ndarray:
        """The preprocessed array of a de-identified instance, computed once.

        Raises
        ------
        CacheError
            The instance is not marked de-identified; it must not enter the cache.
        """
        if str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() != "YES":
            raise CacheError("only de-identified instances (Patient Identity Removed = YES) may be cached")
        uid = str(ds.SOPInstanceUID)
        cached = self.get(uid, config)
        if cached is not None:
            return cached
        array = preprocess_dataset(ds, config)
        self.put(uid, config, array)
        return array

    def entries(self) -> list[Path]:
        """Every complete entry (temporary files excluded)."""
        return sorted(p for p in self.root.glob("*/*.npy") if not p.name.startswith("."))
