"""The spine, end to end: a real SuperLink and two SuperNodes on loopback run two rounds."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clients.hospital_node.governance import budget_status
from clients.hospital_node.home import NodeHome
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from experiments.submit import submit, wait_for_run
from federation.protocol import SCORE_METRICS
from federation.received import RECEIVED_FILE, read_received
from medfed.cluster import flower_env
from medfed.demo import EXAMPLE_SPEC, approve_everywhere, partner_key_path, prepare_alliance
from privacy.accountant import epsilon
from privacy.events import DPEvent, count_event
from privacy.keys import load_private_key

from .accounted import assert_every_number_is_accounted
from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _spec(**federation: object) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"].update({"rounds": 2, "min_nodes": 2, **federation})
    # The largest evaluation epsilon, so the released AUC's noise fits the band below.
    mapping["privacy"]["evaluation_epsilon"] = 2.0
    return ExperimentSpec.from_mapping(mapping, source="test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("spine")
    sites = prepare_alliance(workdir, n_hospitals=2, seed=11)
    with running_cluster(workdir, sites) as local:
        yield local, sites, workdir


def test_two_rounds_train_track_and_account(cluster) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from opacus.accountants import PRVAccountant

    local, sites, workdir = cluster
    spec = _spec()
    plan = plan_privacy(spec)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = flower_env(local.flwr_home)

    approve_everywhere(sites, spec)
    run_id = submit(
        spec, connection=local.connection, tracking_uri=tracking_uri, output_dir=workdir / "runs",
        signing_key=load_private_key(partner_key_path(workdir)), env=env,
    )
    status = wait_for_run(run_id, connection=local.connection, env=env, timeout=600, poll=1.0)
    assert status.succeeded, status

    client = MlflowClient(tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == spec.experiment.name]
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`flwr.run_id` = '{run_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["privacy.delta"] == str(spec.privacy.delta)
    metrics = run.data.metrics

    # Final federated AUC, pooled from the sites' noisy score histograms, in a band: better
    # than chance, not implausibly good under DP. Computed once, for the final model.
    assert 0.65 <= metrics["eval_auc"] <= 0.95, metrics["eval_auc"]
    history = client.get_metric_history(run.info.run_id, "eval_auc")
    assert sorted(m.step for m in history) == [2]

    # Each site's ledger holds the run's steps, its noisy training size and its final
    # evaluation, composed by PLD at the dataset budget's delta, the same number its officer
    # reads with `medfed node budget` and its final evaluation's reply reported.
    steps = DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * 2)
    count = count_event(epsilon=plan.count_epsilon)  # the noisy training size, released once per run
    scores = count_event(epsilon=plan.evaluation_epsilon)  # the final model's score histogram, once
    for site in sites:
        home = NodeHome.open(site.home)
        [row] = [r for r in budget_status(home) if r.dataset == spec.data.dataset]
        assert row.budget is not None
        assert metrics[f"{site.name}.epsilon"] == pytest.approx(row.spent, rel=1e-9)  # the evaluation's reply: all of it
        assert row.spent == pytest.approx(epsilon([steps, count, scores], delta=row.budget.delta, accountant="pld"), rel=1e-9)
        # The run completed: its reservation is used up, nothing is held any more.
        assert row.open_reservations == 0 and [s.state for s in row.reservations] == ["used up"]
    # The partner's planning estimate is a fresh Opacus PRV accountant given the same steps.
    expected = PRVAccountant()
    expected.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * 2)]
    assert plan.epsilon_per_site == pytest.approx(expected.get_epsilon(delta=plan.delta), rel=1e-5)
    assert plan.epsilon_charged_per_site == pytest.approx(epsilon([steps, count, scores], delta=plan.delta, accountant="pld"), rel=1e-9)
    # The coordinator composed the same plan while the nodes answered the query, and logged it.
    assert float(run.data.params["plan.epsilon_per_site"]) == pytest.approx(plan.epsilon_per_site, rel=1e-6)
    assert float(run.data.params["plan.epsilon_charged_per_site"]) == pytest.approx(plan.epsilon_charged_per_site, rel=1e-6)

    # The model is in MLflow and loads.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert sum(p.numel() for p in model.parameters()) == len(spec.data.features) + 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.json", "privacy_summary.json", "calibration.csv", "calibration.png"} <= artifacts

    # Promise 2, walked from the coordinator's side: every number of every reply it received
    # (query, train, evaluate) is a recorded DP release of the sending node or an accounting
    # value, and no exact count, loss or AUC is among them.
    [received] = [p for p in (workdir / "runs").glob(f"*/{RECEIVED_FILE}") if _flower_runs(p) == {run_id}]
    checked = assert_every_number_is_accounted(received, {site.name: site.home for site in sites})
    assert checked >= len(sites) * (1 + 2 * 4 + len(SCORE_METRICS))  # query, two rounds, the final histogram


def _flower_runs(path) -> set[int]:  # type: ignore[no-untyped-def]
    return {reply["flower_run"] for reply in read_received(path)}


def test_too_few_nodes_fails_before_tracking(cluster) -> None:
    from mlflow.tracking import MlflowClient

    local, _, workdir = cluster
    spec = _spec(min_nodes=3, node_wait_seconds=3)
    tracking_uri = f"sqlite:///{workdir / 'mlflow-few.db'}"
    env = flower_env(local.flwr_home)
    run_id = submit(
        spec, connection=local.connection, tracking_uri=tracking_uri, output_dir=workdir / "runs",
        signing_key=load_private_key(partner_key_path(workdir)), env=env,
    )
    status = wait_for_run(run_id, connection=local.connection, env=env, timeout=300, poll=1.0)
    assert status.status == "finished:failed"
    assert "federation.min_nodes = 3" in status.details
    runs = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]
    )
    assert runs == []  # no half-created MLflow run


def test_cli_submit_of_an_unknown_dataset_fails_with_each_sites_reason(cluster, tmp_path) -> None:
    local, sites, workdir = cluster
    text = EXAMPLE_SPEC.read_text().replace('dataset = "htn_cohort"', 'dataset = "no_such_cohort"')
    text = text.replace("rounds = 5", "rounds = 1")
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(text)
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "medfed"),
            "experiment", "submit", str(spec_path),
            "--superlink", local.connection,
            "--tracking-uri", f"sqlite:///{workdir / 'mlflow-bad.db'}",
            "--output-dir", str(workdir / "runs"),
            "--key", str(partner_key_path(workdir)),
            "--timeout", "300",
        ],
        capture_output=True, text=True, env=flower_env(local.flwr_home), timeout=400, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "charged ε" in done.stdout  # the cost is shown before anything runs
    for site in sites:
        # Outward, each site says which dataset it cannot use; why stays in its own audit log.
        assert f"{site.name}: refused (dataset 'no_such_cohort' cannot be used for this run on this node" in done.stderr
        [refusal] = [e.payload for e in NodeHome.open(site.home).audit_log().entries() if e.kind == "refusal"
                     and e.payload.get("dataset") == "no_such_cohort"]
        assert refusal["detail"].startswith("dataset 'no_such_cohort' is not registered")
