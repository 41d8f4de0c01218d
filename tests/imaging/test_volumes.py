"""Series volumes from de-identified slices, through the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imaging.cache import PreprocessCache
from imaging.deid import Deidentifier
from imaging.errors import CacheError, SeriesError
from imaging.preprocess import PreprocessConfig
from imaging.reading import scan_folder, select_series, sort_slices
from imaging.volumes import series_volume
from tests.imaging.conftest import CohortFactory
from tests.imaging.planting import SECRET

CONFIG = PreprocessConfig(size=(8, 8), intensity="window", window="soft_tissue")


@pytest.mark.parametrize("hospital", ["north", "south"])  # slices, and one multi-frame instance
def test_a_de_identified_series_becomes_a_cached_volume(
    cohort_factory: CohortFactory, tmp_path: Path, hospital: str
) -> None:
    cohort = cohort_factory(hospital=hospital, modality="CT", n_patients=1, size=16, slices=4, seed=3, burned_in_fraction=0)
    Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "deid")
    [series] = select_series(scan_folder(tmp_path / "deid").index, modality="CT")
    cache = PreprocessCache(tmp_path / "cache")

    volume = series_volume(sort_slices(series), CONFIG, cache=cache)
    again = series_volume(sort_slices(series), CONFIG, cache=cache, depth=2)

    assert volume.shape == (4, 8, 8) and volume.dtype == np.float32
    assert again.shape == (2, 8, 8)
    assert len(cache.entries()) == len(series.instances)


def test_the_cache_refuses_a_series_that_was_not_de_identified(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=2, seed=3)
    [series] = scan_folder(cohort.root).index.iter_series()
    with pytest.raises(CacheError):
        series_volume(sort_slices(series), CONFIG, cache=PreprocessCache(tmp_path / "cache"))
    assert series_volume(sort_slices(series), CONFIG).shape == (2, 8, 8)  # without a cache it works


def test_no_slices_is_a_series_error() -> None:
    with pytest.raises(SeriesError, match="no slices"):
        series_volume([], CONFIG)
