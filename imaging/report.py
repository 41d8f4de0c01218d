"""The record of a de-identification run, for the node's audit log.

A :class:`DeidReport` says what was done and to what, never with what: the profile and
its edition, the options, how many attributes each action touched, and for every input
file its SHA-256, the SHA-256 of what was written (or why nothing was), and the output's
name (built from pseudonyms and replacement UIDs only). No value read from a file, and no
input path (PACS exports name folders after patients), is ever stored in it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["DeidReport", "FileOutcome", "FileStatus"]


class FileStatus(enum.StrEnum):
    """Whether an input produced an output."""

    WRITTEN = "written"
    EXCLUDED = "excluded"


@dataclass(frozen=True)
class FileOutcome:
    """What became of one input file.

    ``reason`` is a stable code for an excluded file (``not_dicom``, ``truncated``,
    ``burned_in_annotation``, ``pixel_decoder_missing``...); ``detail`` explains it
    without values. ``pixels`` is ``cleaned`` when burned-in regions were blanked.
    """

    input_sha256: str
    status: FileStatus
    output_sha256: str | None = None
    output_name: str | None = None
    reason: str | None = None
    detail: str | None = None
    pixels: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "input_sha256": self.input_sha256,
            "status": self.status.value,
            "output_sha256": self.output_sha256,
            "output_name": self.output_name,
            "reason": self.reason,
            "detail": self.detail,
            "pixels": self.pixels,
        }


@dataclass(frozen=True)
class DeidReport:
    """A de-identification run: profile, options, action counts and per-file outcomes."""

    profile: str
    edition: str
    options: tuple[str, ...]
    burned_in_mode: str
    key_fingerprint: str
    action_counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[FileOutcome, ...] = ()

    @property
    def written(self) -> tuple[FileOutcome, ...]:
        return tuple(f for f in self.files if f.status is FileStatus.WRITTEN)

    @property
    def excluded(self) -> tuple[FileOutcome, ...]:
        return tuple(f for f in self.files if f.status is FileStatus.EXCLUDED)

    def exclusion_counts(self) -> dict[str, int]:
        """Excluded files per reason code."""
        counts: dict[str, int] = {}
        for outcome in self.excluded:
            key = outcome.reason or "unknown"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form for the audit log."""
        return {
            "profile": self.profile,
            "edition": self.edition,
            "options": list(self.options),
            "burned_in_mode": self.burned_in_mode,
            "key_fingerprint": self.key_fingerprint,
            "action_counts": dict(sorted(self.action_counts.items())),
            "files_in": len(self.files),
            "files_written": len(self.written),
            "files_excluded": len(self.excluded),
            "exclusions": self.exclusion_counts(),
            "pixels_cleaned": sum(1 for f in self.files if f.pixels == "cleaned"),
            "files": [f.to_dict() for f in self.files],
        }
