"""The cohort connector: a run's cohort built once from one snapshot, and its rows as training arrays."""

from __future__ import annotations

import stat
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.hospital_node.cohort_connector import cohort_arrays, run_cohort
from clients.hospital_node.errors import ConnectorError
from clients.hospital_node.home import NodeHome
from medfed.demo_omop import OMOP_DATASET, prepare_omop_alliance
from models.clinical_tasks import CohortDefinition

DEFINITION = CohortDefinition.from_mapping(
    {"task": "hypertension_onset", "index_date": "2024-01-01", "covariates": ["age", "sbp_mean"]}
)


@pytest.fixture
def entry(tmp_path):  # type: ignore[no-untyped-def]
    [site, _] = prepare_omop_alliance(tmp_path, n_hospitals=2, seed=5, patients_scale=0.3)
    return NodeHome.open(site.home).dataset(OMOP_DATASET), site.generated.folder


def test_a_run_keeps_the_cohort_of_its_first_snapshot(entry) -> None:  # type: ignore[no-untyped-def]
    dataset, folder = entry
    first = run_cohort(dataset, DEFINITION, run="7")
    # The source changes mid-run: half its people are gone.
    people = pq.read_table(folder / "person.parquet")
    pq.write_table(people.slice(0, people.num_rows // 2), folder / "person.parquet")
    assert run_cohort(dataset, DEFINITION, run="7").equals(first)  # the same patients, every round
    assert run_cohort(dataset, DEFINITION, run="8").num_rows < first.num_rows  # the next run reads anew
    [kept] = [p for p in (dataset.path / "cohorts").glob("*.parquet") if pq.read_table(p).equals(first)]
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    run_cohort(dataset, DEFINITION, run="7", last=True)  # the run's final read removes its copy
    assert not kept.exists()


def _table(sbp: list[float | None], labels: list[int]) -> pa.Table:
    n = len(sbp)
    return pa.table({
        "person_id": pa.array(range(1, n + 1), pa.int64()),
        "index_date": pa.array([date(2024, 1, 1)] * n, pa.date32()),
        "htn_onset_1y": pa.array(labels, pa.int8()),
        "age": pa.array([50.0 + i for i in range(n)], pa.float64()),
        "sbp_mean": pa.array(sbp, pa.float64()),
    })


def test_a_missing_covariate_takes_its_scaling_center() -> None:
    sbp = [None if i % 3 == 0 else 140.0 for i in range(30)]
    data = cohort_arrays(_table(sbp, [i % 2 for i in range(30)]), source="test", label="htn_onset_1y",
                         covariates=("age", "sbp_mean"), scaling={"age": (50.0, 10.0), "sbp_mean": (125.0, 15.0)},
                         validation_fraction=0.2, split_seed=0)
    x = np.concatenate([data.x_train, data.x_val])
    assert data.n_train + data.n_val == 30 and data.feature_names == ("age", "sbp_mean")
    assert sorted(set(np.round(x[:, 1], 6))) == [0.0, 1.0]  # missing -> (125 - 125) / 15, present -> (140 - 125) / 15
    assert (x[:, 1] == 0.0).sum() == 10
    assert np.allclose(np.sort(x[:, 0]), (np.arange(30) + 50.0 - 50.0) / 10.0)


def test_a_covariate_without_scaling_or_too_few_patients_is_refused() -> None:
    table = _table([140.0] * 30, [0, 1] * 15)
    with pytest.raises(ConnectorError, match="covariates without a scaling: sbp_mean"):
        cohort_arrays(table, source="test", label="htn_onset_1y", covariates=("age", "sbp_mean"),
                      scaling={"age": (50.0, 10.0)}, validation_fraction=0.2, split_seed=0)
    with pytest.raises(ConnectorError, match="has 5 patients; at least 10 are needed"):
        cohort_arrays(table.slice(0, 5), source="test", label="htn_onset_1y", covariates=("age",),
                      scaling={"age": (50.0, 10.0)}, validation_fraction=0.2, split_seed=0)
