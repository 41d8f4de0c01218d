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
    ProtocolError,
    SignedSpec,
    TrainInstruction,
    read_metrics,
    read_refusal,
    read_site,
)
from federation.secure_aggregation import SecureRound, node_of, senders_of
from federation.strategies import build_strategy

__all__ = ["ExperimentResult", "SiteOutcome", "build_model", "instruction_for", "run_experiment"]

logger = logging.getLogger(__name__)

MODEL_FILE = "final_model.pt"
WEIGHTS_FILE = "final_model.safetensors"  # what a node scores its patients with (models.weights)
SUMMARY_FILE = "privacy_summary.json"
APPROVAL_POLL_SECONDS = 5.0
HOLD_FILE = "HOLD"
HOLD_POLL_SECONDS = 1.0

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
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)

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
            "epsilon_charged_by_this_experiment": self.plan.epsilon_charged_per_site,  # PLD, as each node charges it
            "epsilon_planning_estimate": self.plan.epsilon_per_site,  # by "accountant"
            "secure_aggregation": self.spec.federation.secure_aggregation,
            "sites": {
                o.site: {"status": o.status, "reason": o.reason, "epsilon_spent_on_dataset": o.epsilon}
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


def _send(
    grid: ParticipantGrid,
    kind: str,
    record: RecordDict,
    node_ids: Iterable[int],
    timeout: float,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[list[Message], dict[str, int]]:
    """Replies of one wave, and whom each sent message went to (see `senders_of`)."""
    messages = [Message(content=record, dst_node_id=n, message_type=kind) for n in node_ids]
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
    record: RecordDict,
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
    record: RecordDict,
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


def _round_runner(spec: ExperimentSpec, participants: ParticipantGrid, query: Mapping[int, Mapping[str, float]], timeout: float) -> RoundRunner:
    """One training round of `spec`: its strategy's train wave, or a SecAgg+ round.

    Either returns the valid replies' metrics per node (refusals and silences recorded
    in the sites) and the new global model; fewer answers than the minimum stop the run.
    """
    fed = spec.federation

    def enough(server_round: int, answered: Mapping[int, object], sites: dict[int, SiteOutcome]) -> None:
        if len(answered) < fed.min_nodes:
            raise NotEnoughNodesError(
                f"round {server_round}: {len(answered)} node(s) replied, fewer than "
                f"federation.min_nodes = {fed.min_nodes}. Per site: {_site_report(sites)}"
            )

    if fed.secure_aggregation:
        secure = SecureRound(
            num_shares=fed.secagg_num_shares,
            reconstruction_threshold=fed.secagg_reconstruction_threshold,
            max_weight=max(float(m.get("num-examples", 0.0)) for m in query.values()) or 1.0,
            timeout=timeout,
        )

        def secure_round(server_round: int, arrays: ArrayRecord, config: Any, sites: dict[int, SiteOutcome]):  # type: ignore[no-untyped-def]
            result = secure.run(participants, server_round, arrays, config)
            answered = _collect(result.replies, sites, result.sampled, TRAIN_METRICS, result.senders)
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
        messages = list(strategy.configure_train(server_round, arrays, config, participants))
        replies = list(participants.send_and_receive(messages, timeout=timeout))
        answered = _collect(replies, sites, participants.get_node_ids(), TRAIN_METRICS, senders_of(messages))
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

    prepared: list[tuple[Any, Any, PrivacyPlan]] = []

    def start_up() -> None:
        """The coordinator's slow start, while the nodes answer the query: nothing is written."""
        model, input_example = build_model(spec)
        tracker.prepare()
        prepared.append((model, input_example, plan_privacy(spec, schedule)))  # Opacus: seconds

    connected = _wait_for_nodes(grid, fed.min_nodes, fed.node_wait_seconds)
    sites = {n: SiteOutcome(n, f"node-{n}") for n in connected}
    query = _query_until_decided(
        grid,
        RecordDict({CONFIG_KEY: config()}),
        connected,
        sites,
        timeout=timeout,
        wait=fed.approval_wait_seconds,
        meanwhile=start_up,
    )
    if len(query) < fed.min_nodes:
        _release(grid, list(query), config(), timeout)
        raise NotEnoughNodesError(
            f"{len(query)} of {len(connected)} hospital node(s) accepted the experiment; the spec "
            f"requires federation.min_nodes = {fed.min_nodes}. Per site: {_site_report(sites)}"
        )
    logger.info("experiment %s: %d site(s) accepted: %s", spec.experiment.name, len(query), _site_report(sites))

    ((model, input_example, plan),) = prepared
    participants = ParticipantGrid(grid, query)
    train_round = _round_runner(spec, participants, query, timeout)
    if checkpoint is None:
        run_id = tracker.start(
            experiment=spec.experiment.mlflow_experiment or spec.experiment.name,
            run_name=spec.experiment.name,
            params={**spec.to_mapping(), "plan": asdict(plan)},
            tags={"medfed.spec_digest": spec.digest(), "medfed.submission_id": submission_id, **(tags or {})},
        )
        checkpoint = Checkpoint(submission_id, spec.digest(), 0, run_id, arrays=ArrayRecord(model.state_dict()))
    else:
        run_id = checkpoint.tracking_run_id
        tracker.resume(run_id)
        by_name = {outcome.site: node for node, outcome in sites.items()}
        for site, rounds in checkpoint.site_rounds.items():
            if site in by_name:
                sites[by_name[site]].rounds.update(rounds)
        logger.info("submission %s continues after round %d of %d", submission_id[:12], checkpoint.round, fed.rounds)
    if flower_run_id is not None:
        checkpoint.flower_runs.append(flower_run_id)
    checkpoint.save(output_dir)
    arrays = checkpoint.arrays if checkpoint.arrays is not None else ArrayRecord(model.state_dict())
    history: dict[int, dict[str, float]] = checkpoint.history
    try:
        for server_round in range(checkpoint.round + 1, fed.rounds + 1):
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
            history[server_round - 1] = {**history.get(server_round - 1, {}), **incoming}
            history[server_round] = {**history.get(server_round, {}), **trained}
            checkpoint.round, checkpoint.arrays = server_round, arrays
            checkpoint.site_rounds = {o.site: dict(o.rounds) for o in sites.values() if o.rounds}
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
