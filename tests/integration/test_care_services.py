"""The four care services' tasks, each trained across real processes from the hospitals' OMOP tables.

A SuperLink and three SuperNodes on loopback; each node has a generated OMOP source
(medfed.synth_omop) registered as its dataset ``omop`` and builds each task's cohort itself
(no look-ahead) from the example spec. The final model's AUC on the hospitals' validation
patients (computed here, where the generated rows are at hand) must be clearly better than
chance and no better than the generator's own risk on the same patients, by DeLong's
paired test (a model beating the truth would mean leakage).
Every run is charged to the one source, whatever the task.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from clients.hospital_node.cohort_connector import cohort_arrays, run_cohort
from clients.hospital_node.connectors import split_fraction
from clients.hospital_node.home import NodeHome
from experiments.spec import ExperimentSpec
from experiments.submit import submit, wait_for_run
from federation.received import RECEIVED_FILE, read_received
from medfed.cluster import flower_env
from medfed.demo import approve_everywhere, partner_key_path
from medfed.demo_omop import OMOP_DATASET, TASK_SPECS, prepare_omop_alliance
from models.clinical_metrics import auc_difference_delong
from models.clinical_tasks import CohortDefinition
from models.training import auc_score
from privacy.keys import load_private_key
from privacy.ledger import PrivacyLedger

from .accounted import assert_every_number_is_accounted
from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("care-services")
    # Three times the default size, so that each hospital holds enough pregnancies for the
    # maternal and infant tasks (a few hundred mothers at the larger sites).
    sites = prepare_omop_alliance(workdir, n_hospitals=3, seed=5, patients_scale=3.0, budget_epsilon=40.0)
    with running_cluster(workdir, sites) as local:
        yield local, sites, workdir


def _spec(task: str) -> ExperimentSpec:
    mapping = tomllib.loads(TASK_SPECS[task].read_text())
    mapping["federation"].update({"rounds": ROUNDS, "min_nodes": 3})
    return ExperimentSpec.from_mapping(mapping, source=str(TASK_SPECS[task]))


def _validation_scores(spec: ExperimentSpec, task: str, sites, model_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """The final model's scores, the generator's true risks and the labels of every site's validation patients."""
    import torch

    from models.tabular import build_tabular_model

    definition = CohortDefinition.from_mapping({**spec.data.cohort, "covariates": list(spec.data.features)})
    scaling = {k: (float(c), float(s)) for k, (c, s) in spec.data.scaling.items()}
    x, y, risk = [], [], []
    for site in sites:
        entry = NodeHome.open(site.home).dataset(OMOP_DATASET)
        table = run_cohort(entry, definition, run="test-scoring", last=True)
        data = cohort_arrays(table, source=site.name, label=definition.label, covariates=definition.covariates,
                             scaling=scaling, validation_fraction=entry.validation_fraction, split_seed=entry.split_seed)
        # The validation rows in cohort_arrays' order: by split fraction, those below validation_fraction.
        ids = np.asarray(table.column("person_id"))
        fractions = np.array([split_fraction(str(i), split_seed=entry.split_seed) for i in ids])
        order = np.argsort(fractions, kind="stable")
        validation_ids = ids[order][fractions[order] < entry.validation_fraction]
        truth = pq.read_table(site.generated.truth / f"{task}.parquet").to_pandas().set_index("person_id")
        assert np.array_equal(truth.loc[validation_ids, "label"].to_numpy(), data.y_val)  # the node's cohort is the truth's
        x.append(data.x_val)
        y.append(data.y_val)
        risk.append(truth.loc[validation_ids, "true_risk"].to_numpy())
    model = build_tabular_model(spec.model.kind, len(spec.data.features), hidden=tuple(spec.model.hidden))
    model.load_state_dict(torch.load(model_path, weights_only=True))
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(np.concatenate(x)))).numpy().ravel()
    return scores, np.concatenate(risk), np.concatenate(y)


def _oracle_auc(task: str, sites) -> float:  # type: ignore[no-untyped-def]
    truth = pd.concat(pq.read_table(site.generated.truth / f"{task}.parquet").to_pandas() for site in sites)
    return auc_score(truth["true_risk"].to_numpy(), truth["label"].to_numpy())


@pytest.mark.parametrize("task", list(TASK_SPECS))
def test_each_care_service_task_trains_across_hospitals_from_their_omop_tables(cluster, task: str) -> None:
    local, sites, workdir = cluster
    spec = _spec(task)
    env = flower_env(local.flwr_home)
    approve_everywhere(sites, spec)
    run_id = submit(
        spec, connection=local.connection, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", output_dir=workdir / "runs",
        signing_key=load_private_key(partner_key_path(workdir)), env=env,
    )
    status = wait_for_run(run_id, connection=local.connection, env=env, timeout=600, poll=1.0)
    assert status.succeeded, status
    [received] = [p for p in (workdir / "runs").glob(f"*/{RECEIVED_FILE}")
                  if {r["flower_run"] for r in read_received(p)} == {run_id}]

    scores, true_risk, labels = _validation_scores(spec, task, sites, received.parent / "final_model.pt")
    oracle = _oracle_auc(task, sites)
    assert 0.75 <= oracle <= 0.95, oracle  # the generator's own risk over every cohort patient
    comparison = auc_difference_delong(scores, true_risk, labels)
    assert comparison.auc_a >= 0.6, (task, comparison, labels.size)
    # On the same validation patients the model may match the generator's own risk, not beat it:
    # a model better than the truth by more than three paired standard errors (one-sided p < 0.0014)
    # would have seen the outcome.
    assert comparison.z() <= 3.0, (task, comparison, labels.size)

    # Every number that left a node is a recorded DP release or accounting value ...
    assert_every_number_is_accounted(received, {site.name: site.home for site in sites})
    # ... charged to the OMOP source, which every task's cohort draws on.
    for site in sites:
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            runs = {c.run_id for c in ledger.charges(OMOP_DATASET)}
        assert str(run_id) in runs
