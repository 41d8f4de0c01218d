"""Errors of the imaging package, one root for all.

ImagingError
 ├── ImagingConfigError (+ ValueError)   a configuration value is invalid; lists every problem
 ├── ProfileError (+ ValueError)         the Annex E table or an option selection is unusable
 ├── DicomReadError                      a file is not readable DICOM (not DICOM, truncated, ...)
 │    └── MissingPixelDataError          an image instance carries no (or too little) pixel data
 ├── UnsupportedTransferSyntaxError      no installed decoder for a transfer syntax; names the
 │                                       decoders that would handle it
 ├── SeriesError (+ ValueError)          a series is inconsistent or a selection matched nothing
 ├── DeidentificationError               a data set could not be de-identified
 ├── PreprocessError (+ ValueError)      pixel data cannot be turned into a model input
 └── CacheError                          the preprocessed-array cache cannot be used

Messages name tags like ``(0010,0010)``, codes, counts and digests; they never carry a
value read from patient data, nor a file name (PACS exports name folders after patients).
pydicom's own log messages can quote a value it found invalid (a name in a date field);
importing this module puts a filter on pydicom's loggers that keeps each record's level
and logger but replaces its words (:func:`withhold_pydicom_messages`).
"""

from __future__ import annotations

import logging

__all__ = [
    "CacheError",
    "DeidentificationError",
    "DicomReadError",
    "ImagingConfigError",
    "ImagingError",
    "MissingPixelDataError",
    "PreprocessError",
    "ProfileError",
    "SeriesError",
    "withhold_pydicom_messages",
    "UnsupportedTransferSyntaxError",
]


class ImagingError(Exception):
    """Root of every error raised by the imaging package."""


class ImagingConfigError(ImagingError, ValueError):
    """A configuration mapping has one or more invalid fields.

    ``problems`` holds one message per field, all of them at once.
    """

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class ProfileError(ImagingError, ValueError):
    """The confidentiality profile table or the selected options cannot be used."""


class DicomReadError(ImagingError):
    """A file could not be read as a DICOM instance.

    ``code`` is a stable reason code (``not_dicom``, ``truncated``, ...) for reports.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class MissingPixelDataError(DicomReadError):
    """An image instance has no pixel data, or less than its header declares."""


class UnsupportedTransferSyntaxError(ImagingError):
    """Pixel data is encoded in a transfer syntax no installed decoder handles.

    ``transfer_syntax`` is the UID; ``missing`` lists the decoder packages that would
    handle it, as pydicom names them.
    """

    def __init__(self, transfer_syntax: str, name: str, missing: tuple[str, ...]) -> None:
        self.transfer_syntax = transfer_syntax
        self.missing = missing
        self.code = "pixel_decoder_missing"
        hint = "; ".join(missing) if missing else "no decoder exists for it in pydicom"
        super().__init__(
            f"cannot decode pixel data in transfer syntax {transfer_syntax} ({name}): "
            f"install one of: {hint}"
        )


class SeriesError(ImagingError, ValueError):
    """A series cannot be used as asked (inconsistent geometry, nothing selected, ...)."""


class DeidentificationError(ImagingError):
    """A data set could not be de-identified; ``code`` is a stable reason code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class PreprocessError(ImagingError, ValueError):
    """Pixel data cannot be converted with the requested preprocessing."""


class CacheError(ImagingError):
    """The preprocessed-array cache is unusable (not a directory, not writable, ...)."""


# pydicom's loggers: "pydicom" for values and files, its pixel modules' own for decoding.
_PYDICOM_LOGGERS = (
    "pydicom",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
    "pydicom.pixels.utils",
)
WITHHELD = "pydicom reported a problem with an element; its words are withheld because they may quote a value"


class _WithholdValues(logging.Filter):
    """Keeps a pydicom record (level, logger, time) and replaces its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = WITHHELD, ()
        return True


def withhold_pydicom_messages() -> None:
    """Put the value-withholding filter on each of pydicom's loggers, once."""
    for name in _PYDICOM_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdValues) for f in logger.filters):
            logger.addFilter(_WithholdValues())


withhold_pydicom_messages()
