"""The rehearsal is the deployment's apps on another engine: same charges, same audit records, at scale.

The same spec runs on the same generated OMOP hospitals twice: on real processes (a
SuperLink and a node service per hospital, ``running_cluster``) and on Flower's
Simulation Engine (``medfed simulate``'s path). Each node's ledger and audit log must
tell the same story: the same kinds of entries in the same order, for the same dataset,
the same messages and rounds, the same ε charged, and the same refusal for the hospital
whose cohort is below the minimum. Only what is random or names the run differs (DP
noise, times, ids, the signer). A 100-site alliance rehearsal then runs end to end.
"""

from __future__ import annotations

import tomllib
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from clients.hospital_node.governance import approve
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.data.sources import OmopSource
from experiments.progress import site_results
from experiments.spec import ExperimentSpec
from experiments.submit import follow, prepare_submission, start_run
from experiments.tracking import default_tracking_uri
from medfed.cluster import flower_env
from medfed.demo import BUDGET_DELTA, OFFICER, Site, govern_site, partner_key_path
from medfed.simulate import RehearsalSite, prepare_rehearsal, run_simulation, simulate
from privacy.keys import load_private_key
from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger

from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
OMOP_SPEC = ROOT / "experiments" / "examples" / "omop_hypertension.toml"


def _spec(rounds: int) -> ExperimentSpec:
    mapping = tomllib.loads(OMOP_SPEC.read_text())
    mapping["federation"]["rounds"] = rounds
    return ExperimentSpec.from_mapping(mapping, source=str(OMOP_SPEC))


def _story(home: Path) -> list[tuple[Any, ...]]:
    """A node's audit log without what is random or names the run: kinds, datasets, messages, rounds, ε, refusals."""
    out = []
    for entry in NodeHome.open(home).audit_log().entries():
        p = entry.payload
        charge = p.get("charge") or {}
        accounting = p.get("accounting") or {}
        out.append((
            entry.kind,
            p.get("dataset"),
            p.get("message"),
            p.get("round"),
            p.get("code"),
            p.get("reason") if entry.kind == "refusal" else None,
            round(charge["epsilon_spent"], 9) if "epsilon_spent" in charge else None,
            round(accounting["epsilon-run"], 9) if "epsilon-run" in accounting else None,
            tuple(sorted(p.get("metrics") or ())) if entry.kind == "release" else None,
            p.get("epsilon") if entry.kind == "budget" else None,
        ))
    return out


def _runs(home: Path) -> set[str]:
    return {str(e.payload["run"]) for e in NodeHome.open(home).audit_log().entries() if "run" in e.payload}


def _charges(home: Path, dataset: str) -> tuple[list[tuple[int, int, DPEvent]], float]:
    """The ledger's charges on `dataset` ((round, release, DP event), in order) and the ε they compose to."""
    with PrivacyLedger.open(NodeHome.open(home).ledger_path) as ledger:
        charges = [(c.round, c.release, c.event) for c in ledger.charges(dataset)]
        return charges, round(ledger.spent(dataset, delta=BUDGET_DELTA), 9)


def _deployment_homes(workdir: Path, rehearsal: list[RehearsalSite], spec: ExperimentSpec) -> list[Site]:
    """Real node homes over the rehearsal's generated hospitals: the demo partner, a real approval."""
    dataset = spec.data.dataset
    sites = []
    partner = partner_key_path(workdir).with_suffix(".pub")
    for virtual in rehearsal:
        folder = NodeHome.open(virtual.home).dataset(dataset).omop
        home = NodeHome.create(workdir / "homes" / virtual.name, name=virtual.name)
        home.register_dataset(
            DatasetEntry(name=dataset, path=home.path / "omop-scratch" / dataset, kind="omop", omop=OmopSource("folder", folder.location))
        )
        govern_site(home, dataset, partner_public_key=partner)
        approve(home, spec.digest(), dataset=dataset, by=OFFICER, not_yet_requested=True)
        sites.append(Site(virtual.name, home.path))
    return sites


def test_the_simulation_charges_and_records_what_the_deployment_does(tmp_path: Path) -> None:
    spec = _spec(rounds=2)
    quiet = Console(file=StringIO(), width=200)
    # Small hospitals: hospital_2 (58 patients) is below the policy's minimum cohort of 100.
    rehearsal = prepare_rehearsal(tmp_path / "sim", spec, sites=3, profile="default", patients_scale=0.3)
    assert [s.n_patients for s in rehearsal] == [861, 58, 251]
    deployment = _deployment_homes(tmp_path / "dep", rehearsal, spec)

    with running_cluster(tmp_path / "dep", deployment) as cluster:
        env = flower_env(cluster.flwr_home)
        record = prepare_submission(spec, signing_key=load_private_key(partner_key_path(tmp_path / "dep")),
                                    tracking_uri=default_tracking_uri(tmp_path / "dep"), output_dir=tmp_path / "dep" / "runs")
        run_id = start_run(record, connection=cluster.connection, env=env)
        status, _ = follow(record, run_id, connection=cluster.connection, env=env, poll=1.0, max_resumes=0)
        assert status.succeeded, status.details
    result = run_simulation(tmp_path / "sim", spec, rehearsal, tracking_uri=default_tracking_uri(tmp_path / "sim"), console=quiet)
    assert result.mlflow_run_id is not None

    for real, virtual in zip(deployment, rehearsal, strict=True):
        assert _story(real.home) == _story(virtual.home), real.name
        assert _charges(real.home, spec.data.dataset) == _charges(virtual.home, spec.data.dataset), real.name
        assert len(_runs(real.home)) == len(_runs(virtual.home)) == 1  # one run each, every entry of it
    kinds = [entry[0] for entry in _story(rehearsal[1].home)]
    assert kinds[-1] == "refusal" and "release" not in kinds  # the small hospital refused, on both engines
    releases = [entry for entry in _story(rehearsal[0].home) if entry[0] == "release"]
    assert [(r[2], r[3]) for r in releases] == [("query", 0), ("train", 1), ("train", 2), ("evaluate", 2)]
    # The coordinator saw the same: two sites, each charged what its ledger says.
    reported = site_results(result.tracking_uri, result.mlflow_run_id)
    assert sorted(reported) == ["hospital_1", "hospital_3"]
    assert reported["hospital_1"].epsilon_run == pytest.approx(releases[-1][7], rel=1e-6)


def test_a_100_site_alliance_rehearsal_runs_with_every_node_governed(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(OMOP_SPEC.read_text().replace("rounds = 5", "rounds = 1"))
    out = StringIO()
    result = simulate(tmp_path / "rehearsal", spec_path, sites=100, patients_scale=0.1, tier2_scale=1.0,
                      console=Console(file=out, width=160))
    text = out.getvalue()
    assert "round 1/1: ε charged by this run" in text
    assert "Validation AUC at ε" in text and "remaining budget on 'omop' per site" in text
    homes = sorted((tmp_path / "rehearsal" / "homes").iterdir())
    trained = [h for h in homes if h.is_dir() and any(e.kind == "release" for e in NodeHome.open(h).audit_log().entries())]
    refused = [h for h in homes if h.is_dir() and any(e.kind == "refusal" for e in NodeHome.open(h).audit_log().entries())]
    assert len(trained) + len(refused) == 100 and 10 <= len(refused) <= 90
    assert len(site_results(result.tracking_uri, result.mlflow_run_id)) == len(trained)
    assert all(NodeHome.open(h).rehearsal for h in trained + refused)
