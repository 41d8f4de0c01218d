"""Scoring a generated hospital's current patients: alerts fire exactly on the generator's planted readings."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clients.hospital_node.data.scoring import omop_connection, score_patients
from clients.hospital_node.home import NodeHome
from experiments.spec import ExperimentSpec
from medfed.demo import approve_everywhere
from medfed.demo_omop import OMOP_DATASET, TASK_SPECS, prepare_omop_alliance
from medfed.synth_omop import DEFAULT_SCORING_DATE
from models.tabular import build_tabular_model
from models.weights import WeightsMetadata, save_weights


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("scoring-alliance")
    sites = prepare_omop_alliance(workdir, n_hospitals=2, seed=5, patients_scale=0.5)
    spec = ExperimentSpec.from_toml(TASK_SPECS["hypertension_onset"])
    approve_everywhere(sites, spec)
    model = build_tabular_model("logistic", len(spec.data.features), seed=1)
    weights = workdir / "final_model.safetensors"
    save_weights(weights, model.state_dict(), WeightsMetadata(
        spec_digest=spec.digest(), model_kind="logistic", hidden=(), features=tuple(spec.data.features),
        scaling={k: (float(c), float(s)) for k, (c, s) in spec.data.scaling.items()}, cohort=spec.data.cohort,
        medfed_version="0.1.0", spec_json=spec.canonical_json(),
    ))
    site = sites[0]
    home = NodeHome.open(site.home)
    with omop_connection(home.dataset(OMOP_DATASET)) as connection:
        result = score_patients(home, weights, dataset=OMOP_DATASET, connection=connection,
                                as_of=DEFAULT_SCORING_DATE, threshold=1.0, out=workdir / "scores")
    planted = pq.read_table(site.generated.truth / "planted_alerts.parquet").to_pandas()
    return result, planted


def test_rule_alerts_fire_exactly_on_the_planted_readings(scored) -> None:
    result, planted = scored
    scored_people = {p.person_id for p in result.patients}
    expected = {(int(r.person_id), r.measurement_datetime.date()) for r in planted.itertuples()
                if int(r.person_id) in scored_people}
    assert expected, "some planted patients are in the scoring cohort"
    fired = {(p.person_id, alert.on) for p in result.patients for alert in p.alerts}
    assert fired == expected


def test_alerted_patients_come_first_and_are_flagged(scored) -> None:
    result, _ = scored
    alerted = [p for p in result.patients if p.alerts]
    assert result.patients[: len(alerted)] == tuple(alerted) and all(p.flagged for p in alerted)
    assert result.csv_path.read_text().count("\n") == len(result.patients) + 1
    assert all(p.key.startswith("MF-") and p.key in result.html_path.read_text() for p in alerted)
