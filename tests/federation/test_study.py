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
