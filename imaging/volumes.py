"""Model inputs for a whole series: its sorted slices, preprocessed and stacked.

Each instance is read once, preprocessed (through the cache when one is given, which
admits de-identified instances only) and its frames taken in the order
:func:`imaging.reading.sort_slices` gave.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom

from imaging.cache import PreprocessCache
from imaging.errors import SeriesError
from imaging.preprocess import PreprocessConfig, preprocess_dataset, stack_volume
from imaging.reading import SliceRef

__all__ = ["series_volume"]


def series_volume(
    slices: Sequence[SliceRef],
    config: PreprocessConfig,
    *,
    cache: PreprocessCache | None = None,
    depth: int | None = None,
) -> np.ndarray:
    """A (depth, rows, cols) float32 volume from sorted slices.

    Parameters
    ----------
    slices
        Slices in volume order, as :func:`imaging.reading.sort_slices` returns them.
    cache
        Where preprocessed instances are kept; their data sets must be de-identified.
    depth
        Resample to this many slices (linear in depth); the slice count by default.
    """
    if not slices:
        raise SeriesError("no slices to build a volume from")
    arrays: dict[str, np.ndarray] = {}
    planes = []
    for ref in slices:
        key = str(ref.instance.path)
        if key not in arrays:
            ds = pydicom.dcmread(ref.instance.path)
            arrays[key] = cache.get_or_compute(ds, config) if cache is not None else preprocess_dataset(ds, config)
        array = arrays[key]
        if array.ndim == 3:
            if ref.frame >= array.shape[0]:
                raise SeriesError(f"frame {ref.frame} is beyond the {array.shape[0]} frames of its instance")
            planes.append(array[ref.frame])
        else:
            planes.append(array)
    return stack_volume(planes, depth=depth)
