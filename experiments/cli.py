"""`medfed experiment`: check a spec, see its privacy cost, submit it and follow it.

User mistakes raise an :class:`~experiments.errors.ExperimentError` (a bad spec, a
failed submission, a run that ended failed); the `medfed` entry point turns them into
one message on stderr and exit code 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from experiments.cost import PrivacyPlan, plan_privacy
from experiments.errors import SubmissionError
from experiments.spec import ExperimentSpec
from experiments.progress import RunProgress, pooled_result, released_rows, results_table, round_line, site_results
from experiments.submit import (
    DEFAULT_SUBMISSIONS_DIR,
    RunStatus,
    SubmissionRecord,
    follow,
    prepare_submission,
    run_status,
    start_run,
)
from experiments.tracking import default_tracking_uri
from privacy.keys import fingerprint, load_private_key

__all__ = ["app"]

app = typer.Typer(
    help="Write, check and cost experiment specs (TOML) before submitting them.",
    no_args_is_help=True,
)

SPEC_ARGUMENT = typer.Argument(..., metavar="SPEC", help="The experiment spec, a TOML file.")


@app.command()
def validate(spec: Path = SPEC_ARGUMENT) -> None:
    """Check SPEC and list every problem at once; print its name and digest when it is valid."""
    parsed = ExperimentSpec.from_toml(spec)
    typer.echo(f"ok: {parsed.experiment.name} ({parsed.digest()[:12]})")
    typer.echo(f"secure aggregation: {parsed.secure_aggregation_summary()}")


@app.command()
def cost(
    spec: Path = SPEC_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Show the DP-SGD parameters of SPEC, the epsilon each site's dataset is charged, and the planning estimate."""
    parsed = ExperimentSpec.from_toml(spec)
    plan = plan_privacy(parsed)
    if as_json:
        fed = parsed.federation
        secagg = {
            "enabled": fed.secure_aggregation,
            "num_shares": fed.secagg_num_shares,
            "reconstruction_threshold": fed.secagg_reconstruction_threshold,
        }
        typer.echo(json.dumps({**asdict(plan), "secure_aggregation": secagg}, indent=2, sort_keys=True))
        return
    Console().print(_table(parsed, plan))


_SUBMISSIONS_HELP = "Where your signed submissions are kept, to follow or resume them."

# Options every submitting command shares (`medfed experiment` and `medfed study`).
SUPERLINK_OPTION = typer.Option(
    ..., "--superlink",
    help="The coordinator's connection name: a [superlink.<name>] table in $FLWR_HOME/config.toml "
    "(the alliance operator gives you one; `medfed coordinator init` writes it).",
)
TRACKING_URI_OPTION = typer.Option("", "--tracking-uri", help="MLflow tracking URI; default: sqlite:///<cwd>/.medfed/mlflow.db.")
KEY_OPTION = typer.Option(
    ..., "--key", envvar="MEDFED_SIGNING_KEY",
    help="Your research partner private key (`medfed keys new`); the nodes accept only submissions it signed.",
)
SUBMISSIONS_DIR_OPTION = typer.Option(DEFAULT_SUBMISSIONS_DIR, "--submissions-dir", help=_SUBMISSIONS_HELP)


@app.command()
def submit(
    spec: Path = SPEC_ARGUMENT,
    superlink: str = SUPERLINK_OPTION,
    tracking_uri: str = TRACKING_URI_OPTION,
    output_dir: Path = typer.Option(
        Path(".medfed/runs"), "--output-dir", help="Where the coordinator keeps each submission's checkpoint and final model."
    ),
    key: Path = KEY_OPTION,
    submissions_dir: Path = SUBMISSIONS_DIR_OPTION,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the run until it ends, through coordinator restarts."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the run when following it."),
) -> None:
    """Validate SPEC, show what each site will be charged, sign a submission of it and start it."""
    parsed = ExperimentSpec.from_toml(spec)
    plan = plan_privacy(parsed)
    typer.echo(
        f"{parsed.experiment.name} ({parsed.digest()[:12]}): each site's dataset '{parsed.data.dataset}' "
        f"will be charged ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} "
        f"(PLD; planning estimate {plan.epsilon_per_site:.3f} by {plan.accountant.upper()})"
    )
    signing_key = load_private_key(key)
    uri = tracking_uri or default_tracking_uri()
    record = prepare_submission(parsed, signing_key=signing_key, tracking_uri=uri, output_dir=output_dir)
    typer.echo(f"signed submission {record.submission_id} of spec {parsed.digest()} with {fingerprint(signing_key.public_key())}")
    progress = RunProgress(uri) if wait else None  # opens the store before the coordinator does
    run_id = start_run(record, connection=superlink)
    record = record.with_run(run_id)
    record.save(submissions_dir)
    typer.echo(f"started as Flower run {run_id}; tracking in {uri}")
    if progress is not None:
        _follow(record, run_id, superlink=superlink, progress=progress, rounds=parsed.federation.rounds,
                submissions_dir=submissions_dir, timeout=timeout)
    else:
        typer.echo(f"follow it with `medfed experiment resume {record.submission_id[:12]} --superlink {superlink}`")


@app.command()
def resume(
    submission: str = typer.Argument(..., help="The submission id `submit` printed (its first 6+ characters)."),
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's connection name."),
    submissions_dir: Path = SUBMISSIONS_DIR_OPTION,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the run until it ends."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the run when following it."),
) -> None:
    """Continue a submission after a coordinator restart, from its last completed round.

    Starts a new Flower run of the same signed submission: each node recognises it as the
    run continuing (its officer's approval is not spent again), and the coordinator goes
    on from its checkpoint. A finished submission is not run again.
    """
    record = SubmissionRecord.load(submissions_dir, submission)
    rounds = ExperimentSpec.from_json(record.spec_json).federation.rounds
    progress = RunProgress(record.tracking_uri) if wait else None
    run_id = start_run(record, connection=superlink)
    record = record.with_run(run_id)
    record.save(submissions_dir)
    typer.echo(f"submission {record.submission_id} continues as Flower run {run_id}")
    if progress is not None:
        _follow(record, run_id, superlink=superlink, progress=progress, rounds=rounds, submissions_dir=submissions_dir, timeout=timeout)


def _follow(
    record: SubmissionRecord, run_id: int, *, superlink: str, progress: RunProgress, rounds: int, submissions_dir: Path, timeout: float
) -> None:
    """Print each round as it ends, follow through coordinator restarts, end with the final table."""
    console = Console()
    progress.follow(record.submission_id)
    unreachable = [False]

    def tick(status: RunStatus | None) -> None:
        if status is None and not unreachable[0]:
            console.print("  the coordinator does not answer; waiting for it to come back")
        unreachable[0] = status is None
        for step, metrics in progress.new_rounds():
            console.print(f"  {round_line(step, rounds, metrics)}")

    def resumed(lost: RunStatus, new_run: int) -> None:
        console.print(f"  run {lost.run_id} died with the coordinator ({lost.details}); "
                      f"submission {record.submission_id[:12]} continues as run {new_run} from its last checkpoint")

    status, record = follow(record, run_id, connection=superlink, timeout=timeout, on_tick=tick, on_resume=resumed)
    record.save(submissions_dir)
    tick(status)
    if not status.succeeded:
        raise SubmissionError(f"run {status.run_id} ended {status.status}: {status.details or 'see `flwr log`'}")
    mlflow_run = progress.mlflow_run_id
    if mlflow_run is not None:
        results = site_results(record.tracking_uri, mlflow_run)
        label = "federated model: validation AUC from the sites' DP score histograms"
        cells, pooled = released_rows(results, pooled_result(record.tracking_uri, mlflow_run))
        sampled = ExperimentSpec.from_json(record.spec_json).federation.fraction_per_round < 1
        console.print(results_table(
            f"submission {record.submission_id[:12]}: final model", {label: cells}, results, all_sites={label: pooled}, show_rounds=sampled
        ))
    typer.echo(f"submission {record.submission_id} finished in run {status.run_id}; results in MLflow run {mlflow_run} "
               f"({record.tracking_uri})")


@app.command()
def status(
    run_id: int = typer.Argument(..., help="The run id that `submit` printed."),
    superlink: str = typer.Option(..., "--superlink", help="The SuperLink's connection name."),
) -> None:
    """Show a submitted run's status (an experiment's or a study's) and, when it failed, why."""
    state = run_status(run_id, connection=superlink)
    typer.echo(f"run {run_id}: {state.status}" + (f" - {state.details}" if state.details else ""))


def _table(spec: ExperimentSpec, plan: PrivacyPlan) -> Table:
    table = Table(title=f"Privacy cost of {spec.experiment.name} ({spec.digest()[:12]})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    noise = f"{plan.noise_multiplier:.3f}"
    if plan.noise_from_target:
        noise += f" (from target ε = {plan.target_epsilon:g})"
    epochs = spec.federation.local_epochs
    table.add_row("noise multiplier σ", noise)
    table.add_row("sample rate q", f"{plan.sample_rate:g}")
    table.add_row(
        "steps per round",
        f"{plan.steps_per_round} ({epochs} local epoch{'s' if epochs != 1 else ''} × "
        f"{plan.steps_per_round // epochs} steps)",
    )
    table.add_row("rounds", str(plan.rounds))
    if plan.rounds_per_node != plan.rounds:
        table.add_row(
            "rounds per site (sampled)",
            f"{plan.rounds_per_node} of {plan.rounds} (fraction_per_round {spec.federation.fraction_per_round:g}; "
            "each site reserves and is charged these only; no amplification by node sampling)",
        )
    table.add_row("total steps per site" if plan.rounds_per_node != plan.rounds else "total steps", str(plan.total_steps))
    table.add_row("δ", f"{plan.delta:g}")
    table.add_row(f"ε per site, planning estimate ({plan.accountant.upper()})", f"{plan.epsilon_per_site:.3f}")
    table.add_row("ε of the DP-SGD rounds per site (PLD)", f"{plan.epsilon_training_charged_per_site:.3f}")
    table.add_row("ε of the training-set size (once, discrete Laplace)", f"{plan.count_epsilon:g}")
    table.add_row(
        "ε of the validation-score histogram (discrete Laplace)",
        f"{plan.evaluation_epsilon:g} " + ("every round it trains and the final model" if plan.evaluate_every_round else "once, final model"),
    )
    table.add_row("ε charged per site (PLD)", f"{plan.epsilon_charged_per_site:.3f}")
    table.add_row("secure aggregation", spec.secure_aggregation_summary())
    table.caption = "ε composes with each dataset's earlier spend (not by adding); nodes keep the total."
    return table
