"""One federated experiment on the coordinator, from a validated spec to a tracked result.

The sequence (DESIGN.md, "Data flow of one experiment"):

1. wait up to ``federation.node_wait_seconds`` for ``federation.min_nodes`` nodes;
2. a *query* wave: each node says whether it takes part, or why not. Every message
   carries the partner-signed spec; each node checks the signature, its officer's
   approval, its policy and its budget itself. Nodes whose officer has not decided yet
   answer "awaiting approval"; they are asked again every ``APPROVAL_POLL_SECONDS``
   until ``federation.approval_wait_seconds`` has passed. Fewer acceptances than the
   minimum then stops the run with every site's status and reason, before anything is
   tracked. The coordinator's own slow start (importing torch, MLflow and Opacus,
   building the model, composing the plan's epsilon) happens while the first query wave
   is out;
3. the tracked run starts; each round is one *train* wave (nodes train the incoming
   global model with DP-SGD, weighted by each site's released noisy training size; with
   ``privacy.evaluate_every_round`` they also release the incoming model's noisy
   validation-score histogram) aggregated by the spec's strategy; with
   ``federation.secure_aggregation`` the round is Flower's SecAgg+ workflow instead
   (:mod:`federation.secure_aggregation`: three more waves, and the coordinator sees
   only the sum of the updates), collected, checked and tracked the same way;
4. one *evaluate* wave on the final model, during which the model and the spec are
   saved and logged; each node answers with its noisy validation-score histogram by
   label. The headline quality is the *pooled* AUC, loss, accuracy, Brier score and
   calibration curve of the summed histograms (:mod:`federation.metrics`), each site's
   own from its histogram beside it; the calibration curve is saved and logged as
   ``calibration.csv`` and ``calibration.png``; then a privacy summary.

After the tracked run starts and after every round the coordinator checkpoints the
submission (:mod:`federation.checkpoint`) in its output folder. A Flower run of the same
submission after a coordinator restart (``medfed experiment resume``, or ``submit
--wait`` by itself) finds the checkpoint, asks the nodes again (each recognises the
submission as the run continuing) and goes on from the round after the last completed
one, into the same tracked run; a finished submission is not run twice.

Node sampling and deadlines (README, "Sampling and deadlines"): before the query the
coordinator draws the submission's schedule (:mod:`federation.schedule`): with
``federation.fraction_per_round`` = f each queried node trains exactly ``ceil(f x rounds)``
rounds, and its query carries its own rounds, which it reserves (and no others). Every
round, the strategy (or SecAgg+) sees a grid listing only that round's scheduled
participants, so Flower's own aggregation still does the work; a round whose scheduled
and accepting nodes are fewer than ``federation.min_nodes`` stops the run before it is
tracked. A train wave waits at most ``federation.round_deadline_seconds`` (else
``round_timeout_seconds``); a node that misses it is left out of that round's aggregate.
Its reply still comes (a node is charged when its reply leaves it): the coordinator keeps
the message ids of the missing replies and pulls them between rounds and once more before
the final report (:class:`LateReplies`), so the report says of every node which rounds it
was scheduled for, which were aggregated, which replied late (charged, not aggregated),
which it refused, and which never answered (its ledger says whether it was charged).

Any failure after step 3 marks the tracked run FAILED with its reason.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from experiments.cost import PrivacyPlan, PrivacySchedule, plan_privacy, privacy_schedule
from experiments.spec import ExperimentSpec
from experiments.tracking import Tracker
from federation.checkpoint import Checkpoint
from federation.errors import FederationError, NotEnoughNodesError
from experiments.quality_report import write_calibration
from federation.metrics import QUALITY_METRICS, aggregate_site_metrics, pooled_quality, site_quality
from federation.participants import ParticipantGrid
from federation.protocol import (
    ARRAYS_KEY,
    AWAITING_APPROVAL,
    REFUSAL_CODES,
    RELEASE_ACTION,
    CONFIG_KEY,
    EVAL_METRICS,
    IMAGING_TASK,
    QUERY_METRICS,
    TRAIN_METRICS,
    ImagingInstruction,
    SCHEDULE_KEY,
    ProtocolError,
    SignedSpec,
    TrainInstruction,
    read_metrics,
    read_refusal,
    read_site,
)
from federation.schedule import RoundSchedule, draw_schedule, schedule_seed
from federation.secure_aggregation import SecureRound, node_of, senders_of
from federation.strategies import build_strategy

__all__ = ["ExperimentResult", "LateReplies", "SiteOutcome", "build_model", "instruction_for", "run_experiment"]

logger = logging.getLogger(__name__)

MODEL_FILE = "final_model.pt"
WEIGHTS_FILE = "final_model.safetensors"  # what a node scores its patients with (models.weights)
SUMMARY_FILE = "privacy_summary.json"
APPROVAL_POLL_SECONDS = 5.0
HOLD_FILE = "HOLD"
HOLD_POLL_SECONDS = 1.0
#: The most the coordinator waits, before its final report, for replies that missed their round's deadline.
LATE_WAIT_SECONDS = 5.0
#: The tracked per-round count of the replies the round aggregated.
NODES_AGGREGATED = "nodes_aggregated"
#: What the report says of a scheduled round the node never answered.
NO_REPLY = "no reply; the node's ledger says whether it was charged"

ACCEPTED = "accepted"
AWAITING = "awaiting approval"
REFUSED = "refused"


@dataclass
class SiteOutcome:
    """What one node did in the experiment, as the coordinator saw it."""

    node_id: int
    site: str
    status: str = "unknown"  # accepted | awaiting approval | refused | no-answer | dropped
    reason: str = ""
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)  # aggregated: replied in time, valid
    final: dict[str, float] = field(default_factory=dict)
    scheduled: tuple[int, ...] = ()  # the rounds the node was scheduled for
    sent: set[int] = field(default_factory=set)  # the rounds a (charged) train message actually went to it
    late: dict[int, dict[str, float]] = field(default_factory=dict)  # replied after the deadline: charged, not aggregated
    refused_rounds: dict[int, str] = field(default_factory=dict)  # answered with a refusal or failure (in time or late)

    def round_report(self) -> dict[str, Any]:
        """Per round, what became of the node's scheduled rounds (the run summary's and the demo's table)."""
        done = set(self.rounds) | set(self.late) | set(self.refused_rounds)
        return {
            "rounds_scheduled": list(self.scheduled),
            "rounds_sent": sorted(self.sent),  # not all scheduled ones when it refused the run, or a round stopped first
            "rounds_aggregated": sorted(self.rounds),
            "rounds_late": sorted(self.late),  # the node replied, so it was charged; not in the aggregate
            "rounds_refused": {str(r): reason for r, reason in sorted(self.refused_rounds.items())},
            "rounds_no_reply": sorted(self.sent - done),
        }

    @property
    def epsilon(self) -> float | None:
        """The dataset's epsilon as the node last reported it (after its final evaluation, if it answered it)."""
        if "epsilon" in self.final:
            return self.final["epsilon"]
        last = max(self.rounds, default=None)
        return None if last is None else self.rounds[last].get("epsilon")


@dataclass
class ExperimentResult:
    """The outcome of a finished experiment."""

    spec: ExperimentSpec
    plan: PrivacyPlan
    sites: dict[int, SiteOutcome]
    history: dict[int, dict[str, float]]
    final: dict[str, float]
    arrays: ArrayRecord
    tracking_run_id: str

    def privacy_summary(self) -> dict[str, Any]:
        """Per-site privacy facts for the researcher (no patient data, no sizes beyond counts)."""
        return {
            "spec_digest": self.spec.digest(),
            "accountant": self.plan.accountant,
            "delta": self.plan.delta,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "steps_per_round": self.plan.steps_per_round,
            "rounds": self.plan.rounds,
            "rounds_per_node": self.plan.rounds_per_node,
            "fraction_per_round": self.spec.federation.fraction_per_round,
            "round_deadline_seconds": self.spec.federation.deadline_seconds,
            "no_reply_means": NO_REPLY,
            "epsilon_charged_by_this_experiment": self.plan.epsilon_charged_per_site,  # PLD, as each node charges it
            "epsilon_planning_estimate": self.plan.epsilon_per_site,  # by "accountant"
            "secure_aggregation": self.spec.federation.secure_aggregation,
            "sites": {
                o.site: {"status": o.status, "reason": o.reason, "epsilon_spent_on_dataset": o.epsilon, **o.round_report()}
                for o in self.sites.values()
            },
        }


def instruction_for(spec: ExperimentSpec, plan: PrivacySchedule) -> TrainInstruction:
    """The node-facing instruction of a spec: every value explicit."""
    imaging = None
    if spec.imaging is not None:
        section = spec.imaging
        imaging = ImagingInstruction(
            modalities=tuple(section.modalities),
            body_parts=tuple(section.body_parts or ()),
            series_description=section.series_description or "",
            size=section.size,
            intensity=section.intensity,
            window=section.window or "",
            window_center=section.window_center,
            window_width=section.window_width,
            projection=section.projection,
        )
    return TrainInstruction(
        experiment=spec.experiment.name,
        spec_digest=spec.digest(),
        dataset=spec.data.dataset,
        features=tuple(spec.data.features or ()),
        label=spec.data.label or "",
        scaling={k: (float(v[0]), float(v[1])) for k, v in spec.data.scaling.items()},
        cohort=spec.data.cohort,
        task=spec.experiment.task,
        imaging=imaging,
        model_kind=spec.model.kind,
        hidden=tuple(spec.model.hidden),
        channels=tuple(spec.model.channels or ()),
        local_epochs=spec.federation.local_epochs,
        learning_rate=spec.federation.learning_rate,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=spec.privacy.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        delta=plan.delta,
        accountant=plan.accountant,
        rounds=plan.rounds,
    )


def build_model(spec: ExperimentSpec):  # type: ignore[no-untyped-def]
    """The spec's initial model and an input example (two zero samples) for MLflow.

    The initial weights are drawn from a generator seeded with the spec's digest: the
    same spec starts from the same model, whichever coordinator (or restart) builds it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.digest()[:15], 16))
        return _build_model(spec)


def _build_model(spec: ExperimentSpec):  # type: ignore[no-untyped-def]
    import torch

    if spec.experiment.task == IMAGING_TASK:
        from models.imaging import build_imaging_model

        assert spec.imaging is not None and spec.model.channels is not None  # the spec's rules
        size = spec.imaging.size
        model = build_imaging_model(spec.model.kind, size, channels=spec.model.channels)
        return model, torch.zeros(2, 1, size, size)
    from models.tabular import build_tabular_model

    assert spec.data.features is not None  # the spec's rules
    model = build_tabular_model(spec.model.kind, len(spec.data.features), hidden=spec.model.hidden)
    return model, torch.zeros(2, len(spec.data.features))


def save_scoring_weights(spec: ExperimentSpec, model: Any, output_dir: Path) -> Path:
    """Write the tabular model as ``final_model.safetensors``: tensors and metadata, no pickled code.

    Its metadata binds the weights to the spec the nodes approved (the same digest the
    run's submissions and approvals name) and say how a node turns its cohort into the
    model's inputs (features in order, scaling, ``[data.cohort]``), so that a node can
    score its own patients with it after checking all of that against its officer's
    approval (``medfed node score``).
    """
    from federation.release import BundleError, release_version
    from models.weights import WeightsMetadata, save_weights

    assert spec.data.features is not None  # a tabular spec's rules
    data = json.loads(spec.canonical_json()).get("data", {})
    try:
        version = release_version()
    except BundleError:  # a source checkout without an install: the weights still carry the rest
        version = "unknown"
    metadata = WeightsMetadata(
        spec_digest=spec.digest(),
        model_kind=spec.model.kind,
        hidden=tuple(spec.model.hidden) if spec.model.kind == "mlp" else (),
        features=tuple(spec.data.features),
        scaling={k: (float(v[0]), float(v[1])) for k, v in spec.data.scaling.items()},
        cohort=data.get("cohort"),
        medfed_version=version,
        spec_json=spec.canonical_json(),
    )
    path = output_dir / WEIGHTS_FILE
    save_weights(path, model.state_dict(), metadata)
    return path


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughNodesError(
                f"only {len(nodes)} hospital node(s) connected within {timeout:g} s; the spec "
                f"requires federation.min_nodes = {minimum}. Start more nodes or lower min_nodes."
            )
        time.sleep(poll)


Content = RecordDict | Callable[[int], RecordDict]  # one record for every node, or each node's own


def _send(
    grid: ParticipantGrid,
    kind: str,
    record: Content,
    node_ids: Iterable[int],
    timeout: float,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[list[Message], dict[str, int]]:
    """Replies of one wave, and whom each sent message went to (see `senders_of`)."""
    messages = [Message(content=record(n) if callable(record) else record, dst_node_id=n, message_type=kind) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout, meanwhile=meanwhile))
    return replies, senders_of(messages)


def _collect(
    replies: Iterable[Message],
    sites: dict[int, SiteOutcome],
    expected: Iterable[int],
    allowed: tuple[str, ...],
    senders: Mapping[str, int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-node metrics of the valid replies; records refusals, failures and silences in `sites`."""
    answered: dict[int, dict[str, float]] = {}
    for reply in replies:
        node = node_of(reply, dict(senders or {}))
        outcome = sites.setdefault(node, SiteOutcome(node, f"node-{node}"))
        if reply.has_error():
            if reply.error.code not in REFUSAL_CODES:  # Flower's own: the node or its app failed
                outcome.status, outcome.reason = "dropped", f"error {reply.error.code}: {reply.error.reason}"
                continue
            outcome.site, reason = read_refusal(reply.error.reason, outcome.site)
            outcome.status = AWAITING if reply.error.code == AWAITING_APPROVAL else REFUSED
            outcome.reason = reason or f"error {reply.error.code}"
            continue
        try:
            answered[node] = read_metrics(reply.content, allowed)
        except ProtocolError as err:
            outcome.status, outcome.reason = REFUSED, f"invalid reply: {err}"
            continue
        outcome.site = read_site(reply.content, outcome.site)
        outcome.status, outcome.reason = ACCEPTED, ""
    for node in expected:
        if node not in answered and sites[node].status not in (REFUSED, AWAITING, "dropped"):
            sites[node].status = "no-answer" if sites[node].status == "unknown" else "dropped"
            sites[node].reason = sites[node].reason or "no reply before the timeout"
    return answered


def _wave(  # noqa: PLR0913
    grid: ParticipantGrid,
    kind: str,
    record: Content,
    nodes: list[int],
    sites: dict[int, SiteOutcome],
    allowed: tuple[str, ...],
    timeout: float,
    meanwhile: Callable[[], object] | None = None,
) -> dict[int, dict[str, float]]:
    """Send `record` to `nodes`, call `meanwhile`, and collect the replies (see `_collect`)."""
    replies, senders = _send(grid, kind, record, nodes, timeout, meanwhile)
    return _collect(replies, sites, nodes, allowed, senders)


def _site_report(sites: Mapping[int, SiteOutcome]) -> str:
    return "; ".join(
        f"{o.site}: {o.status}" + (f" ({o.reason})" if o.reason else "") for o in sorted(sites.values(), key=lambda o: o.site)
    )


def _metric_site(site: str) -> str:
    """A site name as MLflow accepts it in a metric key (letters, digits, _ - . / space)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", site)


def _round_metrics(step_metrics: Mapping[int, Mapping[str, float]], sites: Mapping[int, SiteOutcome], keys: Iterable[str]) -> dict[str, float]:
    """Aggregate plus per-site metrics in MLflow's naming (``<site>.<metric>``).

    A reply's score histogram counts as its quality metrics (``eval-auc``, ...): per site
    from its own histogram, in the aggregate from the pooled one.
    """
    keys = tuple(keys)
    flat = {k: v for k, v in aggregate_site_metrics(list(step_metrics.values())).items() if k in keys}
    for node, metrics in step_metrics.items():
        derived = {**metrics, **site_quality(metrics)}
        flat.update({f"{_metric_site(sites[node].site)}.{k}": v for k, v in derived.items() if k in keys})
    return {k.replace("-", "_"): v for k, v in flat.items()}


def _query_until_decided(  # noqa: PLR0913
    grid: Grid,
    record: Content,
    nodes: list[int],
    sites: dict[int, SiteOutcome],
    *,
    timeout: float,
    wait: float,
    meanwhile: Callable[[], object] | None = None,
    allowed: tuple[str, ...] = QUERY_METRICS,
) -> dict[int, dict[str, float]]:
    """The query wave, repeated for nodes awaiting their officer until none is or `wait` is over.

    `meanwhile` is called once, while the first wave is out; `allowed` are the metric keys
    a reply may carry (a study's admission reply carries none).
    """
    participants = ParticipantGrid(grid, nodes)
    accepted = _wave(participants, MessageType.QUERY, record, nodes, sites, allowed, timeout, meanwhile)
    deadline = time.monotonic() + wait
    while True:
        awaiting = [n for n in nodes if sites[n].status == AWAITING]
        left = deadline - time.monotonic()
        if not awaiting or left <= 0:
            return accepted
        logger.info("waiting for approval at %s (%.0f s left)", ", ".join(sites[n].site for n in awaiting), left)
        time.sleep(min(APPROVAL_POLL_SECONDS, left))
        accepted |= _wave(participants, MessageType.QUERY, record, awaiting, sites, allowed, timeout)


RoundRunner = Callable[[int, ArrayRecord, Any, dict[int, SiteOutcome]], tuple[dict[int, dict[str, float]], ArrayRecord | None]]


class _RoundGrid(ParticipantGrid):
    """One round's participants; remembers the id and node of every message it pushes.

    After the wave, the ids without a reply are the round's missing replies, which
    :class:`LateReplies` pulls later. Pushing is the only thing it adds: the wave's own
    polling is :meth:`ParticipantGrid.send_and_receive`'s.
    """

    def __init__(self, grid: Grid, participants: Iterable[int]) -> None:
        super().__init__(grid, participants)
        self.pushed: dict[str, int] = {}  # message id -> destination node

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        self.pushed |= {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
        return ids


@dataclass
class LateReplies:
    """Train messages whose replies missed their round's deadline, pulled later and reported, never aggregated.

    A node is charged when its reply leaves it, whether or not the reply is in time: a late
    reply is the record that it trained (and was charged) in that round. Pulling is one
    request to the SuperLink for the ids still missing; :meth:`settle` repeats it for a
    few seconds at most before the final report.
    """

    pending: dict[str, tuple[int, int]] = field(default_factory=dict)  # message id -> (node, round)
    poll_interval: float = 0.2

    def expect(self, message_id: str, node: int, server_round: int) -> None:
        self.pending[message_id] = (node, server_round)

    def pull(self, grid: Grid, sites: dict[int, SiteOutcome]) -> int:
        """Pull what has come of the missing replies into `sites`; returns how many came."""
        if not self.pending:
            return 0
        try:
            replies = list(grid.pull_messages(list(self.pending)))
        except Exception as err:  # noqa: BLE001 - a late reply is reported, never needed: the run goes on
            logger.warning("could not pull %d late repl(ies): %s", len(self.pending), err)
            return 0
        came = 0
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            if key not in self.pending:
                continue
            node, server_round = self.pending.pop(key)
            outcome = sites.setdefault(node, SiteOutcome(node, f"node-{node}"))
            came += 1
            if reply.has_error():
                outcome.refused_rounds[server_round] = f"error {reply.error.code} (late): {reply.error.reason}"
                continue
            try:
                metrics = read_metrics(reply.content, TRAIN_METRICS)
            except ProtocolError as err:
                outcome.refused_rounds[server_round] = f"invalid late reply: {err}"
                continue
            outcome.site = read_site(reply.content, outcome.site)
            outcome.late[server_round] = metrics
            logger.info("%s replied to round %d after its deadline: charged, not aggregated", outcome.site, server_round)
        return came

    def settle(self, grid: Grid, sites: dict[int, SiteOutcome], wait: float) -> None:
        """Pull the missing replies until none is missing or `wait` seconds have passed."""
        deadline = time.monotonic() + wait
        while True:
            self.pull(grid, sites)
            if not self.pending or time.monotonic() >= deadline:
                return
            time.sleep(self.poll_interval)


def _expect_late(
    late: LateReplies, pushed: Mapping[str, int], replies: Iterable[Message], server_round: int, sites: dict[int, SiteOutcome]
) -> None:
    """Note that the round's train message went to each node of `pushed`, and every one that has no reply yet."""
    replied = {r.metadata.reply_to_message_id for r in replies}
    for node in pushed.values():
        sites.setdefault(node, SiteOutcome(node, f"node-{node}")).sent.add(server_round)
    for message_id, node in pushed.items():
        if message_id not in replied:
            late.expect(message_id, node, server_round)


def _note_refusals(sites: dict[int, SiteOutcome], expected: Iterable[int], answered: Mapping[int, object], replied: Iterable[int], server_round: int) -> None:
    """Record the round as refused for the scheduled nodes that replied in time with a refusal or failure."""
    replied = set(replied)
    for node in expected:
        if node in replied and node not in answered:
            sites[node].refused_rounds[server_round] = sites[node].reason or sites[node].status


def _round_runner(  # noqa: PLR0913
    spec: ExperimentSpec,
    grid: Grid,
    query: Mapping[int, Mapping[str, float]],
    schedule: RoundSchedule,
    late: LateReplies,
    timeout: float,
) -> RoundRunner:
    """One training round of `spec`: its strategy's train wave, or a SecAgg+ round, over the round's scheduled nodes.

    Either returns the valid replies' metrics per node (refusals and silences recorded
    in the sites) and the new global model; fewer answers than the minimum stop the run.
    A wave waits `timeout` seconds (the spec's round deadline); the replies it misses go
    to `late`.
    """
    fed = spec.federation

    def enough(server_round: int, answered: Mapping[int, object], sites: dict[int, SiteOutcome]) -> None:
        if len(answered) < fed.min_nodes:
            raise NotEnoughNodesError(
                f"round {server_round}: {len(answered)} node(s) replied before the round's deadline of {timeout:g} s, "
                f"fewer than federation.min_nodes = {fed.min_nodes}. Per site: {_site_report(sites)}"
            )

    def round_grid(server_round: int, sites: dict[int, SiteOutcome]) -> _RoundGrid:
        """The round's scheduled participants that accepted, still connected; too few stop the run."""
        view = _RoundGrid(grid, [n for n in schedule.participants(server_round) if n in query])
        present = list(view.get_node_ids())
        if len(present) < fed.min_nodes:
            raise NotEnoughNodesError(
                f"round {server_round}: {len(present)} of its scheduled node(s) accepted the run and are connected, "
                f"fewer than federation.min_nodes = {fed.min_nodes}. Per site: {_site_report(sites)}"
            )
        return view

    if fed.secure_aggregation:
        secure = SecureRound(
            num_shares=fed.secagg_num_shares,
            reconstruction_threshold=fed.secagg_reconstruction_threshold,
            max_weight=max(float(m.get("num-examples", 0.0)) for m in query.values()) or 1.0,
            timeout=timeout,
        )

        def secure_round(server_round: int, arrays: ArrayRecord, config: Any, sites: dict[int, SiteOutcome]):  # type: ignore[no-untyped-def]
            participants = round_grid(server_round, sites)
            result = secure.run(participants, server_round, arrays, config)
            answered = _collect(result.replies, sites, result.sampled, TRAIN_METRICS, result.senders)
            _note_refusals(sites, result.sampled, answered, (node_of(r, result.senders) for r in result.replies), server_round)
            # Only the collect wave's train messages are charged; a node that missed it replies later.
            _expect_late(late, result.collect_sent, result.collect_replies, server_round, sites)
            if result.arrays is None:
                raise FederationError(
                    f"round {server_round}: secure aggregation stopped after {result.waves} of its 4 waves: "
                    f"{len(answered)} of {len(result.sampled)} node(s) sent a masked update; SecAgg+ needs at least "
                    f"2 and the reconstruction threshold of {result.threshold} share holders. Per site: {_site_report(sites)}"
                )
            enough(server_round, answered, sites)
            return answered, result.arrays

        return secure_round

    strategy = build_strategy(
        fed.strategy,
        min_nodes=fed.min_nodes,
        proximal_mu=fed.proximal_mu,
        server_learning_rate=fed.server_learning_rate,
        client_learning_rate=fed.learning_rate,
    )

    def plain_round(server_round: int, arrays: ArrayRecord, config: Any, sites: dict[int, SiteOutcome]):  # type: ignore[no-untyped-def]
        participants = round_grid(server_round, sites)
        messages = list(strategy.configure_train(server_round, arrays, config, participants))
        replies = list(participants.send_and_receive(messages, timeout=timeout))
        senders = senders_of(messages)
        expected = list(participants.get_node_ids())
        answered = _collect(replies, sites, expected, TRAIN_METRICS, senders)
        _note_refusals(sites, expected, answered, (node_of(r, senders) for r in replies), server_round)
        _expect_late(late, participants.pushed, replies, server_round, sites)
        enough(server_round, answered, sites)
        valid = [r for r in replies if not r.has_error() and r.metadata.src_node_id in answered]
        new_arrays, _ = strategy.aggregate_train(server_round, valid)
        return answered, new_arrays

    return plain_round


def _release(grid: Grid, nodes: list[int], config: Any, timeout: float) -> None:
    """Tell the nodes that accepted a run that ended early to give back what they reserved for it.

    Best effort: a node that does not hear it lets the reservation expire after its hold time.
    """
    if not nodes:
        return
    kind = f"{MessageType.QUERY}.{RELEASE_ACTION}"
    try:
        replies = _send(ParticipantGrid(grid, nodes), kind, RecordDict({CONFIG_KEY: config}), nodes, min(timeout, 60.0))[0]
    except Exception as err:  # noqa: BLE001 - the run has failed already; say why the release did not go out
        logger.warning("could not ask %d node(s) to release their reservations: %s", len(nodes), err)
        return
    refused = [r.metadata.src_node_id for r in replies if r.has_error()]
    logger.info("asked %d node(s) to release the run's reservations; %d answered, %d refused", len(nodes), len(replies), len(refused))


def _hold_requested(output_dir: Path, completed: int) -> Path | None:
    """The hold file that asks to stop after round `completed`, if any (see :func:`_hold_if_asked`)."""
    for path in (output_dir / HOLD_FILE, output_dir.parent / HOLD_FILE):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if not text or (text.isdigit() and completed >= int(text)):
            return path
    return None


def _hold_if_asked(output_dir: Path, checkpoint: Checkpoint) -> None:
    """Wait between rounds while the operator holds submissions (before restarting the coordinator, say).

    A file ``HOLD`` in the submission's folder, or in the output folder for every
    submission, holds the run before its next round; holding "N" holds it once round N
    is done. The checkpoint says it is held; the run goes on when the file is removed,
    or a restarted coordinator continues it from the checkpoint.
    """
    path = _hold_requested(output_dir, checkpoint.round)
    if path is None:
        return
    logger.warning("submission %s held after round %d by %s; remove it to go on", checkpoint.submission_id[:12], checkpoint.round, path)
    checkpoint.held = True
    checkpoint.save(output_dir)
    while _hold_requested(output_dir, checkpoint.round) is not None:
        time.sleep(HOLD_POLL_SECONDS)
    checkpoint.held = False
    checkpoint.save(output_dir)


def _schedule_of(spec: ExperimentSpec, submission_id: str, connected: list[int], checkpoint: Checkpoint | None) -> RoundSchedule:
    """The submission's schedule: the one its checkpoint recorded (a continuation), or drawn now over `connected`.

    Without sampling every connected node trains every round, as before sampling
    existed; with it, a continuation keeps the schedule the nodes recorded at
    admission (node ids are stable under node authentication; a node that finds
    another schedule in its query refuses it, and nothing is charged).
    """
    fed = spec.federation
    if fed.fraction_per_round < 1 and checkpoint is not None and checkpoint.schedule:
        return RoundSchedule.from_mapping(checkpoint.schedule)
    seed = schedule_seed(spec.digest(), submission_id)
    schedule = draw_schedule(connected, rounds=fed.rounds, fraction=fed.fraction_per_round, seed=seed)
    if schedule.per_node < schedule.rounds:
        logger.info(
            "schedule of submission %s: %d of %d round(s) per node, %s", submission_id[:12], schedule.per_node, fed.rounds,
            "; ".join(f"round {r}: nodes {', '.join(map(str, schedule.participants(r)))}" for r in range(1, fed.rounds + 1)),
        )
    return schedule


def _keep_outcomes(checkpoint: Checkpoint, sites: Mapping[int, SiteOutcome]) -> None:
    """The sites' rounds as the checkpoint keeps them, by site name: aggregated, late, refused."""
    checkpoint.site_rounds = {o.site: dict(o.rounds) for o in sites.values() if o.rounds}
    checkpoint.site_late = {o.site: dict(o.late) for o in sites.values() if o.late}
    checkpoint.site_refused = {o.site: dict(o.refused_rounds) for o in sites.values() if o.refused_rounds}
    checkpoint.site_sent = {o.site: sorted(o.sent) for o in sites.values() if o.sent}


def _log_round_report(tracker: Tracker, sites: Mapping[int, SiteOutcome]) -> None:
    """Each site's count of scheduled, aggregated, late and unanswered rounds, as MLflow metrics.

    Only for the sites a train message went to: a site that refused the run (or was never
    reached) reports nothing per site, as before sampling, so the final table and
    :func:`experiments.progress.site_results` list the sites that took part.
    """
    metrics = {}
    for outcome in sites.values():
        if not outcome.sent:
            continue
        report = outcome.round_report()
        name = _metric_site(outcome.site).replace("-", "_")  # as _round_metrics names a site's metrics
        metrics |= {
            f"{name}.rounds_scheduled": float(len(report["rounds_scheduled"])),
            f"{name}.rounds_aggregated": float(len(report["rounds_aggregated"])),
            f"{name}.rounds_late": float(len(report["rounds_late"])),
            f"{name}.rounds_no_reply": float(len(report["rounds_no_reply"])),
        }
    if metrics:
        tracker.log_metrics(metrics, step=0)


def run_experiment(
    grid: Grid,
    spec: ExperimentSpec,
    *,
    signed: SignedSpec,
    tracker: Tracker,
    output_dir: Path,
    tags: Mapping[str, str] | None = None,
    on_round: Callable[[int, Mapping[str, float]], None] | None = None,
    flower_run_id: int | None = None,
) -> ExperimentResult:
    """Run `spec` over the nodes of `grid`; see the module docstring for the sequence.

    `output_dir` is the submission's folder: a checkpoint there (:mod:`federation.checkpoint`)
    means this run continues the submission after a coordinator restart, from the round
    after the last one completed, into the same tracked run.
    """
    schedule = privacy_schedule(spec)
    instruction = instruction_for(spec, schedule)
    if signed.spec_json != spec.canonical_json():
        raise FederationError("the signed spec is not the spec of this run; submit it again with `medfed experiment submit`")
    submission_id = signed.submission_id
    checkpoint = Checkpoint.load(output_dir)
    if checkpoint is not None:
        if checkpoint.finished:
            raise FederationError(
                f"submission {submission_id[:12]} already finished (Flower runs {', '.join(map(str, checkpoint.flower_runs))}); "
                f"its results are in MLflow run {checkpoint.tracking_run_id}. Submit the spec again for a new run"
            )
        if (checkpoint.submission_id, checkpoint.spec_digest) != (submission_id, spec.digest()):
            raise FederationError(f"the checkpoint in {output_dir} belongs to another submission; use another output folder")
    fed = spec.federation
    timeout = fed.round_timeout_seconds

    def config(server_round: int = 0):  # type: ignore[no-untyped-def]
        return signed.add_to(instruction.to_config(server_round))

    connected = _wait_for_nodes(grid, fed.min_nodes, fed.node_wait_seconds)
    roster = _schedule_of(spec, submission_id, connected, checkpoint)
    sampled = roster.per_node < roster.rounds

    def query_record(node: int) -> RecordDict:
        """The query: every node's the same, with its own scheduled rounds when the spec samples nodes."""
        record = config()
        if sampled:
            record[SCHEDULE_KEY] = list(roster.of(node))
        return RecordDict({CONFIG_KEY: record})

    prepared: list[tuple[Any, Any, PrivacyPlan]] = []

    def start_up() -> None:
        """The coordinator's slow start, while the nodes answer the query: nothing is written."""
        model, input_example = build_model(spec)
        tracker.prepare()
        prepared.append((model, input_example, plan_privacy(spec, schedule)))  # Opacus: seconds

    queried = [n for n in connected if roster.of(n)]
    sites = {n: SiteOutcome(n, f"node-{n}", scheduled=roster.of(n)) for n in queried}
    query = _query_until_decided(
        grid,
        query_record,
        queried,
        sites,
        timeout=timeout,
        wait=fed.approval_wait_seconds,
        meanwhile=start_up,
    )
    if len(query) < fed.min_nodes:
        _release(grid, list(query), config(), timeout)
        raise NotEnoughNodesError(
            f"{len(query)} of {len(queried)} hospital node(s) accepted the experiment; the spec "
            f"requires federation.min_nodes = {fed.min_nodes}. Per site: {_site_report(sites)}"
        )
    first = checkpoint.round + 1 if checkpoint is not None else 1
    thin = {r: n for r in range(first, fed.rounds + 1) if (n := sum(1 for node in roster.participants(r) if node in query)) < fed.min_nodes}
    if thin:
        # Known before anything trains: stop now rather than spend the rounds before it.
        _release(grid, list(query), config(), timeout)
        worst = min(thin, key=thin.__getitem__)
        raise NotEnoughNodesError(
            f"round {worst} would have {thin[worst]} node(s): of the {len(query)} that accepted, federation.fraction_per_round "
            f"{fed.fraction_per_round:g} schedules {roster.per_node} of {fed.rounds} round(s) each, fewer than "
            f"federation.min_nodes = {fed.min_nodes} in round(s) {', '.join(map(str, sorted(thin)))}; raise "
            f"fraction_per_round or lower min_nodes. Per site: {_site_report(sites)}"
        )
    logger.info("experiment %s: %d site(s) accepted: %s", spec.experiment.name, len(query), _site_report(sites))

    ((model, input_example, plan),) = prepared
    participants = ParticipantGrid(grid, query)
    late = LateReplies()
    train_round = _round_runner(spec, grid, query, roster, late, fed.deadline_seconds)
    if checkpoint is None:
        run_id = tracker.start(
            experiment=spec.experiment.mlflow_experiment or spec.experiment.name,
            run_name=spec.experiment.name,
            params={**spec.to_mapping(), "plan": asdict(plan)},
            tags={"medfed.spec_digest": spec.digest(), "medfed.submission_id": submission_id, **(tags or {})},
        )
        checkpoint = Checkpoint(
            submission_id, spec.digest(), 0, run_id, arrays=ArrayRecord(model.state_dict()), schedule=roster.to_mapping()
        )
    else:
        run_id = checkpoint.tracking_run_id
        tracker.resume(run_id)
        checkpoint.schedule = roster.to_mapping()  # the recorded one (sampled), or every connected node every round
        by_name = {outcome.site: node for node, outcome in sites.items()}
        recorded = (("rounds", checkpoint.site_rounds), ("late", checkpoint.site_late),
                    ("refused_rounds", checkpoint.site_refused), ("sent", checkpoint.site_sent))
        for field_name, per_site in recorded:
            for site, values in per_site.items():
                if site in by_name:
                    getattr(sites[by_name[site]], field_name).update(values)
        logger.info("submission %s continues after round %d of %d", submission_id[:12], checkpoint.round, fed.rounds)
    if flower_run_id is not None:
        checkpoint.flower_runs.append(flower_run_id)
    checkpoint.save(output_dir)
    arrays = checkpoint.arrays if checkpoint.arrays is not None else ArrayRecord(model.state_dict())
    history: dict[int, dict[str, float]] = checkpoint.history
    try:
        for server_round in range(checkpoint.round + 1, fed.rounds + 1):
            late.pull(grid, sites)  # what missed earlier deadlines and has come since: reported, not aggregated
            _hold_if_asked(output_dir, checkpoint)
            answered, new_arrays = train_round(server_round, arrays, config(server_round), sites)
            for node, metrics in answered.items():
                sites[node].rounds[server_round] = metrics
            if new_arrays is None:
                raise FederationError(f"round {server_round}: the strategy produced no model")
            arrays = new_arrays
            # With evaluate_every_round, nodes scored the model they received: that of the previous round.
            incoming = _round_metrics(answered, sites, QUALITY_METRICS)
            trained = _round_metrics(answered, sites, ("epsilon", "epsilon-run"))
            if incoming:
                tracker.log_metrics(incoming, step=server_round - 1)
            tracker.log_metrics(trained, step=server_round)
            tracker.log_metrics({NODES_AGGREGATED: float(len(answered))}, step=server_round)  # fewer when sampled or late
            history[server_round - 1] = {**history.get(server_round - 1, {}), **incoming}
            history[server_round] = {**history.get(server_round, {}), **trained}
            checkpoint.round, checkpoint.arrays = server_round, arrays
            _keep_outcomes(checkpoint, sites)
            checkpoint.save(output_dir)
            if on_round is not None:
                on_round(server_round, history[server_round - 1] | history[server_round])

        def save_model() -> None:
            """Save and log the final model while the nodes evaluate it."""
            import torch

            model.load_state_dict(arrays.to_torch_state_dict())
            output_dir.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), output_dir / MODEL_FILE)
            if spec.experiment.task != IMAGING_TASK:
                tracker.log_artifact(save_scoring_weights(spec, model, output_dir))
            tracker.log_text(spec.canonical_json(), "spec.json")
            tracker.log_model(model, input_example=input_example.numpy())

        final_record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config(fed.rounds)})
        nodes = list(participants.get_node_ids())
        final_sites = _wave(participants, MessageType.EVALUATE, final_record, nodes, sites, EVAL_METRICS, timeout, save_model)
        for node, metrics in final_sites.items():
            sites[node].final = {**site_quality(metrics), **{k: v for k, v in metrics.items() if k.startswith("epsilon")}}
        # The replies that missed their deadline and are still out: a last, short look before the report.
        late.settle(grid, sites, wait=min(LATE_WAIT_SECONDS, fed.deadline_seconds))
        _log_round_report(tracker, sites)
        # The headline: the pooled quality over every site's validation patients; and each
        # site's epsilon once its evaluation was charged (what the run charged in all).
        final = _round_metrics(final_sites, sites, (*QUALITY_METRICS, "epsilon", "epsilon-run"))
        tracker.log_metrics(final, step=fed.rounds)
        pooled = pooled_quality(list(final_sites.values()))
        if pooled is not None:
            for path in write_calibration(pooled.calibration, output_dir, auc=pooled.auc):
                tracker.log_artifact(path)
        history[fed.rounds] = {**history.get(fed.rounds, {}), **final}

        result = ExperimentResult(spec, plan, sites, history, final, arrays, run_id)
        summary = json.dumps(result.privacy_summary(), indent=2, sort_keys=True)
        (output_dir / SUMMARY_FILE).write_text(summary + "\n")
        tracker.log_text(summary, SUMMARY_FILE)
        checkpoint.finished = True
        _keep_outcomes(checkpoint, sites)
        checkpoint.save(output_dir)
    except Exception as err:
        tracker.finish(failed=True, reason=str(err))
        _release(grid, list(query), config(), timeout)
        raise
    except BaseException as err:
        # Stopped with the coordinator (a signal): the submission resumes, its reservations stand.
        tracker.finish(failed=True, reason=str(err) or type(err).__name__)
        raise
    tracker.finish()
    return result
