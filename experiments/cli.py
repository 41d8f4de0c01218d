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
from experiments.submit import run_status, submit as submit_run, wait_for_run
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


@app.command()
def submit(
    spec: Path = SPEC_ARGUMENT,
    superlink: str = typer.Option(
        ..., "--superlink", help="The SuperLink's connection name in $FLWR_HOME/config.toml."
    ),
    tracking_uri: str = typer.Option(
        "", "--tracking-uri", help="MLflow tracking URI; default: sqlite:///<cwd>/.medfed/mlflow.db."
    ),
    output_dir: Path = typer.Option(
        Path(".medfed/runs"), "--output-dir", help="Where the coordinator writes each run's final model."
    ),
    key: Path = typer.Option(
        ..., "--key", envvar="MEDFED_SIGNING_KEY",
        help="Your research partner private key (`medfed keys new`); the nodes accept only specs it signed.",
    ),
    app_dir: Path | None = typer.Option(None, "--app", help="Folder of medfed's Flower App (its pyproject.toml)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the run until it finishes."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the run when following it."),
) -> None:
    """Validate SPEC, show what each site will be charged, and start it on a SuperLink."""
    parsed = ExperimentSpec.from_toml(spec)
    plan = plan_privacy(parsed)
    typer.echo(
        f"{parsed.experiment.name} ({parsed.digest()[:12]}): each site's dataset '{parsed.data.dataset}' "
        f"will be charged ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} "
        f"(PLD; planning estimate {plan.epsilon_per_site:.3f} by {plan.accountant.upper()})"
    )
    signing_key = load_private_key(key)
    typer.echo(f"signing spec {parsed.digest()} with {fingerprint(signing_key.public_key())}")
    uri = tracking_uri or default_tracking_uri()
    run_id = submit_run(
        parsed, connection=superlink, tracking_uri=uri, output_dir=output_dir, signing_key=signing_key, app_dir=app_dir
    )
    typer.echo(f"submitted as run {run_id}; tracking in {uri}")
    if not wait:
        return
    status = wait_for_run(run_id, connection=superlink, timeout=timeout)
    if not status.succeeded:
        raise SubmissionError(f"run {run_id} ended {status.status}: {status.details or 'see `flwr log`'}")
    typer.echo(f"run {run_id} finished; results in MLflow ({uri})")


@app.command()
def status(
    run_id: int = typer.Argument(..., help="The run id that `submit` printed."),
    superlink: str = typer.Option(..., "--superlink", help="The SuperLink's connection name."),
) -> None:
    """Show a submitted run's status and, when it failed, why."""
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
    table.add_row("total steps", str(plan.total_steps))
    table.add_row("δ", f"{plan.delta:g}")
    table.add_row(f"ε per site, planning estimate ({plan.accountant.upper()})", f"{plan.epsilon_per_site:.3f}")
    table.add_row("ε charged per site (PLD)", f"{plan.epsilon_charged_per_site:.3f}")
    table.add_row("secure aggregation", spec.secure_aggregation_summary())
    table.caption = "ε composes with each dataset's earlier spend (not by adding); nodes keep the total."
    return table
