"""`medfed node privacy-check`: an empirical lower bound on a run's epsilon, from the node's own data.

Mounted by ``clients.hospital_node.cli``; user mistakes raise node errors, which
``medfed.cli.main`` prints as one line with exit code 2. A bound above the epsilon the
run was charged is a finding, not a mistake: it is recorded, reported, and the command
exits with code 1 so that a script notices.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["privacy_check", "report_lines"]

_HOME_ENVVAR = "MEDFED_NODE_HOME"  # as clients.hospital_node.cli.HOME_ENVVAR, which imports this module


def report_lines(result: object) -> list[str]:
    """The check's result in words, for the officer (no patient data)."""
    from clients.hospital_node.privacy_check import PrivacyCheckResult

    assert isinstance(result, PrivacyCheckResult)
    mechanism, bound = result.mechanism, result.bound
    sigmas = sorted({p.noise_multiplier for p in mechanism.phases})
    rates = sorted({p.sample_rate for p in mechanism.phases})
    level = f"{bound.confidence:.0%}"
    lines = [
        f"privacy check of run {mechanism.run_id} on dataset '{mechanism.dataset}' (spec {mechanism.spec_digest[:12]})",
        "  method: one-run audit, Steinke, Nasr & Jagielski (NeurIPS 2023, arXiv:2305.08846), white-box Dirac canaries",
        f"  mechanism re-trained: DP-SGD, noise multiplier {', '.join(f'{s:.4g}' for s in sigmas)}, sampling rate "
        f"{', '.join(f'{q:g}' for q in rates)}, {mechanism.steps} steps over {len(mechanism.phases)} round(s), "
        f"clipping norm {mechanism.max_grad_norm:g}, learning rate {mechanism.learning_rate:g}",
        f"  canaries: {bound.canaries}, each included with probability 1/2; best of {bound.options} guess counts: "
        f"{bound.correct} of {bound.guesses} guesses right ({bound.k_plus} 'in', {bound.k_minus} 'out')",
        f"  empirical epsilon lower bound: {bound.epsilon:.3f} at {level} confidence (delta {bound.delta:g})",
        f"  epsilon charged for this run's DP-SGD: {mechanism.epsilon_charged:.3f} (ledger, PLD, delta {mechanism.delta:g}); "
        f"with its other releases: {mechanism.epsilon_run:.3f}",
    ]
    if result.exceeds_charge:
        lines.append(
            f"  FINDING: the lower bound is above the charged epsilon. At {level} confidence the run's training leaks "
            "more than its accounting says (or this is the rare chance the confidence leaves); keep this record and "
            "ask for the training and accounting to be reviewed"
        )
    else:
        lines.append(
            "  reading: the bound is below the charge, as it must be if the accounting is right; it is a lower bound, "
            "so it cannot show that the charge is tight"
        )
    lines.append(f"  recorded in the audit log as entry {result.audit_seq}; nothing left the node")
    return lines


def privacy_check(
    home: Path = typer.Option(..., "--home", envvar=_HOME_ENVVAR, help="The node home folder."),
    run: str = typer.Option(..., "--run", help="The run id (as `medfed node egress` lists it)."),
    dataset: str | None = typer.Option(None, "--dataset", help="The run's dataset, if it trained on several."),
    canaries: int = typer.Option(1000, "--canaries", help="Canaries inserted in the re-training (100..100000)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the lower bound, in [0.5, 1)."),
    seed: int | None = typer.Option(None, "--seed", help="Fix the canaries and the noise (reproductions only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the recorded result as JSON."),
    by: str | None = typer.Option(None, "--by", help="Who asks (recorded in the audit log); default: your user name."),
) -> None:
    """Re-train a run's DP-SGD mechanism with canaries on this node and bound its epsilon from below. Nothing leaves the node."""
    from clients.hospital_node.officer_cli import current_officer
    from clients.hospital_node.privacy_check import run_privacy_check

    result = run_privacy_check(home, run, dataset=dataset, canaries=canaries, confidence=confidence, seed=seed,
                               by=by or current_officer())
    if as_json:
        typer.echo(json.dumps({**result.to_mapping(), "audit_seq": result.audit_seq}, indent=2, sort_keys=True))
    else:
        for line in report_lines(result):
            typer.echo(line)
    if result.exceeds_charge:
        raise typer.Exit(1)
