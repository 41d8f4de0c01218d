"""Secure aggregation on real processes: a SuperLink and three SuperNodes with TLS and node auth.

Each node home has a ``debug-kept-updates`` folder, so every node keeps the updates it
releases (and says so in its log); the digest of each kept update is the one its audit
log recorded before SecAgg+ masked it. The coordinator never sees those updates: the
tests compare the model it saved with plain FedAvg of them.

The tests run in file order on one cluster: the second one kills a node.
"""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.hospital_node.home import NodeHome
from clients.hospital_node.rounds import KEPT_UPDATES_DIR, update_digest
from experiments.spec import ExperimentSpec
from experiments.submit import prepare_submission, start_run, wait_for_run
from federation.received import RECEIVED_FILE
from medfed.cluster import LocalCluster, flower_env
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, partner_key_path, prepare_alliance
from privacy.keys import load_private_key

from .accounted import assert_every_number_is_accounted
from .conftest import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECAGG_TOL = 1e-4  # SecAgg+ quantises weighted parameters to 2**22 levels over [-8, 8]
_TRAIN_RECEIVED = re.compile(r"Receiving: train message")


def _spec(name: str, **federation: object) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["experiment"]["name"] = name
    mapping["federation"].update({"min_nodes": 2, "secure_aggregation": True, **federation})
    return ExperimentSpec.from_mapping(mapping, source="test")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("secagg")
    sites = prepare_alliance(workdir, n_hospitals=3, seed=17)
    for site in sites:
        (site.home / KEPT_UPDATES_DIR).mkdir()
    with running_cluster(workdir, sites) as local:
        yield local, sites, workdir


def _submit(local: LocalCluster, workdir: Path, spec: ExperimentSpec) -> tuple[int, Path]:
    """Start a signed submission of `spec`; its Flower run id and the coordinator's folder for it."""
    record = prepare_submission(
        spec, signing_key=load_private_key(partner_key_path(workdir)), tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        output_dir=workdir / "runs",
    )
    return start_run(record, connection=local.connection, env=flower_env(local.flwr_home)), workdir / "runs" / record.submission_id


def _kept(site, run_id: int, server_round: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """A node's kept update, after checking it against the digest its audit log recorded."""
    from flwr.app import ArrayRecord

    with np.load(site.home / KEPT_UPDATES_DIR / f"run{run_id}-round{server_round}.npz") as data:
        update = {name: data[name] for name in data.files}
    [release] = [
        e.payload for e in NodeHome.open(site.home).audit_log().entries()
        if e.kind == "release" and e.payload["message"] == "train"
        and e.payload["run"] == str(run_id) and e.payload["round"] == server_round
    ]
    assert release["secure_aggregation"]["masked"] is True
    assert update_digest(ArrayRecord({k: torch.from_numpy(v) for k, v in update.items()})) == release["sha256"]
    return update


def _released_size(site, run_id: int) -> float:  # type: ignore[no-untyped-def]
    """The training size the node released for the run (noisy, clamped at 1): FedAvg's weight, as its audit log says."""
    outputs = [
        e.payload["dp_releases"]["num-examples"]["output"] for e in NodeHome.open(site.home).audit_log().entries()
        if e.kind == "release" and e.payload["run"] == str(run_id) and "num-examples" in e.payload.get("dp_releases", {})
    ]
    [[noisy]] = {tuple(o) for o in outputs}  # one release, reused by every reply of the run
    return float(max(1, noisy))


def _assert_fedavg(saved: Path, updates: list[dict[str, np.ndarray]], weights: list[int]) -> None:
    model = torch.load(saved, weights_only=True)
    total = sum(weights)
    for name, tensor in model.items():
        expected = sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights)) / total
        np.testing.assert_allclose(tensor.numpy(), expected, atol=SECAGG_TOL, err_msg=name)


def test_the_coordinator_saves_plain_fedavg_of_the_masked_updates(cluster) -> None:
    local, sites, workdir = cluster
    spec = _spec("secagg-equals-fedavg", rounds=2)
    approve_everywhere(sites, spec)
    run_id, output = _submit(local, workdir, spec)
    status = wait_for_run(run_id, connection=local.connection, env=flower_env(local.flwr_home), timeout=900, poll=1.0)
    assert status.succeeded, status
    weights = [_released_size(site, run_id) for site in sites]
    assert len(set(weights)) > 1  # unequal cohorts: weighting matters
    _assert_fedavg(output / "final_model.pt", [_kept(s, run_id, 2) for s in sites], weights)
    # Every number the coordinator received, masked vectors aside, is an accounted release.
    assert assert_every_number_is_accounted(output / RECEIVED_FILE, {site.name: site.home for site in sites}) > 0
    for site in sites:  # the node warned that it keeps updates
        assert "debug: keeping the update released in run" in local.log_path(f"supernode-{site.name}").read_text()


def _train_messages(local: LocalCluster, site: str) -> int:
    return len(_TRAIN_RECEIVED.findall(local.log_path(f"supernode-{site}").read_text(errors="replace")))


def test_a_node_killed_mid_round_is_recovered_and_the_run_finishes(cluster) -> None:
    import json

    local, sites, workdir = cluster
    # The SuperLink declares a silent node unavailable after two missed heartbeats (~60 s).
    spec = _spec("secagg-dropout", rounds=1, round_timeout_seconds=240.0)
    approve_everywhere(sites, spec)
    victim = sites[2].name
    before = _train_messages(local, victim)
    run_id, output = _submit(local, workdir, spec)
    # Kill the victim when the collect stage (its third train message) reaches it: it has
    # shared its keys, the others will mask against it, and its update never leaves.
    deadline = time.monotonic() + 300
    while _train_messages(local, victim) < before + 3:
        assert time.monotonic() < deadline, f"{victim} never received the collect stage"
        time.sleep(0.05)
    local.kill(f"supernode-{victim}")

    status = wait_for_run(run_id, connection=local.connection, env=flower_env(local.flwr_home), timeout=900, poll=1.0)
    assert status.succeeded, status
    summary = json.loads((output / "privacy_summary.json").read_text())
    assert {name: s["status"] for name, s in summary["sites"].items()} == {
        sites[0].name: "accepted", sites[1].name: "accepted", victim: "dropped"
    }
    survivors = sites[:2]
    _assert_fedavg(
        output / "final_model.pt",
        [_kept(s, run_id, 1) for s in survivors],
        [_released_size(s, run_id) for s in survivors],
    )
    assert not (sites[2].home / KEPT_UPDATES_DIR / f"run{run_id}-round1.npz").exists()
