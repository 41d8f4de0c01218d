"""The `medfed` command: mounts each area's CLI and turns user errors into one line.

Every package has one error root (see its ``errors`` module). A user mistake raises
one of them; here it becomes ``error: <message>`` on stderr and exit code 2, never a
traceback. So does a disk that refuses a write (read-only, full, over a quota or a file
size limit, or owned by another user): the message names the path, and the hint says
what to do. Anything else is a bug and keeps its traceback.

Library warnings (Opacus's alpha-range warning on every ``experiment cost``, pydicom's)
are for developers, not for the people at the terminal: unless Python is run with
``-W`` or ``PYTHONWARNINGS``, they are silenced, so that ``--json`` output is one clean
JSON document on stdout and stderr holds only what medfed means to say.
"""

from __future__ import annotations

import errno
import signal
import sqlite3
import sys
import warnings
from enum import Enum

import typer

from clients.hospital_node.cli import app as node_app
from clients.hospital_node.errors import NodeError
from experiments.cli import app as experiment_app
from experiments.errors import ExperimentError
from experiments.study_cli import app as study_app
from federation.coordinator_cli import app as coordinator_app
from federation.errors import FederationError
from medfed.errors import MedfedError
from privacy.cli import keys_app
from privacy.errors import PrivacyError

USER_ERRORS: tuple[type[Exception], ...] = (
    ExperimentError,
    FederationError,
    MedfedError,
    NodeError,
    PrivacyError,
)

app = typer.Typer(
    name="medfed",
    help="Privacy-preserving federated research for a hospital alliance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(experiment_app, name="experiment")
app.add_typer(study_app, name="study")
app.add_typer(node_app, name="node")
app.add_typer(keys_app, name="keys")
app.add_typer(coordinator_app, name="coordinator")


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="Folder to write one sub-folder per hospital into."),
    hospitals: int = typer.Option(3, "--hospitals", help="Number of hospitals (at least 1)."),
    seed: int = typer.Option(7, "--seed", help="Seed; the same seed gives the same alliance."),
    omop: bool = typer.Option(
        False, "--omop", help="Write OMOP CDM v5.4 tables (Parquet) and ground truth per hospital: the alliance v2."
    ),
    scale: float = typer.Option(1.0, "--scale", help="With --omop: multiplies every hospital's number of patients."),
) -> None:
    """Generate a synthetic alliance: one hypertension cohort (CSV + Parquet) per hospital, or OMOP tables with --omop."""
    from pathlib import Path

    from medfed.errors import SynthError

    if hospitals < 1:
        raise SynthError(f"--hospitals must be at least 1; found {hospitals}")
    if not omop:
        if scale != 1.0:
            raise SynthError("--scale applies only with --omop")
        from medfed.synth import write_alliance

        for cohort in write_alliance(Path(out), n_hospitals=hospitals, seed=seed):
            typer.echo(f"{cohort.site}: {cohort.n_patients} patients -> {cohort.parquet_path.parent}")
        return
    from medfed.synth_omop import write_omop_alliance

    for site in write_omop_alliance(Path(out), n_hospitals=hospitals, seed=seed, patients_scale=scale):
        typer.echo(f"{site.site} ({site.tier}): {site.n_patients} patients -> {site.folder} (truth: {site.truth})")


class DemoTask(str, Enum):
    """The experiments `medfed demo` can run."""

    tabular = "tabular"
    imaging = "imaging"
    statistics = "statistics"


@app.command()
def demo(
    hospitals: int = typer.Option(3, "--hospitals", min=2, help="Number of synthetic hospitals."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
    workdir: str = typer.Option(".medfed/demo", "--workdir", help="Where the demo keeps its state."),
    seed: int = typer.Option(7, "--seed", help="Seed of the synthetic alliance."),
    task: DemoTask = typer.Option(
        DemoTask.tabular,
        "--task",
        help="tabular: hypertension onset from cohort tables; imaging: a lesion on de-identified chest CT; "
        "statistics: prevalence by age band and sex and time to onset under formal DP, beside the true values.",
    ),
) -> None:
    """Run an experiment across synthetic hospitals on real Flower processes."""
    from pathlib import Path

    try:
        if task is DemoTask.imaging:
            from medfed.demo_imaging import run_imaging_demo

            run_imaging_demo(Path(workdir), n_hospitals=hospitals, rounds=rounds, seed=seed)
        elif task is DemoTask.statistics:
            from medfed.demo_statistics import run_statistics_demo

            run_statistics_demo(Path(workdir), n_hospitals=hospitals, seed=seed)
        else:
            from medfed.demo import run_demo

            run_demo(Path(workdir), n_hospitals=hospitals, rounds=rounds, seed=seed)
    except KeyboardInterrupt:
        # run_demo's cluster has been stopped by the time the interrupt reaches here.
        typer.secho("interrupted: every process the demo started has been stopped", err=True)
        raise typer.Exit(130) from None


@app.command()
def simulate(
    spec: str = typer.Argument(..., help="The experiment spec (TOML) to rehearse; it must build an OMOP cohort ([data.cohort])."),
    sites: int = typer.Option(..., "--sites", help="Number of virtual hospitals (540: the whole alliance)."),
    profile: str = typer.Option("alliance", "--profile", help="alliance: 17 cities, tier-3 and tier-2 hospitals 140:400; "
                                "default: every third hospital tier-3, as `medfed synth --omop`."),
    workdir: str = typer.Option(".medfed/simulate", "--workdir", help="Where the rehearsal keeps hospitals (cached), homes and MLflow."),
    seed: int = typer.Option(7, "--seed", help="Seed of the generated hospitals."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplies every hospital's number of patients."),
    tier2_scale: float = typer.Option(0.35, "--tier2-scale", help="With --profile alliance: further multiplies tier-2 hospitals' size."),
    ray_address: str = typer.Option("", "--ray-address", help="A running Ray cluster's head (host:port) instead of a local Ray."),
    cpus: int = typer.Option(0, "--cpus", min=0, help="CPUs for a local Ray (virtual nodes served at once); 0: all."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI; default: a SQLite store under --workdir."),
) -> None:
    """Rehearse a spec at alliance scale: the same ServerApp and ClientApp on Flower's Simulation Engine (Ray)."""
    from pathlib import Path

    from medfed.demo import demo_console
    from medfed.simulate import simulate as run

    run(Path(workdir), Path(spec), sites=sites, profile=profile, seed=seed, patients_scale=scale, tier2_scale=tier2_scale,
        ray_address=ray_address or None, cpus=cpus or None, tracking_uri=tracking_uri or None, console=demo_console())


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    # A service manager stops us with SIGTERM: unwind like Ctrl-C so that every
    # `finally` (the demo's Flower processes among them) runs.
    raise KeyboardInterrupt


_DISK_HINTS = {
    errno.EROFS: "the file system is read-only: remount it read-write, or move the folder to a writable disk",
    errno.ENOSPC: "the disk is full: free space on it (see `df -h`) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free space or ask for a larger quota",
    errno.EFBIG: "a file reached the size limit (see `ulimit -f`) or the disk is full: free space or raise the limit",
    errno.EACCES: "permission denied: run medfed as the user that owns the folder, or give that user write access",
    errno.EPERM: "not permitted: run medfed as the user that owns the folder",
}
# SQLite reports the same causes in its own words.
_SQLITE_HINTS = (
    ("readonly database", "the database or its folder cannot be written by this user, or the disk is read-only: "
                          "run medfed as the user that owns the node home, or make it writable"),
    ("disk is full", _DISK_HINTS[errno.ENOSPC]),
    ("unable to open database file", "the database or its folder cannot be opened for writing: check that the "
                                     "folder exists, is writable by this user and is not on a read-only disk"),
)


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def disk_hint(err: BaseException) -> str | None:
    """What to do about a refused write behind `err` (it or its causes), or None if it is not one."""
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno in _DISK_HINTS:
            return _DISK_HINTS[cause.errno]
        if isinstance(cause, sqlite3.Error):
            text = str(cause).lower()
            for pattern, hint in _SQLITE_HINTS:
                if pattern in text:
                    return hint
    return None


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    sys.exit(2)


def main() -> None:
    """Entry point of the `medfed` console script."""
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
    try:
        app()
    except USER_ERRORS as err:
        hint = disk_hint(err)
        _fail(f"{err}; {hint}" if hint else str(err))
    except (OSError, sqlite3.Error) as err:
        hint = disk_hint(err)
        if hint is None:
            raise  # not the disk: a bug, with its traceback
        where = getattr(err, "filename", None)
        what = getattr(err, "strerror", None) or str(err)
        _fail(f"cannot write {where}: {what}; {hint}" if where else f"{what}; {hint}")
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
