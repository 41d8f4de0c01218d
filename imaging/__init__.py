"""Imaging on the node: DICOM reading, de-identification, preprocessing, synthetic cohorts."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CacheError",
    "DatasetResult",
    "DeidConfig",
    "DeidReport",
    "DeidentificationError",
    "Deidentifier",
    "DicomIndex",
    "DicomReadError",
    "FileIssue",
    "FileOutcome",
    "FileStatus",
    "HOSPITALS",
    "HospitalProfile",
    "ImagingConfigError",
    "ImagingError",
    "IssueCode",
    "MissingPixelDataError",
    "PreprocessCache",
    "PreprocessConfig",
    "PreprocessError",
    "ProfileError",
    "ProfileOption",
    "ProfileTable",
    "ScanReport",
    "SeriesError",
    "SeriesRecord",
    "SliceRef",
    "SynthCohort",
    "UnsupportedTransferSyntaxError",
    "WINDOW_PRESETS",
    "decode_pixels",
    "load_profile_table",
    "preprocess_dataset",
    "remove_stale_staging",
    "scan_files",
    "scan_folder",
    "select_series",
    "series_volume",
    "sort_slices",
    "stack_volume",
    "write_cohort",
]

# Names resolve on first use, so that ``import imaging.errors`` (or a node that only needs
# the errors) does not pull in pydicom and numpy.
_SOURCES = {
    "CacheError": "imaging.errors",
    "DatasetResult": "imaging.deid",
    "DeidConfig": "imaging.deid_config",
    "DeidReport": "imaging.report",
    "DeidentificationError": "imaging.errors",
    "Deidentifier": "imaging.deid",
    "DicomIndex": "imaging.reading",
    "DicomReadError": "imaging.errors",
    "FileIssue": "imaging.reading",
    "FileOutcome": "imaging.report",
    "FileStatus": "imaging.report",
    "HOSPITALS": "imaging.synth",
    "HospitalProfile": "imaging.synth",
    "ImagingConfigError": "imaging.errors",
    "ImagingError": "imaging.errors",
    "IssueCode": "imaging.reading",
    "MissingPixelDataError": "imaging.errors",
    "PreprocessCache": "imaging.cache",
    "PreprocessConfig": "imaging.preprocess",
    "PreprocessError": "imaging.errors",
    "ProfileError": "imaging.errors",
    "ProfileOption": "imaging.profile",
    "ProfileTable": "imaging.profile",
    "ScanReport": "imaging.reading",
    "SeriesError": "imaging.errors",
    "SeriesRecord": "imaging.reading",
    "SliceRef": "imaging.reading",
    "SynthCohort": "imaging.synth",
    "UnsupportedTransferSyntaxError": "imaging.errors",
    "WINDOW_PRESETS": "imaging.preprocess",
    "decode_pixels": "imaging.decoding",
    "load_profile_table": "imaging.profile",
    "preprocess_dataset": "imaging.preprocess",
    "remove_stale_staging": "imaging.deid",
    "scan_files": "imaging.reading",
    "scan_folder": "imaging.reading",
    "select_series": "imaging.reading",
    "series_volume": "imaging.volumes",
    "sort_slices": "imaging.reading",
    "stack_volume": "imaging.preprocess",
    "write_cohort": "imaging.synth",
}


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'imaging' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
