"""Turning DICOM pixel data into model inputs.

The steps, in order: decode the stored values; map them to modality units (Rescale
Slope/Intercept or a Modality LUT, per frame for enhanced multi-frame instances); bring
colour to luminance; apply a window (a named preset, the instance's own VOI, or an
explicit centre and width) or a per-image normalisation; invert MONOCHROME1 so that
brighter always means denser; resample to a fixed size. :class:`PreprocessConfig` holds
the parameters and their digest, which keys the cache (``imaging.cache``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from imaging.decoding import decode_pixels
from imaging.errors import ImagingConfigError, PreprocessError, SeriesError

__all__ = [
    "WINDOW_PRESETS",
    "PreprocessConfig",
    "apply_window",
    "preprocess_dataset",
    "resample",
    "stack_volume",
    "to_modality_units",
]

#: Common CT windows, (centre, width) in HU.
WINDOW_PRESETS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "abdomen": (40.0, 400.0),
        "bone": (400.0, 1800.0),
        "brain": (40.0, 80.0),
        "liver": (60.0, 160.0),
        "lung": (-600.0, 1500.0),
        "mediastinum": (50.0, 350.0),
        "soft_tissue": (50.0, 400.0),
        "stroke": (40.0, 40.0),
        "subdural": (75.0, 215.0),
    }
)

Intensity = Literal["window", "minmax", "zscore", "none"]
_INTENSITIES = ("window", "minmax", "zscore", "none")


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters.

    Attributes
    ----------
    size
        Output rows and columns.
    intensity
        ``window`` (to [0, 1] through :attr:`window`), ``minmax`` (each image to [0, 1]),
        ``zscore`` (each image to mean 0, standard deviation 1) or ``none`` (modality units).
    window
        With ``window``: a preset name, ``"voi"`` (the instance's own window or VOI LUT)
        or ``(centre, width)``.
    invert_monochrome1
        Invert MONOCHROME1 images so that higher values are brighter, as in MONOCHROME2.
    """

    size: tuple[int, int] = (64, 64)
    intensity: Intensity = "minmax"
    window: str | tuple[float, float] | None = None
    invert_monochrome1: bool = True

    def __post_init__(self) -> None:
        problems = _problems(self.size, self.intensity, self.window, self.invert_monochrome1, "preprocess")
        if problems:
            raise ImagingConfigError(problems)

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical parameters (part of every cache key)."""
        canonical = json.dumps(
            {
                "size": list(self.size),
                "intensity": self.intensity,
                "window": [float(v) for v in self.window] if isinstance(self.window, tuple) else self.window,
                "invert_monochrome1": self.invert_monochrome1,
                "version": 1,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], *, prefix: str = "preprocess") -> PreprocessConfig:
        """Build from a decoded configuration table; every problem is reported at once."""
        known = {"size", "intensity", "window", "invert_monochrome1"}
        problems: list[str] = []
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(known)}"
                problems.append(f"{prefix}.{key} is not a setting{hint}")
        size = mapping.get("size", [64, 64])
        window = mapping.get("window")
        if isinstance(window, list):
            window = tuple(window)
        if isinstance(size, list):
            size = tuple(size)
        intensity = mapping.get("intensity", "minmax")
        invert = mapping.get("invert_monochrome1", True)
        problems += _problems(size, intensity, window, invert, prefix)
        if problems:
            raise ImagingConfigError(problems)
        return cls(size=size, intensity=intensity, window=window, invert_monochrome1=invert)  # type: ignore[arg-type]


def _problems(size: object, intensity: object, window: object, invert: object, prefix: str) -> list[str]:
    problems = []
    if (
        not isinstance(size, tuple)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)
    ):
        problems.append(f"{prefix}.size must be two integers in 1..4096; found {size!r}")
    if intensity not in _INTENSITIES:
        problems.append(f"{prefix}.intensity must be one of {list(_INTENSITIES)}; found {intensity!r}")
    if intensity == "window":
        if isinstance(window, str):
            if window != "voi" and window not in WINDOW_PRESETS:
                close = difflib.get_close_matches(window, list(WINDOW_PRESETS) + ["voi"], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(f"{prefix}.window '{window}' is not a preset nor 'voi'{hint}")
        elif isinstance(window, tuple):
            if len(window) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window):
                problems.append(f"{prefix}.window must be [centre, width]; found {list(window)!r}")
            elif window[1] < 1:
                problems.append(f"{prefix}.window width must be >= 1; found {window[1]!r}")
        else:
            problems.append(f"{prefix}.window is required when intensity is 'window' (a preset, 'voi' or [centre, width])")
    elif window is not None:
        problems.append(f"{prefix}.window applies only when intensity is 'window'; found intensity {intensity!r}")
    if not isinstance(invert, bool):
        problems.append(f"{prefix}.invert_monochrome1 must be true or false; found {invert!r}")
    return problems


def _frame_rescale(ds: Dataset, frames: int) -> list[tuple[float, float]] | None:
    """(slope, intercept) per frame from enhanced multi-frame functional groups, if there."""

    def from_group(group: Dataset | None) -> tuple[float, float] | None:
        if group is None:
            return None
        seq = group.get("PixelValueTransformationSequence")
        if not seq:
            return None
        item = seq[0]
        try:
            return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))
        except (TypeError, ValueError):
            return None

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = from_group(shared_seq[0] if shared_seq else None)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    out = []
    for index in range(frames):
        own = from_group(per_frame[index]) if per_frame and index < len(per_frame) else None
        value = own or shared
        if value is None:
            return None
        out.append(value)
    return out


def to_modality_units(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to modality units (HU for CT) as float32, frame by frame."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        per_frame = _frame_rescale(ds, frames)
        if per_frame is not None:
            arr = stored.astype(np.float32)
            view = arr if frames > 1 else arr[np.newaxis]
            for index, (slope, intercept) in enumerate(per_frame):
                view[index] = view[index] * slope + intercept
            return arr
    try:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception:
        raise PreprocessError("the modality LUT or rescale of the instance cannot be applied") from None


def apply_window(values: np.ndarray, *, center: float, width: float) -> np.ndarray:
    """Linear VOI window (PS3.3 C.11.2.1.2.1) onto [0, 1]."""
    if width < 1:
        raise PreprocessError(f"window width must be >= 1; found {width}")
    low = center - 0.5 - (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5).astype(np.float32)
    out[values <= low] = 0.0
    out[values > low + (width - 1)] = 1.0
    return np.clip(out, 0.0, 1.0)


def _dataset_window(values: np.ndarray, stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        try:
            bits = int(item.LUTDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            raise PreprocessError("the instance's VOI LUT has no usable descriptor") from None
        lut_out = np.asarray(apply_voi_lut(stored, ds, index=0), dtype=np.float32)
        return np.clip(lut_out / float(2**bits - 1), 0.0, 1.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        raise PreprocessError("intensity 'window' with window 'voi' needs a window or VOI LUT in the instance")
    return apply_window(values, center=_first_float(center), width=_first_float(width))


def _first_float(value: object) -> float:
    try:
        if isinstance(value, (list, tuple, MultiValue)):
            return float(value[0])
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        raise PreprocessError("the instance's window centre or width is not a number") from None


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """A (n_out, n_in) matrix: area averaging when shrinking, linear when enlarging."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if n_out < n_in:
        for i in range(n_out):
            start, end = i * scale, (i + 1) * scale
            for j in range(int(np.floor(start)), min(int(np.ceil(end)), n_in)):
                weights[i, j] = min(end, j + 1) - max(start, j)
    else:
        centres = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        frac = centres - low
        weights[np.arange(n_out), low] += 1 - frac
        weights[np.arange(n_out), high] += frac
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def resample(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize the last ``len(shape)`` axes: area-averaging down, linear (half-pixel) up."""
    out = np.asarray(values, dtype=np.float32)
    lead = out.ndim - len(shape)
    if lead < 0:
        raise PreprocessError(f"cannot resample {out.ndim}-D data to {len(shape)} axes")
    for offset, n_out in enumerate(shape):
        axis = lead + offset
        if out.shape[axis] == n_out:
            continue
        weights = _weights(out.shape[axis], int(n_out))
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _luminance(values: np.ndarray, ds: Dataset) -> np.ndarray:
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        return values
    rgb = values.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def preprocess_dataset(ds: Dataset, config: PreprocessConfig) -> np.ndarray:
    """Model input from one instance: (rows, cols), or (frames, rows, cols) if multi-frame.

    Raises
    ------
    PreprocessError
        The pixels cannot be turned into the requested input (no window in the file, ...).
    imaging.errors.MissingPixelDataError, imaging.errors.UnsupportedTransferSyntaxError
        As :func:`imaging.decoding.decode_pixels`.
    """
    stored = decode_pixels(ds)
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    values = _luminance(stored, ds) if colour else to_modality_units(stored, ds)
    if config.intensity == "window":
        if config.window == "voi":
            out = _dataset_window(values, stored, ds)
        else:
            window = config.window
            center, width = WINDOW_PRESETS[window] if isinstance(window, str) else window  # type: ignore[misc]
            out = apply_window(values, center=center, width=width)
    elif config.intensity == "minmax":
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values, dtype=np.float32)
    elif config.intensity == "zscore":
        std = float(values.std())
        out = (values - float(values.mean())) / std if std > 0 else np.zeros_like(values, dtype=np.float32)
    else:
        out = values
    if config.invert_monochrome1 and str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        if config.intensity in ("window", "minmax"):
            out = 1.0 - out
        elif config.intensity == "zscore":
            out = -out
    return resample(out, config.size)


def stack_volume(slices: Sequence[np.ndarray], *, depth: int | None = None) -> np.ndarray:
    """Stack sorted 2-D slices into (depth, rows, cols), resampling along depth if asked."""
    if not slices:
        raise SeriesError("no slices to stack")
    shapes = {s.shape for s in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise SeriesError(f"slices must be 2-D and share one shape; found {len(shapes)} shapes")
    volume = np.stack([np.asarray(s, dtype=np.float32) for s in slices])
    if depth is not None:
        if depth < 1:
            raise PreprocessError(f"depth must be >= 1; found {depth}")
        volume = resample(volume, (depth, volume.shape[1], volume.shape[2]))
    return volume

