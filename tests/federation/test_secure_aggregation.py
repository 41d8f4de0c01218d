"""SecAgg+ rounds against the real ClientApp (mods included), in one process.

Each node is the hospital node's own `ClientApp` with its own persistent `Context`
(as a SuperNode keeps one per run), so Flower's `secaggplus_mod` and our
`secure_aggregation_mod` run for real; `InProcessGrid` carries the messages. Each node
home has a ``debug-kept-updates`` folder, so the node keeps every update it releases:
the coordinator's aggregate is compared with plain FedAvg of exactly those updates,
whose digests the nodes' audit logs recorded before masking.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from clients.hospital_node.client_app import app as client_app
from clients.hospital_node.home import NodeHome
from clients.hospital_node.rounds import KEPT_UPDATES_DIR, update_digest
from experiments.spec import ExperimentSpec
from experiments.tracking import InMemoryTracker
from federation.experiment import run_experiment
from federation.inprocess_grid import InProcessGrid
from federation.secure_aggregation import SecureRound
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, prepare_alliance, signed_spec
from privacy.ledger import PrivacyLedger

from .dropouts import COLLECT_STAGE, drops_out_at

SECAGG_TOL = 1e-4  # SecAgg+ quantises to 2**22 levels over [-8, 8]: errors ~1e-5


def _spec(**federation: object) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"].update(
        {"rounds": 2, "min_nodes": 2, "node_wait_seconds": 0.1, "approval_wait_seconds": 0.1, "secure_aggregation": True}
    )
    mapping["federation"].update(federation)
    return ExperimentSpec.from_mapping(mapping, source="test")


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    sites = prepare_alliance(tmp_path_factory.mktemp("secagg"), n_hospitals=3, seed=11)
    for site in sites:
        (site.home / KEPT_UPDATES_DIR).mkdir()
    return sites


def _node(home: Path, node_id: int, run_id: int):  # type: ignore[no-untyped-def]
    """The ClientApp as a SuperNode runs it: one Context per run, an exception becomes an error reply."""
    context = Context(run_id=run_id, node_id=node_id, node_config={"home": str(home)}, state=RecordDict(), run_config={})

    def handle(message: Message) -> Message:
        try:
            return client_app(message, context)
        except Exception as err:  # noqa: BLE001 - as Flower's ClientApp runner reports it
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=message)

    return handle


def _run(sites, spec: ExperimentSpec, run_id: int, tmp_path: Path, handlers=None):  # type: ignore[no-untyped-def]
    approve_everywhere(sites, spec)
    grid = InProcessGrid(handlers or {10 + i: _node(s.home, 10 + i, run_id) for i, s in enumerate(sites)}, run_id=run_id)
    tracker = InMemoryTracker()
    result = run_experiment(
        grid, spec, signed=signed_spec(spec, sites[0].home.parent.parent), tracker=tracker, output_dir=tmp_path
    )
    return result, tracker, grid


def _kept(site, run_id: int, server_round: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    with np.load(site.home / KEPT_UPDATES_DIR / f"run{run_id}-round{server_round}.npz") as data:
        return {name: data[name] for name in data.files}


def _release(site, run_id: int, server_round: int) -> dict:  # type: ignore[no-untyped-def, type-arg]
    [entry] = [
        e for e in NodeHome.open(site.home).audit_log().entries()
        if e.kind == "release" and e.payload["message"] == "train"
        and e.payload["run"] == str(run_id) and e.payload["round"] == server_round
    ]
    return entry.payload


def _fedavg(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {name: sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights)) / total for name in updates[0]}


def test_a_secure_round_aggregates_to_plain_fedavg_of_the_released_updates(alliance, tmp_path: Path) -> None:
    import torch
    from flwr.app import ArrayRecord

    spec = _spec()
    result, tracker, _ = _run(alliance, spec, 501, tmp_path)
    assert tracker.status == "FINISHED"
    assert {o.status for o in result.sites.values()} == {"accepted"}
    updates, weights = [], []
    for site in alliance:
        release = _release(site, 501, 2)
        update = _kept(site, 501, 2)
        # What the node kept is what its audit log says it released (masked).
        assert update_digest(ArrayRecord({k: torch.from_numpy(v) for k, v in update.items()})) == release["sha256"]
        assert release["secure_aggregation"] == {
            "protocol": "SecAgg+", "masked": True, "clipping_range": 8.0, "max_weight": release["secure_aggregation"]["max_weight"]
        }
        [outcome] = [o for o in result.sites.values() if o.site == site.name]
        updates.append(update)
        weights.append(outcome.rounds[2]["num-examples"])
    expected = _fedavg(updates, weights)
    aggregate = result.arrays.to_numpy_ndarrays()
    for (name, value), got in zip(expected.items(), aggregate, strict=True):
        np.testing.assert_allclose(got, value, atol=SECAGG_TOL, err_msg=name)
    # Unequal cohorts: a plain mean would differ from the weighted one by more than the tolerance.
    assert len(set(weights)) > 1
    # The final evaluation still reached the coordinator and MLflow (noisy histograms in plain,
    # beside the masked update), and each node was charged twice, plus its once-per-run releases.
    assert sorted(tracker.metrics["eval_auc"]) == [2]
    for site in alliance:
        assert sorted(tracker.metrics[f"{site.name}.epsilon"]) == [1, 2]
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            assert [c.round for c in ledger.charges(DATASET) if c.run_id == "501"] == [0, 1, 2, 0]  # 0: size, evaluation
    assert result.privacy_summary()["secure_aggregation"] is True
    # `medfed node egress` tells the officer that the updates left masked.
    from typer.testing import CliRunner

    from clients.hospital_node.cli import app as node_cli

    shown = CliRunner().invoke(node_cli, ["egress", "--home", str(alliance[0].home), "--run", "501"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("SecAgg+ masked") == 2


def test_a_node_that_drops_out_mid_round_is_recovered_and_the_run_finishes(alliance, tmp_path: Path) -> None:
    spec = _spec(rounds=1)
    run_id = 502
    handlers = {10 + i: _node(s.home, 10 + i, run_id) for i, s in enumerate(alliance)}
    holder = drops_out_at(handlers, 12, COLLECT_STAGE)  # before it sends its masked update
    approve_everywhere(alliance, spec)
    grid = InProcessGrid(handlers, run_id=run_id)
    holder["grid"] = grid
    tracker = InMemoryTracker()
    result = run_experiment(grid, spec, signed=signed_spec(spec, alliance[0].home.parent.parent), tracker=tracker, output_dir=tmp_path)
    assert tracker.status == "FINISHED"
    statuses = {o.site: o.status for o in result.sites.values()}
    assert statuses == {"hospital_1": "accepted", "hospital_2": "accepted", "hospital_3": "dropped"}
    survivors = alliance[:2]
    updates = [_kept(s, run_id, 1) for s in survivors]
    weights = [next(o for o in result.sites.values() if o.site == s.name).rounds[1]["num-examples"] for s in survivors]
    for (name, value), got in zip(_fedavg(updates, weights).items(), result.arrays.to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(got, value, atol=SECAGG_TOL, err_msg=name)
    assert not (alliance[2].home / KEPT_UPDATES_DIR / f"run{run_id}-round1.npz").exists()


def test_a_refusal_at_the_training_stage_reaches_the_coordinator_with_its_reason(alliance, tmp_path: Path) -> None:
    from clients.hospital_node.governance import revoke

    spec = _spec(rounds=1, min_nodes=2)
    run_id = 503
    handlers = {10 + i: _node(s.home, 10 + i, run_id) for i, s in enumerate(alliance)}
    revoking = handlers[11]

    def officer_revokes_after_the_query(message: Message) -> Message:
        if message.metadata.message_type == "train" and "fitins.config" in message.content.config_records:
            revoke(NodeHome.open(alliance[1].home), spec.digest(), dataset=DATASET, reason="ethics review", by="officer")
        return revoking(message)

    handlers[11] = officer_revokes_after_the_query
    result, tracker, _ = _run(alliance, spec, run_id, tmp_path, handlers)
    assert tracker.status == "FINISHED"
    [refused] = [o for o in result.sites.values() if o.site == "hospital_2"]
    assert (refused.status, refused.reason) == ("refused", "approval revoked by this node's officer: ethics review")
    with PrivacyLedger.open(NodeHome.open(alliance[1].home).ledger_path) as ledger:
        # Only what left with its query: the noisy training size (round 0); no round was charged.
        assert [c.round for c in ledger.charges(DATASET) if c.run_id == str(run_id)] == [0]


def test_the_default_threshold_is_a_majority_of_the_shares() -> None:
    assert SecureRound(None, None, 100.0, 1.0).threshold_for(3) == 2
    assert SecureRound(None, None, 100.0, 1.0).threshold_for(2) == 2
    assert SecureRound(None, None, 100.0, 1.0).threshold_for(10) == 6
    assert SecureRound(5, None, 100.0, 1.0).threshold_for(10) == 3
    assert SecureRound(5, 4, 100.0, 1.0).threshold_for(10) == 4
