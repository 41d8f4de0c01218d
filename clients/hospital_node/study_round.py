"""What a node does with each message of a statistics study: admission, answer, release.

A study's messages carry the partner-signed spec and nothing else the node acts on: the
node parses the query from the signed spec itself (:class:`privacy.query.StatisticsQuery`,
never from coordinator-supplied fields), then lets its governance admit it
(:func:`clients.hospital_node.governance.admit_study`: signature, officer approval of this
digest on this dataset, replay rules, the policy's task kinds and ``max_cells``, the
registered research columns, and the whole query reserved in the ledger, one event per
release). A query that does not parse, or that admission refuses, is refused before any
row is read, with nothing reserved or charged. Once admitted, a dataset with fewer
patients than the policy's ``min_cohort_size`` (any task's standing limit) gives its
reservation back and is refused; the count stays on the node.

The answer (``query.statistics``), in this order:

1. read the registered dataset lazily (polars; only the query's declared columns, the
   site filter of the registration, and the id column to check one row per patient);
2. the exact vector of every release (:func:`clients.hospital_node.statistics.evaluate`);
3. noise on each, with the release's mechanism and scale (:mod:`privacy.mechanisms`,
   OpenDP's samplers): discrete Laplace on counts, Laplace on sums;
4. suppression: a cell whose *noisy* size is below the policy's ``min_cell_size`` is
   released as suppressed, its values None in every release
   (:func:`suppressed_cells`, which is given the noisy vectors only; a cell's noisy size
   is, per statistic, its noisy count or total, or its noisy row of a histogram or 2x2
   table summed, and the smallest over the statistics decides). Post-processing of the
   noisy releases: the true count is never consulted;
5. the answer is checked against the query's release plan (the egress guard,
   :meth:`federation.protocol.SiteAnswer.problems`), then the ledger charges every
   reserved release (:meth:`privacy.ledger.PrivacyLedger.charge_round`), then the audit
   log records exactly what leaves (every noisy value, each release's mechanism, scale,
   sensitivity and share of epsilon, the suppressed cells, the charge), then the reply
   is built and guarded as a whole.

A study is answered once per submission: its reservation is then used up and a replay is
refused. The admission reply carries no number; the answer reply carries the
:class:`~federation.protocol.SiteAnswer` and the ledger's epsilons
(:data:`~federation.protocol.STATISTICS_METRICS`), nothing else.

Secure aggregation (the signed spec's ``[federation] secure_aggregation = true``): the
answer leaves only through SecAgg+, as the collect stage of Flower's workflow (a
``train`` message through ``secaggplus_mod``), and a ``query.statistics`` message for
such a study is refused, as is a SecAgg+ one for a plain study. Steps 1 to 4 are the
same: the node adds its own noise (an exact sum behind SecAgg+ would not be DP, and a
site that drops out would leave the others' exact values in the sum) and suppresses on
its noisy counts. Before it reads a row, the node checks the settings its mod will mask
with (:func:`federation.protocol.secure_sum_problems`: at least two sites, weight 1,
quantisation exact on integers, no wrap-around of the sum). Then its answer is rounded
to whole quanta (1 for a count, the scale / 256 for a sum: post-processing) and encoded
as integer vectors, zero in its suppressed cells, with a 0/1 reported-cell vector
(:func:`federation.protocol.secure_encoding`). A value beyond the clipping range would be
clipped by SecAgg+ and distort the sum: the node sends nothing but a refusal; the
ledger is charged all the same and the audit log says why, because whether a noisy value
fits is a fact about the noisy answer. Otherwise the ledger is charged, the audit log
records every value as sent and marks it masked (with the SecAgg+ settings, the size and
digest of the vector before masking), and the reply is the legacy fit result of the
vectors with weight 1 beside the ledger's epsilons; the mod masks the vector and clears
every array before anything leaves.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict

from clients.hospital_node.errors import ConnectorError, DatasetNotFoundError, NodeError
from clients.hospital_node.governance import Admission, Refusal, admit_study
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.rounds import _open_home, _refuse
from federation.protocol import (
    CONFIG_KEY,
    LEGACY_FIT_CONFIG,
    METRICS_KEY,
    NODE_KEY,
    REFUSED_BAD_INSTRUCTION,
    REFUSED_BUDGET,
    REFUSED_DATASET,
    REFUSED_POLICY,
    RELEASE_METRICS,
    SECURE_SUM_WEIGHT,
    STATISTICS_ACTION,
    STATISTICS_KEY,
    STATISTICS_METRICS,
    STUDY_QUERY_METRICS,
    ProtocolError,
    ReleaseLayout,
    SignedSpec,
    SiteAnswer,
    SiteRelease,
    node_record,
    release_quantum,
    secure_encoding,
    secure_sum_problems,
)
from privacy.accountant import LEDGER_ACCOUNTANT
from privacy.errors import PrivacyError, QueryError
from privacy.governance import spec_digest
from privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from clients.hospital_node.secure_aggregation import SecAggSettings
    from privacy.query import Release, StatisticsQuery

__all__ = [
    "Sampler", "answer_study", "guard_secure", "noisy_answer", "opendp_sampler", "release_layout", "suppressed_cells",
]

logger = logging.getLogger(__name__)

#: Adds one release's noise to its exact vector: the node's is OpenDP's (:func:`opendp_sampler`).
Sampler = Callable[["Release", np.ndarray], np.ndarray]

_KINDS = ("query", STATISTICS_ACTION, "release", "train")  # train: SecAgg+'s collect stage of a secure study
# A statistic's releases that count its patients per cell: what suppression reads (noisy).
_CELL_SIZES = ("count", "total")


@dataclass(frozen=True)
class _About:
    """What a refusal record names: the spec's digest and the dataset (when known)."""

    spec_digest: str
    dataset: str


def answer_study(kind: str, msg: Message, node_config: Mapping[str, Any], *, secagg: SecAggSettings | None = None) -> Message:
    """Handle one message of a study ("query", "statistics", "release", or "train": SecAgg+'s collect stage) and build the reply."""
    home: NodeHome | None = None
    about: _About | None = None
    try:
        home = _open_home(node_config)
        key = LEGACY_FIT_CONFIG if kind == "train" else CONFIG_KEY
        config = msg.content.config_records.get(key)
        if config is None:
            raise ProtocolError(f"the message has no '{key}' ConfigRecord")
        signed = SignedSpec.from_config(config)
        if kind not in _KINDS:
            raise ProtocolError(f"a statistics study takes {', '.join(_KINDS)} messages, not {kind}")
        query = parse_query(signed)
        about = _About(spec_digest(signed.spec_json), query.dataset)
        run_id = str(msg.metadata.run_id)
        answering = kind in (STATISTICS_ACTION, "train")
        admission = admit_study(home, signed, query, run_id=run_id, kind=STATISTICS_ACTION if answering else kind)
        if answering:
            _check_route(kind, query, secagg)
        if kind != "release":
            _check_cohort(home, query, admission, run_id)
        if kind == "train":
            assert secagg is not None  # _check_route
            content = _answer_secure(home, query, signed, admission, run_id, secagg)
        elif kind == STATISTICS_ACTION:
            content = _answer(home, query, signed, admission, run_id)
        else:
            content = RecordDict({METRICS_KEY: MetricRecord({})})
            guard(kind, content, query)
            home.audit_log().append("release", _plain_record(kind, run_id, query, signed, about))
    except Refusal as err:
        return _refuse(msg, home, about, err.code, err.reason, record=err.record)
    except QueryError as err:  # a PrivacyError: before it, so that it reads as what it is
        reason = "the signed statistics query is invalid: " + "; ".join(err.problems)
        return _refuse(msg, home, about, REFUSED_BAD_INSTRUCTION, reason)
    except ProtocolError as err:
        return _refuse(msg, home, about, REFUSED_BAD_INSTRUCTION, str(err))
    except (ConnectorError, DatasetNotFoundError) as err:
        # The reason names files, columns and counts of the hospital's data: it stays here.
        dataset = f"dataset '{about.dataset}'" if about is not None else "the dataset"
        outward = (
            f"{dataset} cannot be used for this study on this node (not registered, unreadable, or not fitting its "
            "registration); the hospital's IT sees why with `medfed node doctor`"
        )
        return _refuse(msg, home, about, REFUSED_DATASET, outward, detail=str(err))
    except NodeError as err:
        return _refuse(msg, home, about, REFUSED_DATASET, str(err))
    except PrivacyError as err:
        return _refuse(msg, home, about, REFUSED_BUDGET, str(err))
    assert home is not None
    content[NODE_KEY] = node_record(home.name)
    return Message(content, reply_to=msg)


def parse_query(signed: SignedSpec) -> StatisticsQuery:
    """The query of the signed spec, parsed and checked by the node's own code.

    Raises
    ------
    QueryError
        Every problem of the query, each naming its field.
    ProtocolError
        The spec is not JSON, or not a statistics study.
    """
    from federation.protocol import is_statistics_spec
    from privacy.query import StatisticsQuery

    mapping = signed.mapping()
    if not is_statistics_spec(mapping):
        raise ProtocolError("the signed spec is not a statistics study (its kind is not 'statistics')")
    return StatisticsQuery.from_mapping(mapping, source="the signed statistics spec")


def release_layout(query: StatisticsQuery) -> list[ReleaseLayout]:
    """The release plan of `query` as the protocol checks an answer against it."""
    return [
        ReleaseLayout(r.statistic, r.name, r.mechanism, r.scale, r.sensitivity, tuple(r.shape)) for r in query.releases()
    ]


def opendp_sampler(release: Release, exact: np.ndarray) -> np.ndarray:
    """`exact` with the release's noise, drawn by OpenDP's samplers (:func:`privacy.mechanisms.add_noise`)."""
    from privacy.mechanisms import add_noise

    noisy = add_noise(exact, mechanism=release.mechanism, scale=release.scale)
    return np.asarray(noisy, dtype=np.int64 if release.kind == "count" else np.float64)


def suppressed_cells(query: StatisticsQuery, noisy: Sequence[np.ndarray], min_cell_size: int) -> list[int]:
    """The cells whose noisy size is below `min_cell_size`, from the *noisy* releases only.

    A cell's noisy size, per statistic: its noisy ``count`` or ``total`` release, or
    else its noisy count release's row (histogram bins, 2x2 table) summed; the smallest
    over the statistics decides. Post-processing of DP releases: nothing here sees data.
    """
    cells = query.n_cells
    if min_cell_size <= 0:
        return []
    smallest = np.full(cells, np.inf)
    releases = query.releases()
    for statistic in query.statistics:
        mine = [(r, v) for r, v in zip(releases, noisy, strict=True) if r.statistic == statistic.name]
        sizes = [v for r, v in mine if r.name in _CELL_SIZES and tuple(r.shape) == (cells,)]
        if not sizes:
            sizes = [
                np.asarray(v, dtype=np.float64).reshape(r.shape).reshape(cells, -1).sum(axis=1)
                for r, v in mine
                if r.kind == "count" and len(r.shape) == 2
            ]
        if sizes:
            smallest = np.minimum(smallest, np.asarray(sizes[0], dtype=np.float64))
    return [int(i) for i in np.flatnonzero(smallest < min_cell_size)]


def noisy_answer(
    query: StatisticsQuery, exact: Sequence[np.ndarray], *, min_cell_size: int, sampler: Sampler = opendp_sampler
) -> SiteAnswer:
    """The site answer of `exact` (one vector per release, in release order): noise, then suppression on noise."""
    releases = query.releases()
    if len(exact) != len(releases) or any(len(np.ravel(v)) != r.size for r, v in zip(releases, exact, strict=False)):
        raise ProtocolError("the evaluation does not match the query's release plan; nothing was sent")
    noisy = [np.ravel(sampler(r, np.ravel(v))) for r, v in zip(releases, exact, strict=True)]
    suppressed = suppressed_cells(query, noisy, min_cell_size)
    hidden = set(suppressed)
    layout = release_layout(query)
    out = []
    for release, plan, values in zip(releases, layout, noisy, strict=True):
        count = release.mechanism == "discrete-laplace"
        shown = tuple(
            None if plan.cell_of(i) in hidden else (float(int(v)) if count else float(v)) for i, v in enumerate(values)
        )
        out.append(SiteRelease(release.statistic, release.name, shown, release.scale, release.mechanism, release.sensitivity))
    return SiteAnswer(tuple(out), tuple(suppressed))


def guard(kind: str, content: RecordDict, query: StatisticsQuery) -> None:
    """The egress guard of a study's reply: only what the protocol declares for `kind`, and an answer that is the plan's."""
    declared = {"query": STUDY_QUERY_METRICS, "release": RELEASE_METRICS, STATISTICS_ACTION: STATISTICS_METRICS}[kind]
    allowed = {METRICS_KEY, STATISTICS_KEY} if kind == STATISTICS_ACTION else {METRICS_KEY}
    metrics = content.get(METRICS_KEY)
    if set(content) != allowed or not isinstance(metrics, MetricRecord):
        raise ProtocolError(f"egress guard: a study's {kind} reply may carry only {', '.join(sorted(allowed))}; nothing was sent")
    undeclared = sorted(set(metrics) - set(declared))
    if undeclared:
        raise ProtocolError(f"egress guard: undeclared metric(s) {', '.join(undeclared)} in a study's {kind} reply; nothing was sent")
    if kind == STATISTICS_ACTION:
        problems = SiteAnswer.from_content(content).problems(release_layout(query), query.n_cells)
        if problems:
            raise ProtocolError("egress guard: the answer is not the query's release plan (" + "; ".join(problems[:3]) + "); nothing was sent")


def _frame(entry: DatasetEntry):  # type: ignore[no-untyped-def]
    """The registered dataset as a lazy polars frame, the registration's site filter applied.

    Checks one row per patient (each id once) on the id column alone; the query's own
    columns are read by the evaluation, which selects nothing else.
    """
    import polars as pl

    source = f"dataset {entry.name!r} ({entry.path})"
    suffix = entry.path.suffix.lower()
    if not entry.path.is_file():
        raise ConnectorError(f"{source}: the file does not exist")
    try:
        if suffix == ".parquet":
            lazy = pl.scan_parquet(entry.path)
        elif suffix == ".csv":
            lazy = pl.scan_csv(entry.path, schema_overrides={entry.id_column: pl.String}, infer_schema_length=10000)
        else:
            raise ConnectorError(f"{source}: cannot read files ending in {suffix or '(no suffix)'!r}; supported: .csv, .parquet")
        if entry.site_column is not None:
            lazy = lazy.filter(pl.col(entry.site_column).cast(pl.String) == entry.site_value)
        duplicated = lazy.select(pl.col(entry.id_column).is_duplicated().any()).collect().item()
    except (pl.exceptions.PolarsError, OSError) as err:
        # The reader's message may quote the file's content: name the failure only.
        raise ConnectorError(f"{source}: the file is not readable ({type(err).__name__})") from None
    if duplicated:
        raise ConnectorError(f"{source}: a patient id appears more than once; a study needs one row per patient")
    return lazy


def _study_frame(home: NodeHome, query: StatisticsQuery, *, run: str, last: bool = False):  # type: ignore[no-untyped-def]
    """The rows a query reads: the registered flat dataset, or the cohort it asks of an OMOP source.

    A cohort is built once per run (``last``: the study's answer, its final read) with the
    query's declared columns, but the task's label, as its covariates.
    """
    entry = home.dataset(query.dataset)
    if query.cohort is None:
        return _frame(entry)
    import polars as pl

    from clients.hospital_node.cohort_connector import run_cohort, study_cohort

    table = run_cohort(entry, study_cohort(query), run=run, last=last)
    return pl.from_arrow(table).lazy()


def _check_cohort(home: NodeHome, query: StatisticsQuery, admission: Admission, run: str) -> None:
    """The dataset must hold the policy's minimum cohort, as for any task; the count stays on the node.

    Counted once admitted (reading rows needs the reservation first); a dataset below the
    minimum gives its reservation back at once and is refused.
    """
    import polars as pl

    minimum = admission.policy.min_cohort_size
    try:
        patients = int(_study_frame(home, query, run=run).select(pl.len()).collect().item())
    except pl.exceptions.PolarsError as err:
        raise ConnectorError(f"dataset {query.dataset!r}: the file is not readable ({type(err).__name__})") from None
    if patients >= minimum:
        return
    with PrivacyLedger.open(home.ledger_path) as ledger:
        ledger.release_run(query.dataset, submission=admission.submission.submission_id)
    raise Refusal(REFUSED_POLICY, f"dataset '{query.dataset}' has fewer patients than the minimum cohort of {minimum}")


def _check_route(kind: str, query: StatisticsQuery, secagg: SecAggSettings | None) -> None:
    """The answer leaves the way the signed spec says, and SecAgg+'s settings carry it hidden and exact; no row is read.

    Raises
    ------
    ProtocolError
        A plain answer asked of a securely aggregated study or the other way round, or
        SecAgg+ settings under which the sum would reveal or distort this site's answer.
    """
    if kind == STATISTICS_ACTION and query.secure_aggregation:
        raise ProtocolError(
            "this study's signed spec asks for secure aggregation (federation.secure_aggregation): its answer leaves "
            "only masked, through SecAgg+, never as a plain 'query.statistics' reply; nothing was sent"
        )
    if kind != "train":
        return
    if not query.secure_aggregation:
        raise ProtocolError(
            "this study's signed spec does not ask for secure aggregation: it is answered by a 'query.statistics' "
            "message, not through SecAgg+; nothing was sent"
        )
    if secagg is None:
        raise ProtocolError("a study's train message must be the collect stage of a SecAgg+ round; nothing was sent")
    problems = secure_sum_problems(
        sample_num=secagg.sample_num,
        clipping_range=secagg.clipping_range,
        quantization_range=secagg.quantization_range,
        modulus_range=secagg.modulus_range,
        max_weight=secagg.max_weight,
    )
    if problems:
        raise ProtocolError(
            "the coordinator's SecAgg+ settings would not keep this site's answer hidden and exact ("
            + "; ".join(problems) + "); nothing was read or sent"
        )


def _charge(home: NodeHome, query: StatisticsQuery, admission: Admission, run_id: str) -> dict[str, float]:
    """Charge every reserved release of the study; the ledger's epsilons after it (what the reply reports)."""
    assert admission.budget is not None
    budget = admission.budget
    submission = admission.submission.submission_id
    with PrivacyLedger.open(home.ledger_path) as ledger:
        # Charged as the reply is built: from here on it counts. Every release of the query.
        ledger.charge_round(
            query.dataset,
            submission=submission,
            run_id=run_id,
            round=1,
            budget=budget,
            run_cap=admission.run_cap,
            hold=admission.policy.reservation_hold,
        )
        epsilon = ledger.spent(query.dataset, delta=budget.delta)
        epsilon_run = ledger.spent(query.dataset, delta=budget.delta, submission=submission)
    return {"epsilon": epsilon, "epsilon-run": epsilon_run}


def _answer_secure(
    home: NodeHome, query: StatisticsQuery, signed: SignedSpec, admission: Admission, run_id: str, secagg: SecAggSettings
) -> RecordDict:
    """The answer as SecAgg+'s collect stage takes it: the legacy fit result of the encoded answer, weight 1."""
    from clients.hospital_node.secure_aggregation import legacy_fit_result
    from clients.hospital_node.statistics import evaluate

    # Admitted: the whole query is reserved; its budget and caps were checked.
    assert admission.budget is not None and admission.reservation is not None
    exact = evaluate(query, _study_frame(home, query, run=run_id, last=True))
    noisy = noisy_answer(query, exact, min_cell_size=admission.policy.min_cell_size)
    del exact  # nothing below reads the true vectors
    layout = release_layout(query)
    answer, vectors = secure_encoding(noisy, layout, query.n_cells)
    del noisy  # what is sent is the answer in whole quanta
    clipping = secagg.clipping_range
    fits = all(float(np.abs(v).max(initial=0.0)) <= clipping for v in vectors)
    metrics = _charge(home, query, admission, run_id)
    record = _answer_record(run_id, query, signed, answer, metrics, admission)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(v, dtype="<f8").tobytes() for v in vectors))
    record |= {
        "bytes": sum(v.size * 8 for v in vectors),
        "sha256": digest.hexdigest(),  # of the vector before masking: what the sum holds of this site
        "secure_aggregation": {
            "protocol": "SecAgg+",
            "masked": fits,
            "weight": SECURE_SUM_WEIGHT,
            "quanta": [release_quantum(r.mechanism, r.scale) for r in query.releases()],
            "reported_cells": [int(x) for x in vectors[-1]],
            **secagg.to_mapping(),
        },
    }
    if not fits:
        # Whether a noisy value fits is a fact about the noisy answer, so the refusal is
        # itself a release of it: charged above, and recorded with nothing else leaving.
        reason = (
            f"this site's noisy answer does not fit the SecAgg+ clipping range of {clipping:.0f} quanta the coordinator "
            f"chose for {secagg.sample_num} sites and would be clipped; nothing was sent. The study was charged: "
            "the refusal depends on the noisy answer"
        )
        record |= {"releases": [], "metrics": [], "metric_values": {}, "bytes": 0, "refused": {"code": REFUSED_BAD_INSTRUCTION, "reason": reason}}
        home.audit_log().append("release", record)
        raise Refusal(REFUSED_BAD_INSTRUCTION, reason, record=False)
    content = legacy_fit_result(vectors, SECURE_SUM_WEIGHT, metrics)
    home.audit_log().append("release", record)
    guard_secure(content, query, clipping)
    logger.info(
        "run %s: answered study %s on dataset '%s' through SecAgg+ (%d releases, %d cell(s) suppressed, masked); "
        "epsilon spent %.3f at delta %g",
        run_id, spec_digest(signed.spec_json)[:12], query.dataset, len(answer.releases), len(answer.suppressed),
        metrics["epsilon"], admission.budget.delta,
    )
    return content


_LEGACY_FIT_RESULT = {"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"}


def guard_secure(content: RecordDict, query: StatisticsQuery, clipping_range: float) -> None:
    """The egress guard of a securely aggregated answer, before ``secaggplus_mod`` masks it.

    Only the legacy fit result and the ledger's epsilons; the weight 1, no legacy metrics;
    the vector is the plan's releases then the reported cells, each value a whole number
    of quanta within the clipping range, the reported cells 0 or 1.
    """
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    metrics = content.get(METRICS_KEY)
    if set(content) != _LEGACY_FIT_RESULT | {METRICS_KEY} or not isinstance(metrics, MetricRecord):
        raise ProtocolError("egress guard: a secure study reply may carry only the legacy fit result and 'metrics'; nothing was sent")
    undeclared = sorted(set(metrics) - set(STATISTICS_METRICS))
    if undeclared:
        raise ProtocolError(f"egress guard: undeclared metric(s) {', '.join(undeclared)} in a secure study reply; nothing was sent")
    fitres = compat.recorddict_to_fitres(content, keep_input=True)
    if fitres.num_examples != SECURE_SUM_WEIGHT or fitres.metrics:
        raise ProtocolError(f"egress guard: a secure study reply has weight {SECURE_SUM_WEIGHT} and no legacy metrics; nothing was sent")
    vectors = parameters_to_ndarrays(fitres.parameters)
    sizes = [r.size for r in query.releases()] + [query.n_cells]
    if [v.size for v in vectors] != sizes:
        raise ProtocolError("egress guard: the secure vector is not the query's release plan; nothing was sent")
    for vector in vectors:
        if not (np.all(np.isfinite(vector)) and np.all(vector == np.rint(vector)) and np.all(np.abs(vector) <= clipping_range)):
            raise ProtocolError("egress guard: the secure vector holds a value that is not whole quanta within the clipping range; nothing was sent")
    if not np.all((vectors[-1] == 0) | (vectors[-1] == 1)):
        raise ProtocolError("egress guard: the reported cells of a secure vector must be 0 or 1; nothing was sent")


def _answer(home: NodeHome, query: StatisticsQuery, signed: SignedSpec, admission: Admission, run_id: str) -> RecordDict:
    from clients.hospital_node.statistics import evaluate

    # Admitted: the whole query is reserved; its budget and caps were checked.
    assert admission.budget is not None and admission.reservation is not None
    exact = evaluate(query, _study_frame(home, query, run=run_id, last=True))
    answer = noisy_answer(query, exact, min_cell_size=admission.policy.min_cell_size)
    del exact  # nothing below reads the true vectors
    problems = answer.problems(release_layout(query), query.n_cells)
    if problems:
        raise ProtocolError("egress guard: the answer is not the query's release plan (" + "; ".join(problems[:3]) + "); nothing was sent")
    metrics = _charge(home, query, admission, run_id)
    content = RecordDict({STATISTICS_KEY: answer.to_record(), METRICS_KEY: MetricRecord(metrics)})
    home.audit_log().append("release", _answer_record(run_id, query, signed, answer, metrics, admission))
    guard(STATISTICS_ACTION, content, query)
    logger.info(
        "run %s: answered study %s on dataset '%s' (%d releases, %d cell(s) suppressed); epsilon spent %.3f at delta %g",
        run_id, spec_digest(signed.spec_json)[:12], query.dataset, len(answer.releases), len(answer.suppressed),
        metrics["epsilon"], admission.budget.delta,
    )
    return content


def _study_name(signed: SignedSpec) -> str:
    study = signed.mapping().get("study")
    return str(study.get("name", "")) if isinstance(study, dict) else ""


def _plain_record(kind: str, run_id: str, query: StatisticsQuery, signed: SignedSpec, about: _About) -> dict[str, object]:
    """What leaves with a study's admission or release reply: no number at all."""
    return {
        "run": run_id,
        "round": 0,
        "message": kind,
        "experiment": _study_name(signed),
        "spec_digest": about.spec_digest,
        "dataset": query.dataset,
        "arrays": {},
        "metrics": [],
        "metric_values": {},
        "bytes": 0,
        "sha256": hashlib.sha256(b"{}").hexdigest(),
    }


def _answer_record(
    run_id: str, query: StatisticsQuery, signed: SignedSpec, answer: SiteAnswer, metrics: dict[str, float], admission: Admission
) -> dict[str, object]:
    """What leaves with a study's answer: every noisy value as sent, with its mechanism and scale, and the charge."""
    assert admission.budget is not None
    text = answer.to_json()
    shares = {(r.statistic, r.name): r.epsilon for r in query.releases()}
    return {
        "run": run_id,
        "round": 1,
        "message": STATISTICS_ACTION,
        "experiment": _study_name(signed),
        "spec_digest": spec_digest(signed.spec_json),
        "dataset": query.dataset,
        "arrays": {},
        "metrics": sorted(metrics),
        "metric_values": dict(sorted(metrics.items())),
        "releases": [
            {**release.to_mapping(), "epsilon": shares[(release.statistic, release.name)]} for release in answer.releases
        ],
        "suppressed": list(answer.suppressed),
        "min_cell_size": admission.policy.min_cell_size,
        "bytes": len(text.encode()),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "charge": {
            "events": [
                {"mechanism": e.mechanism, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps}
                for e in query.events()
            ],
            "epsilon_spent": metrics["epsilon"],  # the dataset's, composed by the ledger at its budget's delta
            "epsilon_study": metrics["epsilon-run"],
            "delta": admission.budget.delta,
            "accountant": LEDGER_ACCOUNTANT,
        },
    }
