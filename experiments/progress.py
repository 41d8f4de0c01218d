"""Following a submission's tracked run: per-round progress and the final table, read from MLflow.

The coordinator records every round of a submission into one MLflow run (continued
across coordinator restarts) tagged ``medfed.submission_id``. `medfed experiment submit
--wait`, `resume` and the demo read it back while it runs: :class:`RunProgress` yields the
rounds as they end, :func:`site_results` the final per-site metrics, and
:func:`results_table` renders the final table: one row per model (the federated model's
quality from each site's noisy validation-score histogram, and pooled over all sites;
the demo adds local-only and pooled baselines), one column per site, then the ε each
site's dataset was charged by this run and the dataset's lifetime total, as each node's
ledger reported them. No site sends an exact metric: every quality number is
post-processing of a DP histogram (:mod:`federation.metrics`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

__all__ = ["RunProgress", "SiteResult", "pooled_result", "released_rows", "results_table", "round_line", "site_results"]

# MLflow metric names (the coordinator writes `<site>.<metric>` and the aggregate `<metric>`).
EVAL_AUC = "eval_auc"
EVAL_ACCURACY = "eval_accuracy"
EPSILON_DATASET = "epsilon"  # the dataset's lifetime total after the round, from the node's ledger
EPSILON_RUN = "epsilon_run"  # what this submission alone charged the dataset, from the node's ledger
NODES_AGGREGATED = "nodes_aggregated"  # the replies a round aggregated (fewer when nodes are sampled or late)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    # MLflow configures its loggers on import; its database set-up chatter is not progress.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri)
    client.search_experiments()  # creates the schema of a new store now
    return client


class RunProgress:
    """Reads a submission's per-round metrics from MLflow while it runs.

    Open it before the coordinator first writes to a new SQLite store: two processes
    creating a fresh MLflow schema at once race in its migrations.
    """

    def __init__(self, tracking_uri: str) -> None:
        self._client = _client(tracking_uri)
        self._submission: str | None = None
        self._run_id: str | None = None
        self.shown = 0

    def follow(self, submission_id: str) -> None:
        if submission_id != self._submission:
            self._submission, self._run_id, self.shown = submission_id, None, 0

    @property
    def mlflow_run_id(self) -> str | None:
        if self._run_id is None and self._submission is not None:
            experiments = self._client.search_experiments()
            runs = self._client.search_runs(
                [e.experiment_id for e in experiments],
                filter_string=f"tags.`medfed.submission_id` = '{self._submission}'",
                max_results=1,
            ) if experiments else []
            self._run_id = runs[0].info.run_id if runs else None
        return self._run_id

    def new_rounds(self) -> list[tuple[int, dict[str, float]]]:
        """Rounds that ended since the last call: their step and aggregate metrics."""
        run_id = self.mlflow_run_id
        if run_id is None:
            return []
        # Every round logs the run's epsilon; quality only where nodes evaluated every round.
        spent = {m.step: m.value for m in self._client.get_metric_history(run_id, EPSILON_RUN)}
        out = []
        for step in sorted(s for s in spent if s > self.shown):
            metrics = {EPSILON_RUN: spent[step]}
            for key in (EVAL_AUC, EVAL_ACCURACY, EPSILON_DATASET, NODES_AGGREGATED):
                history = {m.step: m.value for m in self._client.get_metric_history(run_id, key)}
                wanted = step - 1 if key.startswith("eval") else step
                if wanted in history:
                    metrics[key] = history[wanted]
            out.append((step, metrics))
            self.shown = step
        return out


def round_line(step: int, rounds: int, metrics: Mapping[str, float], *, accuracy: bool = False) -> str:
    """One line of progress for a finished round."""
    quality = ""
    if EVAL_AUC in metrics:  # the spec evaluates every round
        shown = f", accuracy {metrics.get(EVAL_ACCURACY, math.nan):.3f}" if accuracy else ""
        quality = f"pooled AUC of the model it started from {metrics[EVAL_AUC]:.3f}{shown}, "
    nodes = f" ({int(metrics[NODES_AGGREGATED])} node(s) aggregated)" if NODES_AGGREGATED in metrics else ""
    return f"round {step}/{rounds}: {quality}ε charged by this run (max over sites) {metrics.get(EPSILON_RUN, math.nan):.3f}{nodes}"


@dataclass(frozen=True)
class SiteResult:
    """What one site reported about the final model and its privacy spend."""

    metrics: dict[str, float]  # the final model on its validation split: eval_auc, eval_accuracy, ...
    epsilon_run: float
    epsilon_dataset: float
    # How many of its scheduled rounds were aggregated, replied late (charged, not
    # aggregated) or got no reply, by ROUND_COUNTS key; empty for runs tracked before sampling.
    rounds: dict[str, float] = field(default_factory=dict)


def pooled_result(tracking_uri: str, mlflow_run_id: str) -> dict[str, float]:
    """The final model's pooled quality (``eval_auc``, ...) over every site, from the tracked run."""
    data = _client(tracking_uri).get_run(mlflow_run_id).data.metrics
    return {key: value for key, value in data.items() if "." not in key and key.startswith("eval_")}


def released_rows(results: Mapping[str, SiteResult], pooled: Mapping[str, float], metric: str = EVAL_AUC) -> tuple[list[str], str]:
    """The federated model's `metric` as the sites released it (noisy histograms): a cell per site, and pooled."""
    return [_fmt3(r.metrics.get(metric)) for r in results.values()], _fmt3(pooled.get(metric))


def site_results(tracking_uri: str, mlflow_run_id: str, sites: Sequence[str] | None = None) -> dict[str, SiteResult]:
    """Each site's final metrics and ε, from the tracked run (sites as the coordinator named them)."""
    data = _client(tracking_uri).get_run(mlflow_run_id).data.metrics
    names = sorted({key.split(".", 1)[0] for key in data if "." in key}) if sites is None else list(sites)
    out = {}
    for site in names:
        mine = {key.split(".", 1)[1]: value for key, value in data.items() if key.startswith(f"{site}.")}
        out[site] = SiteResult(
            {k: v for k, v in mine.items() if k.startswith("eval_")},
            mine.get(EPSILON_RUN, math.nan),
            mine.get(EPSILON_DATASET, math.nan),
            {k: v for k, v in mine.items() if k in ROUND_COUNTS},
        )
    return out


def results_table(
    title: str,
    rows: Mapping[str, Sequence[str]],
    results: Mapping[str, SiteResult],
    *,
    all_sites: Mapping[str, str] | None = None,
    show_rounds: bool = False,
) -> Table:
    """The final table: a row per model (cells per site, then all sites), then the ε rows per site.

    The sites' round counts (scheduled, aggregated, late, no reply) follow when
    `show_rounds` (the spec samples nodes) or when some site replied late or not at all.

    `rows` maps a model's label to its cells, one per site of `results`, in order;
    `all_sites` its cell for all sites together (blank if absent).
    """
    table = Table(title=title)
    table.add_column("model")
    for site in results:
        table.add_column(site, justify="right")
    table.add_column("all sites", justify="right")
    for label, cells in rows.items():
        table.add_row(label, *cells, (all_sites or {}).get(label, ""))
    table.add_section()
    table.add_row("ε charged by this run (node ledger)", *[_fmt(r.epsilon_run) for r in results.values()], "")
    table.add_row("ε spent on the dataset, lifetime (node ledger)", *[_fmt(r.epsilon_dataset) for r in results.values()], "")
    irregular = any(r.rounds.get("rounds_late") or r.rounds.get("rounds_no_reply") for r in results.values())
    if (show_rounds or irregular) and any(r.rounds for r in results.values()):
        table.add_section()
        for key, label in ROUND_COUNTS.items():
            table.add_row(label, *[_count(r.rounds.get(key)) for r in results.values()], "")
    return table


#: The per-site round counts the coordinator tracks (``<site>.<key>``), as the final table labels them.
ROUND_COUNTS = {
    "rounds_scheduled": "rounds scheduled",
    "rounds_aggregated": "rounds aggregated",
    "rounds_late": "rounds replied late (charged, not aggregated)",
    "rounds_no_reply": "rounds with no reply (the node's ledger says if charged)",
}


def _count(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else str(int(value))


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _fmt3(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"
