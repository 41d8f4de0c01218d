"""Preprocessing: modality units, windows, MONOCHROME1, resampling, normalisation, config."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging.decoding import decode_pixels
from imaging.errors import ImagingConfigError, PreprocessError, SeriesError
from imaging.preprocess import (
    WINDOW_PRESETS,
    PreprocessConfig,
    apply_window,
    preprocess_dataset,
    resample,
    stack_volume,
    to_modality_units,
)
from tests.imaging.conftest import CohortFactory


@pytest.mark.parametrize("hospital", ["north", "east", "south"])
def test_every_site_encoding_gives_the_same_hounsfield_units(cohort_factory: CohortFactory, hospital: str) -> None:
    # One phantom (same seed), three rescale encodings: slope 1 or 0.5, unsigned or signed,
    # slices or one enhanced multi-frame instance.
    cohort = cohort_factory(hospital=hospital, modality="CT", n_patients=1, size=16, slices=2, seed=21, burned_in_fraction=0)
    volumes = []
    for path in sorted(cohort.files):
        ds = pydicom.dcmread(path)
        volumes.append(to_modality_units(decode_pixels(ds), ds))
    hu = np.concatenate([v.reshape(-1, 16, 16) for v in volumes])
    reference = cohort_factory(hospital="north", modality="CT", n_patients=1, size=16, slices=2, seed=21, burned_in_fraction=0)
    expected = np.concatenate(
        [to_modality_units(decode_pixels(d), d).reshape(-1, 16, 16) for d in map(pydicom.dcmread, sorted(reference.files))]
    )
    if hospital == "north":
        assert np.array_equal(hu, expected)
    else:
        assert hu.shape == expected.shape
        assert np.abs(np.sort(hu, axis=None) - np.sort(expected, axis=None)).max() <= 1.0
    assert -1100 < float(np.median(hu)) < -900  # mostly air around the body


def test_windowing_follows_the_linear_voi_function() -> None:
    # PS3.3 C.11.2.1.2.1 with centre 40, width 400: 0 up to -160, 1 above 239, linear between.
    values = np.array([-1000.0, -160.0, -159.0, 40.0, 239.0, 1000.0])
    out = apply_window(values, center=40.0, width=400.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5 - 198.5 / 399, 0.5 + 0.5 / 399, 1.0, 1.0], abs=1e-6)


def test_window_presets_hold_center_and_width() -> None:
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0)


def test_the_instance_window_can_be_used() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    out = preprocess_dataset(ds, PreprocessConfig(size=(32, 32), intensity="window", window="voi"))
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_the_instance_window_is_required_when_asked_for() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    with pytest.raises(PreprocessError, match="needs a window or VOI LUT"):
        preprocess_dataset(ds, PreprocessConfig(intensity="window", window="voi"))


def test_monochrome1_radiographs_match_monochrome2_after_inversion(cohort_factory: CohortFactory) -> None:
    # east stores MONOCHROME1, north MONOCHROME2; the same phantom must come out the same.
    config = PreprocessConfig(size=(16, 16))
    outputs = {}
    for hospital in ("north", "east"):
        cohort = cohort_factory(hospital=hospital, modality="DX", n_patients=1, size=16, seed=33, burned_in_fraction=0)
        ds = pydicom.dcmread(cohort.files[0])
        outputs[ds.PhotometricInterpretation] = preprocess_dataset(ds, config)
    assert set(outputs) == {"MONOCHROME1", "MONOCHROME2"}
    assert np.allclose(outputs["MONOCHROME1"], outputs["MONOCHROME2"], atol=1e-3)


def test_resampling_preserves_constants_and_means() -> None:
    constant = np.full((40, 30), 7.0)
    assert np.allclose(resample(constant, (16, 16)), 7.0)
    assert np.allclose(resample(constant, (64, 50)), 7.0)
    ramp = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert resample(ramp, (4, 4)).mean() == pytest.approx(ramp.mean())
    assert resample(ramp, (4, 4))[0, 0] == pytest.approx(ramp[:2, :2].mean())


def test_resampling_works_on_the_last_axes_of_a_stack() -> None:
    stack = np.random.default_rng(0).normal(size=(3, 20, 20))
    assert resample(stack, (8, 8)).shape == (3, 8, 8)
    assert resample(stack, (5, 8, 8)).shape == (5, 8, 8)


def test_zscore_and_minmax_normalise_each_image() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    z = preprocess_dataset(ds, PreprocessConfig(size=(128, 128), intensity="zscore"))
    assert z.mean() == pytest.approx(0.0, abs=1e-4) and z.std() == pytest.approx(1.0, abs=1e-3)
    m = preprocess_dataset(ds, PreprocessConfig(size=(128, 128), intensity="minmax"))
    assert m.min() == 0.0 and m.max() == 1.0


def test_a_multi_frame_instance_gives_a_stack(cohort_factory: CohortFactory) -> None:
    cohort = cohort_factory(hospital="south", modality="CT", n_patients=1, size=16, slices=4, seed=1, burned_in_fraction=0)
    ds = pydicom.dcmread(cohort.files[0])
    out = preprocess_dataset(ds, PreprocessConfig(size=(8, 8), intensity="window", window="soft_tissue"))
    assert out.shape == (4, 8, 8)


def test_volumes_are_stacked_and_resampled_in_depth() -> None:
    slices = [np.full((4, 4), float(i)) for i in range(4)]
    volume = stack_volume(slices, depth=2)
    assert volume.shape == (2, 4, 4)
    assert volume[0, 0, 0] == pytest.approx(0.5) and volume[1, 0, 0] == pytest.approx(2.5)
    with pytest.raises(SeriesError, match="share one shape"):
        stack_volume([np.zeros((4, 4)), np.zeros((5, 4))])


def test_the_config_reports_every_problem_with_a_hint() -> None:
    with pytest.raises(ImagingConfigError) as info:
        PreprocessConfig.from_mapping({"sise": [64, 64], "intensity": "window", "window": "lungs", "invert_monochrome1": "yes"})
    assert info.value.problems == (
        "preprocess.sise is not a setting; did you mean 'size'?",
        "preprocess.window 'lungs' is not a preset nor 'voi'; did you mean 'lung'?",
        "preprocess.invert_monochrome1 must be true or false; found 'yes'",
    )


def test_a_window_needs_the_window_intensity() -> None:
    with pytest.raises(ImagingConfigError, match="window applies only when intensity is 'window'"):
        PreprocessConfig(intensity="minmax", window="lung")
    with pytest.raises(ImagingConfigError, match=r"size must be two integers in 1\.\.4096; found \(0, 64\)"):
        PreprocessConfig(size=(0, 64))


def test_the_digest_changes_with_every_parameter() -> None:
    base = PreprocessConfig(size=(64, 64), intensity="window", window="lung")
    variants = [
        PreprocessConfig(size=(32, 64), intensity="window", window="lung"),
        PreprocessConfig(size=(64, 64), intensity="window", window="brain"),
        PreprocessConfig(size=(64, 64), intensity="window", window=(-600.0, 1500.0)),
        PreprocessConfig(size=(64, 64), intensity="window", window="lung", invert_monochrome1=False),
    ]
    digests = {base.digest} | {v.digest for v in variants}
    assert len(digests) == 5
    assert PreprocessConfig.from_mapping({"size": [64, 64], "intensity": "window", "window": "lung"}).digest == base.digest
    as_ints = PreprocessConfig(size=(64, 64), intensity="window", window=(-600, 1500))
    assert as_ints.digest == variants[2].digest
