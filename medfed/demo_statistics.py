"""``medfed demo --task statistics``: two statistics studies across synthetic hospitals, for real.

It builds the same governed alliance as the training demo (each node trusts the demo
research partner, gives its cohort a lifetime budget, and its officer approves each
study's exact digest), starts a SuperLink and one node service per hospital on
loopback, and submits two signed studies through the path a research partner uses
(``medfed study submit``):

- the prevalence of hypertension diagnosed within a year by age band and sex (with the
  mean home systolic pressure and its distribution): ``experiments/examples/htn_prevalence.toml``;
- how long until hypertension is diagnosed, by sex (Kaplan-Meier over a year of
  follow-up): ``experiments/examples/htn_onset_survival.toml``.

Each node answers with noisy releases only and charges its ledger. The demo then prints
each DP answer beside the true value, which it knows because it generated the data: the
same estimator applied to the exact pooled vectors of every site (computed here, outside
the federation, from the generated files; no node releases them), and the ε each site's
dataset was charged by each study and what remains of its budget.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clients.hospital_node.governance import approve
from clients.hospital_node.home import NodeHome
from experiments.study import StudySpec, study_cost
from experiments.study_report import ReportRow, read_csv
from experiments.study_run import SUMMARY_FILE, StudyOptions
from experiments.submit import follow, prepare_submission, start_run
from experiments.tracking import default_tracking_uri
from medfed.cluster import LocalCluster, flower_env
from medfed.demo import BUDGET_DELTA, BUDGET_EPSILON, DATASET, OFFICER, PARTNER, Site, demo_console, partner_key_path, prepare_alliance
from medfed.demo import print_budgets
from medfed.errors import DemoError
from privacy.keys import load_private_key

__all__ = ["EXAMPLE_STUDIES", "run_statistics_demo", "true_rows"]

_EXAMPLES = Path(__file__).resolve().parents[1] / "experiments" / "examples"
EXAMPLE_STUDIES = (_EXAMPLES / "htn_prevalence.toml", _EXAMPLES / "htn_onset_survival.toml")
# What the DP-versus-truth table shows of each study (the full report is in the CSV and MLflow).
_SHOWN_KINDS = ("proportion", "survival")


def true_rows(spec: StudySpec, sites: Sequence[Site]) -> list[ReportRow]:
    """The study's estimates from the exact vectors of every site's generated data (no noise, no suppression).

    The truth the demo can know because it generated the data: each site's registered
    cohort file evaluated by the node's own evaluation, pooled by the coordinator's own
    rules with zero noise.
    """
    import polars as pl

    from clients.hospital_node.statistics import evaluate
    from federation.study import combine

    answers: list[dict[str, Any]] = []
    for site in sites:
        entry = NodeHome.open(site.home).dataset(spec.query.dataset)
        exact = evaluate(spec.query, pl.scan_parquet(entry.path))
        answers.append({
            "releases": [
                {"statistic": r.statistic, "name": r.name, "values": [float(v) for v in vector], "scale": 0.0,
                 "mechanism": r.mechanism, "sensitivity": r.sensitivity}
                for r, vector in zip(spec.query.releases(), exact, strict=True)
            ],
            "suppressed": [],
        })
    return combine(spec.query, answers)


def _estimate(row: ReportRow | None) -> str:
    if row is None or row.value.suppressed or math.isnan(row.value.estimate):
        return "suppressed" if row is not None and row.value.suppressed else "-"
    return f"{row.value.estimate:.3f} [{row.value.lower:.3f}, {row.value.upper:.3f}]"


def comparison_table(title: str, rows: Sequence[ReportRow], truth: Sequence[ReportRow]) -> Table:
    """The DP answer (with its 95 % interval and the sites that contributed) beside the true value, row by row."""
    known = {(r.statistic, r.cell, r.quantity): r for r in truth}
    table = Table(title=title, title_justify="left")
    for column, justify in (("statistic", "left"), ("cell", "left"), ("quantity", "left"), ("DP answer [95 % CI]", "right"),
                            ("sites", "right"), ("true", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        if row.kind not in _SHOWN_KINDS:
            continue
        true = known.get((row.statistic, row.cell, row.quantity))
        shown = "-" if true is None or math.isnan(true.value.estimate) else f"{true.value.estimate:.3f}"
        table.add_row(row.statistic, " / ".join(row.cell) or "all", row.quantity, _estimate(row), str(row.value.sites), shown)
    table.caption = (
        "true: the same estimator on the exact data of every site (no noise, no suppression); "
        "a cell a site suppressed (its noisy count below the node's min_cell_size) is pooled over the other sites"
    )
    return table


def _run_study(cluster: LocalCluster, spec: StudySpec, workdir: Path, n_sites: int, tracking_uri: str, console: Console) -> Path:
    """Submit `spec` as the partner does and wait for it; the folder of its report."""
    env = flower_env(cluster.flwr_home)
    record = prepare_submission(
        spec,
        signing_key=load_private_key(partner_key_path(workdir)),
        tracking_uri=tracking_uri,
        output_dir=workdir / "runs",
        study_options=StudyOptions(min_sites=n_sites, approval_wait_seconds=60.0).to_json(),
    )
    run_id = start_run(record, connection=cluster.connection, env=env)
    console.print(f"  study {spec.study.name}: submission {record.submission_id[:12]} started as Flower run {run_id}")
    status, record = follow(record, run_id, connection=cluster.connection, env=env, poll=1.0, max_resumes=0)
    if not status.succeeded:
        raise DemoError(f"the study run {status.run_id} ended {status.status}: {status.details or 'see ' + str(cluster.workdir / 'logs')}")
    return Path(record.output_dir) / record.submission_id


def run_statistics_demo(workdir: Path, *, n_hospitals: int = 3, seed: int = 7, console: Console | None = None) -> None:
    """Run the statistics demo; raises DemoError (or a package's error) with a clear message."""
    import json

    console = console or demo_console()
    workdir = workdir.resolve()
    started = time.monotonic()
    specs = [StudySpec.from_toml(path) for path in EXAMPLE_STUDIES]
    console.print(f"[bold]medfed demo --task statistics[/]: {n_hospitals} synthetic hospitals, {len(specs)} studies under formal DP")
    shutil.rmtree(workdir / "homes", ignore_errors=True)
    sites = prepare_alliance(workdir, n_hospitals=n_hospitals, seed=seed)
    for spec in specs:
        cost = study_cost(spec)
        for site in sites:
            approve(NodeHome.open(site.home), spec.digest(), dataset=DATASET, by=OFFICER, not_yet_requested=True)
        console.print(
            f"  {spec.study.name} ({spec.digest()[:12]}): {len(cost.releases)} DP releases over {spec.query.n_cells} cells; "
            f"each site charged ε = {cost.epsilon_charged_per_site:.3f} at δ = {cost.delta:g}; approved by every officer"
        )
    console.print(
        f"  governance: signed by partner {PARTNER}; each node's '{DATASET}' has a lifetime budget of ε = {BUDGET_EPSILON:g} "
        f"at δ = {BUDGET_DELTA:g}; cells whose noisy count is below the policy's min_cell_size are suppressed"
    )
    tracking_uri = default_tracking_uri()
    folders = []
    with LocalCluster(workdir / "cluster") as cluster:
        cluster.start_superlink()
        for site in sites:
            cluster.start_supernode(site.name, site.home)
        cluster.wait_for_nodes(len(sites))
        console.print(f"  SuperLink and {len(sites)} hospital nodes online after {time.monotonic() - started:.0f} s")
        for spec in specs:
            folders.append(_run_study(cluster, spec, workdir, len(sites), tracking_uri, console))
    for spec, folder in zip(specs, folders, strict=True):
        rows = read_csv(folder / "estimates.csv")
        console.print(comparison_table(f"{spec.study.name}: DP answer beside the true value", rows, true_rows(spec, sites)))
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        spent = ", ".join(
            f"{site} {facts['epsilon_charged_by_this_study']:.3f}" for site, facts in sorted(summary["sites"].items())
            if facts.get("epsilon_charged_by_this_study") is not None
        )
        console.print(f"  ε each site's dataset was charged by this study (δ = {BUDGET_DELTA:g}): {spent}")
        console.print(f"  report: {folder} (estimates.csv, plots); MLflow run {summary['tracking_run_id']}")
    print_budgets(console, sites, DATASET)
    console.print(f"done in {time.monotonic() - started:.0f} s; every process stopped.")
