"""What a node does with each message of an experiment: query, train, evaluate, release.

Every handler follows the same order: parse the instruction, let the node's governance
admit it (:func:`clients.hospital_node.governance.admit`: signature, approval, policy,
budget; the first query or train message of a run reserves in the ledger every round
of it this node trains: all of them, or with node sampling the rounds of the node's
schedule, which the query carries; nothing is read before that), check what else can be
checked without touching patient rows (dataset registered, label and features declared,
privacy parameters consistent, round not already released and in the node's schedule), then read the data, compute, charge one
reserved round to the ledger, record the release in the audit log, and only then build
the reply. A failure before the charge spends nothing and leaves the run's reservation
as it was; the final evaluate message, or a release message from a coordinator whose run
ended early, ends the run and gives back what it did not use. What leaves passes the
egress guard: only the metric keys the protocol declares for that message and arrays
shaped exactly like the instructed model; and every metric only with the value the
handler vouched for: the output of one of its DP releases (or its declared
post-processing), or an accounting value (the spec's steps, the ledger's epsilon).

Every number that leaves is accounted:

- *Counts.* The training-set size that weights FedAvg (and scales the update under
  SecAgg+) is released once per run as a discrete Laplace count, charged to the ledger as
  one of the run's once-per-run events, and reused by every later reply
  (:mod:`clients.hospital_node.released`).
- *Model quality.* The final evaluate reply carries the final model's validation scores
  as a histogram by label over fixed bins with discrete Laplace noise (the run's other
  once-per-run event, ``privacy.evaluation_epsilon``); the coordinator computes AUC,
  loss, accuracy, Brier score and calibration from it, per site and pooled. With
  ``privacy.evaluate_every_round`` each train reply also carries the incoming model's
  histogram, charged as the round's second release. No exact loss, AUC or training loss
  leaves.
- *Accounting values.* ``steps`` is the signed spec's; ``epsilon`` and ``epsilon-run``
  are the node's ledger totals, which depend on the approved releases, not on rows.

What else a training reply reveals about the training size n, and what is done about it:

- *The update's scale.* Opacus divides the clipped, noised gradient sum by the expected
  batch size ``round(sample_rate * n)``. With the exact n, the same noisy sum becomes a
  step whose size is a function of n (a coordinator that sees a site's update over many
  rounds can estimate the divisor). Closed: DP-SGD divides by ``round(sample_rate *
  noisy_n)`` with the run's released size (``train_dp(expected_size=...)``), so the scale
  is post-processing of an accounted release. The number of steps is the spec's, not n's.
- *Flower's reply metadata.* A reply's ``Metadata`` carries run, message and node ids, a
  reply-to id, the group id, ``created_at`` (when the ClientApp built the reply) and the
  TTL (the request's deadline minus that moment). Neither number is computed from rows,
  but both encode the ClientApp's runtime (the coordinator subtracts the request's own
  ``created_at``), as does the reply's arrival time; the runtime grows with n (an epoch
  is ``steps`` Poisson batches of about ``sample_rate * n`` patients, and the data load
  and the evaluation scan every row). That is a timing side channel of roughly n, not
  covered by the ledger. It stays open: the runtime is a hardware-dependent, jittery
  function of n whose n-dependent part is milliseconds to a second at the alliance's
  cohort sizes, beside seconds of model loading and Flower's own overhead, and closing it
  would take padding every reply to a fixed, policy-declared duration. The masked SecAgg+
  update's ``fitres.num_examples`` is the released noisy size.

A run is known to the ledger by its *submission*: the id in the partner-signed envelope
(:class:`privacy.governance.Submission`), the same for every continuation of the
submission after a coordinator restart (another Flower run of the same submission). A
training reply reports the dataset's lifetime epsilon and what this submission alone has
charged it.

A train message may come in Flower's legacy fit layout, through ``secaggplus_mod``
(secure aggregation, :mod:`clients.hospital_node.secure_aggregation`): the same checks,
budget reservation, charge and audit record apply; the reply is then a legacy fit
result whose arrays the mod masks before anything leaves, and the release record says
so (with the shapes, size and digest of the update before masking). A node home with a
``debug-kept-updates`` folder also keeps each released update there (tests compare the
coordinator's aggregate against them); the node warns on every use.

A refusal is an error reply with a code from ``federation.protocol.REFUSAL_CODES`` and a
one-line reason for the researcher; it never contains patient data, and it is recorded
in the node's audit log (except "awaiting approval", recorded once as the request).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from clients.hospital_node.errors import ConnectorError, DatasetNotFoundError, NodeError
from clients.hospital_node.governance import Admission, Refusal, admit
from clients.hospital_node.home import NodeHome
from models.evaluation import SCORE_BINS
from federation.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_METRICS,
    IMAGING_TASK,
    LEGACY_FIT_ARRAYS,
    LEGACY_FIT_CONFIG,
    METRICS_KEY,
    NODE_KEY,
    QUERY_METRICS,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_DATASET,
    REFUSED_POLICY,
    RELEASE_METRICS,
    SPEC_KEY,
    STATISTICS_ACTION,
    TRAIN_METRICS,
    score_metrics,
    ProtocolError,
    SignedSpec,
    TrainInstruction,
    is_statistics_spec,
    node_record,
    read_schedule,
    refusal_reason,
)
from privacy.accountant import LEDGER_ACCOUNTANT, steps_per_epoch
from privacy.errors import PrivacyError
from privacy.ledger import Budget, PrivacyLedger

if TYPE_CHECKING:  # the connectors pull in pandas and pydicom: imported where they are used
    from clients.hospital_node.connectors import TabularData
    from clients.hospital_node.imaging_connector import ImagingData
    from clients.hospital_node.released import Release
    from clients.hospital_node.secure_aggregation import SecAggSettings
    from privacy.events import TrainingReleases

__all__ = ["DEBUG_NOISE_SEED_FILE", "KEPT_UPDATES_DIR", "answer", "update_digest"]

logger = logging.getLogger(__name__)

#: A folder of this name in the node home makes the node keep every update it releases.
KEPT_UPDATES_DIR = "debug-kept-updates"
#: A file of this name in the node home seeds its DP-SGD noise (tests only; see `_sampling_generator`).
DEBUG_NOISE_SEED_FILE = "debug-noise-seed"


@dataclass(frozen=True)
class _Request:
    """One message's parts, whichever layout it came in."""

    config: ConfigRecord
    arrays: ArrayRecord | None
    run_id: str
    secure: bool  # Flower's legacy fit layout under SecAgg+: numbered arrays, legacy reply
    secagg: SecAggSettings | None = None  # what this node's secaggplus_mod will mask with (its setup stage's)
    # What the handler released by a DP mechanism, by metric key: the value the guard lets leave.
    released: dict[str, float] = field(default_factory=dict)
    release_records: dict[str, object] = field(default_factory=dict)  # the same releases, as the audit log records them
    accounting: dict[str, float] = field(default_factory=dict)  # numbers from the spec and the ledger, not from rows


def _request(kind: str, msg: Message, secagg: SecAggSettings | None = None) -> _Request:
    records = msg.content.config_records
    secure = kind == "train" and LEGACY_FIT_CONFIG in records
    config = records.get(LEGACY_FIT_CONFIG if secure else CONFIG_KEY)
    if config is None:
        raise ProtocolError(f"the message has no '{CONFIG_KEY}' ConfigRecord")
    arrays = msg.content.array_records.get(LEGACY_FIT_ARRAYS if secure else ARRAYS_KEY)
    return _Request(config, arrays, str(msg.metadata.run_id), secure, secagg if secure else None)


def answer(kind: str, msg: Message, node_config: Mapping[str, Any], *, secagg: SecAggSettings | None = None) -> Message:
    """Handle one message of `kind` ("query", "train", "evaluate", "release" or "statistics") and build the reply.

    A message whose signed spec is a statistics study, or whose action is "statistics",
    is a study's (:mod:`clients.hospital_node.study_round`). `secagg` are the settings
    of the run's SecAgg+ round (:func:`~clients.hospital_node.secure_aggregation.secagg_settings`),
    when a train message is its collect stage.
    """
    if kind == STATISTICS_ACTION or _carries_study(msg):
        from clients.hospital_node.study_round import answer_study

        return answer_study(kind, msg, node_config, secagg=secagg)
    home: NodeHome | None = None
    instruction: TrainInstruction | None = None
    try:
        home = _open_home(node_config)
        request = _request(kind, msg, secagg)
        instruction = TrainInstruction.from_config(request.config)
        signed = SignedSpec.from_config(request.config)
        _check_accounting(instruction)  # before admission reserves the run's rounds of this event
        admission = admit(home, instruction, signed, run_id=request.run_id, kind=kind, schedule=read_schedule(request.config))
        content = _HANDLERS[kind](home, instruction, request, admission)
        _guard(kind, content, secure=request.secure, released=request.released)
        if kind != "train":  # a training reply records itself, with its charge, before it is built
            record = _reply_record(kind, request, instruction, content)
            if request.release_records:
                record["dp_releases"] = dict(request.release_records)
            if request.accounting:
                record["accounting"] = dict(request.accounting)
            home.audit_log().append("release", record)
    except Refusal as err:
        return _refuse(msg, home, instruction, err.code, err.reason, record=err.record)
    except ProtocolError as err:
        return _refuse(msg, home, instruction, REFUSED_BAD_INSTRUCTION, str(err))
    except (ConnectorError, DatasetNotFoundError) as err:
        # The reason names files, columns and counts of the hospital's data, or its other
        # datasets: it stays here.
        dataset = f"dataset '{instruction.dataset}'" if instruction is not None else "the dataset"
        outward = (
            f"{dataset} cannot be used for this run on this node (not registered, unreadable, or not fitting its "
            "registration); the hospital's IT sees why with `medfed node doctor`"
        )
        return _refuse(msg, home, instruction, REFUSED_DATASET, outward, detail=str(err))
    except NodeError as err:  # the node's own set-up (its home, its configuration): nothing of the data
        return _refuse(msg, home, instruction, REFUSED_DATASET, str(err))
    except PrivacyError as err:
        return _refuse(msg, home, instruction, REFUSED_BUDGET, str(err))
    content[NODE_KEY] = node_record(home.name)
    return Message(content, reply_to=msg)


def _carries_study(msg: Message) -> bool:
    """Whether the message's signed spec says it is a statistics study (any doubt: it is not)."""
    config = msg.content.config_records.get(CONFIG_KEY) or msg.content.config_records.get(LEGACY_FIT_CONFIG)
    text = config.get(SPEC_KEY) if config is not None else None
    if not isinstance(text, str):
        return False
    try:
        return is_statistics_spec(json.loads(text))
    except (json.JSONDecodeError, AttributeError):
        return False


class _Subject(Protocol):
    """What a refusal record names of the request: the spec and the dataset (an instruction, or a study's)."""

    @property
    def spec_digest(self) -> str: ...

    @property
    def dataset(self) -> str: ...


def _refuse(
    msg: Message,
    home: NodeHome | None,
    instruction: _Subject | None,
    code: int,
    reason: str,
    *,
    record: bool = True,
    detail: str | None = None,
) -> Message:
    """The error reply: `reason` leaves the node; `detail`, if given, is why, for the node's own log and audit."""
    kind, run_id = msg.metadata.message_type, str(msg.metadata.run_id)
    logger.warning("refused %s message of run %s: %s", kind, run_id, detail or reason)
    if home is not None and record:
        payload = {"run": run_id, "message": kind, "code": code, "reason": reason}
        if detail is not None:
            payload["detail"] = detail
        if instruction is not None:
            payload |= {"spec_digest": instruction.spec_digest, "dataset": instruction.dataset}
        try:
            home.audit_log().append("refusal", payload)
        except (NodeError, PrivacyError) as err:  # the refusal stands; the log says why it is silent
            logger.error("could not record the refusal in the audit log: %s", err)
    site = home.name if home is not None else "unconfigured node"
    return Message(Error(code=code, reason=refusal_reason(site, reason)), reply_to=msg)


_DECLARED = {"query": QUERY_METRICS, "train": TRAIN_METRICS, "evaluate": EVAL_METRICS, "release": RELEASE_METRICS}


# Flower's legacy fit result, as `fitres_to_recorddict` writes it; secaggplus_mod masks its arrays.
_LEGACY_FIT_RESULT = {"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"}


def _guard(kind: str, content: RecordDict, *, secure: bool = False, released: Mapping[str, float] | None = None) -> None:
    """The egress guard: nothing leaves but the declared metric keys (and, for train, model arrays),
    each only with the value the handler vouched for (`released`): a DP release's output or
    its declared post-processing, or an accounting value (the spec's steps, the ledger's epsilon)."""
    arrays = _LEGACY_FIT_RESULT if secure else {ARRAYS_KEY}
    unexpected = set(content) - {METRICS_KEY, *(arrays if kind == "train" else ())}
    if secure and content.get("fitres.metrics"):
        unexpected.add("fitres.metrics")  # metrics travel in METRICS_KEY only, where they are checked
    metrics = content.get(METRICS_KEY)
    if unexpected or not isinstance(metrics, MetricRecord):
        raise ProtocolError(f"egress guard: a {kind} reply may carry only '{METRICS_KEY}'" + (" and model arrays" if kind == "train" else ""))
    undeclared = sorted(set(metrics) - set(_DECLARED[kind]))
    if undeclared:
        raise ProtocolError(f"egress guard: undeclared metric(s) {', '.join(undeclared)} in a {kind} reply; nothing was sent")
    released = released or {}
    # Every number: a DP release's output (or its declared post-processing), or an
    # accounting value from the signed spec and the ledger, exactly as the handler made it.
    unreleased = sorted(k for k in metrics if not _same(metrics[k], released.get(k)))
    if secure:
        legacy = content.get("fitres.num_examples")  # Flower's MetricRecord {"num_examples": n}
        if not isinstance(legacy, MetricRecord) or float(legacy.get("num_examples", math.nan)) != released.get("num-examples"):
            unreleased.append("fitres.num_examples")
    if unreleased:
        raise ProtocolError(
            f"egress guard: {', '.join(unreleased)} in a {kind} reply is neither the output of one of the node's DP "
            "releases nor an accounting value; nothing was sent"
        )


def _same(sent: object, made: float | None) -> bool:
    """Whether a metric value that is about to leave is the number the handler released."""
    return made is not None and isinstance(sent, int | float) and not isinstance(sent, bool) and float(sent) == made


def _open_home(node_config: Mapping[str, Any]) -> NodeHome:
    home = node_config.get("home")
    if not isinstance(home, str) or not home:
        raise NodeError("the SuperNode was started without --node-config home=<node home folder>")
    return NodeHome.open(Path(home))


def _check_accounting(instruction: TrainInstruction) -> None:
    """The node recomputes the step count it will be charged for; it never trusts it."""
    expected = instruction.local_epochs * steps_per_epoch(instruction.sample_rate)
    if instruction.steps != expected:
        raise ProtocolError(
            f"steps per round {instruction.steps} does not match local_epochs x "
            f"steps_per_epoch(sample_rate) = {expected}"
        )


def _load(home: NodeHome, instruction: TrainInstruction, *, run: str, last: bool = False) -> TabularData | ImagingData:
    """The dataset's arrays, split by patient: TabularData or ImagingData, per the task.

    A cohort is built once per ``run`` (``last``: the run's final read), see
    :func:`clients.hospital_node.cohort_connector.load_cohort`.
    """
    entry = home.dataset(instruction.dataset)
    wanted = "imaging" if instruction.task == IMAGING_TASK else "omop" if instruction.cohort is not None else "tabular"
    if entry.kind != wanted:
        raise Refusal(
            REFUSED_DATASET,
            f"dataset '{instruction.dataset}' on node '{home.name}' is of kind '{entry.kind}'; "
            f"task {instruction.task} needs a dataset of kind '{wanted}'",
        )
    if instruction.task == IMAGING_TASK:
        from clients.hospital_node.imaging_connector import ImagingConnector

        assert instruction.imaging is not None  # TrainInstruction checks it
        return ImagingConnector(home, entry).load(instruction.imaging)
    if instruction.cohort is not None:
        from clients.hospital_node.cohort_connector import load_cohort

        return load_cohort(entry, instruction.cohort_definition(), instruction.scaling, run=run, last=last)
    from clients.hospital_node.connectors import TabularConnector

    if entry.label_column != instruction.label:
        raise ProtocolError(
            f"label '{instruction.label}' is not the label of dataset '{instruction.dataset}' "
            f"on this node ('{entry.label_column}')"
        )
    return TabularConnector(entry).load().select(instruction.features, instruction.scaling)


def _model(instruction: TrainInstruction, arrays: ArrayRecord | None, *, numbered: bool = False):  # type: ignore[no-untyped-def]
    if instruction.task == IMAGING_TASK:
        from models.imaging import build_imaging_model

        assert instruction.imaging is not None  # TrainInstruction checks it
        model = build_imaging_model(instruction.model_kind, instruction.imaging.size, channels=instruction.channels)
    else:
        from models.tabular import build_tabular_model

        model = build_tabular_model(instruction.model_kind, len(instruction.features), hidden=instruction.hidden)
    if arrays is not None and numbered:
        state = _numbered_state(model, arrays)
    elif arrays is not None:
        state = arrays.to_torch_state_dict()
    if arrays is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        received = {k: tuple(v.shape) for k, v in state.items()}
        if expected != received:
            raise ProtocolError("the received model arrays do not match the instructed model")
        if not all(bool(v.isfinite().all()) for v in state.values()):
            # Checked before any row is read: a model that scores some patients NaN would
            # turn a failure into an exact, uncharged answer about them.
            raise ProtocolError("the received model holds a value that is not a finite number; nothing was read")
        model.load_state_dict(state)
    return model


def _numbered_state(model, arrays: ArrayRecord):  # type: ignore[no-untyped-def]
    """A legacy layout's arrays ("0", "1", ...: the model's state_dict order) as a state dict."""
    import torch
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    values = parameters_to_ndarrays(arrayrecord_to_parameters(arrays, keep_input=True))
    names = list(model.state_dict())
    if len(values) != len(names):
        raise ProtocolError("the received model arrays do not match the instructed model")
    return {name: torch.from_numpy(value.copy()) for name, value in zip(names, values, strict=True)}


def _tensors(data: TabularData | ImagingData):  # type: ignore[no-untyped-def]
    import torch

    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_val),
        torch.from_numpy(data.y_val),
    )


def _check_layout(request: _Request) -> None:
    """A train message travels the way the signed spec says: through SecAgg+ exactly when it asks for it."""
    wanted = SignedSpec.from_config(request.config).mapping().get("federation", {}).get("secure_aggregation", False) is True
    if request.secure != wanted:
        how = "through SecAgg+" if wanted else "in plain (no SecAgg+)"
        raise ProtocolError(f"the signed spec's federation.secure_aggregation says this run trains {how}; this message does not; nothing was read")


def _check_cohort(
    home: NodeHome, data: TabularData | ImagingData, instruction: TrainInstruction, admission: Admission, request: _Request
) -> None:
    """The dataset must have the policy's minimum cohort, and the run's released size the signed spec's.

    The policy's minimum is the officer's fixed gate, judged on the exact count: the same
    one bit whoever asks, however often. The spec's ``privacy.min_cohort_size`` is the
    partner's, who could bisect the exact count with a series of thresholds: it is judged
    on the run's released (noisy) training-set size, and a refusal by it charges that
    release, since it depends on the noisy value.
    """
    minimum = admission.policy.min_cohort_size
    if data.n_train + data.n_val < minimum:
        # The count itself stays on the node: a small cohort is a disclosure risk.
        raise Refusal(REFUSED_POLICY, f"dataset '{instruction.dataset}' has fewer patients than the minimum cohort of {minimum}")
    spec = SignedSpec.from_config(request.config).mapping()
    wanted = int(spec.get("privacy", {}).get("min_cohort_size") or 0)
    if wanted and _training_count(home, instruction, request, admission, data.n_train, charge=False) < wanted:
        _training_count(home, instruction, request, admission, data.n_train)  # the refusal is a release of it: charged
        raise Refusal(
            REFUSED_POLICY,
            f"dataset '{instruction.dataset}': the released training-set size is below the spec's "
            f"privacy.min_cohort_size of {wanted}",
        )


def _query(home: NodeHome, instruction: TrainInstruction, request: _Request, admission: Admission) -> RecordDict:
    # Cheap on purpose: every check short of training, without importing torch, so the
    # query wave costs little more than Flower's floor for a wave.
    data = _load(home, instruction, run=request.run_id)
    _check_cohort(home, data, instruction, admission, request)
    weight = _training_count(home, instruction, request, admission, data.n_train)
    return RecordDict({METRICS_KEY: MetricRecord({"num-examples": weight})})


def _releases(instruction: TrainInstruction, request: _Request) -> TrainingReleases:
    """What the run releases, by the instruction and the signed spec's privacy options."""
    from clients.hospital_node.governance import training_releases_of

    return training_releases_of(instruction, SignedSpec.from_config(request.config).mapping())


def _release_once(  # noqa: PLR0913
    home: NodeHome,
    instruction: TrainInstruction,
    request: _Request,
    admission: Admission,
    name: str,
    exact: list[int],
    *,
    subject: str = "",
    charge: bool = True,
) -> Release:
    """The run's once-per-run release `name` of `exact` (drawn and charged once, then reused)."""
    from clients.hospital_node.released import ONCE_PER_RUN, release_once

    assert admission.budget is not None and admission.reservation is not None  # admitted with a reservation
    return release_once(
        home,
        name=name,
        dataset=instruction.dataset,
        submission=admission.submission.submission_id,
        run_id=request.run_id,
        exact=exact,
        event=_releases(instruction, request).once[ONCE_PER_RUN.index(name)],
        budget=admission.budget,
        hold=admission.policy.reservation_hold,
        run_cap=admission.run_cap,
        subject=subject,
        debug_seed=_debug_release_seed(home, instruction.dataset, name),
        charge=charge,
    )


def _training_count(
    home: NodeHome, instruction: TrainInstruction, request: _Request, admission: Admission, n_train: int, *, charge: bool = True
) -> float:
    """The run's noisy training-set size clamped at 1 (drawn and charged once, then reused), recorded as the reply's release."""
    from clients.hospital_node.released import TRAINING_SIZE

    release = _release_once(home, instruction, request, admission, TRAINING_SIZE, [n_train], charge=charge)
    weight = float(max(1, release.noisy[0]))
    request.released["num-examples"] = weight
    request.release_records["num-examples"] = release.record("max(1, output)")
    return weight


def _scores(model: Any, x_val: Any, y_val: Any) -> list[int]:
    """The exact validation-score histogram by label (models.evaluation's bins), flattened: never leaves as is."""
    from models.evaluation import score_histogram
    from models.training import predict

    # A score that is not a number (a model whose arithmetic overflows on some patient) is
    # put at 0.5, so that every patient falls in exactly one bin and the histogram's noise
    # covers it: raising instead would answer, exactly and uncharged, whether such a patient exists.
    scores = np.nan_to_num(predict(model, x_val), nan=0.5).clip(0.0, 1.0)
    return [int(v) for v in score_histogram(scores, y_val.numpy().astype(int)).ravel()]


def _send_scores(request: _Request, noisy: list[int], record: dict[str, object]) -> dict[str, float]:
    """A released histogram as the reply's SCORE_METRICS, recorded as the reply's release."""
    metrics = score_metrics([noisy[:SCORE_BINS], noisy[SCORE_BINS:]])
    request.released.update(metrics)
    request.release_records["eval-scores"] = record
    return metrics


def _train(home: NodeHome, instruction: TrainInstruction, request: _Request, admission: Admission) -> RecordDict:
    from models.training import train_dp

    server_round = int(request.config.get("server-round", 0))
    run_id = request.run_id
    if not 1 <= server_round <= instruction.rounds:
        raise ProtocolError(f"server-round must be in 1..{instruction.rounds} (the signed spec's rounds); found {server_round}")
    if server_round not in admission.schedule:
        # Node sampling: the node reserved its scheduled rounds only, and trains no other.
        raise ProtocolError(
            f"round {server_round} is not in this node's schedule for submission "
            f"{admission.submission.submission_id[:12]} (rounds {', '.join(map(str, admission.schedule))}); "
            "nothing was read or charged"
        )
    with PrivacyLedger.open(home.ledger_path) as ledger:
        if ledger.round_charges(instruction.dataset, run_id, server_round):
            raise ProtocolError(
                f"round {server_round} of run {run_id} was already trained and charged on "
                f"dataset '{instruction.dataset}'; a second release is refused"
            )
    # Admitted for training: budget and caps were checked and the run's rounds are reserved.
    assert admission.budget is not None and admission.reservation is not None
    _check_layout(request)
    model = _model(instruction, request.arrays, numbered=request.secure)  # before any row is read
    data = _load(home, instruction, run=request.run_id)
    _check_cohort(home, data, instruction, admission, request)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    x_train, y_train, x_val, y_val = _tensors(data)
    releases = _releases(instruction, request)
    # With evaluate_every_round, the incoming model's validation scores: a histogram the
    # round's charge covers (its second release), drawn now, before the model trains.
    incoming = _scores(model, x_val, y_val) if len(releases.per_round) > 1 else None
    # The released size, drawn before training (charged below, with the round, if no query
    # released it): DP-SGD's expected batch size is computed from it, never from the exact n.
    size = _training_count(home, instruction, request, admission, data.n_train, charge=False)
    generator = _sampling_generator(home, instruction.dataset, server_round)
    stats = train_dp(
        model,
        x_train,
        y_train,
        noise_multiplier=instruction.noise_multiplier,
        max_grad_norm=instruction.max_grad_norm,
        sample_rate=instruction.sample_rate,
        steps=instruction.steps,
        learning_rate=instruction.learning_rate,
        proximal_mu=float(request.config.get("proximal-mu", 0.0)),
        generator=generator,
        expected_size=size,
    )
    if stats.steps != instruction.steps:
        raise ProtocolError(f"training took {stats.steps} steps, not the {instruction.steps} reserved")
    arrays = ArrayRecord(model.state_dict())
    if {k: tuple(v.shape) for k, v in arrays.items()} != expected:
        raise ProtocolError("egress guard: the trained arrays are not shaped like the instructed model; nothing was sent")
    weight = _training_count(home, instruction, request, admission, data.n_train)  # the same value, charged if not yet
    budget = admission.budget
    with PrivacyLedger.open(home.ledger_path) as ledger:
        # Charged before anything about the trained model is judged: from here on it counts,
        # and a refusal below (a function of the noisy update and the released size) is
        # post-processing of this round's release, never a free retry. One round of the reservation.
        ledger.charge_round(
            instruction.dataset,
            submission=admission.submission.submission_id,
            run_id=run_id,
            round=server_round,
            budget=budget,
            run_cap=admission.run_cap,
            hold=admission.policy.reservation_hold,
        )
        epsilon = ledger.spent(instruction.dataset, delta=budget.delta)
        epsilon_run = ledger.spent(instruction.dataset, delta=budget.delta, submission=admission.submission.submission_id)
    logger.info(
        "run %s round %s: trained %s steps on dataset '%s'; epsilon spent %.3f at delta %g",
        run_id, server_round, stats.steps, instruction.dataset, epsilon, budget.delta,
    )
    if not all(bool(a.numpy().size == 0 or np.isfinite(a.numpy()).all()) for a in arrays.values()):
        raise ProtocolError(f"round {server_round}: the trained model holds a value that is not a finite number; nothing was sent (the round was charged)")
    secagg = _check_secagg_range(request, arrays, weight) if request.secure else None
    accounting = {"steps": float(instruction.steps), "epsilon": epsilon, "epsilon-run": epsilon_run}
    request.released.update(accounting)
    metrics = {"num-examples": weight, **accounting}
    if incoming is not None:
        from clients.hospital_node.released import noisy_counts

        scale = releases.per_round[1].noise_multiplier
        seed = _debug_release_seed(home, instruction.dataset, f"scores-{run_id}-{server_round}")
        noisy = noisy_counts(incoming, scale, debug_seed=seed)
        metrics |= _send_scores(request, noisy, {
            "mechanism": releases.per_round[1].mechanism, "scale": scale, "output": noisy,
            "post_processing": "none", "charged": f"now, as release 1 of round {server_round}",
        })
    record = _release_record(run_id, server_round, instruction, arrays, metrics, budget)
    record["dp_releases"] = dict(request.release_records)
    record["accounting"] = accounting
    if secagg is not None:
        record["secure_aggregation"] = secagg
    home.audit_log().append("release", record)
    _keep_update(home, run_id, server_round, arrays)
    if request.secure:
        return _legacy_fit_result(arrays, int(weight), metrics)
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics)})


def _audited(value: Any) -> Any:
    """A metric's value as the audit log can hold it: a number that is not finite (the AUC of
    a validation split with one class is NaN) as its text, 'nan', 'inf' or '-inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_audited(item) for item in value]
    return value


def _reply_record(kind: str, request: _Request, instruction: TrainInstruction, content: RecordDict) -> dict[str, object]:
    """What leaves with a query or evaluate reply: every metric with its value, size and digest."""
    metrics = content[METRICS_KEY]
    sent = {k: metrics[k] for k in sorted(metrics)}
    values = json.dumps(sent, sort_keys=True, separators=(",", ":"))
    return {
        "run": request.run_id,
        "round": int(request.config.get("server-round", 0)),
        "message": kind,
        "experiment": instruction.experiment,
        "spec_digest": instruction.spec_digest,
        "dataset": instruction.dataset,
        "arrays": {},
        "metrics": sorted(metrics),
        "metric_values": {k: _audited(v) for k, v in sent.items()},  # the officer sees each number that left
        "bytes": metrics.count_bytes(),
        "sha256": hashlib.sha256(values.encode()).hexdigest(),
    }


def _check_secagg_range(request: _Request, arrays: ArrayRecord, n_train: float) -> dict[str, object]:
    """The update must survive SecAgg+'s weighting and clipping intact; what the audit records of it.

    ``secaggplus_mod`` multiplies the update by ``n_train / max_weight`` (the released noisy size) and clips it to
    ``[-clipping_range, clipping_range]`` before quantising; an update it would clip, or a
    weight above 1, would silently change the aggregate, so nothing is sent instead. The
    settings judged are those the mod took from the round's setup stage and will mask
    with (``request.secagg``), not what the coordinator restates in the train config.
    """
    if request.secagg is None:
        raise ProtocolError(
            "a secure-aggregation train message must be SecAgg+'s collect stage, whose settings this node's "
            "secaggplus_mod holds from the round's setup stage; it holds none for this run, so nothing was sent"
        )
    clipping, max_weight = request.secagg.clipping_range, request.secagg.max_weight
    if not all(math.isfinite(v) and v > 0 for v in (clipping, max_weight)):
        raise ProtocolError("the SecAgg+ setup stage gave a clipping range or max_weight that is not a positive number; nothing was sent")
    weight = n_train / float(max_weight)  # type: ignore[arg-type]
    if weight > 1:
        raise ProtocolError(
            "the coordinator's SecAgg+ max_weight is below this node's training size (it changed since the query); "
            "nothing was sent"
        )
    largest = max((float(abs(a.numpy()).max()) for a in arrays.values() if a.numpy().size), default=0.0)
    if largest * weight > float(clipping):  # type: ignore[arg-type]
        raise ProtocolError(
            f"egress guard: the trained model has a weighted parameter beyond the SecAgg+ clipping range "
            f"of {float(clipping):g} and would be clipped; nothing was sent"  # type: ignore[arg-type]
        )
    return {"protocol": "SecAgg+", "masked": True, "clipping_range": float(clipping), "max_weight": float(max_weight)}  # type: ignore[arg-type]


def _legacy_fit_result(arrays: ArrayRecord, n_train: int, metrics: dict[str, float]) -> RecordDict:
    """Flower's legacy fit result (arrays in the model's order, weighted by `n_train`) plus our metrics."""
    from clients.hospital_node.secure_aggregation import legacy_fit_result

    return legacy_fit_result([array.numpy() for array in arrays.values()], n_train, metrics)


def _sampling_generator(home: NodeHome, dataset: str, server_round: int):  # type: ignore[no-untyped-def]
    """The generator of the round's Poisson sampling, seeded from the OS: unpredictable to anyone else.

    Tests only: a node home with a ``debug-noise-seed`` file (an integer) seeds the
    sampling *and* torch's default generator, from which Opacus draws the noise, from
    that seed, the dataset and the round, so two runs of a spec train identically. The
    seed lives on the node, never in a spec or a message: a coordinator that chose the
    noise could subtract it. The node warns on every use.
    """
    import torch

    path = home.path / DEBUG_NOISE_SEED_FILE
    if not path.is_file():
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    seed = int(hashlib.sha256(f"{path.read_text().strip()}|{dataset}|{server_round}".encode()).hexdigest()[:15], 16)
    logger.warning("debug: round %s on dataset '%s' trains with noise seeded from %s (remove it to stop)", server_round, dataset, path)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _debug_release_seed(home: NodeHome, dataset: str, what: str) -> int | None:
    """Tests only: the seed of release `what`'s noise on `dataset`, from ``debug-noise-seed`` (see `_sampling_generator`)."""
    path = home.path / DEBUG_NOISE_SEED_FILE
    if not path.is_file():
        return None
    logger.warning("debug: the %s of dataset '%s' is released with noise seeded from %s (remove it to stop)", what, dataset, path)
    return int(hashlib.sha256(f"{path.read_text().strip()}|{dataset}|{what}".encode()).hexdigest()[:15], 16)


def _keep_update(home: NodeHome, run_id: str, server_round: int, arrays: ArrayRecord) -> None:
    """Debugging and tests only: keep the released update on this node, if its home asks for it."""
    folder = home.path / KEPT_UPDATES_DIR
    if not folder.is_dir():
        return
    import numpy as np

    path = folder / f"run{run_id}-round{server_round}.npz"
    logger.warning("debug: keeping the update released in run %s round %s at %s (remove %s to stop)", run_id, server_round, path, folder)
    np.savez(path, **{name: array.numpy() for name, array in arrays.items()})


def update_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over the arrays' names and bytes, in name order: what a release record holds."""
    digest = hashlib.sha256()
    for name, array in sorted(arrays.items()):
        digest.update(name.encode())
        digest.update(array.data)
    return digest.hexdigest()


def _release_record(
    run_id: str, server_round: int, instruction: TrainInstruction, arrays: ArrayRecord, metrics: dict[str, float], budget: Budget
) -> dict[str, object]:
    """What leaves the site with a training reply: the arrays' names, shapes, size and digest (never
    their values: a model, not data), and every metric with its value."""
    return {
        "run": run_id,
        "round": server_round,
        "message": "train",
        "experiment": instruction.experiment,
        "spec_digest": instruction.spec_digest,
        "dataset": instruction.dataset,
        "arrays": {name: list(array.shape) for name, array in sorted(arrays.items())},
        "bytes": arrays.count_bytes(),
        "sha256": update_digest(arrays),
        "metrics": sorted(metrics),
        "metric_values": {k: _audited(v) for k, v in sorted(metrics.items())},
        "charge": {
            "noise_multiplier": instruction.noise_multiplier,
            "sample_rate": instruction.sample_rate,
            "steps": int(metrics["steps"]),
            "epsilon_spent": metrics["epsilon"],  # the dataset's, composed by the ledger at its budget's delta
            "delta": budget.delta,
            "accountant": LEDGER_ACCOUNTANT,
        },
        # The whole instruction the round trained by (the signed spec's values, the noise the
        # coordinator chose): what `medfed node privacy-check` re-trains the run's mechanism with.
        "instruction": json.loads(instruction.to_json()),
    }


def _evaluate(home: NodeHome, instruction: TrainInstruction, request: _Request, admission: Admission) -> RecordDict:
    """The final model's validation scores, a histogram by label released once per run; then the run ends.

    Charged (the run's once-per-run evaluation) as the reply is built. Whatever happens,
    the run ends here: what it reserved and did not use goes back to the dataset, and
    a second evaluate is refused (a run's end is not a metric oracle).
    """
    from clients.hospital_node.governance import end_run
    from clients.hospital_node.released import FINAL_EVALUATION

    try:
        data = _load(home, instruction, run=request.run_id, last=True)
        model = _model(instruction, request.arrays)
        _, _, x_val, y_val = _tensors(data)
        assert request.arrays is not None
        subject = update_digest(request.arrays)  # the model it scored: asked again for another, the node refuses
        release = _release_once(
            home, instruction, request, admission, FINAL_EVALUATION, _scores(model, x_val, y_val), subject=subject
        )
        metrics = _send_scores(request, list(release.noisy), {**release.record("none"), "model_sha256": subject})
        assert admission.budget is not None
        with PrivacyLedger.open(home.ledger_path) as ledger:  # the run's epsilon with its evaluation charged
            accounting = {
                "epsilon": ledger.spent(instruction.dataset, delta=admission.budget.delta),
                "epsilon-run": ledger.spent(
                    instruction.dataset, delta=admission.budget.delta, submission=admission.submission.submission_id
                ),
            }
        request.released.update(accounting)
        request.accounting.update(accounting)
        metrics |= accounting
    finally:
        end_run(home, instruction.dataset, admission.submission.submission_id)
    return RecordDict({METRICS_KEY: MetricRecord(metrics)})


def _release(home: NodeHome, instruction: TrainInstruction, request: _Request, admission: Admission) -> RecordDict:
    """The run ended early: admission gave back its unused rounds; the reply carries no number."""
    logger.info("run %s of submission %s ended early; its unused rounds were released", request.run_id, admission.submission.submission_id[:12])
    return RecordDict({METRICS_KEY: MetricRecord({})})


_HANDLERS = {"query": _query, "train": _train, "evaluate": _evaluate, "release": _release}
