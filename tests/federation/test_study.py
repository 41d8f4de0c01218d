"""The coordinator's statistics study against real node logic, in one process.

`InProcessGrid` hands each message to the hospital node's installed ClientApp for a node
home with a synthetic cohort, so this exercises admission, the noisy answers, suppression,
ledger charges, pooling and the report without Flower processes.
tests/integration/test_study.py runs the same over real processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import numpy as np
from flwr.app import Context, Message, RecordDict

from clients.hospital_node.client_app import app as client_app
from clients.hospital_node.governance import approve
from clients.hospital_node.home import NodeHome
from experiments.study import StudySpec
from experiments.study_run import ANSWERS_FILE, SUMMARY_FILE, StudyOptions
from experiments.tracking import InMemoryTracker
from federation.errors import FederationError, NotEnoughNodesError
from federation.inprocess_grid import InProcessGrid
from federation.protocol import ANSWER_KEY, STATISTICS_KEY, SiteAnswer
from federation.study import run_study
from medfed.demo import BUDGET_DELTA, DATASET, prepare_alliance, signed_spec
from privacy.accountant import epsilon
from privacy.ledger import PrivacyLedger

from .dropouts import COLLECT_STAGE, UNMASK_STAGE, drops_out_at

EXAMPLES = Path(__file__).resolve().parents[2] / "experiments" / "examples"
OPTIONS = StudyOptions(min_sites=2, node_wait_seconds=0.1, approval_wait_seconds=0.1, timeout_seconds=60)


@pytest.fixture(scope="module")
def alliance(tmp_path_factory: pytest.TempPathFactory):
    return prepare_alliance(tmp_path_factory.mktemp("alliance"), n_hospitals=3, seed=5)


def _handler(home: Path, replies: list[Message] | None = None, tamper=None):  # type: ignore[no-untyped-def]
    """The node's installed ClientApp, dispatching as Flower does; keeps every reply in `replies`."""

    def handle(message: Message) -> Message:
        context = Context(run_id=message.metadata.run_id, node_id=message.metadata.dst_node_id, node_config={"home": str(home)},
                          state=RecordDict(), run_config={})
        reply = client_app(message=message, context=context)
        if tamper is not None:
            reply = tamper(reply)
        if replies is not None:
            replies.append(reply)
        return reply

    return handle


def _approve(sites, spec: StudySpec) -> None:  # type: ignore[no-untyped-def]
    for site in sites:
        approve(NodeHome.open(site.home), spec.digest(), dataset=DATASET, by="test-officer", not_yet_requested=True)


def _run(sites, spec: StudySpec, tmp_path: Path, *, run_id: int, handlers=None, approved: bool = True):  # type: ignore[no-untyped-def]
    if approved:
        _approve(sites, spec)
    grid = InProcessGrid(handlers or {i + 10: _handler(site.home) for i, site in enumerate(sites)}, run_id=run_id)
    tracker = InMemoryTracker()
    signed = signed_spec(spec, sites[0].home.parent.parent)
    result = run_study(grid, spec, signed=signed, tracker=tracker, output_dir=tmp_path / "out", options=OPTIONS)
    return result, tracker


def test_a_study_is_answered_pooled_and_reported_with_each_sites_epsilon(alliance, tmp_path: Path) -> None:
    spec = StudySpec.from_toml(EXAMPLES / "htn_prevalence.toml")
    result, tracker = _run(alliance, spec, tmp_path, run_id=201)
    assert tracker.status == "FINISHED"
    assert sorted(result.answers) == ["hospital_1", "hospital_2", "hospital_3"]
    # Each node reports the study's charge at its dataset budget's delta (the demo's), by the ledger's PLD.
    charged = epsilon(spec.query.events(), delta=BUDGET_DELTA, accountant="pld")
    for site, eps in result.epsilon.items():
        assert eps["epsilon-run"] == pytest.approx(charged, rel=1e-9), site
    kinds = {row.kind for row in result.rows}
    assert {"proportion", "mean", "histogram"} <= kinds
    prevalence = [r for r in result.rows if r.kind == "proportion" and not r.value.suppressed]
    assert prevalence and all(0 <= r.value.estimate <= 1 for r in prevalence)
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["sites"]["hospital_2"]["epsilon_charged_by_this_study"] == result.epsilon["hospital_2"]["epsilon-run"]
    assert (tmp_path / "out" / ANSWERS_FILE).is_file() and (tmp_path / "out" / "estimates.csv").is_file()
    for site in alliance:
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            assert sum(c.run_id == "201" for c in ledger.charges(DATASET)) == len(spec.query.releases())


def test_a_finished_study_is_not_run_again(alliance, tmp_path: Path) -> None:
    spec = StudySpec.from_toml(EXAMPLES / "htn_onset_survival.toml")
    result, _ = _run(alliance, spec, tmp_path, run_id=202)
    assert any(row.kind == "survival" for row in result.rows)
    with pytest.raises(FederationError, match="already finished"):
        _run(alliance, spec, tmp_path, run_id=203, approved=False)


def test_every_number_a_node_sent_is_a_release_its_audit_log_records(alliance, tmp_path: Path) -> None:
    spec = StudySpec.from_toml(EXAMPLES / "htn_onset_survival.toml")
    replies: dict[int, list[Message]] = {}
    handlers = {}
    for i, site in enumerate(alliance):
        replies[i + 10] = []
        handlers[i + 10] = _handler(site.home, replies[i + 10])
    _run(alliance, spec, tmp_path, run_id=204, handlers=handlers)
    for node, site in zip(sorted(replies), alliance, strict=True):
        records = [e.payload for e in NodeHome.open(site.home).audit_log().entries() if e.kind == "release" and e.payload["run"] == "204"]
        by_message = {r["message"]: r for r in records}
        for reply in replies[node]:
            assert not reply.has_error()
            numbers = dict(reply.content.metric_records.get("metrics", {}))
            if STATISTICS_KEY not in reply.content:
                assert numbers == {}  # the admission reply carries no number
                continue
            record = by_message["statistics"]
            assert numbers == record["metric_values"]
            sent = json.loads(reply.content.config_records[STATISTICS_KEY][ANSWER_KEY])
            assert [r["values"] for r in sent["releases"]] == [r["values"] for r in record["releases"]]
            assert [(r["mechanism"], r["scale"]) for r in sent["releases"]] == [(r["mechanism"], r["scale"]) for r in record["releases"]]


def test_an_answer_that_departs_from_the_plan_is_set_aside(alliance, tmp_path: Path) -> None:
    spec = StudySpec.from_toml(EXAMPLES / "htn_onset_survival.toml")

    def tamper(reply: Message) -> Message:
        if reply.has_error() or STATISTICS_KEY not in reply.content:
            return reply
        answer = SiteAnswer.from_content(reply.content)
        reply.content[STATISTICS_KEY] = SiteAnswer(answer.releases[:1], answer.suppressed).to_record()
        return reply

    handlers = {i + 10: _handler(site.home, tamper=tamper if i == 0 else None) for i, site in enumerate(alliance)}
    result, _ = _run(alliance, spec, tmp_path, run_id=205, handlers=handlers)
    assert sorted(result.answers) == ["hospital_2", "hospital_3"]
    [outcome] = [o for o in result.sites.values() if o.site == "hospital_1"]
    assert outcome.status == "refused" and outcome.reason.startswith("invalid answer: the answer holds 1 release(s)")


def test_a_study_nobody_approved_stops_with_each_sites_status(alliance, tmp_path: Path) -> None:
    mapping = json.loads(StudySpec.from_toml(EXAMPLES / "htn_onset_survival.toml").canonical_json())
    mapping["study"]["name"] = "never-approved"
    spec = StudySpec.from_mapping(mapping)
    with pytest.raises(NotEnoughNodesError, match="0 of 3 hospital node\\(s\\) accepted the study.*awaiting approval"):
        _run(alliance, spec, tmp_path, run_id=206, approved=False)


# ---------------------------------------------------------------- securely aggregated studies


def _secure(name: str = "htn_prevalence.toml", study: str | None = None) -> StudySpec:
    mapping = json.loads(StudySpec.from_toml(EXAMPLES / name).canonical_json())
    mapping["federation"] = {"secure_aggregation": True}
    if study is not None:
        mapping["study"]["name"] = study
    return StudySpec.from_mapping(mapping)


def _persistent(home: Path, node_id: int, run_id: int, received: list[Message] | None = None):  # type: ignore[no-untyped-def]
    """The node's ClientApp as a SuperNode runs it: one Context per run (SecAgg+ keeps its state there);
    an exception becomes an error reply; every reply the coordinator receives is kept in `received`."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    context = Context(run_id=run_id, node_id=node_id, node_config={"home": str(home)}, state=RecordDict(), run_config={})

    def handle(message: Message) -> Message:
        try:
            reply = client_app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - as Flower's ClientApp runner reports it
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=message)
        if received is not None:
            received.append(reply)
        return reply

    return handle


def _released(site, run_id: int) -> dict:  # type: ignore[no-untyped-def, type-arg]
    [record] = [
        e.payload for e in NodeHome.open(site.home).audit_log().entries()
        if e.kind == "release" and e.payload["run"] == str(run_id) and e.payload["message"] == "statistics"
    ]
    return record


def test_a_secure_studys_totals_are_the_sum_of_what_each_node_released(alliance, tmp_path: Path) -> None:
    from federation.study import combine

    spec = _secure()
    run_id = 301
    received: list[Message] = []
    handlers = {10 + i: _persistent(s.home, 10 + i, run_id, received) for i, s in enumerate(alliance)}
    result, tracker = _run(alliance, spec, tmp_path, run_id=run_id, handlers=handlers)
    assert tracker.status == "FINISHED"
    assert result.totals is not None and result.answers == {}
    assert result.contributors == ["hospital_1", "hospital_2", "hospital_3"]
    records = [_released(site, run_id) for site in alliance]
    cells = spec.query.n_cells
    for index, release in enumerate(result.totals.releases):
        sent = [r["releases"][index] for r in records]
        assert all(s["secure_aggregation"]["masked"] for s in records) if index == 0 else True
        for at, total in enumerate(release.values):
            values = [s["values"][at] for s in sent if s["values"][at] is not None]
            if not values:
                assert total is None
                continue
            # Counts exactly; sums to floating point: what each node recorded as sent (in whole quanta).
            assert total == pytest.approx(sum(values), rel=1e-12, abs=1e-9)
    reported = [sum(cell not in r["suppressed"] for r in records) for cell in range(cells)]
    assert list(result.totals.sites) == reported
    # Pooled from the totals, the estimates are those pooled from the nodes' own (recorded) answers.
    plain = combine(spec.query, [{"releases": r["releases"], "suppressed": r["suppressed"]} for r in records])
    assert len(plain) == len(result.rows)
    for secure_row, plain_row in zip(result.rows, plain, strict=True):
        assert (secure_row.statistic, secure_row.cell, secure_row.quantity) == (plain_row.statistic, plain_row.cell, plain_row.quantity)
        assert secure_row.value.sites == plain_row.value.sites and secure_row.value.suppressed == plain_row.value.suppressed
        np.testing.assert_allclose(
            [secure_row.value.estimate, secure_row.value.lower, secure_row.value.upper],
            [plain_row.value.estimate, plain_row.value.lower, plain_row.value.upper],
            rtol=1e-9, atol=1e-9,
        )
    # Each node was charged the whole query once, and says so in its reply's plain part.
    charged = epsilon(spec.query.events(), delta=BUDGET_DELTA, accountant="pld")
    for site in alliance:
        assert result.epsilon[site.name]["epsilon-run"] == pytest.approx(charged, rel=1e-9)
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            assert sum(c.run_id == str(run_id) for c in ledger.charges(DATASET)) == len(spec.query.releases())
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["secure_aggregation"] is True
    assert summary["secure_sum"]["contributing_sites"] == ["hospital_1", "hospital_2", "hospital_3"]
    assert all(s["suppressed_cells"] is None and s["in_secure_sum"] for s in summary["sites"].values())
    assert tracker.tags["medfed.secure_aggregation"] == "true"
    assert "securely aggregated (SecAgg+: only totals were seen)" in (tmp_path / "out" / "estimates.txt").read_text().replace("\n", " ")


def test_the_coordinator_of_a_secure_study_receives_no_sites_vector(alliance, tmp_path: Path) -> None:
    from flwr.common import bytes_to_ndarray

    from federation.protocol import secure_clipping_range, secure_encoding
    from federation.study import release_layout

    spec = _secure(study="secure-view")
    run_id = 302
    received: list[Message] = []
    handlers = {10 + i: _persistent(s.home, 10 + i, run_id, received) for i, s in enumerate(alliance)}
    _run(alliance, spec, tmp_path, run_id=run_id, handlers=handlers)
    masked = []
    for reply in received:
        assert not reply.has_error()
        assert STATISTICS_KEY not in reply.content  # no plain answer, ever
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no plain array
        secagg = reply.content.config_records.get("secaggplus_configs")
        if secagg is not None and "masked_params" in secagg:
            masked.append([bytes_to_ndarray(b) for b in secagg["masked_params"]])
    assert len(masked) == len(alliance)
    # What a node's masked vector holds is not its answer: the plaintext vectors appear nowhere.
    layout = release_layout(spec)
    for site in alliance:
        record = _released(site, run_id)
        answer = SiteAnswer.from_json(json.dumps({"releases": [
            {k: r[k] for k in ("statistic", "name", "values", "scale", "mechanism", "sensitivity")} for r in record["releases"]
        ], "suppressed": record["suppressed"]}))
        _, plain = secure_encoding(answer, layout, spec.query.n_cells)
        shifted = [p + secure_clipping_range(3) for p in plain]  # as SecAgg+ quantises them, before masking
        for vectors in masked:
            assert not any(np.array_equal(v, p) for v in vectors for p in plain + shifted)
    kept = json.loads((tmp_path / "out" / ANSWERS_FILE).read_text())
    assert all("answer" not in r for r in kept["replies"])
    assert [r["answer_masked"] for r in kept["replies"] if r["message"] == "statistics"] == [True] * 3
    assert kept["secure_sum"]["protocol"] == "SecAgg+" and kept["secure_sum"]["contributors"] == 3


def test_a_node_that_drops_out_before_its_masked_answer_is_left_out_and_keeps_its_budget(alliance, tmp_path: Path) -> None:
    spec = _secure(study="secure-dropout")
    run_id = 303
    handlers = {10 + i: _persistent(s.home, 10 + i, run_id) for i, s in enumerate(alliance)}
    holder = drops_out_at(handlers, 12, COLLECT_STAGE)  # before it sends its masked answer
    _approve(alliance, spec)
    grid = InProcessGrid(handlers, run_id=run_id)
    holder["grid"] = grid
    tracker = InMemoryTracker()
    result = run_study(grid, spec, signed=signed_spec(spec, alliance[0].home.parent.parent), tracker=tracker,
                       output_dir=tmp_path / "out", options=OPTIONS)
    assert result.contributors == ["hospital_1", "hospital_2"]
    assert {o.site: o.status for o in result.sites.values()}["hospital_3"] == "dropped"
    records = [_released(site, run_id) for site in alliance[:2]]
    counts = [i for i, r in enumerate(spec.query.releases()) if r.mechanism == "discrete-laplace"][0]
    for at, total in enumerate(result.totals.releases[counts].values):
        values = [r["releases"][counts]["values"][at] for r in records if r["releases"][counts]["values"][at] is not None]
        assert total == (sum(values) if values else None)
    with PrivacyLedger.open(NodeHome.open(alliance[2].home).ledger_path) as ledger:
        assert [c for c in ledger.charges(DATASET) if c.run_id == str(run_id)] == []


def test_a_secure_study_needs_two_sites_whatever_min_sites_says(alliance, tmp_path: Path) -> None:
    spec = _secure(study="secure-lonely")
    _approve(alliance[:1], spec)
    grid = InProcessGrid({10: _persistent(alliance[0].home, 10, 304), 11: _handler(alliance[1].home)}, run_id=304)
    options = StudyOptions(min_sites=1, node_wait_seconds=0.1, approval_wait_seconds=0.1, timeout_seconds=60)
    with pytest.raises(NotEnoughNodesError, match=r"1 of 2 hospital node\(s\) accepted the study; it needs 2 \(secure aggregation: SecAgg\+ sums at least 2 sites' answers\)"):
        run_study(grid, spec, signed=signed_spec(spec, alliance[0].home.parent.parent), tracker=InMemoryTracker(),
                  output_dir=tmp_path / "out", options=options)
    with PrivacyLedger.open(NodeHome.open(alliance[0].home).ledger_path) as ledger:
        assert [c for c in ledger.charges(DATASET) if c.run_id == "304"] == []


def test_a_node_that_drops_out_after_its_masked_answer_is_in_the_sum_and_charged(alliance, tmp_path: Path) -> None:
    spec = _secure(study="secure-late-dropout")
    run_id = 305
    handlers = {10 + i: _persistent(s.home, 10 + i, run_id) for i, s in enumerate(alliance)}
    holder = drops_out_at(handlers, 12, UNMASK_STAGE)  # after its masked answer is in the sum
    _approve(alliance, spec)
    grid = InProcessGrid(handlers, run_id=run_id)
    holder["grid"] = grid
    result = run_study(grid, spec, signed=signed_spec(spec, alliance[0].home.parent.parent), tracker=InMemoryTracker(),
                       output_dir=tmp_path / "out", options=OPTIONS)
    # Two share holders of three recover its masks: its answer counts, and it was charged.
    assert result.contributors == ["hospital_1", "hospital_2", "hospital_3"]
    assert result.totals is not None and result.totals.contributors == 3
    records = [_released(site, run_id) for site in alliance]
    for at, total in enumerate(result.totals.releases[1].values):
        values = [r["releases"][1]["values"][at] for r in records if r["releases"][1]["values"][at] is not None]
        assert total == (sum(values) if values else None)
    with PrivacyLedger.open(NodeHome.open(alliance[2].home).ledger_path) as ledger:
        assert sum(c.run_id == str(run_id) for c in ledger.charges(DATASET)) == len(spec.query.releases())


def test_a_refusal_at_the_collect_stage_reaches_the_coordinator_and_charges_nothing(alliance, tmp_path: Path) -> None:
    from clients.hospital_node.governance import revoke

    spec = _secure(study="secure-revoked")
    run_id = 306
    handlers = {10 + i: _persistent(s.home, 10 + i, run_id) for i, s in enumerate(alliance)}
    revoking = handlers[11]

    def officer_revokes_after_the_query(message: Message) -> Message:
        if message.metadata.message_type == "train" and "fitins.config" in message.content.config_records:
            revoke(NodeHome.open(alliance[1].home), spec.digest(), dataset=DATASET, reason="ethics review", by="officer")
        return revoking(message)

    handlers[11] = officer_revokes_after_the_query
    result, _ = _run(alliance, spec, tmp_path, run_id=run_id, handlers=handlers)
    assert result.contributors == ["hospital_1", "hospital_3"]
    [refused] = [o for o in result.sites.values() if o.site == "hospital_2"]
    assert (refused.status, refused.reason) == ("refused", "approval revoked by this node's officer: ethics review")
    assert result.totals is not None and max(result.totals.sites) == 2
    with PrivacyLedger.open(NodeHome.open(alliance[1].home).ledger_path) as ledger:
        assert [c for c in ledger.charges(DATASET) if c.run_id == str(run_id)] == []
