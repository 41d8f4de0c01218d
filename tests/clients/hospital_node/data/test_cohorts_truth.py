"""build_cohort against the synthetic alliance v2's ground truth: same people, index dates and labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.hospital_node.data.cohorts import build_cohort
from medfed.synth_omop import DEFAULT_INDEX_DATE, DEFAULT_PERIOD, OmopSite, write_omop_alliance
from models.clinical_tasks import TASKS, CohortDefinition
from tests.clients.hospital_node.data.omop_folder import open_omop


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[OmopSite]:
    return write_omop_alliance(tmp_path_factory.mktemp("alliance"), n_hospitals=2, seed=11, patients_scale=0.5)


def definition(task: str) -> CohortDefinition:
    dates = ({"index_date": DEFAULT_INDEX_DATE.isoformat()} if TASKS[task].index == "calendar"
             else {"period": [d.isoformat() for d in DEFAULT_PERIOD]})
    return CohortDefinition.from_mapping({"task": task, "covariates": ["age"], **dates})


@pytest.mark.parametrize("task", sorted(TASKS))
def test_cohort_equals_the_generators_truth(sites: list[OmopSite], task: str) -> None:
    for site in sites:
        cohort = build_cohort(open_omop(site.folder), definition(task))
        truth = pq.read_table(site.truth / f"{task}.parquet").sort_by("person_id")
        assert cohort.num_rows > 0, site.site
        assert cohort.column("person_id").to_pylist() == truth.column("person_id").to_pylist(), site.site
        assert cohort.column("index_date").to_pylist() == truth.column("index_date").to_pylist(), site.site
        assert cohort.column(TASKS[task].label).to_pylist() == truth.column("label").to_pylist(), site.site
