"""Governance on real processes: the nodes decide, whatever the coordinator submits.

One secure cluster of three hospitals. In order: a hostile submission (unsigned, then
signed by a key no officer trusts) trains nowhere; a signed but unapproved spec stops
with "awaiting approval" at every site; the officers approve it with `medfed node
approve`, the same spec runs, and `medfed node budget` shows the spend; a second spec
that would exceed one hospital's budget is refused there while the other two proceed.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.hospital_node.governance import budget_status, governance_state, pending_requests, set_budget
from clients.hospital_node.home import NodeHome
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from experiments.submit import submit, wait_for_run
from medfed.cluster import flower_env
from medfed.demo import DATASET, EXAMPLE_SPEC, OFFICER, partner_key_path, prepare_alliance
from privacy.keys import load_private_key
from privacy.ledger import PrivacyLedger

from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDFED = str(Path(sys.executable).parent / "medfed")


def _spec(rounds: int, name: str) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["experiment"]["name"] = name
    mapping["federation"].update({"rounds": rounds, "min_nodes": 2, "approval_wait_seconds": 1.0})
    return ExperimentSpec.from_mapping(mapping, source="test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("governance")
    sites = prepare_alliance(workdir, n_hospitals=3, seed=13)
    with running_cluster(workdir, sites) as local:
        yield local, sites, workdir


def _run(local, workdir: Path, spec: ExperimentSpec, key: Ed25519PrivateKey | None):  # type: ignore[no-untyped-def]
    env = flower_env(local.flwr_home)
    run_id = submit(
        spec, connection=local.connection, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        output_dir=workdir / "runs", signing_key=key, env=env,
    )
    return run_id, wait_for_run(run_id, connection=local.connection, env=env, timeout=600, poll=1.0)


def _charges(sites) -> dict[str, int]:  # type: ignore[no-untyped-def]
    out = {}
    for site in sites:
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            out[site.name] = len(ledger.charges(DATASET))
    return out


def _node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEDFED, "node", *args], capture_output=True, text=True, timeout=120, check=False)


def test_hostile_submissions_train_nowhere(cluster) -> None:
    local, sites, workdir = cluster
    spec = _spec(1, "hostile")
    _, unsigned = _run(local, workdir, spec, None)
    assert unsigned.status == "finished:failed"
    for site in sites:
        assert f"{site.name}: refused (the experiment spec is not signed" in unsigned.details
    _, stranger = _run(local, workdir, spec, Ed25519PrivateKey.generate())
    assert stranger.status == "finished:failed"
    for site in sites:
        assert f"{site.name}: refused (signer SHA256:" in stranger.details
        assert "is not a trusted partner of this node" in stranger.details
    assert _charges(sites) == {s.name: 0 for s in sites}
    for site in sites:
        home = NodeHome.open(site.home)
        refusals = [e for e in home.audit_log().entries() if e.kind == "refusal"]
        assert len(refusals) == 2  # each recorded by the node that refused it
        assert pending_requests(home) == []  # nothing reached the officer


def test_approval_then_run_then_a_budget_that_one_site_cannot_afford(cluster) -> None:
    local, sites, workdir = cluster
    key = load_private_key(partner_key_path(workdir))
    first = _spec(1, "governed-a")

    # Signed, not approved: every site records a request and the run stops.
    _, waiting = _run(local, workdir, first, key)
    assert waiting.status == "finished:failed"
    for site in sites:
        assert f"{site.name}: awaiting approval (awaiting approval by this node's data-governance officer (spec {first.digest()[:12]}" in waiting.details
        [request] = pending_requests(NodeHome.open(site.home))
        assert request.request.spec_digest == first.digest()

    # Each officer reviews and approves on the node, by a prefix of the hash.
    for site in sites:
        shown = _node("requests", "--home", str(site.home))
        assert shown.returncode == 0 and first.digest() in shown.stdout, shown.stderr
        done = _node("approve", first.digest()[:12], "--dataset", DATASET, "--home", str(site.home), "--by", OFFICER)
        assert done.returncode == 0, done.stderr
    _, ran = _run(local, workdir, first, key)
    assert ran.succeeded, ran
    assert _charges(sites) == {s.name: 3 for s in sites}  # the noisy training size, one round, the final evaluation
    budget = _node("budget", "--home", str(sites[0].home))
    assert budget.returncode == 0, budget.stderr
    [row] = budget_status(NodeHome.open(sites[0].home))
    assert row.spent == pytest.approx(plan_privacy(first).epsilon_charged_per_site, rel=0.05)
    assert f"{row.spent:.3f}" in budget.stdout and f"{row.remaining:.3f}" in budget.stdout

    # hospital_3's officer leaves room for less than a second experiment; the others proceed.
    second = _spec(2, "governed-b")
    poor = NodeHome.open(sites[2].home)
    set_budget(poor, DATASET, epsilon_=row.spent * 1.2, delta=1e-5, by=OFFICER)
    for site in sites:
        # Approved before its request arrives: the officer says so explicitly.
        refused = _node("approve", second.digest(), "--dataset", DATASET, "--home", str(site.home))
        assert refused.returncode == 2 and f"nobody has requested spec {second.digest()}" in refused.stderr
        approved = _node("approve", second.digest(), "--dataset", DATASET, "--not-yet-requested", "--home", str(site.home))
        assert approved.returncode == 0, approved.stderr
    _, partial = _run(local, workdir, second, key)
    assert partial.succeeded, partial
    assert _charges(sites) == {sites[0].name: 7, sites[1].name: 7, sites[2].name: 3}  # + size, two rounds, evaluation
    reasons = [e.payload["reason"] for e in poor.audit_log().entries() if e.kind == "refusal"]
    assert any("over its lifetime budget of" in reason for reason in reasons)
    assert governance_state(poor).budgets[DATASET].epsilon == pytest.approx(row.spent * 1.2)


def test_two_runs_racing_for_a_budget_that_fits_one_never_leave_a_site_charged_for_a_run_it_cannot_finish(cluster) -> None:
    from privacy.accountant import epsilon
    from privacy.events import DPEvent

    local, sites, workdir = cluster
    key = load_private_key(partner_key_path(workdir))
    spec = _spec(2, "racing")
    plan = plan_privacy(spec)
    run = DPEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round).times(plan.rounds)
    # Each officer leaves room for one run of this spec beside what the dataset has spent, not two.
    for site in sites:
        home = NodeHome.open(site.home)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            spent = ledger.events(DATASET)
        one, two = (epsilon([*spent, *[run] * n], delta=1e-5, accountant="pld") for n in (1, 2))
        set_budget(home, DATASET, epsilon_=(one + two) / 2, delta=1e-5, by=OFFICER)
        approved = _node("approve", spec.digest(), "--dataset", DATASET, "--runs", "2", "--not-yet-requested", "--home", str(site.home))
        assert approved.returncode == 0, approved.stderr
    before = _charges(sites)
    env = flower_env(local.flwr_home)
    runs = [
        submit(spec, connection=local.connection, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
               output_dir=workdir / "runs", signing_key=key, env=env)
        for _ in range(2)
    ]
    statuses = [wait_for_run(run_id, connection=local.connection, env=env, timeout=600, poll=1.0) for run_id in runs]
    assert sum(status.succeeded for status in statuses) <= 1, statuses
    for site in sites:
        home = NodeHome.open(site.home)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            new = ledger.charges(DATASET)[before[site.name]:]
            [row] = [r for r in budget_status(home) if r.dataset == DATASET]
        charged = {c.run_id for c in new}
        # A site trains one of the two runs, all of its rounds, or none: never a round of a run it then refuses.
        assert len(charged) <= 1, (site.name, charged)
        rounds = [c for c in new if c.round > 0]  # round 0: a run's noisy training size, released with its query
        assert len(rounds) in (0, plan.rounds), (site.name, [(c.run_id, c.round) for c in new])
        assert row.remaining is not None and row.held <= row.budget.epsilon  # type: ignore[union-attr]
        refused = [e.payload for e in home.audit_log().entries() if e.kind == "refusal" and e.payload.get("run") in {str(r) for r in runs}]
        assert all("spent or reserved" in p["reason"] for p in refused if p.get("message") == "query"), refused
        assert not any(p.get("run") in charged and p.get("message") == "train" for p in refused), refused
        # Whoever won here, nothing of either run is still held: the loser gave its reservation back.
        with PrivacyLedger.open(home.ledger_path) as ledger:
            now, hold = ledger.now(), home.policy().reservation_hold
            states = [r.state(hold=hold, now=now) for r in ledger.run_reservations(DATASET)]
        assert "live" not in states, (site.name, states)
