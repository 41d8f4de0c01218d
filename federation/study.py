"""One statistics study on the coordinator, from a signed spec to a tracked report.

The sequence mirrors an experiment's (:mod:`federation.experiment`):

1. wait up to ``node_wait_seconds`` for ``min_sites`` nodes;
2. the same *query* wave for admission: every message carries the partner-signed spec
   and nothing else the nodes act on; each node parses the query itself, checks the
   signature, its officer's approval, its policy and its budget, and reserves the whole
   query. Nodes awaiting their officer are asked again until ``approval_wait_seconds``
   has passed; fewer acceptances than ``min_sites`` stop the study (the nodes that
   accepted are asked to give their reservations back);
3. one *statistics* wave (``query.statistics``) to the nodes that accepted: each answers
   with its noisy releases (:class:`~federation.protocol.SiteAnswer`) and the epsilon its
   ledger charged. Each answer is checked against the release plan the coordinator
   computes from the same signed spec; an answer that departs from it is set aside and
   its site reported, and every site that accepted but gave no valid answer is asked to
   give its reservation back;
4. the answers are combined (:mod:`federation.statistics`: pooled estimates with 95 %
   intervals for DP noise and sampling, suppressed cells marked) and reported
   (:mod:`experiments.study_report`): a table, CSV and PNG plots in the submission's
   output folder, all logged to MLflow as one run, with each site's epsilon; and the
   site answers, as they arrived, kept beside them (``answers.json``).

A study whose signed spec asks for secure aggregation (``[federation] secure_aggregation
= true``) replaces step 3 with Flower's SecAgg+ workflow over the nodes that accepted
(:class:`federation.secure_aggregation.SecureSum`: four waves, the collect stage
carrying the signed spec). The coordinator then holds no site's answer: only the
element-wise totals over the sites and, per cell, how many sites reported it
(:class:`~federation.protocol.SecureTotals`, checked to be what honest sites' vectors
add up to), which it pools exactly as it pools answers
(:mod:`federation.statistics`: the noise of a cell is that of its reporting sites, at
the scales the spec fixes). It needs at least two sites, whatever ``min_sites`` says.
What it cannot do any more is check each site's answer against the plan: each node's
own egress guard does. Drop-outs: a site whose masked answer did not arrive is left out
of the sum and asked to give its reservation back; one that fails after sending it is
in the sum, unmasked from the others' shares. A site whose reply left was charged even
if the protocol then stops (too few share holders to unmask: no sum, nothing reported);
the error names those sites. The report says that the study was securely aggregated and
lists the sites whose answers the totals hold.

A study is answered once per submission on every node, so a finished submission is not
run again (its ``summary.json`` says so).

The coordinator's own settings (how many sites, how long to wait) are not part of the
signed spec: they ride in the run config as :class:`experiments.study_run.StudyOptions`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from experiments.study import StudySpec, study_cost
from experiments.study_run import ANSWERS_FILE, SUMMARY_FILE, StudyOptions
from experiments.tracking import Tracker
from federation.errors import FederationError, NotEnoughNodesError
from federation.experiment import (
    REFUSED,
    SiteOutcome,
    _collect,
    _query_until_decided,
    _release,
    _site_report,
    _wait_for_nodes,
)
from federation.participants import ParticipantGrid
from federation.protocol import (
    CONFIG_KEY,
    METRICS_KEY,
    STATISTICS_ACTION,
    STATISTICS_METRICS,
    STUDY_QUERY_METRICS,
    ProtocolError,
    ReleaseLayout,
    SecureTotals,
    SignedSpec,
    SiteAnswer,
)
from federation.secure_aggregation import SecureSum, node_of
from privacy.query import MIN_SECURE_SITES

__all__ = ["StudyResult", "combine", "release_layout", "run_study"]

if TYPE_CHECKING:
    from privacy.query import StatisticsQuery

logger = logging.getLogger(__name__)

STATISTICS_MESSAGE = f"{MessageType.QUERY}.{STATISTICS_ACTION}"


@dataclass
class StudyResult:
    """The outcome of a finished study."""

    spec: StudySpec
    sites: dict[int, SiteOutcome]
    answers: dict[str, SiteAnswer]  # by site name
    epsilon: dict[str, dict[str, float]]  # by site name: the ledger's epsilons its reply reported
    rows: list[Any]  # experiments.study_report.ReportRow
    tracking_run_id: str
    files: list[Path] = field(default_factory=list)
    totals: SecureTotals | None = None  # a securely aggregated study's: all the coordinator learnt of the answers
    contributors: list[str] = field(default_factory=list)  # the sites whose answers the secure totals hold

    def summary(self) -> dict[str, Any]:
        """What the researcher is told about each site (no patient data)."""
        cost = study_cost(self.spec)
        secure = self.totals is not None
        summary = {
            "spec_digest": self.spec.digest(),
            "study": self.spec.study.name,
            "epsilon": cost.epsilon,
            "delta": cost.delta,
            "epsilon_charged_per_site": cost.epsilon_charged_per_site,
            "finished": True,
            "tracking_run_id": self.tracking_run_id,
            "secure_aggregation": secure,
            "sites": {
                o.site: {
                    "status": o.status,
                    "reason": o.reason,
                    "epsilon_spent_on_dataset": self.epsilon.get(o.site, {}).get("epsilon"),
                    "epsilon_charged_by_this_study": self.epsilon.get(o.site, {}).get("epsilon-run"),
                    # Under SecAgg+ no site's suppressed cells are known: only how many sites reported each cell.
                    "suppressed_cells": list(self.answers[o.site].suppressed) if o.site in self.answers else None,
                    **({"in_secure_sum": o.site in self.contributors} if secure else {}),
                }
                for o in sorted(self.sites.values(), key=lambda o: o.site)
            },
        }
        if self.totals is not None:
            summary["secure_sum"] = {
                "protocol": "SecAgg+",
                "contributing_sites": sorted(self.contributors),
                "sites_per_cell": list(self.totals.sites),
            }
        return summary


def release_layout(spec: StudySpec) -> list[ReleaseLayout]:
    """The study's release plan as the protocol checks a site answer against it."""
    return [
        ReleaseLayout(r.statistic, r.name, r.mechanism, r.scale, r.sensitivity, tuple(r.shape)) for r in spec.query.releases()
    ]


def _answers(
    replies: list[Message], sites: dict[int, SiteOutcome], expected: list[int], spec: StudySpec
) -> tuple[dict[int, SiteAnswer], dict[int, dict[str, float]]]:
    """The valid answers of the statistics wave, by node; refusals, silences and bad answers recorded in `sites`."""
    metrics = _collect(replies, sites, expected, STATISTICS_METRICS)
    layout = release_layout(spec)
    answers: dict[int, SiteAnswer] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in metrics:
            continue
        try:
            answer = SiteAnswer.from_content(reply.content)
            problems = answer.problems(layout, spec.query.n_cells)
            if problems:
                raise ProtocolError("; ".join(problems[:3]))
        except ProtocolError as err:
            sites[node].status, sites[node].reason = REFUSED, f"invalid answer: {err}"
            metrics.pop(node)
            continue
        answers[node] = answer
    return answers, metrics


def combine(query: StatisticsQuery, answers: Sequence[Mapping[str, Any]], *, level: float = 0.95) -> list[Any]:
    """The pooled estimates of the site answers (wire layout), labelled as report rows, statistic by statistic.

    Binds each statistic of `query` to its releases in the answers and to the pooling rule
    of :mod:`federation.statistics` for its kind (a 2x2 table reports its cells and the
    odds ratio; quantiles their quantiles).
    """
    from federation import statistics as pool

    cells = query.cells()
    n = query.n_cells
    rows: list[Any] = []

    def vectors(statistic: str, name: str, *, width: int = 1, part: int = 0, parts: int = 1) -> list[Any]:
        return [
            pool.NoisyVector.from_answer(a, statistic=statistic, name=name, cells=n, width=width, part=part, parts=parts)
            for a in answers
        ]

    for statistic in query.statistics:
        name, kind = statistic.name, statistic.kind
        column = query.column(statistic.column) if statistic.column is not None else None
        bounds = (float(column.lower), float(column.upper)) if column is not None and column.lower is not None else None
        if kind == "count":
            rows += pool.report_rows(name, "count", cells, pool.pooled_count(vectors(name, "count"), level=level))
        elif kind in ("sum", "mean"):
            assert bounds is not None
            rule = pool.pooled_sum if kind == "sum" else pool.pooled_mean
            estimates = rule(vectors(name, "sum"), vectors(name, "count"), bounds=bounds, level=level)
            rows += pool.report_rows(name, kind, cells, estimates)
        elif kind in ("variance", "sd"):
            assert bounds is not None
            rule = pool.pooled_variance if kind == "variance" else pool.pooled_sd
            estimates = rule(vectors(name, "sum"), vectors(name, "sum_squares"), vectors(name, "count"), bounds=bounds, level=level)
            rows += pool.report_rows(name, kind, cells, estimates)
        elif kind == "proportion":
            estimates = pool.pooled_proportion(vectors(name, "events"), vectors(name, "count"), level=level)
            rows += pool.report_rows(name, "proportion", cells, estimates)
        elif kind in ("histogram", "quantiles"):
            assert statistic.bins is not None
            bins = vectors(name, "histogram", width=len(statistic.bins) - 1)
            if kind == "histogram":
                rows += pool.report_rows(name, "histogram", cells, pool.merged_histogram(bins, level=level), edges=statistic.bins)
            else:
                probabilities = statistic.probabilities or (0.25, 0.5, 0.75)
                estimates = pool.pooled_quantiles(bins, edges=statistic.bins, probabilities=probabilities, level=level)
                rows += pool.report_rows(name, "quantile", cells, estimates, probabilities=probabilities)
        elif kind == "two_by_two":
            tables = vectors(name, "table", width=4)
            rows += pool.report_rows(name, "table", cells, pool.pooled_table(tables, level=level))
            rows += pool.report_rows(name, "odds_ratio", cells, pool.pooled_odds_ratio(tables, level=level))
        elif kind == "kaplan_meier":
            assert statistic.bins is not None
            width = len(statistic.bins) - 1
            events = vectors(name, "events", width=width, part=0, parts=2)
            censored = vectors(name, "events", width=width, part=1, parts=2)
            estimates = pool.pooled_survival(events, censored, vectors(name, "total"), level=level)
            rows += pool.report_rows(name, "survival", cells, estimates, edges=statistic.bins)
        else:  # the query module and this binding list the same kinds
            raise FederationError(f"statistic {name!r}: kind {kind!r} has no pooling rule on this coordinator")
    return rows


def _combine(spec: StudySpec, answers: Mapping[str, SiteAnswer]) -> list[Any]:
    """The pooled estimates of the site answers, as report rows (:mod:`federation.statistics`)."""
    return combine(spec.query, [json.loads(answer.to_json()) for answer in answers.values()])


def _keep_replies(
    path: Path,
    sites: Mapping[int, SiteOutcome],
    admitted: Mapping[int, Mapping[str, float]],
    answers: Mapping[int, SiteAnswer],
    metrics: Mapping[int, Mapping[str, float]],
    totals: SecureTotals | None = None,
) -> None:
    """Every valid reply the study received, each number as it arrived: the admission replies, then the answers.

    Under secure aggregation a site's reply carries its ledger's epsilons and its masked
    answer, which nobody can read alone; what the coordinator holds instead is the
    totals (``secure_sum``).
    """
    replies = [{"site": sites[n].site, "message": "query", "metrics": dict(admitted[n])} for n in sorted(admitted)]
    for n in sorted(metrics):
        reply: dict[str, Any] = {"site": sites[n].site, "message": STATISTICS_ACTION, "metrics": dict(metrics[n])}
        if n in answers:
            reply["answer"] = json.loads(answers[n].to_json())
        else:
            reply["answer_masked"] = True  # in the secure sum; its own values never reached the coordinator
        replies.append(reply)
    kept: dict[str, Any] = {"replies": replies}
    if totals is not None:
        kept["secure_sum"] = {"protocol": "SecAgg+", **totals.to_mapping()}
    path.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")


def _secure_wave(
    grid: ParticipantGrid,
    config: ConfigRecord,
    spec: StudySpec,
    sites: dict[int, SiteOutcome],
    nodes: list[int],
    options: StudyOptions,
) -> tuple[SecureTotals, dict[int, dict[str, float]], list[int]]:
    """The study's answers through SecAgg+: their totals, each contributing node's epsilons, and the contributors.

    Raises
    ------
    FederationError
        The protocol stopped (nothing unmasked), or its sums are not what honest sites'
        vectors add up to; the error names the sites whose answers left (charged).
    NotEnoughNodesError
        Fewer than the minimum of sites' answers are in the sum.
    """
    try:
        result = SecureSum(timeout=options.timeout_seconds).run(grid, config)
    except ProtocolError as err:
        raise FederationError(f"secure aggregation of the study failed: {err}") from None
    metrics = _collect(result.replies, sites, result.sampled, STATISTICS_METRICS, result.senders)
    left = sorted(
        {node_of(r, result.senders) for r in result.replies if not r.has_error() and METRICS_KEY in r.content} | set(result.contributors)
    )
    charged = ", ".join(sorted(sites[n].site for n in left)) or "none"
    if result.sums is None:
        raise FederationError(
            f"secure aggregation stopped after {result.waves} of its 4 waves: {len(left)} of {len(result.sampled)} "
            f"site(s) sent a masked answer; SecAgg+ needs at least {MIN_SECURE_SITES} and {result.threshold} share "
            f"holders to unmask. Nothing was reported; sites whose answer left were charged: {charged}. "
            f"Per site: {_site_report(sites)}"
        )
    contributors = sorted(result.contributors)
    try:
        totals = SecureTotals.from_sums(result.sums, release_layout(spec), spec.query.n_cells, contributors=len(contributors))
    except ProtocolError as err:
        raise FederationError(
            f"the securely aggregated totals cannot be used: {err}. Nothing was reported; sites whose answer left were "
            f"charged: {charged}"
        ) from None
    minimum = max(options.min_sites, MIN_SECURE_SITES)
    if len(contributors) < minimum:
        raise NotEnoughNodesError(
            f"{len(contributors)} site(s)' answers are in the secure sum; the study needs {minimum}. Nothing was "
            f"reported; sites whose answer left were charged: {charged}. Per site: {_site_report(sites)}"
        )
    for node in contributors:
        if node not in metrics:  # in the sum, though its reply's plain part was not valid
            sites[node].reason = (sites[node].reason + "; " if sites[node].reason else "") + "its masked answer is in the sum"
    return totals, metrics, contributors


def run_study(
    grid: Grid,
    spec: StudySpec,
    *,
    signed: SignedSpec,
    tracker: Tracker,
    output_dir: Path,
    options: StudyOptions | None = None,
    tags: Mapping[str, str] | None = None,
) -> StudyResult:
    """Run the study `spec` over the nodes of `grid`; see the module docstring for the sequence.

    Raises
    ------
    FederationError
        The signed spec is not `spec`, the submission already finished, or a site's
        answer could not be used and too few remain.
    NotEnoughNodesError
        Fewer than ``min_sites`` nodes connected, accepted or answered.
    """
    from experiments.study_report import log_report

    options = options or StudyOptions()
    if signed.spec_json != spec.canonical_json():
        raise FederationError("the signed spec is not the study of this run; submit it again with `medfed study submit`")
    summary_path = output_dir / SUMMARY_FILE
    if summary_path.exists():
        raise FederationError(
            f"submission {signed.submission_id[:12]} already finished; its report is in {output_dir}. "
            "A study is answered once per submission: submit the spec again for a new answer"
        )
    config = signed.add_to(ConfigRecord())
    secure = spec.query.secure_aggregation
    minimum = max(options.min_sites, MIN_SECURE_SITES) if secure else options.min_sites
    connected = _wait_for_nodes(grid, minimum, options.node_wait_seconds)
    sites = {n: SiteOutcome(n, f"node-{n}") for n in connected}
    accepted = _query_until_decided(
        grid,
        RecordDict({CONFIG_KEY: config}),
        connected,
        sites,
        timeout=options.timeout_seconds,
        wait=options.approval_wait_seconds,
        allowed=STUDY_QUERY_METRICS,
    )
    if len(accepted) < minimum:
        _release(grid, list(accepted), config, options.timeout_seconds)
        why = f" (secure aggregation: SecAgg+ sums at least {MIN_SECURE_SITES} sites' answers)" if secure else ""
        raise NotEnoughNodesError(
            f"{len(accepted)} of {len(connected)} hospital node(s) accepted the study; it needs "
            f"{minimum}{why}. Per site: {_site_report(sites)}"
        )
    nodes = sorted(accepted)
    logger.info("study %s: %d site(s) accepted: %s", spec.study.name, len(nodes), _site_report(sites))
    participants = ParticipantGrid(grid, nodes)
    totals: SecureTotals | None = None
    by_node: dict[int, SiteAnswer] = {}
    contributors: list[int] = []
    try:
        if secure:
            totals, metrics, contributors = _secure_wave(participants, config, spec, sites, nodes, options)
            answered = set(contributors)
        else:
            messages = [
                Message(content=RecordDict({CONFIG_KEY: config}), dst_node_id=n, message_type=STATISTICS_MESSAGE) for n in nodes
            ]
            replies = list(participants.send_and_receive(messages, timeout=options.timeout_seconds))
            by_node, metrics = _answers(replies, sites, nodes, spec)
            answered = set(by_node)
    except Exception:
        # Whoever did not answer gives its reservation back (one whose answer left has charged
        # it: its reservation is used up, and the release changes nothing).
        _release(grid, nodes, config, options.timeout_seconds)
        raise
    silent = [n for n in nodes if n not in answered]
    if silent:
        # A site that accepted and did not answer gives its reservation back (one that answered
        # late has charged it: its reservation is used up, and the release changes nothing).
        _release(grid, silent, config, options.timeout_seconds)
    if len(answered) < minimum:
        raise NotEnoughNodesError(
            f"{len(answered)} site(s) answered the study; it needs {minimum}. Per site: {_site_report(sites)}"
        )
    answers = {sites[n].site: by_node[n] for n in sorted(by_node, key=lambda n: sites[n].site)}
    epsilon = {sites[n].site: metrics[n] for n in metrics}
    contributing = sorted(sites[n].site for n in contributors)
    output_dir.mkdir(parents=True, exist_ok=True)
    _keep_replies(output_dir / ANSWERS_FILE, sites, accepted, by_node, metrics, totals)
    rows = combine(spec.query, [totals.to_mapping()]) if totals is not None else _combine(spec, answers)
    cost = study_cost(spec)
    params = {
        **spec.to_mapping(),
        "cost": {"epsilon": cost.epsilon, "delta": cost.delta, "epsilon_charged_per_site": cost.epsilon_charged_per_site},
        "sites": {site: {"epsilon": e.get("epsilon"), "epsilon_study": e.get("epsilon-run")} for site, e in epsilon.items()},
    }
    if totals is not None:
        params["secure_sum"] = {"protocol": "SecAgg+", "contributing_sites": contributing}
        title = (
            f"{spec.study.name}: pooled estimates over {len(contributing)} site(s), securely aggregated (SecAgg+: only "
            f"totals were seen) from {', '.join(contributing)}"
        )
    else:
        title = f"{spec.study.name}: pooled estimates over {len(answers)} site(s)"
    run_id = log_report(
        tracker,
        rows,
        output_dir,
        experiment=spec.study.mlflow_experiment or spec.study.name,
        run_name=spec.study.name,
        params=params,
        tags={
            "medfed.spec_digest": spec.digest(),
            "medfed.submission_id": signed.submission_id,
            "medfed.kind": "statistics",
            "medfed.secure_aggregation": "true" if secure else "false",
            **(tags or {}),
        },
        title=title,
    )
    result = StudyResult(spec, sites, answers, epsilon, rows, run_id, sorted(output_dir.iterdir()), totals, contributing)
    summary_path.write_text(json.dumps(result.summary(), indent=2, sort_keys=True) + "\n")
    logger.info(
        "study %s finished: %d row(s) from %d site(s)%s; MLflow run %s",
        spec.study.name, len(rows), len(contributing) if secure else len(answers), " (SecAgg+)" if secure else "", run_id,
    )
    return result
