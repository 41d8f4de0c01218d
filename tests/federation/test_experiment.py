"""The coordinator's experiment loop against real node logic, in one process.

`InProcessGrid` hands each message to the hospital node's own handler
(`clients.hospital_node.rounds.answer`) for a node home with a synthetic cohort, so
this exercises query, training with DP-SGD, ledger charges and evaluation without
starting Flower processes. tests/integration runs the same over real processes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.app import Message

from clients.hospital_node.governance import governance_state
from clients.hospital_node.home import NodeHome
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from experiments.tracking import InMemoryTracker
from federation.errors import FederationError, NotEnoughNodesError
from federation.experiment import run_experiment
from federation.inprocess_grid import InProcessGrid
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, prepare_alliance, signed_spec
from models.weights import load_weights
from privacy.accountant import epsilon
from privacy.ledger import PrivacyLedger


def _spec(**sections: dict[str, object]) -> ExperimentSpec:
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"].update({"rounds": 2, "min_nodes": 2, "node_wait_seconds": 0.1, "approval_wait_seconds": 0.1})
    for section, values in sections.items():
        mapping[section].update(values)
    return ExperimentSpec.from_mapping(mapping, source="test")


def _run(sites, spec: ExperimentSpec, run_id: int, tracker: InMemoryTracker, output_dir: Path, *, approved: bool = True):
    """Run `spec` signed by the demo partner, after each site's officer approved it (unless not)."""
    if approved:
        approve_everywhere(sites, spec)
    workdir = sites[0].home.parent.parent
    return run_experiment(_grid(sites, run_id), spec, signed=signed_spec(spec, workdir), tracker=tracker, output_dir=output_dir)


def _handler(home: Path):
    """The node's installed ClientApp, dispatching as Flower does (``query.release`` included)."""
    from flwr.app import Context, RecordDict

    from clients.hospital_node.client_app import app

    def handle(message: Message) -> Message:
        context = Context(run_id=message.metadata.run_id, node_id=message.metadata.dst_node_id, node_config={"home": str(home)},
                          state=RecordDict(), run_config={})
        return app(message=message, context=context)

    return handle


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    from clients.hospital_node.governance import set_budget

    workdir = tmp_path_factory.mktemp("alliance")
    sites = prepare_alliance(workdir, n_hospitals=3, seed=5)
    for site in sites:  # room for every run of this module, each with its once-per-run releases
        set_budget(NodeHome.open(site.home), DATASET, epsilon_=40.0, delta=1e-5, by="test-officer")
    return sites


def _grid(sites, run_id: int) -> InProcessGrid:
    return InProcessGrid({i + 10: _handler(site.home) for i, site in enumerate(sites)}, run_id=run_id)


def test_rounds_train_charge_and_track(alliance, tmp_path: Path) -> None:
    spec = _spec(privacy={"evaluation_epsilon": 2.0})  # the largest: a released AUC close to the exact one
    tracker = InMemoryTracker()
    result = _run(alliance, spec, 101, tracker, tmp_path)

    assert tracker.status == "FINISHED"
    assert {o.status for o in result.sites.values()} == {"accepted"}
    # The final model only (evaluate_every_round is off): its pooled AUC over every site's
    # validation patients, from the sites' noisy score histograms, and each site's own.
    assert sorted(tracker.metrics["eval_auc"]) == [2]
    assert 0.6 <= tracker.metrics["eval_auc"][2] <= 0.95
    assert all(0.0 <= tracker.metrics[f"{site.name}.eval_auc"][2] <= 1.0 for site in alliance)
    assert "train_loss" not in tracker.metrics and not any(k.startswith("eval_scores") for k in tracker.metrics)
    assert sorted(tracker.metrics["hospital_2.epsilon"]) == [1, 2]
    assert (tmp_path / "final_model.pt").is_file()
    # The weights a node scores with: safetensors bound to the approved spec, logged beside it.
    import torch

    tensors, metadata = load_weights(tmp_path / "final_model.safetensors")
    assert metadata.spec_digest == spec.digest() and metadata.model_kind == spec.model.kind
    assert metadata.features == tuple(spec.data.features or ())
    assert metadata.spec_json == spec.canonical_json()  # so a node that pre-approved the digest can read its spec
    assert set(tensors) == set(torch.load(tmp_path / "final_model.pt", weights_only=True))
    assert "final_model.safetensors" in tracker.files
    assert {"privacy_summary.json", "spec.json"} <= set(tracker.artifacts)
    assert {"calibration.csv", "calibration.png"} <= set(tracker.files)
    assert tracker.files["calibration.png"].startswith(b"\x89PNG")
    calibration = (tmp_path / "calibration.csv").read_text().splitlines()
    assert calibration[0] == "score_low,score_high,patients,predicted_risk,observed_risk" and len(calibration) > 3

    plan = plan_privacy(spec)
    for site in alliance:
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            charges = [c for c in ledger.charges(DATASET) if c.run_id == "101"]
            # Round 0: the once-per-run releases, the noisy training size, then the final evaluation.
            assert [(c.round, c.release) for c in charges] == [(0, 1), (1, 0), (2, 0), (0, 2)]
            spent = ledger.spent(DATASET, delta=plan.delta)
            # What the last round reported: everything but the final evaluation, charged after it ...
            before_evaluation = epsilon([c.event for c in ledger.charges(DATASET)][:-1], delta=plan.delta, accountant="pld")
        # ... and the evaluation's reply, logged last at the same step, everything the run charged.
        assert tracker.metrics[f"{site.name}.epsilon"][2] == pytest.approx(spent) and before_evaluation < spent


def test_a_node_refusing_the_query_is_left_out(alliance, tmp_path: Path) -> None:
    spec = _spec(data={"features": ["age", "bmi", "not_a_column"], "scaling": {}})
    tracker = InMemoryTracker()
    with pytest.raises(NotEnoughNodesError, match="0 of 3 hospital node"):
        _run(alliance, spec, 102, tracker, tmp_path)
    assert tracker.status == "NONE"  # nothing tracked for a run that never started


def test_fewer_nodes_than_the_minimum_stops_before_tracking(alliance, tmp_path: Path) -> None:
    spec = _spec(federation={"min_nodes": 4})
    tracker = InMemoryTracker()
    with pytest.raises(NotEnoughNodesError, match="federation.min_nodes = 4"):
        _run(alliance, spec, 103, tracker, tmp_path)
    assert tracker.status == "NONE"


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(alliance, tmp_path: Path, strategy: str) -> None:
    extra = {"proximal_mu": 0.1} if strategy == "fedprox" else {"server_learning_rate": 0.3}
    tracker = InMemoryTracker()
    # Evaluated every round: the pooled AUC of the initial model is tracked at step 0. At the
    # largest evaluation epsilon (2) the released AUC of these validation patients stayed
    # within 0.745-0.775 over 14 runs; at the default 0.5 it spread over 0.67-0.95.
    spec = _spec(federation={"strategy": strategy, "rounds": 2, **extra},
                 privacy={"evaluate_every_round": True, "evaluation_epsilon": 2.0})
    result = _run(alliance, spec, 104 if strategy == "fedprox" else 105, tracker, tmp_path)
    assert tracker.status == "FINISHED"
    assert sorted(tracker.metrics["eval_auc"]) == [0, 1, 2]
    initial = tracker.metrics["eval_auc"][0]
    assert initial + 0.05 <= result.final["eval_auc"] <= 0.9


# ---------------------------------------------------------------- the imaging task


@pytest.fixture(scope="module")
def imaging_alliance(tmp_path_factory: pytest.TempPathFactory):
    from medfed.demo_imaging import prepare_imaging_alliance
    from tests.clients.hospital_node.conftest import write_node_secret

    workdir = tmp_path_factory.mktemp("imaging-alliance")
    # Known secrets: the same validation patients (2 of 11 at each site) on every run.
    for index, byte in ((1, 7), (2, 8)):
        write_node_secret(workdir / "homes" / f"hospital_{index}", bytes([byte]) * 32)
    return prepare_imaging_alliance(workdir, n_hospitals=2, n_patients=12, seed=3)


def _imaging_spec(**sections: dict[str, object]) -> ExperimentSpec:
    from medfed.demo_imaging import EXAMPLE_SPEC as IMAGING_SPEC

    mapping = tomllib.loads(IMAGING_SPEC.read_text())
    # RDP: the same guarantee type, and a fraction of PRV's accounting time at q = 0.25.
    mapping["privacy"]["accountant"] = "rdp"
    mapping["federation"].update({"rounds": 2, "min_nodes": 2, "node_wait_seconds": 0.1, "approval_wait_seconds": 0.1})
    for section, values in sections.items():
        mapping[section].update(values)
    return ExperimentSpec.from_mapping(mapping, source="test")


def test_an_imaging_experiment_trains_a_cnn_across_nodes_and_charges_each(imaging_alliance, tmp_path: Path) -> None:
    import torch

    from models.imaging import SmallCNN

    spec = _imaging_spec()
    tracker = InMemoryTracker()
    result = _run(imaging_alliance, spec, 201, tracker, tmp_path)

    assert tracker.status == "FINISHED"
    assert {o.status for o in result.sites.values()} == {"accepted"}
    # The pooled accuracy of a few validation images under the histograms' noise: defined
    # (and logged) exactly when the pooled noisy count of patients is positive.
    pooled = sum(o.final["eval-patients"] for o in result.sites.values())
    if pooled > 0:
        assert sorted(tracker.metrics["eval_accuracy"]) == [2] and 0.0 <= tracker.metrics["eval_accuracy"][2] <= 1.0
    else:
        assert "eval_accuracy" not in tracker.metrics
    # No exact count left any node: the weights are the noisy training sizes, released once.
    assert "eval_num_examples" not in tracker.metrics
    for outcome in result.sites.values():
        assert "eval-num-examples" not in outcome.final and "num-examples" not in outcome.final
        [size] = {r["num-examples"] for r in outcome.rounds.values()}  # one release, reused by every round
        assert size >= 1.0

    for site in imaging_alliance:
        home = NodeHome.open(site.home)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            assert [c.round for c in ledger.charges("chest_ct") if c.run_id == "201"] == [0, 1, 2, 0]  # 0: size, evaluation
            # The node reports the ledger's epsilon at its budget's delta, as of its last round.
            delta = governance_state(home).budgets["chest_ct"].delta
            spent = ledger.spent("chest_ct", delta=delta)  # the final evaluation's reply reports it all
        assert tracker.metrics[f"{site.name}.epsilon"][2] == pytest.approx(spent)

    model = tracker.models["model"]
    assert isinstance(model, SmallCNN) and model.image_size == 32
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert tuple(state["features.0.weight"].shape) == (spec.model.channels[0], 1, 3, 3)  # type: ignore[index]
    assert tracker.params["imaging.window_center"] == "90.0"


def test_an_imaging_experiment_is_refused_by_a_node_whose_dataset_is_tabular(alliance, tmp_path: Path) -> None:
    spec = _imaging_spec(data={"dataset": DATASET})
    tracker = InMemoryTracker()
    with pytest.raises(NotEnoughNodesError) as info:
        _run(alliance, spec, 202, tracker, tmp_path)
    assert "hospital_1: refused (dataset 'htn_cohort' on node 'hospital_1' is of kind 'tabular'; " \
        "task imaging-classification needs a dataset of kind 'imaging')" in str(info.value)
    assert tracker.status == "NONE"


# ---------------------------------------------------------------- governance


def test_the_run_waits_for_approvals_and_goes_on_when_the_officers_approve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import federation.experiment

    from clients.hospital_node.governance import approve, pending_requests

    monkeypatch.setattr(federation.experiment, "APPROVAL_POLL_SECONDS", 0.01)
    sites = prepare_alliance(tmp_path / "alliance", n_hospitals=2, seed=5)
    spec = _spec(federation={"rounds": 1, "approval_wait_seconds": 60.0})
    asked: dict[int, int] = {}

    def officer_reads_the_request_then_approves(node_id: int, site) -> object:  # type: ignore[no-untyped-def]
        handle = _handler(site.home)

        def answer_then_decide(message: Message) -> Message:
            reply = handle(message)
            asked[node_id] = asked.get(node_id, 0) + 1
            home = NodeHome.open(site.home)
            if asked[node_id] == 2:  # the officer decides between the coordinator's second and third ask
                [request] = pending_requests(home)
                approve(home, request.request.spec_digest[:12], dataset=DATASET, by="officer")
            return reply

        return answer_then_decide

    grid = InProcessGrid({10 + i: officer_reads_the_request_then_approves(10 + i, s) for i, s in enumerate(sites)}, run_id=301)
    tracker = InMemoryTracker()
    result = run_experiment(grid, spec, signed=signed_spec(spec, tmp_path / "alliance"), tracker=tracker, output_dir=tmp_path / "out")
    assert tracker.status == "FINISHED"
    assert {o.status for o in result.sites.values()} == {"accepted"}
    # Two "awaiting approval" answers and the accepting third query, then one train and one evaluate.
    assert asked == {10: 5, 11: 5}


def test_unapproved_sites_are_reported_as_awaiting_and_nothing_is_tracked(alliance, tmp_path: Path) -> None:
    spec = _spec(federation={"rounds": 1}, experiment={"name": "never-approved"})
    tracker = InMemoryTracker()
    with pytest.raises(NotEnoughNodesError) as info:
        _run(alliance, spec, 302, tracker, tmp_path, approved=False)
    for site in alliance:
        assert f"{site.name}: awaiting approval (awaiting approval by this node's data-governance officer (spec {spec.digest()[:12]}" in str(info.value)
    assert tracker.status == "NONE"


def test_a_spec_signed_by_a_stranger_trains_nowhere(alliance, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from federation.protocol import SignedSpec
    from privacy.governance import Submission, sign_submission

    spec = _spec(federation={"rounds": 1}, experiment={"name": "stranger"})
    approve_everywhere(alliance, spec)  # even an approved hash needs a trusted signature
    submission = Submission.new(spec.canonical_json())
    signature = sign_submission(submission, Ed25519PrivateKey.generate())
    signed = SignedSpec(spec.canonical_json(), signature.signature, signature.signer, submission.to_json())
    def charges() -> dict[str, int]:
        counts = {}
        for site in alliance:
            with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
                counts[site.name] = len(ledger.charges(DATASET))
        return counts

    before = charges()
    with pytest.raises(NotEnoughNodesError, match="is not a trusted partner of this node"):
        run_experiment(_grid(alliance, 303), spec, signed=signed, tracker=InMemoryTracker(), output_dir=tmp_path)
    assert charges() == before


class _TimelineTracker(InMemoryTracker):
    """Records when the coordinator prepares tracking and logs the model, beside the nodes' messages."""

    def __init__(self, timeline: list[str]) -> None:
        super().__init__()
        self.timeline = timeline

    def prepare(self) -> None:
        self.timeline.append("coordinator prepares")

    def start(self, **kwargs) -> str:  # type: ignore[no-untyped-def]
        self.timeline.append("coordinator starts the tracked run")
        return super().start(**kwargs)

    def log_model(self, model, *, input_example, name: str = "model") -> None:  # type: ignore[no-untyped-def]
        self.timeline.append("coordinator logs the model")
        super().log_model(model, input_example=input_example, name=name)

    def log_metrics(self, metrics, *, step: int) -> None:  # type: ignore[no-untyped-def]
        if "eval_auc" in metrics and step == 1:
            self.timeline.append("coordinator logs the final metrics")
        super().log_metrics(metrics, step=step)


def test_the_coordinator_starts_up_and_saves_the_model_while_a_wave_is_out(alliance, tmp_path: Path) -> None:
    spec = _spec(federation={"rounds": 1}, experiment={"name": "overlap"})
    approve_everywhere(alliance, spec)
    timeline: list[str] = []

    def recorded(home: Path):  # type: ignore[no-untyped-def]
        handle = _handler(home)

        def handler(message: Message) -> Message:
            timeline.append(f"node answers {message.metadata.message_type}")
            return handle(message)

        return handler

    grid = InProcessGrid({i + 10: recorded(site.home) for i, site in enumerate(alliance)}, run_id=304)
    tracker = _TimelineTracker(timeline)
    run_experiment(grid, spec, signed=signed_spec(spec, alliance[0].home.parent.parent), tracker=tracker, output_dir=tmp_path)

    # The in-process grid answers while the messages are pushed, so "meanwhile" work
    # comes after the wave's answers and before anything that needs them.
    assert timeline == [
        *["node answers query"] * 3,
        "coordinator prepares",
        "coordinator starts the tracked run",
        *["node answers train"] * 3,
        *["node answers evaluate"] * 3,
        "coordinator logs the model",
        "coordinator logs the final metrics",
    ]
    assert tracker.status == "FINISHED" and "model" in tracker.models
    assert float(tracker.params["plan.epsilon_per_site"]) == pytest.approx(plan_privacy(spec).epsilon_per_site)
    assert (tmp_path / "final_model.pt").is_file()


# ---------------------------------------------------------------- a coordinator restart


class _CoordinatorDied(BaseException):
    """Stands for the ServerApp process dying with its SuperLink (a signal, not a failure of the run)."""


def test_a_submission_continues_from_its_checkpoint_and_ends_as_an_uninterrupted_run(alliance, tmp_path: Path) -> None:
    from clients.hospital_node.rounds import DEBUG_NOISE_SEED_FILE

    for site in alliance:  # the nodes' test-only hook: the same noise in every run of a round
        (site.home / DEBUG_NOISE_SEED_FILE).write_text("2026\n")
    try:
        spec = _spec(federation={"rounds": 4}, experiment={"name": "restarted"})
        approve_everywhere(alliance, spec)
        workdir = alliance[0].home.parent.parent
        signed = signed_spec(spec, workdir)
        tracker = InMemoryTracker()

        def die_after_round_2(server_round: int, _metrics: object) -> None:
            if server_round == 2:
                raise _CoordinatorDied

        with pytest.raises(_CoordinatorDied):
            run_experiment(_grid(alliance, 201), spec, signed=signed, tracker=tracker, output_dir=tmp_path / "a", on_round=die_after_round_2)
        resumed = run_experiment(_grid(alliance, 202), spec, signed=signed, tracker=tracker, output_dir=tmp_path / "a", flower_run_id=202)
        assert tracker.resumed == "in-memory" and tracker.status == "FINISHED"
        assert sorted(tracker.metrics["epsilon_run"]) == [1, 2, 3, 4]  # one tracked run across both
        for site in alliance:
            with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
                charged = [(c.run_id, c.round) for c in ledger.charges(DATASET) if c.run_id in ("201", "202")]
            # The noisy training size is released once per submission (round 0 of its first run), then reused.
            # The final evaluation, once, by the run that finished.
            assert charged == [("201", 0), ("201", 1), ("201", 2), ("202", 3), ("202", 4), ("202", 0)]

        approve_everywhere(alliance, spec)  # a second run of the same spec, uninterrupted
        whole = run_experiment(_grid(alliance, 203), spec, signed=signed_spec(spec, workdir), tracker=InMemoryTracker(), output_dir=tmp_path / "b")
        for name, array in whole.arrays.items():
            assert resumed.arrays[name].numpy() == pytest.approx(array.numpy(), abs=1e-6)
    finally:
        for site in alliance:
            (site.home / DEBUG_NOISE_SEED_FILE).unlink(missing_ok=True)


def test_a_finished_submission_is_not_run_again(alliance, tmp_path: Path) -> None:
    spec = _spec(federation={"rounds": 1}, experiment={"name": "once"})
    approve_everywhere(alliance, spec)
    signed = signed_spec(spec, alliance[0].home.parent.parent)
    run_experiment(_grid(alliance, 301), spec, signed=signed, tracker=InMemoryTracker(), output_dir=tmp_path, flower_run_id=301)
    with pytest.raises(FederationError, match=r"already finished \(Flower runs 301\)"):
        run_experiment(_grid(alliance, 302), spec, signed=signed, tracker=InMemoryTracker(), output_dir=tmp_path, flower_run_id=302)


def test_a_run_that_cannot_start_gives_the_accepting_nodes_their_budget_back(alliance, tmp_path: Path) -> None:
    from clients.hospital_node.home import NodeHome as Home

    spec = _spec(federation={"rounds": 2, "min_nodes": 3}, experiment={"name": "two-of-three"})
    approve_everywhere(alliance[:2], spec)  # the third officer has not decided
    signed = signed_spec(spec, alliance[0].home.parent.parent)
    with pytest.raises(NotEnoughNodesError, match="2 of 3 hospital node"):
        run_experiment(_grid(alliance, 401), spec, signed=signed, tracker=InMemoryTracker(), output_dir=tmp_path)
    for site in alliance[:2]:
        home = Home.open(site.home)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            now, hold = ledger.now(), home.policy().reservation_hold
            [mine] = [r for r in ledger.run_reservations(DATASET) if r.submission == signed.submission_id]
            assert (mine.state(hold=hold, now=now), mine.charged) == ("released", 0)
        assert [e.payload["message"] for e in home.audit_log().entries() if e.kind == "release"][-1] == "release"
