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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from clients.hospital_node.connectors import TabularConnector, TabularData
from clients.hospital_node.governance import approve, governance_state, set_budget
from clients.hospital_node.home import DatasetEntry, NodeHome
from experiments.cost import PrivacyPlan, plan_privacy
from experiments.spec import ExperimentSpec
from experiments.submit import run_status, submit
from experiments.tracking import default_tracking_uri
from medfed.cluster import LocalCluster, flower_env
from federation.protocol import SignedSpec
from medfed.errors import DemoError
from medfed.synth import FEATURES, ID_COLUMN, LABEL, SITE_COLUMN, write_alliance
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.governance import sign_spec
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
    "ledger_spent",
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


def approve_everywhere(sites: list[Site], spec: ExperimentSpec) -> None:
    """Each site's officer approves exactly this spec (its digest) on the spec's dataset."""
    for site in sites:
        approve(NodeHome.open(site.home), spec.digest(), dataset=spec.data.dataset, by=OFFICER)


def signed_spec(spec: ExperimentSpec, workdir: Path) -> SignedSpec:
    """`spec` signed by the demo partner, as `medfed experiment submit --key` signs it."""
    signature = sign_spec(spec.canonical_json(), load_private_key(partner_key_path(workdir)))
    return SignedSpec(spec.canonical_json(), signature.signature, signature.signer)


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
            feature_columns=tuple(FEATURES),
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


class _Progress:
    """Reads a run's per-round metrics from MLflow while it runs."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow configures its loggers on import; its database set-up chatter is not progress.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self._client = MlflowClient(tracking_uri)
        self._client.search_experiments()  # creates the schema of a new store now
        self._flwr_run_id: int | None = None
        self._run_id: str | None = None
        self.shown = 0

    def follow(self, flwr_run_id: int) -> None:
        self._flwr_run_id = flwr_run_id
        self._run_id = None
        self.shown = 0

    def _find_run(self) -> str | None:
        if self._run_id is None and self._flwr_run_id is not None:
            experiments = self._client.search_experiments()
            runs = self._client.search_runs(
                [e.experiment_id for e in experiments],
                filter_string=f"tags.`flwr.run_id` = '{self._flwr_run_id}'",
                max_results=1,
            ) if experiments else []
            self._run_id = runs[0].info.run_id if runs else None
        return self._run_id

    @property
    def mlflow_run_id(self) -> str | None:
        return self._find_run()

    def new_rounds(self) -> list[tuple[int, dict[str, float]]]:
        run_id = self._find_run()
        if run_id is None:
            return []
        losses = {m.step: m.value for m in self._client.get_metric_history(run_id, "train_loss")}
        out = []
        for step in sorted(s for s in losses if s > self.shown):
            metrics = {"train_loss": losses[step]}
            for key in ("eval_auc", "eval_accuracy", "epsilon"):
                history = {m.step: m.value for m in self._client.get_metric_history(run_id, key)}
                wanted = step - 1 if key.startswith("eval") else step
                if wanted in history:
                    metrics[key] = history[wanted]
            out.append((step, metrics))
            self.shown = step
        return out


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
    spent: dict[str, float],
    *,
    metrics: tuple[str, ...] = ("auc",),
) -> Table:
    """Federated vs local-only vs pooled models on each site's validation split.

    `tensors` holds each site's ``(x_train, y_train, x_val, y_val)``. The local-only and
    pooled models are trained here with the federated run's DP-SGD parameters and step
    count, so every model costs each patient the same epsilon.
    """
    import torch

    from federation.experiment import build_model
    from models.training import evaluate

    x_val_all = torch.cat([t[2] for t in tensors.values()])
    y_val_all = torch.cat([t[3] for t in tensors.values()])

    federated, _ = build_model(spec)
    federated.load_state_dict(torch.load(model_path, weights_only=True))
    models = {"federated (all sites)": federated}
    for i, (name, (x, y, _, _)) in enumerate(tensors.items()):
        models[f"local-only {name}"] = _train_baseline(spec, plan, x, y, seed=100 + i)
    x_all = torch.cat([t[0] for t in tensors.values()])
    y_all = torch.cat([t[1] for t in tensors.values()])
    models["pooled (centralised)"] = _train_baseline(spec, plan, x_all, y_all, seed=99)

    shown = " / ".join(_METRIC_NAMES[m] for m in metrics)
    table = Table(title=f"Validation {shown} at ε ≈ {plan.epsilon_charged_per_site:.2f} per patient (δ = {plan.delta:g})")
    table.add_column("model")
    for name in tensors:
        table.add_column(f"{name} {shown}", justify="right")
    table.add_column(f"all sites {shown}", justify="right")

    def cell(model, x, y) -> str:  # type: ignore[no-untyped-def]
        result = evaluate(model, x, y)
        return " / ".join(f"{getattr(result, m):.3f}" for m in metrics)

    for label, model in models.items():
        cells = [cell(model, t[2], t[3]) for t in tensors.values()]
        cells.append(cell(model, x_val_all, y_val_all))
        table.add_row(label, *cells)
    table.add_section()
    table.add_row("ε spent on the dataset (ledger)", *[f"{spent.get(n, math.nan):.2f}" for n in tensors], "")
    return table


def ledger_spent(sites: list[Site], dataset: str, plan: PrivacyPlan) -> dict[str, float]:
    """Each site's composed epsilon on `dataset`, read from its own ledger as the node reports it (at its budget's delta)."""
    spent = {}
    for site in sites:
        home = NodeHome.open(site.home)
        setting = governance_state(home).budgets.get(dataset)
        with PrivacyLedger.open(home.ledger_path) as ledger:
            spent[site.name] = ledger.spent(dataset, delta=plan.delta if setting is None else setting.delta)
    return spent


def run_on_cluster(
    workdir: Path,
    spec: ExperimentSpec,
    sites: list[Site],
    *,
    tracking_uri: str,
    console: Console,
    started: float,
    show_accuracy: bool = False,
) -> tuple[int, str | None]:
    """Start a SuperLink and a SuperNode per site, submit `spec`, print its rounds as they end.

    Returns the Flower run id and the MLflow run id; every process is stopped on the way
    out. Raises DemoError if the run does not succeed.
    """
    rounds = spec.federation.rounds
    with LocalCluster(workdir / "cluster") as cluster:
        cluster.start_superlink()
        for site in sites:
            cluster.start_supernode(site.name, site.home)
        cluster.wait_for_nodes(len(sites))
        console.print(f"  SuperLink on {cluster.fleet_address} (gRPC Fleet, {'insecure' if cluster.insecure else 'TLS + node authentication'}) and {cluster.control_address} (control); "
                      f"{len(sites)} SuperNodes online after {time.monotonic() - started:.0f} s")
        env = flower_env(cluster.flwr_home)
        # Open the store before the ServerApp does: two processes creating a fresh
        # MLflow SQLite schema at once race in its migrations.
        progress = _Progress(tracking_uri)
        signing_key = load_private_key(partner_key_path(workdir))
        run_id = submit(
            spec, connection=cluster.connection, tracking_uri=tracking_uri, output_dir=workdir / "runs",
            signing_key=signing_key, env=env,
        )
        console.print(f"  submitted as Flower run {run_id}; tracking in {tracking_uri}")
        progress.follow(run_id)
        while True:
            status = run_status(run_id, connection=cluster.connection, env=env)
            for step, metrics in progress.new_rounds():
                auc = metrics.get("eval_auc", math.nan)
                accuracy = f"accuracy {metrics.get('eval_accuracy', math.nan):.3f}, " if show_accuracy else ""
                console.print(f"  round {step}/{rounds}: train loss {metrics['train_loss']:.3f}, "
                              f"{accuracy}AUC of the model it started from {auc:.3f}, ε max {metrics.get('epsilon', math.nan):.3f}")
            if status.finished:
                break
            time.sleep(1.0)
        if not status.succeeded:
            raise DemoError(f"the experiment run {run_id} ended {status.status}: {status.details or 'see ' + str(cluster.workdir / 'logs')}")
    return run_id, progress.mlflow_run_id


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
    run_id, mlflow_run_id = run_on_cluster(
        workdir, spec, sites, tracking_uri=tracking_uri, console=console, started=started
    )
    model_path = workdir / "runs" / str(run_id) / "final_model.pt"
    spent = ledger_spent(sites, DATASET, plan)
    tensors = {
        s.name: torch_split(
            TabularConnector(NodeHome.open(s.home).dataset(DATASET)).load().select(spec.data.features or (), spec.data.scaling)
        )
        for s in sites
    }
    console.print(comparison_table(spec, plan, tensors, model_path, spent))
    print_budgets(console, sites, DATASET)
    console.print(f"MLflow run {mlflow_run_id}: `mlflow ui --backend-store-uri {tracking_uri}`")
    console.print(f"done in {time.monotonic() - started:.0f} s; every process stopped.")
