"""`medfed study`: check a statistics spec, see its privacy cost, submit it and follow it.

It mirrors `medfed experiment`: the same signing, submission and run status, for the
second kind of spec (:mod:`experiments.study`). User mistakes raise an
:class:`~experiments.errors.ExperimentError` (a bad spec names every problem by field,
a failed submission, a run that ended failed); the `medfed` entry point turns them into
one message on stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from experiments.errors import SubmissionError
from experiments.study import StudyCost, StudySpec, study_cost
from experiments.study_run import SUMMARY_FILE, StudyOptions
from experiments.cli import KEY_OPTION, SUBMISSIONS_DIR_OPTION, SUPERLINK_OPTION, TRACKING_URI_OPTION, status
from experiments.submit import follow, prepare_submission, start_run
from experiments.tracking import default_tracking_uri
from privacy.keys import fingerprint, load_private_key
from privacy.query import MIN_SECURE_SITES

__all__ = ["app"]

app = typer.Typer(
    help="Write, check and cost statistics specs (TOML) before submitting them: answers under formal DP.",
    no_args_is_help=True,
)

SPEC_ARGUMENT = typer.Argument(..., metavar="SPEC", help="The statistics spec, a TOML file (kind = \"statistics\").")


@app.command()
def validate(spec: Path = SPEC_ARGUMENT) -> None:
    """Check SPEC and list every problem at once; print its name, digest and release plan's size when it is valid."""
    parsed = StudySpec.from_toml(spec)
    query = parsed.query
    typer.echo(f"ok: {parsed.study.name} ({parsed.digest()[:12]})")
    typer.echo(
        f"dataset '{query.dataset}': {len(query.statistics)} statistic(s) over {query.n_cells} cell(s), "
        f"{len(query.releases())} DP release(s)"
    )
    typer.echo(f"answers: {_answers_travel(parsed)}")


def _answers_travel(spec: StudySpec) -> str:
    """How the sites' answers reach the coordinator, in one line."""
    if spec.query.secure_aggregation:
        return (
            "securely aggregated (SecAgg+, federation.secure_aggregation = true): the coordinator sees only the totals "
            f"over the sites, at least {MIN_SECURE_SITES}"
        )
    return "each site's noisy answer, in plain (each is DP on its own)"


@app.command()
def cost(
    spec: Path = SPEC_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the cost and the release plan as JSON."),
) -> None:
    """Show each DP release of SPEC (mechanism, sensitivity, noise scale, share of ε) and the ε each site is charged."""
    parsed = StudySpec.from_toml(spec)
    plan = study_cost(parsed)
    if as_json:
        typer.echo(json.dumps(_cost_mapping(parsed, plan), indent=2, sort_keys=True))
        return
    Console().print(_table(parsed, plan))


@app.command()
def submit(
    spec: Path = SPEC_ARGUMENT,
    superlink: str = SUPERLINK_OPTION,
    key: Path = KEY_OPTION,
    tracking_uri: str = TRACKING_URI_OPTION,
    output_dir: Path = typer.Option(Path(".medfed/runs"), "--output-dir", help="Where the coordinator writes each submission's report."),
    submissions_dir: Path = SUBMISSIONS_DIR_OPTION,
    min_sites: int | None = typer.Option(
        None, "--min-sites", min=1,
        help=f"Sites that must answer for the study to be reported (default 1; {MIN_SECURE_SITES} under secure aggregation).",
    ),
    approval_wait: float = typer.Option(
        3600.0, "--approval-wait", min=0, help="Seconds to wait for the officers' approvals before answering with the sites that accepted."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the run until it ends and print the report."),
    timeout: float = typer.Option(7200.0, "--timeout", help="Seconds to wait for the run when following it."),
) -> None:
    """Validate SPEC, show what each site will be charged, sign a submission of it and start it."""
    parsed = StudySpec.from_toml(spec)
    plan = study_cost(parsed)
    typer.echo(
        f"{parsed.study.name} ({parsed.digest()[:12]}): each site's dataset '{parsed.query.dataset}' will be charged "
        f"ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} (PLD over {len(plan.releases)} releases; "
        f"the spec's ε = {plan.epsilon:g} calibrates the noise)"
    )
    options = StudyOptions(min_sites=_min_sites(parsed, min_sites), approval_wait_seconds=approval_wait)
    signing_key = load_private_key(key)
    uri = tracking_uri or default_tracking_uri()
    record = prepare_submission(
        parsed, signing_key=signing_key, tracking_uri=uri, output_dir=output_dir, study_options=options.to_json()
    )
    typer.echo(f"signed submission {record.submission_id} of spec {parsed.digest()} with {fingerprint(signing_key.public_key())}")
    run_id = start_run(record, connection=superlink)
    record = record.with_run(run_id)
    record.save(submissions_dir)
    typer.echo(f"started as Flower run {run_id}; tracking in {uri}")
    if not wait:
        typer.echo(f"follow it with `medfed study status {run_id} --superlink {superlink}`")
        return
    # A study is answered once per submission: a run lost with the coordinator is not resumed.
    status, record = follow(record, run_id, connection=superlink, timeout=timeout, max_resumes=0)
    record.save(submissions_dir)
    if not status.succeeded:
        raise SubmissionError(f"run {status.run_id} ended {status.status}: {status.details or 'see `flwr log`'}")
    report_folder = Path(record.output_dir) / record.submission_id
    _print_report(report_folder)
    typer.echo(f"submission {record.submission_id} finished in run {status.run_id}; report in {report_folder}")


app.command()(status)  # the same run status as `medfed experiment status`


def _min_sites(spec: StudySpec, given: int | None) -> int:
    """``--min-sites``, or its default: 1, or what SecAgg+ needs for a securely aggregated study."""
    if not spec.query.secure_aggregation:
        return 1 if given is None else given
    if given is None:
        return MIN_SECURE_SITES
    if given < MIN_SECURE_SITES:
        raise SubmissionError(
            f"--min-sites {given} is too few for a study with federation.secure_aggregation = true: SecAgg+ sums the "
            f"answers of at least {MIN_SECURE_SITES} sites (a sum over one site is its answer); use --min-sites "
            f"{MIN_SECURE_SITES} or more"
        )
    return given


def _print_report(folder: Path) -> None:
    """The coordinator's table and each site's ε, when its output folder is on this machine."""
    table, summary = folder / "estimates.txt", folder / SUMMARY_FILE
    if table.is_file():
        typer.echo(table.read_text(encoding="utf-8"))
    if summary.is_file():
        secure = json.loads(summary.read_text(encoding="utf-8")).get("secure_sum")
        if secure:
            typer.echo(f"securely aggregated (SecAgg+): totals of {', '.join(secure.get('contributing_sites', []))}; no site's answer was seen")
        sites = json.loads(summary.read_text(encoding="utf-8")).get("sites", {})
        for site, facts in sorted(sites.items()):
            charged = facts.get("epsilon_charged_by_this_study")
            shown = "-" if charged is None else f"{charged:.3f}"
            typer.echo(f"  {site}: {facts.get('status')}; ε charged by this study {shown}" + (f" ({facts['reason']})" if facts.get("reason") else ""))


def _cost_mapping(spec: StudySpec, plan: StudyCost) -> dict[str, object]:
    return {
        "study": spec.study.name,
        "spec_digest": spec.digest(),
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "epsilon_charged_per_site": plan.epsilon_charged_per_site,
        "cells": spec.query.n_cells,
        "secure_aggregation": spec.query.secure_aggregation,
        "releases": [
            {
                "statistic": r.statistic,
                "release": r.name,
                "mechanism": r.mechanism,
                "sensitivity": r.sensitivity,
                "scale": r.scale,
                "epsilon": r.epsilon,
                "values": r.size,
            }
            for r in plan.releases
        ],
    }


def _table(spec: StudySpec, plan: StudyCost) -> Table:
    table = Table(title=f"Privacy cost of {spec.study.name} ({spec.digest()[:12]})")
    for column in ("statistic", "release", "mechanism", "Δ (L1)", "scale b", "ε"):
        table.add_column(column, justify="right" if column in ("Δ (L1)", "scale b", "ε") else "left")
    for r in plan.releases:
        table.add_row(r.statistic, r.name, r.mechanism, f"{r.sensitivity:g}", f"{r.scale:.4g}", f"{r.epsilon:.4g}")
    table.caption = (
        f"ε = {plan.epsilon:g} split equally across statistics, then releases; each site is charged "
        f"ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} (PLD composition of the releases). "
        f"Answers: {_answers_travel(spec)}."
    )
    return table
