"""`medfed experiment`: check a spec and see its privacy cost before submitting it.

User mistakes raise :class:`~experiments.errors.SpecError` (an ExperimentError); the
`medfed` entry point turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from experiments.cost import PrivacyPlan, plan_privacy
from experiments.spec import ExperimentSpec

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


@app.command()
def cost(
    spec: Path = SPEC_ARGUMENT,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Show the DP-SGD parameters of SPEC and the epsilon each site's dataset is charged."""
    parsed = ExperimentSpec.from_toml(spec)
    plan = plan_privacy(parsed)
    if as_json:
        typer.echo(json.dumps(asdict(plan), indent=2, sort_keys=True))
        return
    Console().print(_table(parsed, plan))


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
    table.add_row("accountant", plan.accountant.upper())
    table.add_row("ε charged per site", f"{plan.epsilon_per_site:.3f}")
    table.caption = "ε composes with each dataset's earlier spend (not by adding); nodes keep the total."
    return table
