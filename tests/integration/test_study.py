"""A statistics study end to end: a real SuperLink and node services on loopback answer it under DP.

The partner's path (a signed submission started with `flwr run`), each node's own
admission, noise, suppression, ledger and audit log, and the coordinator's pooled report
in MLflow. Then every reply of the run, as the coordinator received it, is walked and
each number in it is matched to the release record its node's signed audit log holds.

A securely aggregated study (``[federation] secure_aggregation = true``) runs on three
more nodes through Flower's SecAgg+ workflow: the coordinator keeps no site's answer,
and its totals are exactly the sum of what each node's audit log says it sent masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.hospital_node.governance import approve, budget_status, ledger_disagreement
from clients.hospital_node.home import NodeHome
from experiments.study import StudySpec
from experiments.study_run import ANSWERS_FILE, SUMMARY_FILE, StudyOptions
from experiments.submit import follow, prepare_submission, start_run
from medfed.cluster import flower_env
from medfed.demo import DATASET, partner_key_path, prepare_alliance
from privacy.keys import load_private_key, load_public_key
from privacy.ledger import PrivacyLedger

from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SURVIVAL = Path(__file__).resolve().parents[2] / "experiments" / "examples" / "htn_onset_survival.toml"
PREVALENCE = Path(__file__).resolve().parents[2] / "experiments" / "examples" / "htn_prevalence.toml"


def _answer(tmp_path_factory: pytest.TempPathFactory, spec: StudySpec, *, hospitals: int, name: str):  # type: ignore[no-untyped-def]
    """`spec`, answered by `hospitals` real nodes; the sites, the report folder, the run id and its MLflow runs."""
    from mlflow.tracking import MlflowClient

    workdir = tmp_path_factory.mktemp(name)
    sites = prepare_alliance(workdir, n_hospitals=hospitals, seed=11)
    for site in sites:
        approve(NodeHome.open(site.home), spec.digest(), dataset=DATASET, by="test-officer", not_yet_requested=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with running_cluster(workdir, sites) as local:
        env = flower_env(local.flwr_home)
        record = prepare_submission(
            spec,
            signing_key=load_private_key(partner_key_path(workdir)),
            tracking_uri=tracking_uri,
            output_dir=workdir / "runs",
            study_options=StudyOptions(min_sites=hospitals, approval_wait_seconds=0).to_json(),
        )
        run_id = start_run(record, connection=local.connection, env=env)
        status, record = follow(record, run_id, connection=local.connection, env=env, poll=1.0, timeout=600, max_resumes=0)
    assert status.succeeded, status
    folder = Path(record.output_dir) / record.submission_id
    runs = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()],
        filter_string=f"tags.`flwr.run_id` = '{run_id}'",
    )
    return spec, sites, folder, str(run_id), runs


@pytest.fixture(scope="module")
def answered(tmp_path_factory: pytest.TempPathFactory):
    """The survival study, answered by two real nodes."""
    return _answer(tmp_path_factory, StudySpec.from_toml(SURVIVAL), hospitals=2, name="study")


@pytest.fixture(scope="module")
def securely_answered(tmp_path_factory: pytest.TempPathFactory):
    """The prevalence study with secure aggregation, answered by three real nodes through SecAgg+."""
    mapping = json.loads(StudySpec.from_toml(PREVALENCE).canonical_json())
    mapping["federation"] = {"secure_aggregation": True}
    return _answer(tmp_path_factory, StudySpec.from_mapping(mapping), hospitals=3, name="secure-study")


def test_the_study_is_pooled_tracked_and_charged_at_every_site(answered) -> None:
    spec, sites, folder, run_id, runs = answered
    [run] = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["medfed.spec_digest"] == spec.digest()
    assert any(key.startswith("htn_free/") for key in run.data.metrics)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert sorted(summary["sites"]) == [s.name for s in sites]
    for site in sites:
        home = NodeHome.open(site.home)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            charges = [c for c in ledger.charges(DATASET) if c.run_id == run_id]
            assert [c.event for c in sorted(charges, key=lambda c: c.release)] == spec.query.events()
        [row] = [r for r in budget_status(home) if r.dataset == DATASET]
        assert summary["sites"][site.name]["epsilon_spent_on_dataset"] == pytest.approx(row.spent, rel=1e-9)
        assert ledger_disagreement(home, home.audit_log().entries()) == []
        assert home.audit_log().verify(load_public_key(home.audit_public_key_path)).ok


def test_every_number_in_every_reply_is_a_release_the_nodes_audit_log_records(answered) -> None:
    spec, sites, folder, run_id, _ = answered
    replies = json.loads((folder / ANSWERS_FILE).read_text())["replies"]
    assert sorted((r["site"], r["message"]) for r in replies) == sorted(
        (s.name, m) for s in sites for m in ("query", "statistics")
    )
    for reply in replies:
        home = NodeHome.open(next(s.home for s in sites if s.name == reply["site"]))
        [record] = [
            e.payload for e in home.audit_log().entries()
            if e.kind == "release" and e.payload["run"] == run_id and e.payload["message"] == reply["message"]
        ]
        # Every metric that left is recorded with its value; an admission reply carries none.
        assert reply["metrics"] == record["metric_values"]
        if reply["message"] == "query":
            assert reply["metrics"] == {} and "answer" not in reply
            continue
        answer = reply["answer"]
        assert answer["suppressed"] == record["suppressed"]
        plan = spec.query.releases()
        assert len(answer["releases"]) == len(record["releases"]) == len(plan)
        for sent, recorded, planned in zip(answer["releases"], record["releases"], plan, strict=True):
            # Each value is the output of the recorded mechanism at the recorded scale: the
            # number that left is the noisy one the log holds, nothing else.
            assert sent["values"] == recorded["values"]
            assert (sent["mechanism"], sent["scale"], sent["sensitivity"]) == (
                recorded["mechanism"], recorded["scale"], recorded["sensitivity"]
            ) == (planned.mechanism, planned.scale, planned.sensitivity)
            assert recorded["epsilon"] == planned.epsilon
            assert all(v is None or float(v).is_integer() for v in sent["values"])  # noisy counts
        [event_record] = [record["charge"]]
        assert [e["mechanism"] for e in event_record["events"]] == [r.mechanism for r in plan]


def test_a_securely_aggregated_study_totals_exactly_what_the_nodes_sent_masked(securely_answered) -> None:
    spec, sites, folder, run_id, runs = securely_answered
    [run] = runs
    assert run.info.status == "FINISHED" and run.data.tags["medfed.secure_aggregation"] == "true"
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["secure_aggregation"] is True
    assert summary["secure_sum"]["contributing_sites"] == sorted(s.name for s in sites)
    kept = json.loads((folder / ANSWERS_FILE).read_text())
    # The coordinator holds no site's answer: only the epsilons each reply carried in plain, and the totals.
    assert all("answer" not in reply for reply in kept["replies"])
    records = []
    for site in sites:
        home = NodeHome.open(site.home)
        [record] = [
            e.payload for e in home.audit_log().entries()
            if e.kind == "release" and e.payload["run"] == run_id and e.payload["message"] == "statistics"
        ]
        assert record["secure_aggregation"]["masked"] is True and record["secure_aggregation"]["sample_num"] == 3
        [reply] = [r for r in kept["replies"] if r["site"] == site.name and r["message"] == "statistics"]
        assert reply["metrics"] == record["metric_values"]
        with PrivacyLedger.open(home.ledger_path) as ledger:
            charges = [c for c in ledger.charges(DATASET) if c.run_id == run_id]
            assert [c.event for c in sorted(charges, key=lambda c: c.release)] == spec.query.events()
        assert ledger_disagreement(home, home.audit_log().entries()) == []
        assert home.audit_log().verify(load_public_key(home.audit_public_key_path)).ok
        records.append(record)
    totals = kept["secure_sum"]
    assert totals["contributors"] == 3
    assert totals["sites"] == [sum(cell not in r["suppressed"] for r in records) for cell in range(spec.query.n_cells)]
    for index, (release, plan) in enumerate(zip(totals["releases"], spec.query.releases(), strict=True)):
        for at, total in enumerate(release["values"]):
            sent = [r["releases"][index]["values"][at] for r in records if r["releases"][index]["values"][at] is not None]
            if not sent:
                assert total is None
            elif plan.mechanism == "discrete-laplace":
                assert total == sum(sent)  # noisy counts, exactly
            else:
                assert total == pytest.approx(sum(sent), rel=1e-12, abs=1e-9)  # whole quanta of the sums
    # The pooled report, within its bounds: prevalences are proportions.
    prevalence = [m for k, m in run.data.metrics.items() if k.startswith("htn_prevalence/") and k.count("/") == 2]
    assert prevalence and all(0 <= value <= 1 for value in prevalence)
