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
    STATISTICS_ACTION,
    STATISTICS_METRICS,
    STUDY_QUERY_METRICS,
    ProtocolError,
    ReleaseLayout,
    SignedSpec,
    SiteAnswer,
)

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

    def summary(self) -> dict[str, Any]:
        """What the researcher is told about each site (no patient data)."""
        cost = study_cost(self.spec)
        return {
            "spec_digest": self.spec.digest(),
            "study": self.spec.study.name,
            "epsilon": cost.epsilon,
            "delta": cost.delta,
            "epsilon_charged_per_site": cost.epsilon_charged_per_site,
            "finished": True,
            "tracking_run_id": self.tracking_run_id,
            "sites": {
                o.site: {
                    "status": o.status,
                    "reason": o.reason,
                    "epsilon_spent_on_dataset": self.epsilon.get(o.site, {}).get("epsilon"),
                    "epsilon_charged_by_this_study": self.epsilon.get(o.site, {}).get("epsilon-run"),
                    "suppressed_cells": list(self.answers[o.site].suppressed) if o.site in self.answers else None,
                }
                for o in sorted(self.sites.values(), key=lambda o: o.site)
            },
        }


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
) -> None:
    """Every valid reply the study received, each number as it arrived: the admission replies, then the answers."""
    replies = [{"site": sites[n].site, "message": "query", "metrics": dict(admitted[n])} for n in sorted(admitted)]
    replies += [
        {"site": sites[n].site, "message": STATISTICS_ACTION, "metrics": dict(metrics[n]), "answer": json.loads(answers[n].to_json())}
        for n in sorted(answers)
    ]
    path.write_text(json.dumps({"replies": replies}, indent=1, sort_keys=True) + "\n")


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
    connected = _wait_for_nodes(grid, options.min_sites, options.node_wait_seconds)
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
    if len(accepted) < options.min_sites:
        _release(grid, list(accepted), config, options.timeout_seconds)
        raise NotEnoughNodesError(
            f"{len(accepted)} of {len(connected)} hospital node(s) accepted the study; it needs "
            f"{options.min_sites}. Per site: {_site_report(sites)}"
        )
    nodes = sorted(accepted)
    logger.info("study %s: %d site(s) accepted: %s", spec.study.name, len(nodes), _site_report(sites))
    participants = ParticipantGrid(grid, nodes)
    messages = [
        Message(content=RecordDict({CONFIG_KEY: config}), dst_node_id=n, message_type=STATISTICS_MESSAGE) for n in nodes
    ]
    try:
        replies = list(participants.send_and_receive(messages, timeout=options.timeout_seconds))
    except Exception:
        _release(grid, nodes, config, options.timeout_seconds)
        raise
    by_node, metrics = _answers(replies, sites, nodes, spec)
    silent = [n for n in nodes if n not in by_node]
    if silent:
        # A site that accepted and did not answer gives its reservation back (one that answered
        # late has charged it: its reservation is used up, and the release changes nothing).
        _release(grid, silent, config, options.timeout_seconds)
    if len(by_node) < options.min_sites:
        raise NotEnoughNodesError(
            f"{len(by_node)} site(s) answered the study; it needs {options.min_sites}. Per site: {_site_report(sites)}"
        )
    answers = {sites[n].site: by_node[n] for n in sorted(by_node, key=lambda n: sites[n].site)}
    epsilon = {sites[n].site: metrics[n] for n in by_node}
    output_dir.mkdir(parents=True, exist_ok=True)
    _keep_replies(output_dir / ANSWERS_FILE, sites, accepted, by_node, metrics)
    rows = _combine(spec, answers)
    cost = study_cost(spec)
    params = {
        **spec.to_mapping(),
        "cost": {"epsilon": cost.epsilon, "delta": cost.delta, "epsilon_charged_per_site": cost.epsilon_charged_per_site},
        "sites": {site: {"epsilon": e.get("epsilon"), "epsilon_study": e.get("epsilon-run")} for site, e in epsilon.items()},
    }
    run_id = log_report(
        tracker,
        rows,
        output_dir,
        experiment=spec.study.mlflow_experiment or spec.study.name,
        run_name=spec.study.name,
        params=params,
        tags={"medfed.spec_digest": spec.digest(), "medfed.submission_id": signed.submission_id, "medfed.kind": "statistics", **(tags or {})},
        title=f"{spec.study.name}: pooled estimates over {len(answers)} site(s)",
    )
    result = StudyResult(spec, sites, answers, epsilon, rows, run_id, sorted(output_dir.iterdir()))
    summary_path.write_text(json.dumps(result.summary(), indent=2, sort_keys=True) + "\n")
    logger.info("study %s finished: %d row(s) from %d site(s); MLflow run %s", spec.study.name, len(rows), len(answers), run_id)
    return result
