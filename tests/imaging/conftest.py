"""Synthetic DICOM cohorts, a node secret and de-identifiers shared by the imaging tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from imaging.deid import Deidentifier
from imaging.synth import SynthCohort, write_cohort
from tests.imaging.planting import SECRET

CohortFactory = Callable[..., SynthCohort]


@pytest.fixture(scope="session")
def _cohort_cache() -> dict[tuple[object, ...], SynthCohort]:
    return {}


@pytest.fixture
def cohort_factory(
    _cohort_cache: dict[tuple[object, ...], SynthCohort],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> CohortFactory:
    """Writes (once per session) and copies (per test) a synthetic hospital export."""

    def make(**kwargs: object) -> SynthCohort:
        key = tuple(sorted(kwargs.items()))
        if key not in _cohort_cache:
            root = tmp_path_factory.mktemp("cohort")
            _cohort_cache[key] = write_cohort(root / "export", **kwargs)  # type: ignore[arg-type]
        original = _cohort_cache[key]
        copy_root = tmp_path / f"export-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(original.root, copy_root)
        moved = tuple(
            type(p)(
                patient_id=p.patient_id,
                name=p.name,
                label=p.label,
                burned_in=p.burned_in,
                files=tuple(copy_root / f.relative_to(original.root) for f in p.files),
            )
            for p in original.patients
        )
        return SynthCohort(
            root=copy_root,
            hospital=original.hospital,
            modality=original.modality,
            patients=moved,
            planted_text=original.planted_text,
            planted_numbers=original.planted_numbers,
            planted_uids=original.planted_uids,
        )

    return make


@pytest.fixture
def deidentifier() -> Deidentifier:
    return Deidentifier(secret=SECRET)

