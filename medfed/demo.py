"""``medfed demo``: the hypertension experiment across synthetic hospitals, for real.

It generates the synthetic alliance, gives each hospital a node home with its cohort
registered, starts a SuperLink and one SuperNode per hospital as processes on loopback,
submits the example spec through the same path a research partner uses, follows the run
round by round from MLflow, and ends with a table comparing the federated model with
each hospital's local-only model and a pooled model trained on the union of the data,
all at the same privacy cost per patient, and each site's remaining lifetime budget.
Every process it started is stopped on the way out, also on Ctrl-C or failure.

Each demo node is governed as a real one: its officer trusts the demo research
partner's key, gives the cohort a lifetime budget and approves the signed spec's digest;
the nodes check all of it themselves. The alliance is rebuilt on each run, and the node
homes stay in ``<workdir>/homes`` afterwards for the officer's commands
(``medfed node budget|requests|audit|report --home ...``).

The local-only and pooled baselines are trained by the demo itself, outside the
federation, only to show what federation buys; they are not charged to any node's ledger.
"""

from __future__ import annotations

import logging
import math
import time
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from clients.hospital_node.connectors import TabularConnector, TabularData
from clients.hospital_node.governance import approve, governance_state, set_budget
from clients.hospital_node.home import DatasetEntry, NodeHome
from experiments.cost import PrivacyPlan, plan_privacy
from experiments.spec import ExperimentSpec
from experiments.progress import RunProgress, SiteResult, pooled_result, released_rows, results_table, round_line, site_results
from experiments.submit import follow, prepare_submission, start_run
from experiments.tracking import default_tracking_uri
from medfed.cluster import LocalCluster, flower_env
from federation.protocol import SignedSpec
from medfed.errors import DemoError
from medfed.synth import FEATURES, FOLLOW_UP, ID_COLUMN, LABEL, SITE_COLUMN, write_alliance
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.governance import Submission, sign_submission
from privacy.keys import generate_keypair, load_private_key
from privacy.ledger import PrivacyLedger

__all__ = [
    "DATASET",
    "EXAMPLE_SPEC",
    "Site",
    "approve_everywhere",
    "comparison_table",
    "demo_console",
    "govern_site",
    "partner_key_path",
    "prepare_alliance",
    "remaining_budgets",
    "signed_spec",
    "run_demo",
    "run_on_cluster",
    "torch_split",
]

if TYPE_CHECKING:
    from clients.hospital_node.imaging_connector import ImagingData

logger = logging.getLogger(__name__)

DATASET = "htn_cohort"
EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "experiments" / "examples" / "hypertension.toml"


# The demo's research partner (who signs the spec) and the officer of every demo node.
PARTNER = "alliance_research"
OFFICER = "demo-officer"
# Each demo dataset's lifetime budget: several demo-sized experiments fit, not unlimited ones.
BUDGET_EPSILON = 12.0
BUDGET_DELTA = 1e-5


@dataclass(frozen=True)
class Site:
    """A synthetic hospital of the demo: its name and its node home."""

    name: str
    home: Path


def partner_key_path(workdir: Path) -> Path:
    """The demo research partner's private key, created on first use (``<workdir>/partner``)."""
    path = workdir / "partner" / f"{PARTNER}.key"
    if not path.exists():
        generate_keypair(path.parent, PARTNER)
    return path


def govern_site(home: NodeHome, dataset: str, *, partner_public_key: Path, min_cohort_size: int | None = None) -> None:
    """What a node's officer does once: trust the partner, set the dataset's budget (and the cohort floor)."""
    trusted = home.trusted_partners()
    if PARTNER not in {p.name for p in trusted.list()}:
        trusted.add(PARTNER, partner_public_key, added_by=OFFICER)
    if min_cohort_size is not None:
        home.policy_path.write_text(replace(home.policy(), min_cohort_size=min_cohort_size).render())
    if dataset not in governance_state(home).budgets:
        set_budget(home, dataset, epsilon_=BUDGET_EPSILON, delta=BUDGET_DELTA, by=OFFICER)


def approve_everywhere(sites: list[Site], spec: ExperimentSpec, *, runs: int = 1) -> None:
    """Each site's officer approves exactly this spec (its digest) on the spec's dataset, for `runs` submissions."""
    for site in sites:
        approve(NodeHome.open(site.home), spec.digest(), dataset=spec.data.dataset, by=OFFICER, runs=runs, not_yet_requested=True)


def signed_spec(spec: ExperimentSpec, workdir: Path) -> SignedSpec:
    """A fresh submission of `spec` signed by the demo partner, as `medfed experiment submit --key` signs it."""
    submission = Submission.new(spec.canonical_json())
    signature = sign_submission(submission, load_private_key(partner_key_path(workdir)))
    return SignedSpec(spec.canonical_json(), signature.signature, signature.signer, submission.to_json())


def remaining_budgets(sites: list[Site], dataset: str) -> dict[str, tuple[float, float]]:
    """Each site's (spent, budget) epsilon on `dataset`, at the budget's delta, from its own ledger."""
    out = {}
    for site in sites:
        home = NodeHome.open(site.home)
        setting = governance_state(home).budgets[dataset]
        with PrivacyLedger.open(home.ledger_path) as ledger:
            spent = epsilon(ledger.held(dataset, hold=home.policy().reservation_hold), delta=setting.delta, accountant=LEDGER_ACCOUNTANT)
        out[site.name] = (spent, setting.epsilon)
    return out


def prepare_alliance(workdir: Path, *, n_hospitals: int, seed: int) -> list[Site]:
    """Generate the cohorts and a governed node home per hospital with the cohort registered.

    Each node trusts the demo partner's key and gives the cohort a lifetime budget of
    ``BUDGET_EPSILON`` at ``BUDGET_DELTA``; approving a spec is left to the caller
    (:func:`approve_everywhere`), as it is to a real officer.
    """
    cohorts = write_alliance(workdir / "data", n_hospitals=n_hospitals, seed=seed)
    partner_public_key = partner_key_path(workdir).with_suffix(".pub")
    sites = []
    for cohort in cohorts:
        path = workdir / "homes" / cohort.site
        home = NodeHome.open(path) if (path / "node.toml").exists() else NodeHome.create(path, name=cohort.site)
        entry = DatasetEntry(
            name=DATASET,
            path=cohort.parquet_path.resolve(),
            id_column=ID_COLUMN,
            label_column=LABEL,
            # The follow-up time is registered for research too: statistics studies may read it.
            feature_columns=(*FEATURES, FOLLOW_UP),
            site_column=SITE_COLUMN,
            site_value=cohort.site,
        )
        home.register_dataset(entry, replace=True)
        govern_site(home, DATASET, partner_public_key=partner_public_key)
        sites.append(Site(cohort.site, path))
    return sites


def demo_spec(rounds: int, n_hospitals: int) -> ExperimentSpec:
    """The example hypertension spec with the demo's number of rounds."""
    import tomllib

    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"]["rounds"] = rounds
    mapping["federation"]["min_nodes"] = min(mapping["federation"].get("min_nodes", 2), n_hospitals)
    return ExperimentSpec.from_mapping(mapping, source=str(EXAMPLE_SPEC))


def torch_split(data: TabularData | ImagingData):  # type: ignore[no-untyped-def]
    """A connector's four arrays (x_train, y_train, x_val, y_val) as tensors."""
    import torch

    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_val),
        torch.from_numpy(data.y_val),
    )


def _train_baseline(spec: ExperimentSpec, plan: PrivacyPlan, x, y, seed: int):  # type: ignore[no-untyped-def]
    import torch

    from federation.experiment import build_model
    from models.training import train_dp

    model, _ = build_model(spec)
    train_dp(
        model,
        x,
        y,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=spec.privacy.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.total_steps,
        learning_rate=spec.federation.learning_rate,
        generator=torch.Generator().manual_seed(seed),
    )
    return model


_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy"}


def comparison_table(
    spec: ExperimentSpec,
    plan: PrivacyPlan,
    tensors: dict[str, tuple],  # type: ignore[type-arg]
    model_path: Path,
    results: Mapping[str, SiteResult],
    *,
    metrics: tuple[str, ...] = ("auc",),
    released: Mapping[str, float] | None = None,
    baselines: Mapping[str, Any] | None = None,
) -> Table:
    """Federated vs local-only vs pooled models on each site's validation split, and each site's ε.

    The table `medfed experiment submit --wait` ends with (:func:`experiments.progress.results_table`),
    with the baselines a research partner cannot have: `tensors` holds each site's
    ``(x_train, y_train, x_val, y_val)``; the local-only and pooled models are trained here
    with the federated run's DP-SGD parameters and step count, so every model costs each
    patient the same epsilon. `results` are the sites' ε as their ledgers reported them,
    and the federated model's AUC as each site released it (a noisy score histogram);
    `released` the pooled quality from the summed histograms. The demo knows the data it
    generated, so its other rows are exact: beside them the released row shows what the
    DP noise costs the researcher's view. `baselines` are further models (label to a
    module giving one logit per row), already fitted, scored on the same validation splits
    right after the federated one.
    """
    import torch

    from federation.experiment import build_model
    from models.training import evaluate

    x_val_all = torch.cat([t[2] for t in tensors.values()])
    y_val_all = torch.cat([t[3] for t in tensors.values()])

    federated, _ = build_model(spec)
    federated.load_state_dict(torch.load(model_path, weights_only=True))
    models = {"federated (all sites)": federated, **(baselines or {})}
    for i, (name, (x, y, _, _)) in enumerate(tensors.items()):
        models[f"local-only {name}"] = _train_baseline(spec, plan, x, y, seed=100 + i)
    x_all = torch.cat([t[0] for t in tensors.values()])
    y_all = torch.cat([t[1] for t in tensors.values()])
    models["pooled (centralised)"] = _train_baseline(spec, plan, x_all, y_all, seed=99)

    def cell(model, x, y) -> str:  # type: ignore[no-untyped-def]
        result = evaluate(model, x, y)
        return " / ".join(f"{getattr(result, m):.3f}" for m in metrics)

    rows = {label: [cell(model, t[2], t[3]) for t in tensors.values()] for label, model in models.items()}
    pooled = {label: cell(model, x_val_all, y_val_all) for label, model in models.items()}
    shown = " / ".join(_METRIC_NAMES[m] for m in metrics)
    ordered = {name: results.get(name, SiteResult({}, math.nan, math.nan)) for name in tensors}
    if released is not None and "auc" in metrics:
        label = "federated, as released (AUC from DP score histograms)"
        rows[label], pooled[label] = released_rows(ordered, released)
    title = f"Validation {shown} at ε ≈ {plan.epsilon_charged_per_site:.2f} per patient (δ = {plan.delta:g})"
    return results_table(title, rows, ordered, all_sites=pooled, show_rounds=spec.federation.fraction_per_round < 1)


def run_on_cluster(
    workdir: Path,
    spec: ExperimentSpec,
    sites: list[Site],
    *,
    tracking_uri: str,
    console: Console,
    started: float,
    show_accuracy: bool = False,
) -> tuple[str, str | None]:
    """Start a SuperLink and a node service per site, submit `spec`, print its rounds as they end.

    Returns the submission id and the MLflow run id; every process is stopped on the way
    out. Raises DemoError if the run does not succeed.
    """
    rounds = spec.federation.rounds
    with LocalCluster(workdir / "cluster") as cluster:
        cluster.start_superlink()
        for site in sites:
            cluster.start_supernode(site.name, site.home)
        cluster.wait_for_nodes(len(sites))
        console.print(f"  SuperLink on {cluster.fleet_address} (gRPC Fleet, {'insecure' if cluster.insecure else 'TLS + node authentication'}) and {cluster.control_address} (control); "
                      f"{len(sites)} hospital nodes online after {time.monotonic() - started:.0f} s")
        env = flower_env(cluster.flwr_home)
        progress = RunProgress(tracking_uri)  # opens the store before the ServerApp does
        record = prepare_submission(
            spec, signing_key=load_private_key(partner_key_path(workdir)), tracking_uri=tracking_uri, output_dir=workdir / "runs"
        )
        run_id = start_run(record, connection=cluster.connection, env=env)
        console.print(f"  submission {record.submission_id[:12]} started as Flower run {run_id}; tracking in {tracking_uri}")
        progress.follow(record.submission_id)

        def tick(_status: object) -> None:
            for step, metrics in progress.new_rounds():
                console.print(f"  {round_line(step, rounds, metrics, accuracy=show_accuracy)}")

        status, record = follow(record, run_id, connection=cluster.connection, env=env, poll=1.0, on_tick=tick, max_resumes=0)
        tick(status)
        if not status.succeeded:
            raise DemoError(f"the experiment run {status.run_id} ended {status.status}: {status.details or 'see ' + str(cluster.workdir / 'logs')}")
    return record.submission_id, progress.mlflow_run_id


def report_governance(console: Console, sites: list[Site], spec: ExperimentSpec) -> None:
    """Each officer approves the signed spec; say so, and where the officers' commands work."""
    approve_everywhere(sites, spec)
    console.print(
        f"  governance: spec signed by partner {PARTNER}; the officer of each of {len(sites)} nodes trusts that key, "
        f"set '{spec.data.dataset}' a lifetime budget of ε = {BUDGET_EPSILON:g} at δ = {BUDGET_DELTA:g} and "
        f"approved spec {spec.digest()[:12]}"
    )


def print_budgets(console: Console, sites: list[Site], dataset: str) -> None:
    """Each site's remaining lifetime budget on `dataset`, from its own ledger."""
    budgets = remaining_budgets(sites, dataset)
    line = ", ".join(f"{name} {budget - spent:.2f} of {budget:g}" for name, (spent, budget) in budgets.items())
    console.print(f"remaining budget on '{dataset}' (ε at δ = {BUDGET_DELTA:g}): {line}")
    first = sites[0].home
    console.print(f"officer's view of a node: `medfed node budget --home {first}` (also: requests, audit verify, report)")


def demo_console() -> Console:
    """The console the demos print to."""
    console = Console()
    # A log file or CI has no terminal width; keep the final table on one line per row.
    return console if console.is_terminal else Console(width=120)


def run_demo(workdir: Path, *, n_hospitals: int = 3, rounds: int = 5, seed: int = 7, console: Console | None = None) -> None:
    """Run the whole demo; raises DemoError (or a package's error) with a clear message."""
    console = console or demo_console()
    workdir = workdir.resolve()
    spec = demo_spec(rounds, n_hospitals)
    plan = plan_privacy(spec)
    started = time.monotonic()
    console.print(f"[bold]medfed demo[/]: {n_hospitals} synthetic hospitals, {rounds} rounds, spec {spec.experiment.name} ({spec.digest()[:12]})")
    # A fresh alliance every time: the demo's ledgers and audit logs describe this run only.
    shutil.rmtree(workdir / "homes", ignore_errors=True)
    sites = prepare_alliance(workdir, n_hospitals=n_hospitals, seed=seed)
    console.print(f"  cost: each site's dataset is charged ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} "
                  f"(PLD; planning estimate {plan.epsilon_per_site:.3f} by {plan.accountant.upper()}; "
                  f"σ = {plan.noise_multiplier:.3f}, q = {plan.sample_rate:g}, {plan.total_steps} steps)")
    report_governance(console, sites, spec)
    tracking_uri = default_tracking_uri()
    submission_id, mlflow_run_id = run_on_cluster(
        workdir, spec, sites, tracking_uri=tracking_uri, console=console, started=started
    )
    model_path = workdir / "runs" / submission_id / "final_model.pt"
    results = site_results(tracking_uri, mlflow_run_id) if mlflow_run_id else {}
    tensors = {
        s.name: torch_split(
            TabularConnector(NodeHome.open(s.home).dataset(DATASET)).load().select(spec.data.features or (), spec.data.scaling)
        )
        for s in sites
    }
    released = pooled_result(tracking_uri, mlflow_run_id) if mlflow_run_id else {}
    console.print(comparison_table(spec, plan, tensors, model_path, results, released=released))
    print_budgets(console, sites, DATASET)
    console.print(f"MLflow run {mlflow_run_id}: `mlflow ui --backend-store-uri {tracking_uri}`")
    console.print(f"done in {time.monotonic() - started:.0f} s; every process stopped.")
