"""The imaging connector: a registered DICOM folder to one labelled image per patient.

An imaging dataset (``kind = "imaging"`` in ``node.toml``) names a folder of DICOM files
as a PACS exported it (identifiable: names in headers, pixels and folder names) and a
labels CSV keyed by the hospital's own patient IDs. :class:`ImagingConnector` turns
them into training tensors in four steps, each cached under
``<home>/imaging-cache/<dataset>/`` so that a ClientApp process (one per message) finds
the work already done:

1. **De-identify, incrementally** (``deid/``). Each source file is recognised by a keyed
   digest of its relative path (so the cache names no original path) and its size and
   modification time; a file whose stat changed is hashed, and only a new or changed
   file is de-identified (:class:`imaging.Deidentifier`, PS3.15 Annex E, keyed by the
   node secret). A file gone from the folder takes its output with it. Each run that
   changed anything is one ``deidentification`` entry in the node's audit log: the
   report's counts, profile, options and key fingerprint, and the SHA-256 of the full
   per-file report (input and output digests, exclusion codes), which is kept in
   ``deid-reports/<sha256>.json``. Nothing in the report or the entry is a value read
   from a file, nor a source path.
2. **One image per patient** (``arrays/``, ``samples/``). The de-identified folder is
   scanned; series are kept when they match both the registration's selection and the
   experiment's; per patient, the consistent matching series with the most slices is
   taken (ties: the smaller de-identified Series Instance UID, a keyed hash, so the
   choice is stable). Its slices are preprocessed through ``imaging.PreprocessCache``
   and reduced to one 2-D image: ``mip``, the maximum over the slices, keeps a finding
   whatever slice it is on (the reading radiologists use for nodules and other dense
   foci), at the cost of overlaying structures; ``middle`` takes the middle slice
   (index ``depth // 2``), cheaper and undistorted but blind to what lies elsewhere.
   One image per patient, never one per slice or series, is what makes sample-level
   DP-SGD patient-level DP: a patient with three series is still one sample.
3. **Labels through pseudonyms.** The labels CSV is read on every load (it is small and
   may be corrected); each ``patient_id`` (with ``issuer`` when the file has that
   column, else the Issuer of Patient ID its DICOM files carried) becomes the keyed
   pseudonym that de-identification put in the images, so labels and images meet
   without an original identifier ever entering the cache.
4. **Split by pseudonym**: as the tabular connector does, by ``split_fraction`` of the
   pseudonym, so the split is deterministic on a node and unrelated across nodes.

Files that cannot be used are skipped and counted by reason code, never named.
Everything written into the cache is written whole (temporary file, then rename), and
the manifest that says what the cache holds is written last, after the audit entry: a
crash leaves at worst work to redo, never a half-written file taken for a whole one,
and never an unaudited de-identification.

The node secret (``keys/deid.secret``, 32 random bytes, mode 0600) is created on first
use. It keys every pseudonym and replacement UID: back it up with the node home, since
another secret gives other pseudonyms and the whole folder is de-identified again.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.hospital_node.connectors import split_fraction
from clients.hospital_node.errors import ConnectorError, NodeHomeError
from clients.hospital_node.home import CACHE_DIR, KEYS_DIR, DatasetEntry, NodeHome
from federation.protocol import ImagingInstruction
from privacy.private_files import FILE_MODE, make_private_folder, publish

if TYPE_CHECKING:  # imaging pulls in pydicom: imported where it is used
    from imaging.deid import Deidentifier
    from imaging.preprocess import PreprocessConfig
    from imaging.pseudonyms import Keyring
    from imaging.report import FileOutcome

__all__ = [
    "CACHE_DIR",
    "DEID_SECRET_FILE",
    "MIN_PATIENTS",
    "DeidSync",
    "ImagingConnector",
    "ImagingData",
    "ImagingInventory",
    "node_secret",
]

logger = logging.getLogger(__name__)

DEID_SECRET_FILE = "deid.secret"  # in the node home's keys folder
MIN_PATIENTS = 10

_SECRET_BYTES = 32
_MANIFEST_VERSION = 1
_SAMPLES_VERSION = 1
_LABEL_COLUMNS = ("patient_id", "label")
_ISSUER_COLUMN = "issuer"
_INGESTING_MARK = ".ingesting"
_PARTIAL = ".partial"


# ---------------------------------------------------------------- the node secret


def node_secret(home: NodeHome) -> bytes:
    """The node's de-identification secret, created (32 random bytes, mode 0600) on first use.

    Raises
    ------
    NodeHomeError
        If the secret file is shorter than 32 bytes, unreadable, or readable by other
        users (fix with ``chmod 600``).
    """
    path = home.path / KEYS_DIR / DEID_SECRET_FILE
    if not path.exists():
        _create_secret(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise NodeHomeError(f"cannot read the de-identification secret {path}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise NodeHomeError(
                f"the de-identification secret {path} is readable by other users; run `chmod 600 {path}`"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            secret = handle.read()
    finally:
        os.close(fd)
    if len(secret) < _SECRET_BYTES:
        raise NodeHomeError(
            f"the de-identification secret {path} holds {len(secret)} bytes; at least {_SECRET_BYTES} are needed. "
            "Restore it from backup"
        )
    return secret


def _create_secret(path: Path) -> None:
    """Write a new secret whole, then link it into place unless another process did first."""
    make_private_folder(path.parent)
    try:
        publish(path, os.urandom(_SECRET_BYTES), replace=False)  # atomic, and never replaces a secret
    except FileExistsError:
        return
    logger.info("created the node's de-identification secret in %s", path.parent)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class DeidSync:
    """What bringing the de-identified cache up to date did.

    ``report_sha256`` names the full report in ``deid-reports/`` and is None when nothing
    changed (then nothing was de-identified and nothing was audited).
    ``links_not_followed`` counts the symbolic links that lead out of the registered
    folder: never read, and never named (a target's path may name a patient).
    """

    files_seen: int
    files_processed: int
    files_unchanged: int
    files_removed: int
    report_sha256: str | None = None
    links_not_followed: int = 0  # symbolic links that lead out of the registered folder


@dataclass(frozen=True)
class ImagingInventory:
    """What an imaging dataset holds, in counts (as registration reports it)."""

    files_seen: int
    files_written: int
    files_excluded: Mapping[str, int]
    patients_with_images: int
    patients_labelled: int
    deid: DeidSync


@dataclass(frozen=True, eq=False)
class ImagingData:
    """One image per patient as float32 ``(n, 1, size, size)`` arrays, split by pseudonym.

    ``y_*`` hold 0.0 or 1.0. ``skipped`` counts, by reason code, the patients and files
    left out (never which ones).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    skipped: Mapping[str, int] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        """Training patients."""
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        """Validation patients."""
        return len(self.y_val)


# ---------------------------------------------------------------- helpers


def _write_atomically(target: Path, data: bytes) -> None:
    make_private_folder(target.parent)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=_PARTIAL)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_regular(path: Path) -> bytes:
    """The bytes of the regular file `path`; a symbolic link put in its place since it was
    listed, a FIFO or a device is refused (without blocking on it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return handle.read()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(value: object) -> str:
    return hashlib.sha256(_canonical(value).encode("ascii")).hexdigest()


def _remove_empty_parents(path: Path, stop: Path) -> None:
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def _original_patient(data: bytes) -> tuple[str, str] | None:
    """(issuer, patient ID) of an encoded original, or None; only ever kept as a keyed token."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings may quote values
            ds = pydicom.dcmread(
                io.BytesIO(data), stop_before_pixels=True, specific_tags=["PatientID", "IssuerOfPatientID"], force=True
            )
        return str(ds.get("IssuerOfPatientID", "") or "").strip(), str(ds.get("PatientID", "") or "").strip()
    except Exception:  # the de-identifier has judged the file readable; a header oddity only loses the token
        return None


def _signature(info: os.stat_result | None) -> list[int]:
    """What marks a source file as unchanged: size, modification time and mode (or none)."""
    return [-1, -1, -1] if info is None else [info.st_size, info.st_mtime_ns, info.st_mode]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------- the connector


class ImagingConnector:
    """Prepares and loads one registered imaging dataset of a node home.

    Parameters
    ----------
    home
        The node home: holds the secret, the cache and the audit log.
    entry
        A registration of kind ``imaging``.
    """

    def __init__(self, home: NodeHome, entry: DatasetEntry) -> None:
        if entry.kind != "imaging" or entry.imaging is None:
            raise ConnectorError(f"dataset {entry.name!r} is not an imaging dataset (kind {entry.kind!r})")
        self.home = home
        self.entry = entry
        self.source = entry.imaging
        self.root = home.path / CACHE_DIR / entry.name
        self._where = f"imaging dataset {entry.name!r}"

    # ------------------------------------------------------------ layout

    @property
    def deid_dir(self) -> Path:
        """The de-identified DICOM files: ``<pseudonym>/<study>/<series>/<instance>.dcm``."""
        return self.root / "deid"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def reports_dir(self) -> Path:
        """Full de-identification reports, named by their SHA-256."""
        return self.root / "deid-reports"

    @property
    def arrays_dir(self) -> Path:
        return self.root / "arrays"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def _ingesting_path(self) -> Path:
        """Present while an ingestion changes the cache; found under the lock, its process died."""
        return self.root / _INGESTING_MARK

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time per dataset: ClientApp processes may overlap.

        The lock is an ``flock``, which the kernel drops when its holder dies (SIGKILL
        included): whoever holds it is the only process writing this dataset's cache.
        """
        make_private_folder(self.root)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._ingesting_path.exists():
                self._clean_interrupted()
            os.close(os.open(self._ingesting_path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
            yield
            # Only a holder that finished takes the mark away; after an error or a kill
            # the next holder cleans up what this one may have left.
            self._ingesting_path.unlink()
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _clean_interrupted(self) -> None:
        """Remove what a holder of the lock that died left: temporary files, and
        de-identified files the manifest does not record (never audited, never used)."""
        recorded = {
            e["output"] for e in self._stored_manifest().get("files", {}).values() if e.get("status") == "written"
        }
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            here = Path(dirpath)
            for name in filenames:
                path = here / name
                temporary = name.startswith(".") and name.endswith((_PARTIAL, ".tmp"))
                stray = here.is_relative_to(self.deid_dir) and path.relative_to(self.deid_dir).as_posix() not in recorded
                if temporary or stray:
                    path.unlink(missing_ok=True)
                    _remove_empty_parents(path, self.root)
                    removed += 1
        logger.warning(
            "%s: cleaned up after an interrupted ingestion (%s removed); nothing it left was used",
            self._where,
            _plural(removed, "file"),
        )

    # ------------------------------------------------------------ public steps

    def prepare(self) -> ImagingInventory:
        """Bring the de-identified cache up to date and count what it holds.

        Raises
        ------
        ConnectorError
            If the folder or the labels file cannot be used (every labels problem at once).
        """
        from imaging.errors import ImagingError

        labels = self._read_labels()  # cheap checks first: a bad labels file stops before any work
        try:
            with self._locked():
                manifest, sync = self._sync()
        except ImagingError as err:
            raise ConnectorError(f"{self._where}: {err}") from None
        written = {e["pseudonym"] for e in manifest["files"].values() if e["status"] == "written"}
        mapped, _ = self._map_labels(labels, manifest)
        excluded = Counter(e["reason"] or "unknown" for e in manifest["files"].values() if e["status"] == "excluded")
        return ImagingInventory(
            files_seen=sync.files_seen,
            files_written=sum(1 for e in manifest["files"].values() if e["status"] == "written"),
            files_excluded=dict(sorted(excluded.items())),
            patients_with_images=len(written),
            patients_labelled=len(written & set(mapped)),
            deid=sync,
        )

    def labelled_patients(self) -> int | None:
        """Labelled patients with a de-identified image, as the cache's manifest last recorded
        them; None if the dataset was never prepared. Nothing is de-identified or written
        (an officer's view calls it). An experiment's own series selection may leave fewer.
        """
        manifest = self._stored_manifest()
        if not manifest:
            return None
        written = {e["pseudonym"] for e in manifest["files"].values() if e["status"] == "written"}
        mapped, _ = self._map_labels(self._read_labels(), manifest)
        return len(written & set(mapped))

    def load(self, request: ImagingInstruction) -> ImagingData:
        """One labelled image per patient, as the experiment's `request` asks, split by pseudonym.

        Raises
        ------
        ConnectorError
            If the folder or labels cannot be used, the selection leaves fewer than
            :data:`MIN_PATIENTS` labelled patients, or the split leaves no training or no
            validation patient.
        """
        from imaging.errors import ImagingError

        labels = self._read_labels()
        try:
            with self._locked():
                manifest, _ = self._sync()
                pseudonyms, images, skipped = self._samples(manifest, request)
        except ImagingError as err:
            # Imaging messages hold no values or file names; they may still help IT.
            raise ConnectorError(f"{self._where}: {err}") from None
        mapped, unmatched = self._map_labels(labels, manifest)
        return self._split(pseudonyms, images, mapped, {**skipped, "label_without_usable_image": unmatched})

    # ------------------------------------------------------------ 1. de-identification

    def _stored_manifest(self) -> dict[str, Any]:
        """The manifest as stored; empty if there is none or it is unreadable."""
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="ascii"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            logger.warning("%s: the cache manifest is unreadable; de-identifying the folder again", self._where)
            return {}
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}

    def _read_manifest(self, fingerprint: str, deid_digest: str) -> dict[str, Any]:
        empty: dict[str, Any] = {
            "version": _MANIFEST_VERSION, "key_fingerprint": fingerprint, "deid_digest": deid_digest, "files": {}
        }
        manifest: dict[str, Any] | None = self._stored_manifest()
        if not manifest:
            if not self.manifest_path.exists():
                return empty
            manifest = None
        if (
            not isinstance(manifest, dict)
            or manifest.get("version") != _MANIFEST_VERSION
            or manifest.get("key_fingerprint") != fingerprint
            or manifest.get("deid_digest") != deid_digest
        ):
            if manifest is not None:
                logger.info("%s: the secret or the de-identification settings changed; starting afresh", self._where)
            for folder in (self.deid_dir, self.arrays_dir, self.samples_dir):
                shutil.rmtree(folder, ignore_errors=True)
            return empty
        return manifest

    def _source_files(self) -> tuple[list[tuple[str, Path]], int]:
        """(relative name, path to read) of every file in the registered folder, and how many
        symbolic links lead out of it (never followed).

        A link to a file inside the folder is read at its target; a link to a folder is
        never walked into (os.walk's default), and counted if it leads out.
        """
        folder = self.entry.path
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise ConnectorError(f"{self._where}: the DICOM folder {folder} {what}")
        inside = folder.resolve()
        skip = {self.home.path.resolve()}
        files: list[tuple[str, Path]] = []
        outside = 0
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            kept = []
            for name in sorted(dirnames):
                path = here / name
                if path.is_symlink():
                    outside += not path.resolve().is_relative_to(inside)
                elif path.resolve() not in skip:
                    kept.append(name)
            dirnames[:] = kept
            for name in sorted(filenames):
                path = here / name
                if path.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(inside):
                        outside += 1
                        continue
                    path = target
                files.append(((here / name).relative_to(folder).as_posix(), path))
        if outside:
            logger.warning(
                "%s: %d symbolic link(s) lead out of the registered folder and were not followed", self._where, outside
            )
        return files, outside

    def _sync(self) -> tuple[dict[str, Any], DeidSync]:
        """Bring ``deid/`` and the manifest up to date with the source folder (under the lock)."""
        from imaging.deid import Deidentifier
        from imaging.pseudonyms import Keyring

        secret = node_secret(self.home)
        deidentifier = Deidentifier(secret=secret, config=self.source.deid_config())
        keys = Keyring(secret)
        deid_digest = _digest({"deid": dict(self.source.deid), "table": deidentifier.table.title})
        manifest = self._read_manifest(deidentifier.key_fingerprint, deid_digest)
        known: dict[str, dict[str, Any]] = manifest["files"]
        seen: dict[str, dict[str, Any]] = {}
        todo: list[tuple[str, Path, os.stat_result | None]] = []
        sources, links_not_followed = self._source_files()
        for relative, path in sources:
            token = keys.token("source-path", relative, 32)
            try:
                info: os.stat_result | None = path.stat()
            except OSError:
                info = None  # a dangling link, say: excluded as unreadable, once
            entry = known.get(token)
            if entry is not None and entry["stat"] == _signature(info):
                seen[token] = entry
            else:
                todo.append((token, path, info))
        outcomes: list[FileOutcome] = []
        counts: Counter[str] = Counter()
        processed: dict[str, dict[str, Any]] = {}
        for token, path, info in todo:
            entry, outcome, file_counts = self._deidentify_one(deidentifier, keys, path, info, known.get(token))
            if outcome is None:  # touched but unchanged
                seen[token] = entry
                continue
            processed[token] = entry
            outcomes.append(outcome)
            counts.update(file_counts)
        removed = [token for token in known if token not in seen and token not in processed]
        current = {**seen, **processed}
        self._remove_outputs([known[t] for t in removed] + [known[t] for t in processed if t in known], current)
        manifest = {**manifest, "files": dict(sorted(current.items()))}
        sync = DeidSync(
            files_seen=len(seen) + len(processed),
            files_processed=len(processed),
            files_unchanged=len(seen),
            files_removed=len(removed),
            links_not_followed=links_not_followed,
        )
        if processed or removed:
            shutil.rmtree(self.samples_dir, ignore_errors=True)  # derived from the old set of patients
            if removed:
                # Preprocessed arrays are keyed by instance and parameters, not listable by
                # patient: drop them all rather than keep a removed patient's images.
                shutil.rmtree(self.arrays_dir, ignore_errors=True)
            sync = self._audit(deidentifier, outcomes, counts, sync)
        if manifest["files"] != known or not self.manifest_path.exists():
            _write_atomically(self.manifest_path, _canonical(manifest).encode("ascii"))
        return manifest, sync

    def _deidentify_one(
        self,
        deidentifier: Deidentifier,
        keys: Keyring,
        path: Path,
        info: os.stat_result | None,
        previous: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], FileOutcome | None, Mapping[str, int]]:
        """De-identify one new or changed file; (manifest entry, FileOutcome or None, counts)."""
        from imaging.errors import DeidentificationError, DicomReadError
        from imaging.report import FileOutcome, FileStatus

        data: bytes | None = None
        reason = "the file cannot be read (FileNotFoundError)"
        if info is not None:
            try:
                data = _read_regular(path)
            except OSError as err:
                reason = f"the file cannot be read ({type(err).__name__})"
        base = {"stat": _signature(info)}
        if data is None:
            outcome = FileOutcome("", FileStatus.EXCLUDED, reason="unreadable", detail=reason)
            entry = {**base, "sha256": "", "status": "excluded", "reason": "unreadable",
                     "output": None, "output_sha256": None, "pseudonym": None, "id_token": None}
            return entry, outcome, {}
        digest = hashlib.sha256(data).hexdigest()
        if previous is not None and previous["sha256"] == digest:
            return {**previous, **base}, None, {}
        try:
            encoded, result, name = deidentifier.deidentify_bytes(data)
        except (DeidentificationError, DicomReadError) as err:
            outcome = FileOutcome(digest, FileStatus.EXCLUDED, reason=err.code, detail=str(err))
            entry = {**base, "sha256": digest, "status": "excluded", "reason": err.code,
                     "output": None, "output_sha256": None, "pseudonym": None, "id_token": None}
            return entry, outcome, {}
        _write_atomically(self.deid_dir / name, encoded)
        output_sha256 = hashlib.sha256(encoded).hexdigest()
        original = _original_patient(data)
        id_token = keys.token("patient-id", original[1], 32) if original and original[1] else None
        outcome = FileOutcome(
            input_sha256=digest,
            status=FileStatus.WRITTEN,
            output_sha256=output_sha256,
            output_name=name,
            pixels=result.pixels,
        )
        entry = {**base, "sha256": digest, "status": "written", "reason": None, "output": name,
                 "output_sha256": output_sha256, "pseudonym": result.patient_pseudonym, "id_token": id_token}
        return entry, outcome, dict(result.counts)

    def _remove_outputs(self, gone: list[dict[str, Any]], current: Mapping[str, dict[str, Any]]) -> None:
        """Delete outputs no current file produces (a removed or replaced input's)."""
        kept = {e["output"] for e in current.values() if e["status"] == "written"}
        for entry in gone:
            name = entry.get("output")
            if entry["status"] == "written" and name and name not in kept:
                target = self.deid_dir / name
                target.unlink(missing_ok=True)
                _remove_empty_parents(target, self.deid_dir)

    def _audit(
        self, deidentifier: Deidentifier, outcomes: list[FileOutcome], counts: Counter[str], sync: DeidSync
    ) -> DeidSync:
        """Keep the run's full report and record it in the audit log; before the manifest."""
        from types import MappingProxyType

        from imaging.report import DeidReport

        config = deidentifier.config
        report = DeidReport(
            profile=deidentifier.table.profile,
            edition=deidentifier.table.title,
            options=config.option_names,
            burned_in_mode=config.burned_in.mode.value,
            key_fingerprint=deidentifier.key_fingerprint,
            action_counts=MappingProxyType(dict(counts)),
            files=tuple(outcomes),
        )
        full = report.to_dict()
        text = _canonical(full).encode("ascii")
        report_sha256 = hashlib.sha256(text).hexdigest()
        _write_atomically(self.reports_dir / f"{report_sha256}.json", text)
        # The audit entry holds the summary and commits to the per-file report by its
        # digest: a large folder's per-file list would not fit one entry.
        payload = {key: value for key, value in full.items() if key != "files"}
        payload.update(
            dataset=self.entry.name,
            files_unchanged=sync.files_unchanged,
            files_removed=sync.files_removed,
            links_not_followed=sync.links_not_followed,
            report_sha256=report_sha256,
            report_file=(self.reports_dir / f"{report_sha256}.json").relative_to(self.home.path).as_posix(),
        )
        self.home.audit_log().append("deidentification", payload)
        logger.info(
            "%s: de-identified %s (%d written, %d excluded), %d unchanged, %d removed",
            self._where,
            _plural(len(outcomes), "file"),
            len(report.written),
            len(report.excluded),
            sync.files_unchanged,
            sync.files_removed,
        )
        return DeidSync(
            files_seen=sync.files_seen,
            files_processed=sync.files_processed,
            files_unchanged=sync.files_unchanged,
            files_removed=sync.files_removed,
            report_sha256=report_sha256,
            links_not_followed=sync.links_not_followed,
        )

    # ------------------------------------------------------------ 2. one image per patient

    def _samples(
        self, manifest: Mapping[str, Any], request: ImagingInstruction
    ) -> tuple[list[str], np.ndarray, dict[str, int]]:
        from imaging.preprocess import PreprocessConfig

        window: str | tuple[float, float] | None = None
        if request.intensity == "window":
            if request.window:
                window = request.window
            else:
                assert request.window_center is not None and request.window_width is not None
                window = (float(request.window_center), float(request.window_width))
        config = PreprocessConfig(size=(request.size, request.size), intensity=request.intensity, window=window)  # type: ignore[arg-type]
        outputs = sorted(
            (e["output"], e["output_sha256"]) for e in manifest["files"].values() if e["status"] == "written"
        )
        key = _digest({
            "version": _SAMPLES_VERSION,
            "outputs": outputs,
            "preprocess": config.digest,
            "registration": [list(self.source.modalities), list(self.source.body_parts), self.source.series_description],
            "request": [list(request.modalities), list(request.body_parts), request.series_description],
            "projection": request.projection,
        })
        path = self.samples_dir / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as stored:
                pseudonyms = [str(p) for p in stored["pseudonyms"]]
                return pseudonyms, stored["images"], json.loads(str(stored["skipped"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError):
            logger.warning("%s: dropping an unreadable samples file", self._where)
            path.unlink(missing_ok=True)
        pseudonyms, images, skipped = self._build_samples(config, request, manifest)
        if "file_missing_or_changed" in skipped:
            return pseudonyms, images, skipped  # not kept: the manifest's files may come back
        buffer = io.BytesIO()
        np.savez(
            buffer,
            pseudonyms=np.array(pseudonyms, dtype=str),
            images=images,
            skipped=np.array(_canonical(skipped)),
        )
        _write_atomically(path, buffer.getvalue())
        return pseudonyms, images, skipped

    def _recorded_outputs(self, manifest: Mapping[str, Any]) -> tuple[list[Path], int]:
        """The de-identified files the manifest records whose bytes still have the recorded digest,
        and how many do not (missing or changed since: never used)."""
        paths: list[Path] = []
        broken = 0
        for entry in sorted(manifest["files"].values(), key=lambda e: e["output"] or ""):
            if entry["status"] != "written":
                continue
            path = self.deid_dir / entry["output"]
            try:
                data = _read_regular(path)
            except OSError:
                broken += 1
                continue
            if hashlib.sha256(data).hexdigest() != entry["output_sha256"]:
                broken += 1
                continue
            paths.append(path)
        if broken:
            logger.warning("%s: %s in the cache missing or changed since de-identification; not used",
                           self._where, _plural(broken, "file"))
        return paths, broken

    def _build_samples(
        self, config: PreprocessConfig, request: ImagingInstruction, manifest: Mapping[str, Any]
    ) -> tuple[list[str], np.ndarray, dict[str, int]]:
        """Training reads only what a completed, audited ingestion recorded: the manifest's
        files, each checked against its digest, never whatever else the folder holds."""
        from imaging.cache import PreprocessCache
        from imaging.errors import CacheError, ImagingError
        from imaging.reading import scan_files, select_series, series_problems, sort_slices
        from imaging.volumes import series_volume

        skipped: Counter[str] = Counter()
        size = request.size
        paths, broken = self._recorded_outputs(manifest)
        if broken:
            skipped["file_missing_or_changed"] = broken
        scan = scan_files(paths)
        skipped.update({f"file_{code}": n for code, n in scan.counts().items()})

        def chosen(modalities: tuple[str, ...], parts: tuple[str, ...], pattern: str) -> set[str]:
            series = select_series(
                scan.index, modality=modalities or None, body_part=parts or None, description=pattern or None
            )
            return {s.series_instance_uid for s in series}

        wanted = chosen(self.source.modalities, self.source.body_parts, self.source.series_description)
        wanted &= chosen(request.modalities, request.body_parts, request.series_description)
        cache = PreprocessCache(self.arrays_dir)
        pseudonyms: list[str] = []
        images: list[np.ndarray] = []
        for patient in sorted(scan.index.patients, key=lambda p: p.patient_key):
            pseudonym = patient.patient_key[1]
            candidates = [s for study in patient.studies for s in study.series if s.series_instance_uid in wanted]
            if not candidates:
                skipped["patient_no_matching_series"] += 1
                continue
            candidates.sort(key=lambda s: (-sum(i.frames for i in s.instances), s.series_instance_uid))
            usable = [s for s in candidates if not series_problems(s)]
            if not usable:
                skipped["patient_inconsistent_series"] += 1
                continue
            try:
                volume = series_volume(sort_slices(usable[0]), config, cache=cache)
            except CacheError:
                raise
            except ImagingError as err:
                skipped[f"patient_{getattr(err, 'code', type(err).__name__)}"] += 1
                continue
            except (OSError, ValueError, EOFError):
                skipped["patient_unreadable"] += 1
                continue
            image = volume.max(axis=0) if request.projection == "mip" else volume[volume.shape[0] // 2]
            pseudonyms.append(pseudonym)
            images.append(np.ascontiguousarray(image, dtype=np.float32))
        stacked = np.stack(images) if images else np.zeros((0, size, size), np.float32)
        return pseudonyms, stacked, dict(sorted(skipped.items()))

    # ------------------------------------------------------------ 3. labels

    def _read_labels(self) -> list[tuple[str | None, str, float]]:
        """Rows of the labels file as (issuer or None, patient id, label); every problem at once."""
        path = self.source.labels
        source = f"{self._where}: labels file {path}"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConnectorError(f"{source} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise ConnectorError(f"{source} cannot be read: {reason}") from None
        try:
            reader = csv.DictReader(io.StringIO(text))
            header = reader.fieldnames or []
            rows = list(reader)
        except csv.Error as err:
            raise ConnectorError(f"{source} is not readable as CSV ({type(err).__name__})") from None
        problems = [f"missing column {name!r}" for name in _LABEL_COLUMNS if name not in header]
        if problems:
            raise ConnectorError(f"{source} does not fit its registration:\n" + "\n".join(f"  - {p}" for p in problems))
        has_issuer = _ISSUER_COLUMN in header
        out: list[tuple[str | None, str, float]] = []
        missing = bad = 0
        keys: Counter[tuple[str | None, str]] = Counter()
        for row in rows:
            patient = (row.get("patient_id") or "").strip()
            issuer = (row.get(_ISSUER_COLUMN) or "").strip() if has_issuer else None
            raw = (row.get("label") or "").strip()
            if not patient:
                missing += 1
                continue
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if value not in (0.0, 1.0):
                bad += 1
                continue
            keys[(issuer, patient)] += 1
            out.append((issuer, patient, value))
        repeated = [key for key, n in keys.items() if n > 1]
        if missing:
            problems.append(f"{_plural(missing, 'row')} without a patient_id")
        if bad:
            problems.append(f"column 'label' must hold 0 or 1 only; {_plural(bad, 'row')} hold something else")
        if repeated:
            problems.append(
                f"{_plural(len(repeated), 'patient')} on more than one row; one label per patient is needed"
            )
        if problems:
            raise ConnectorError(f"{source} does not fit its registration:\n" + "\n".join(f"  - {p}" for p in problems))
        return out

    def _map_labels(
        self, rows: list[tuple[str | None, str, float]], manifest: Mapping[str, Any]
    ) -> tuple[dict[str, float], int]:
        """Labels by pseudonym (through the issuer column, else the files' own issuers), and
        how many rows matched no de-identified image."""
        from imaging.pseudonyms import Keyring

        keys = Keyring(node_secret(self.home))
        by_id: dict[str, set[str]] = {}
        for entry in manifest["files"].values():
            if entry["status"] == "written" and entry.get("id_token"):
                by_id.setdefault(entry["id_token"], set()).add(entry["pseudonym"])
        mapped: dict[str, float] = {}
        ambiguous = unmatched = 0
        for issuer, patient, label in rows:
            if issuer is not None:
                mapped[keys.patient_pseudonym(issuer, patient)] = label
                continue
            found = by_id.get(keys.token("patient-id", patient, 32), set())
            if len(found) > 1:
                ambiguous += 1  # one ID under several issuers: the file needs an issuer column
            elif not found:
                unmatched += 1
            else:
                mapped[next(iter(found))] = label
        if ambiguous:
            logger.warning(
                "%s: %s match images under more than one Issuer of Patient ID and are left out; "
                "add an 'issuer' column to the labels file",
                self._where,
                _plural(ambiguous, "label row"),
            )
        return mapped, unmatched + ambiguous

    # ------------------------------------------------------------ 4. split

    def _split(
        self, pseudonyms: list[str], images: np.ndarray, labels: Mapping[str, float], skipped: Mapping[str, int]
    ) -> ImagingData:
        counts = Counter(skipped)
        keep = [i for i, p in enumerate(pseudonyms) if p in labels]
        counts["patient_without_label"] += len(pseudonyms) - len(keep)
        counts["label_without_usable_image"] += len(set(labels) - set(pseudonyms))  # matched, but unusable
        counts = Counter({k: v for k, v in counts.items() if v})
        if len(keep) < MIN_PATIENTS:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing skipped"
            raise ConnectorError(
                f"{self._where} has {_plural(len(keep), 'labelled patient')} with a matching series; at least "
                f"{MIN_PATIENTS} are needed (left out: {detail}). Check the registration's series selection "
                "and labels file, and the experiment's [imaging] selection"
            )
        seed = self.entry.split_seed
        fractions = np.array([split_fraction(pseudonyms[i], split_seed=seed) for i in keep])
        order = np.argsort(fractions, kind="stable")
        index = np.array(keep)[order]
        x = images[index][:, np.newaxis].astype(np.float32)
        y = np.array([labels[pseudonyms[i]] for i in index], dtype=np.float32)
        is_val = fractions[order] < self.entry.validation_fraction
        if is_val.all() or not is_val.any():
            # Every round evaluates the incoming model on the validation patients.
            which = "training" if is_val.all() else "validation"
            raise ConnectorError(
                f"{self._where}: validation_fraction {self.entry.validation_fraction} leaves no {which} "
                f"patients out of {len(keep)}; register the dataset with another validation_fraction"
            )
        data = ImagingData(
            x_train=np.ascontiguousarray(x[~is_val]),
            y_train=np.ascontiguousarray(y[~is_val]),
            x_val=np.ascontiguousarray(x[is_val]),
            y_val=np.ascontiguousarray(y[is_val]),
            skipped=dict(sorted(counts.items())),
        )
        logger.info(
            "loaded %s: %d training and %d validation patients; left out: %s",
            self._where,
            data.n_train,
            data.n_val,
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none",
        )
        return data

