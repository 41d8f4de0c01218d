"""The preprocessed-array cache: keyed by de-identified UID and parameters, atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from imaging.cache import PreprocessCache
from imaging.deid import Deidentifier
from imaging.errors import CacheError
from imaging.preprocess import PreprocessConfig
from tests.imaging.conftest import CohortFactory
from tests.imaging.planting import SECRET

CONFIG = PreprocessConfig(size=(8, 8), intensity="window", window="soft_tissue")


@pytest.fixture
def deidentified(cohort_factory: CohortFactory, tmp_path: Path) -> pydicom.Dataset:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=2, burned_in_fraction=0)
    report = Deidentifier(secret=SECRET).deidentify_folder(cohort.root, tmp_path / "deid")
    return pydicom.dcmread(tmp_path / "deid" / report.written[0].output_name)  # type: ignore[operator]


def test_an_array_is_computed_once_and_then_read_back(deidentified: pydicom.Dataset, tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    first = cache.get_or_compute(deidentified, CONFIG)
    assert len(cache.entries()) == 1
    del deidentified.PixelData  # a second computation would now fail: the cache must answer
    second = cache.get_or_compute(deidentified, CONFIG)
    assert np.array_equal(first, second) and second.shape == (8, 8)


def test_other_parameters_make_another_entry(deidentified: pydicom.Dataset, tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    cache.get_or_compute(deidentified, CONFIG)
    cache.get_or_compute(deidentified, PreprocessConfig(size=(4, 4)))
    assert len(cache.entries()) == 2


def test_entry_names_carry_no_original_identifier(deidentified: pydicom.Dataset, tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    path = cache.put(deidentified.SOPInstanceUID, CONFIG, np.zeros((2, 2), np.float32))
    assert path.name == f"{PreprocessCache.key(deidentified.SOPInstanceUID, CONFIG)}.npy"
    assert deidentified.SOPInstanceUID not in str(path)


def test_an_instance_that_is_not_de_identified_is_refused(cohort_factory: CohortFactory, tmp_path: Path) -> None:
    cohort = cohort_factory(hospital="north", modality="DX", n_patients=1, size=16, seed=2, burned_in_fraction=0)
    raw = pydicom.dcmread(cohort.files[0])
    with pytest.raises(CacheError, match=r"only de-identified instances \(Patient Identity Removed = YES\)"):
        PreprocessCache(tmp_path / "cache").get_or_compute(raw, CONFIG)
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_a_failed_write_leaves_nothing_behind(
    deidentified: pydicom.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = PreprocessCache(tmp_path / "cache")

    def half_write(fp: object, array: np.ndarray, allow_pickle: bool) -> None:
        fp.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(deidentified, CONFIG)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert cache.get(deidentified.SOPInstanceUID, CONFIG) is None


def test_a_corrupt_entry_is_dropped_and_recomputed(deidentified: pydicom.Dataset, tmp_path: Path) -> None:
    cache = PreprocessCache(tmp_path / "cache")
    path = cache.path_for(cache.key(deidentified.SOPInstanceUID, CONFIG))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an array")
    assert cache.get(deidentified.SOPInstanceUID, CONFIG) is None
    assert not path.exists()
    assert cache.get_or_compute(deidentified, CONFIG).shape == (8, 8)


def test_the_cache_root_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="cannot be created|not a folder"):
        PreprocessCache(tmp_path / "file")
