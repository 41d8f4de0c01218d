"""The node's message handlers: refusals name the site and the reason, releases are charged once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node.governance import budget_status, set_budget
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import answer
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from federation.experiment import instruction_for
from federation.protocol import (
    EVAL_METRICS,
    QUERY_METRICS,
    REFUSED_REPLAY,
    SCORE_METRICS,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_DATASET,
    TRAIN_METRICS,
    TrainInstruction,
    read_metrics,
    read_refusal,
)
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from models.tabular import build_tabular_model
from privacy.events import DISCRETE_LAPLACE, DPEvent
from privacy.keys import load_public_key
from privacy.ledger import PrivacyLedger

from .conftest import SENTINEL, example_spec, govern, sign, signed_message


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 77, 1, 1


def _governed_home(tmp_path: Path, spec: ExperimentSpec) -> NodeHome:
    """A node home with the example cohort, whose officer approved `spec`."""
    path = tmp_path / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(path, index=False)
    node = NodeHome.create(tmp_path / "home", name="hospital_9")
    node.register_dataset(
        DatasetEntry(name="htn_cohort", path=path, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    govern(node, "htn_cohort", approve_spec=spec)
    return node


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return _governed_home(tmp_path, example_spec())


def _legacy_train(config: ConfigRecord, instruction: TrainInstruction) -> Message:
    """A train message in Flower's legacy fit layout (SecAgg+'s), carrying `config` and a fresh model."""
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

    from federation.protocol import LEGACY_FIT_ARRAYS, LEGACY_FIT_CONFIG

    model = build_tabular_model(instruction.model_kind, len(instruction.features))
    arrays = parameters_to_arrayrecord(ndarrays_to_parameters([v.numpy() for v in model.state_dict().values()]), keep_input=True)
    return Message(RecordDict({LEGACY_FIT_CONFIG: config, LEGACY_FIT_ARRAYS: arrays}), dst_node_id=1, message_type=MessageType.TRAIN)


def _instruction(**changes: object) -> TrainInstruction:
    spec = example_spec()
    values = instruction_for(spec, plan_privacy(spec)).__dict__ | changes
    return TrainInstruction(**values)


def _message(kind: str, instruction: TrainInstruction, server_round: int = 1, arrays: bool = True) -> Message:
    """A message of the approved example spec, carrying `instruction` (which a test may have altered)."""
    model = build_tabular_model(instruction.model_kind, len(instruction.features)) if arrays else None
    return signed_message(
        kind,
        example_spec(),
        instruction=instruction,
        server_round=server_round,
        arrays=ArrayRecord(model.state_dict()) if model is not None else None,
    )


def test_train_reply_carries_declared_metrics_and_the_ledgers_epsilon(home: NodeHome) -> None:
    # The dataset's budget is read at another delta than the spec's: the node reports the ledger's number.
    set_budget(home, "htn_cohort", epsilon_=50.0, delta=1e-6, by="test-officer")
    instruction = _instruction()
    reply = answer("train", _message(MessageType.TRAIN, instruction), {"home": str(home.path)})
    assert not reply.has_error(), reply.error
    metrics = read_metrics(reply.content, TRAIN_METRICS)
    # No loss, no AUC: the model's quality leaves only as the final evaluation's DP histogram.
    assert set(metrics) == {"num-examples", "steps", "epsilon", "epsilon-run"}
    assert metrics["steps"] == instruction.steps
    with PrivacyLedger.open(home.ledger_path) as ledger:
        submission = sign(example_spec()).submission_id  # the partner-signed submission the message carried
        # Round 0: the once-per-run noisy training-set size; round 1: the DP-SGD steps.
        charges = ledger.charges("htn_cohort")
        assert [(c.run_id, c.round, c.submission) for c in charges] == [("77", 0, submission), ("77", 1, submission)]
        assert charges[0].event == DPEvent(10.0, 1.0, 1, mechanism=DISCRETE_LAPLACE)
        assert metrics["epsilon"] == ledger.spent("htn_cohort", delta=1e-6)
    [row] = budget_status(home)
    assert row.spent == metrics["epsilon"]  # one epsilon: what left, what the officer reads
    shapes = {k: tuple(v.shape) for k, v in reply.content["arrays"].items()}
    assert shapes == {"linear.weight": (1, len(FEATURES)), "linear.bias": (1,)}

    # What left the site is in the signed audit log: shapes, size, digest, the charge.
    [release] = [e for e in home.audit_log().entries() if e.kind == "release"]
    assert release.payload["arrays"] == {"linear.bias": [1], "linear.weight": [1, len(FEATURES)]}
    assert release.payload["bytes"] == reply.content["arrays"].count_bytes()
    charge = release.payload["charge"]
    assert (charge["epsilon_spent"], charge["delta"], charge["accountant"]) == (metrics["epsilon"], 1e-6, "pld")
    assert home.audit_log().verify(load_public_key(home.audit_public_key_path)).ok


def test_a_round_is_released_and_charged_only_once(home: NodeHome) -> None:
    instruction = _instruction()
    config = {"home": str(home.path)}
    assert not answer("train", _message(MessageType.TRAIN, instruction), config).has_error()
    again = answer("train", _message(MessageType.TRAIN, instruction), config)
    assert again.error.code == REFUSED_BAD_INSTRUCTION
    assert "already trained and charged" in again.error.reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [c.round for c in ledger.charges("htn_cohort")] == [0, 1]


def test_unknown_dataset_is_refused_with_the_site_name_and_nothing_charged(home: NodeHome) -> None:
    spec = example_spec(data={"dataset": "ecg_cohort"})
    reply = answer("query", signed_message(MessageType.QUERY, spec), {"home": str(home.path)})
    assert reply.error.code == REFUSED_DATASET
    site, reason = read_refusal(reply.error.reason, "?")
    assert site == "hospital_9"
    assert reason.startswith("dataset 'ecg_cohort' cannot be used for this run on this node")
    assert "htn_cohort" not in reason  # the node's other datasets are its own business
    [refusal] = [e.payload for e in home.audit_log().entries() if e.kind == "refusal"]
    assert refusal["reason"] == reason and refusal["detail"].startswith("dataset 'ecg_cohort' is not registered on node 'hospital_9'")
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.datasets() == []


def test_a_dataset_problem_leaves_the_node_without_its_paths_or_counts(home: NodeHome) -> None:
    # The registered file is replaced by one too small for its split (the attacker's probe).
    entry = home.dataset("htn_cohort")
    entry.path.write_text(entry.path.read_text().splitlines()[0] + "\n")
    reply = answer("query", signed_message(MessageType.QUERY, example_spec()), {"home": str(home.path)})
    assert reply.error.code == REFUSED_DATASET
    assert str(entry.path) not in reply.error.reason and not any(ch.isdigit() for ch in reply.error.reason.split("node", 1)[1])


def test_step_count_that_does_not_match_the_sample_rate_is_refused_before_anything_is_reserved(home: NodeHome) -> None:
    reply = answer("train", _message(MessageType.TRAIN, _instruction(steps=5)), {"home": str(home.path)})
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "does not match local_epochs x steps_per_epoch(sample_rate) = 20" in reply.error.reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.run_reservations() == []


def test_arrays_of_another_model_are_refused(home: NodeHome) -> None:
    message = _message(MessageType.TRAIN, _instruction())
    message.content["arrays"] = ArrayRecord(build_tabular_model("mlp", len(FEATURES)).state_dict())
    reply = answer("train", message, {"home": str(home.path)})
    assert "do not match the instructed model" in reply.error.reason


def test_missing_home_or_config_is_refused_without_a_traceback(home: NodeHome) -> None:
    reply = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), {})
    assert "--node-config home=" in reply.error.reason
    bare = Message(content=RecordDict({"other": ConfigRecord({})}), dst_node_id=5, message_type=MessageType.QUERY)
    reply = answer("query", bare, {"home": str(home.path)})
    assert "no 'config' ConfigRecord" in reply.error.reason
    assert "Traceback" not in reply.error.reason


def test_bad_cell_values_never_reach_the_refusal(home: NodeHome) -> None:
    entry = home.dataset("htn_cohort")
    frame = pd.read_csv(entry.path)
    frame["bmi"] = frame["bmi"].astype(object)
    frame.loc[3, "bmi"] = SENTINEL
    frame.to_csv(entry.path, index=False)
    reply = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), {"home": str(home.path)})
    assert reply.error.code == REFUSED_DATASET
    assert "bmi" not in reply.error.reason and SENTINEL not in reply.error.reason  # which column, and how, stay here
    [refusal] = [e.payload for e in home.audit_log().entries() if e.kind == "refusal"]
    assert "bmi" in refusal["detail"] and SENTINEL not in refusal["detail"]


# ---------------------------------------------------------------- imaging datasets


def _imaging_spec() -> ExperimentSpec:
    from medfed.demo_imaging import EXAMPLE_SPEC as IMAGING_SPEC

    return example_spec(IMAGING_SPEC, imaging={"size": 16, "body_parts": ["CHEST"], "series_description": "axial"})


def test_an_imaging_train_reply_carries_the_cnns_arrays(imaging_site) -> None:  # type: ignore[no-untyped-def]
    from models.imaging import build_imaging_model

    imaging_site.home.register_dataset(imaging_site.entry)
    spec = _imaging_spec()
    govern(imaging_site.home, "chest_ct", approve_spec=spec, min_cohort_size=10)
    arrays = ArrayRecord(build_imaging_model("cnn", 16, channels=spec.model.channels or ()).state_dict())
    message = signed_message(MessageType.TRAIN, spec, arrays=arrays)
    reply = answer("train", message, {"home": str(imaging_site.home.path)})
    assert not reply.has_error(), reply.error
    metrics = read_metrics(reply.content, TRAIN_METRICS)
    assert metrics["num-examples"] >= 1 and "eval-num-examples" not in metrics  # a noisy count, never the exact one
    shapes = {k: tuple(v.shape) for k, v in reply.content["arrays"].items()}
    first, last = spec.model.channels[0], spec.model.channels[-1]  # type: ignore[index]
    assert shapes["features.0.weight"] == (first, 1, 3, 3) and shapes["head.weight"] == (1, last)
    with PrivacyLedger.open(imaging_site.home.ledger_path) as ledger:
        assert [(c.run_id, c.round) for c in ledger.charges("chest_ct")] == [("77", 0), ("77", 1)]


def test_a_tabular_instruction_on_an_imaging_dataset_is_refused(imaging_site) -> None:  # type: ignore[no-untyped-def]
    imaging_site.home.register_dataset(imaging_site.entry)
    spec = example_spec(data={"dataset": "chest_ct"})
    govern(imaging_site.home, "chest_ct", approve_spec=spec)
    reply = answer("query", signed_message(MessageType.QUERY, spec), {"home": str(imaging_site.home.path)})
    assert reply.has_error() and reply.error.code == REFUSED_DATASET
    assert read_refusal(reply.error.reason, "") == (
        "hospital_7",
        "dataset 'chest_ct' on node 'hospital_7' is of kind 'imaging'; task tabular-classification needs "
        "a dataset of kind 'tabular'",
    )


def test_egress_lists_what_left_for_each_run(home: NodeHome) -> None:
    from typer.testing import CliRunner

    from clients.hospital_node.cli import app

    reply = answer("train", _message(MessageType.TRAIN, _instruction()), {"home": str(home.path)})
    runner = CliRunner()
    shown = runner.invoke(app, ["egress", "--home", str(home.path), "--json", "--run", "77"])
    assert shown.exit_code == 0, shown.output
    [record] = json.loads(shown.output)
    assert record["payload"]["bytes"] == reply.content["arrays"].count_bytes()
    other = runner.invoke(app, ["egress", "--home", str(home.path), "--run", "78"])
    assert other.exit_code == 0 and "nothing has left node 'hospital_9' for run 78" in other.output


def test_every_reply_is_recorded_query_and_evaluate_included(home: NodeHome) -> None:
    config = {"home": str(home.path)}
    query = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), config)
    evaluate = answer("evaluate", _message(MessageType.EVALUATE, _instruction(), server_round=5), config)
    assert not query.has_error() and not evaluate.has_error(), (query.error, evaluate.error)
    records = [e.payload for e in home.audit_log().entries() if e.kind == "release"]
    assert [(r["message"], r["round"]) for r in records] == [("query", 1), ("evaluate", 5)]
    assert records[0]["metrics"] == ["num-examples"]
    assert records[0]["dp_releases"]["num-examples"]["mechanism"] == DISCRETE_LAPLACE
    assert max(1, *records[0]["dp_releases"]["num-examples"]["output"]) == query.content["metrics"]["num-examples"]
    assert records[0]["bytes"] == query.content["metrics"].count_bytes()
    # The evaluation leaves as its noisy score histogram, and nothing else.
    assert records[1]["arrays"] == {} and records[1]["metrics"] == sorted([*SCORE_METRICS, "epsilon", "epsilon-run"])
    assert set(records[1]["accounting"]) == {"epsilon", "epsilon-run"}  # the ledger's, with the evaluation charged
    histogram = records[1]["dp_releases"]["eval-scores"]
    assert histogram["mechanism"] == DISCRETE_LAPLACE and histogram["scale"] == 2.0  # evaluation_epsilon 0.5
    assert [evaluate.content["metrics"][k] for k in SCORE_METRICS] == histogram["output"]
    # The digest is of the values that left, so an officer can match it to the coordinator's copy.
    sent = {k: evaluate.content["metrics"][k] for k in sorted(evaluate.content["metrics"])}
    assert records[1]["sha256"] == hashlib.sha256(json.dumps(sent, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_the_egress_guard_refuses_an_undeclared_metric(home: NodeHome, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.hospital_node.rounds as rounds

    real = rounds._HANDLERS["query"]

    def leaky(*args):  # type: ignore[no-untyped-def]
        content = real(*args)
        content["metrics"]["mean-age"] = 57.0  # not in the protocol: must not leave
        return content

    monkeypatch.setitem(rounds._HANDLERS, "query", leaky)
    reply = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), {"home": str(home.path)})
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "egress guard: undeclared metric(s) mean-age in a query reply; nothing was sent" in reply.error.reason
    assert not [e for e in home.audit_log().entries() if e.kind == "release"]


# ---------------------------------------------------------------- the released training-set size


def _two_rounds(home: NodeHome) -> tuple[Message, Message, Message]:
    config = {"home": str(home.path)}
    query = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), config)
    first = answer("train", _message(MessageType.TRAIN, _instruction(), server_round=1), config)
    second = answer("train", _message(MessageType.TRAIN, _instruction(), server_round=2), config)
    assert not any(r.has_error() for r in (query, first, second)), [r.error for r in (query, first, second) if r.has_error()]
    return query, first, second


def test_the_training_size_is_released_once_charged_once_and_reused_by_every_reply(home: NodeHome) -> None:
    query, first, second = _two_rounds(home)
    sent = {read_metrics(r.content, allowed)["num-examples"] for r, allowed in ((query, QUERY_METRICS), (first, TRAIN_METRICS), (second, TRAIN_METRICS))}
    assert len(sent) == 1  # post-processing of one release
    with PrivacyLedger.open(home.ledger_path) as ledger:
        counts = [c for c in ledger.charges("htn_cohort") if c.event.mechanism == DISCRETE_LAPLACE]
        [reservation] = ledger.run_reservations("htn_cohort")
    assert [(c.round, c.event.noise_multiplier) for c in counts] == [(0, 10.0)]  # count_epsilon 0.1 by default
    assert reservation.once_charged == (True, False) and reservation.charged == 2  # the final evaluation is still held
    records = [e.payload for e in home.audit_log().entries() if e.kind == "release"]
    assert [r["dp_releases"]["num-examples"]["charged"] for r in records] == ["now", "earlier in the run (reused)", "earlier in the run (reused)"]


def test_no_reply_carries_the_exact_training_size_over_seeded_draws(home: NodeHome) -> None:
    # The example cohort's exact training size; the noisy one differs from it most of the time
    # (discrete Laplace at scale 10 is 0 with probability tanh(1/20) = 5 %).
    from clients.hospital_node.connectors import TabularConnector
    from privacy.mechanisms import add_noise

    exact = TabularConnector(home.dataset("htn_cohort")).load().select(FEATURES, _instruction().scaling).n_train
    draws = add_noise([exact] * 400, mechanism=DISCRETE_LAPLACE, scale=10.0)
    assert 0.01 < float((draws == exact).mean()) < 0.12
    query = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), {"home": str(home.path)})
    [record] = [e.payload for e in home.audit_log().entries() if e.kind == "release"]
    assert query.content["metrics"]["num-examples"] == max(1, *record["dp_releases"]["num-examples"]["output"])


def test_a_count_whose_value_is_lost_after_its_release_is_never_drawn_again(home: NodeHome) -> None:
    from clients.hospital_node.released import RELEASED_DIR

    config = {"home": str(home.path)}
    assert not answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), config).has_error()
    for path in (home.path / RELEASED_DIR).iterdir():
        path.unlink()
    reply = answer("train", _message(MessageType.TRAIN, _instruction()), config)
    assert reply.has_error() and "cannot be released again" in reply.error.reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert [c.round for c in ledger.charges("htn_cohort")] == [0]


def test_the_egress_guard_refuses_a_count_that_is_not_the_release(home: NodeHome, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.hospital_node.rounds as rounds

    original = rounds._query

    def exact(*args: object) -> RecordDict:
        content = original(*args)  # type: ignore[arg-type]
        content["metrics"]["num-examples"] = 1234.0  # as if the exact count were sent
        return content

    monkeypatch.setitem(rounds._HANDLERS, "query", exact)
    reply = answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), {"home": str(home.path)})
    assert reply.has_error() and "is neither the output of one of the node's DP releases" in reply.error.reason


# ---------------------------------------------------------------- the model's quality as DP histograms


def _exact_histogram(home: NodeHome, arrays: ArrayRecord) -> list[int]:
    """What the node's validation split scores to, exactly: only a test on the node's own data sees it."""
    from clients.hospital_node.connectors import TabularConnector
    from models.evaluation import score_histogram
    from models.training import predict

    split = TabularConnector(home.dataset("htn_cohort")).load().select(FEATURES, _instruction().scaling)
    model = build_tabular_model("logistic", len(FEATURES))
    model.load_state_dict(arrays.to_torch_state_dict())
    import torch

    x_val = torch.from_numpy(split.x_val)
    return [int(v) for v in score_histogram(predict(model, x_val), split.y_val.astype(int)).ravel()]


def test_the_final_evaluation_is_a_charged_noisy_histogram_answered_once(home: NodeHome) -> None:
    config = {"home": str(home.path)}
    _two_rounds(home)
    final = _message(MessageType.EVALUATE, _instruction(), server_round=2)
    reply = answer("evaluate", final, config)
    assert not reply.has_error(), reply.error
    sent = read_metrics(reply.content, EVAL_METRICS)
    assert set(sent) == {*SCORE_METRICS, "epsilon", "epsilon-run"}
    exact = _exact_histogram(home, final.content["arrays"])
    noise = [sent[k] - e for k, e in zip(SCORE_METRICS, exact, strict=True)]
    # Discrete Laplace at scale 2 per bin (variance 2 t^2 / (1 + ...) < 8): 40 bins differ from
    # the exact counts, and their sum stays within 5 standard deviations of the total.
    assert sum(1 for n in noise if n != 0) >= 20
    assert abs(sum(noise)) < 5 * (8 * len(noise)) ** 0.5
    with PrivacyLedger.open(home.ledger_path) as ledger:
        charges = [(c.round, c.release, c.event.noise_multiplier) for c in ledger.charges("htn_cohort") if c.event.mechanism == DISCRETE_LAPLACE]
        [reservation] = ledger.run_reservations("htn_cohort")
    assert charges == [(0, 1, 10.0), (0, 2, 2.0)]  # the training size, then the evaluation
    assert reservation.once_charged == (True, True) and reservation.released_at is not None
    # A second final evaluation (another model, or the same) is refused: the run has ended.
    again = answer("evaluate", _message(MessageType.EVALUATE, _instruction(), server_round=2), config)
    assert again.error.code == REFUSED_REPLAY and "its final evaluation is answered once" in again.error.reason


def test_evaluating_every_round_releases_the_incoming_histogram_as_the_rounds_second_charge(tmp_path: Path) -> None:
    spec = example_spec(privacy={"evaluate_every_round": True, "evaluation_epsilon": 1.0})
    node = _governed_home(tmp_path, spec)
    instruction = instruction_for(spec, plan_privacy(spec))
    model = build_tabular_model(instruction.model_kind, len(instruction.features))
    message = signed_message(MessageType.TRAIN, spec, instruction=instruction, server_round=1, arrays=ArrayRecord(model.state_dict()))
    reply = answer("train", message, {"home": str(node.path)})
    assert not reply.has_error(), reply.error
    metrics = read_metrics(reply.content, TRAIN_METRICS)
    assert set(metrics) == {"num-examples", "steps", "epsilon", "epsilon-run", *SCORE_METRICS}
    with PrivacyLedger.open(node.ledger_path) as ledger:
        rounds = [(c.round, c.release, c.event.mechanism) for c in ledger.charges("htn_cohort") if c.round == 1]
    assert rounds == [(1, 0, "poisson-gaussian"), (1, 1, DISCRETE_LAPLACE)]
    [record] = [e.payload for e in node.audit_log().entries() if e.kind == "release"]
    assert [metrics[k] for k in SCORE_METRICS] == record["dp_releases"]["eval-scores"]["output"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("eval-auc", 0.81), ("train-loss", 0.4), ("eval-scores-1-10", None)],
    ids=["an exact AUC", "an exact training loss", "an altered histogram bin"],
)
def test_the_egress_guard_refuses_any_number_that_is_not_a_release(
    home: NodeHome, monkeypatch: pytest.MonkeyPatch, key: str, value: float | None
) -> None:
    import clients.hospital_node.rounds as rounds

    original = rounds._evaluate

    def leaky(*args: object) -> RecordDict:
        content = original(*args)  # type: ignore[arg-type]
        metrics = content["metrics"]
        metrics[key] = metrics[key] + 1.0 if value is None else value
        return content

    monkeypatch.setitem(rounds._HANDLERS, "evaluate", leaky)
    config = {"home": str(home.path)}
    assert not answer("query", _message(MessageType.QUERY, _instruction(), arrays=False), config).has_error()
    reply = answer("evaluate", _message(MessageType.EVALUATE, _instruction(), server_round=2), config)
    assert reply.has_error() and "egress guard" in reply.error.reason and key in reply.error.reason
    assert [e.payload["message"] for e in home.audit_log().entries() if e.kind == "release"] == ["query"]


# ---------------------------------------------------------------- no free, exact answers by failure


def test_a_model_that_is_not_finite_is_refused_before_any_row_is_read(home: NodeHome, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.hospital_node.rounds as rounds

    def no_reading(*args: object) -> None:
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(rounds, "_load", no_reading)
    model = build_tabular_model("logistic", len(FEATURES))
    state = model.state_dict()
    state["linear.bias"].fill_(float("-inf"))
    message = signed_message(MessageType.TRAIN, example_spec(), instruction=_instruction(), server_round=1, arrays=ArrayRecord(state))
    reply = answer("train", message, {"home": str(home.path)})
    assert reply.error.code == REFUSED_BAD_INSTRUCTION and "not a finite number; nothing was read" in reply.error.reason


def test_scores_that_overflow_to_nan_fall_in_a_bin_instead_of_failing(home: NodeHome) -> None:
    # Finite weights whose products overflow float32 on some patients: inf - inf = NaN scores.
    # The histogram still counts every validation patient once; nothing raises.
    import torch

    from clients.hospital_node.connectors import TabularConnector
    from clients.hospital_node.rounds import _scores

    split = TabularConnector(home.dataset("htn_cohort")).load().select(FEATURES, _instruction().scaling)
    model = build_tabular_model("logistic", len(FEATURES))
    with torch.no_grad():
        signs = torch.tensor([(-1.0) ** i for i in range(len(FEATURES))])
        model.linear.weight.copy_(3.4e38 * signs.unsqueeze(0))
    x = torch.from_numpy(split.x_val)
    assert torch.isnan(torch.sigmoid(model(x))).any()
    histogram = _scores(model, x, torch.from_numpy(split.y_val))
    assert sum(histogram) == len(split.y_val)


def test_a_secure_layout_for_a_plain_spec_is_refused_before_any_row_is_read(home: NodeHome) -> None:
    plain = _message(MessageType.TRAIN, _instruction())
    reply = answer("train", _legacy_train(plain.content.config_records["config"], _instruction()), {"home": str(home.path)})
    assert reply.error.code == REFUSED_BAD_INSTRUCTION
    assert "federation.secure_aggregation says this run trains in plain" in reply.error.reason
    with PrivacyLedger.open(home.ledger_path) as ledger:
        assert ledger.charges("htn_cohort") == []


def test_a_round_secagg_would_clip_is_refused_after_its_charge_so_it_cannot_be_retried_for_free(tmp_path: Path) -> None:
    from clients.hospital_node.secure_aggregation import SecAggSettings

    spec = example_spec(federation={"secure_aggregation": True, "min_nodes": 2})
    node = _governed_home(tmp_path, spec)
    instruction = instruction_for(spec, plan_privacy(spec))
    plain = signed_message(MessageType.TRAIN, spec, instruction=instruction, server_round=1, arrays=None)
    # The coordinator's setup stage chose a clipping range no trained model fits in.
    tiny = SecAggSettings(sample_num=3, share_num=3, threshold=2, clipping_range=1e-9, quantization_range=1 << 22,
                          modulus_range=1 << 32, max_weight=1e9)
    config = {"home": str(node.path)}
    first = answer("train", _legacy_train(plain.content.config_records["config"], instruction), config, secagg=tiny)
    assert first.error.code == REFUSED_BAD_INSTRUCTION and "would be clipped; nothing was sent" in first.error.reason
    again = answer("train", _legacy_train(plain.content.config_records["config"], instruction), config, secagg=tiny)
    assert "already trained and charged" in again.error.reason  # no fresh, free retry of the same round
    with PrivacyLedger.open(node.ledger_path) as ledger:
        assert [(c.round, c.event.mechanism) for c in ledger.charges("htn_cohort")] == [(0, DISCRETE_LAPLACE), (1, "poisson-gaussian")]
