"""Clinical report per task: local-only vs federated vs pooled vs federated with DP, on a generated alliance.

For each task of :data:`models.clinical_tasks.TASKS` (or those named by ``--task``) this
generates a synthetic OMOP alliance (:func:`medfed.synth_omop.write_omop_alliance`),
builds every site's cohort from its OMOP folder as a node does (``open_snapshot`` then
``build_cohort``), turns it into arrays with the task's example spec
(``experiments/examples/omop_*.toml``: its features, scaling and schedule) and the node's
default split (``cohort_arrays``: validation fraction 0.2, split seed 0), and compares,
on the same per-site validation patients:

- **local-only**: each site trains its own logistic model (``train_plain``, non-DP) on
  its own training rows, for the federated run's total number of steps;
- **pooled**: one model on every site's training rows (non-DP), the same steps;
- **federated**: FedAvg over the sites (non-DP; the spec's rounds, local epochs and
  learning rate), each round's site models averaged by training size;
- **federated with DP** at two target epsilons: the real federated path
  (``federation.experiment.run_experiment`` over ``InProcessGrid``, each site's own node
  handler and governed node home with the OMOP folder registered), when this checkout's
  node home can register an OMOP source; otherwise (or with ``--dp-path in-process``)
  FedAvg over ``train_dp`` at each site with the noise that
  ``privacy.accountant.noise_for_target`` gives for the target, which the report then
  says. Either way the ε each site was charged is reported;
- **oracle**: the generator's own outcome probability (``<truth>/<task>.parquet``), the
  best any model of these covariates could hope for.

All of this is benchmark mathematics on generated data, where every site's rows are at
hand: the local-only, pooled and non-DP rows and the exact metrics below are never
requested from a real node (what leaves a node is accounted; see DESIGN.md). Per row:
AUC over the pooled validation patients with DeLong's 95 % interval, calibration
intercept (slope fixed at 1) and slope, sensitivity, specificity, PPV and NPV at a
threshold equal to the outcome's prevalence in the pooled training rows (stated in the
report), and each site's AUC. A site is *small* when the generator gave it fewer than
``--small-site`` patients (300); the AUC at the small sites is over pairs of a patient
with and one without the outcome from the same small site (their validation patients,
each site's pairs scored by the model that site would use), so that scores of different
local models never meet in one ranking.

Written per task to ``<out>/<task>/``: ``report.md`` (the table), ``report.csv``,
``reliability.png`` (each row's reliability curve, deciles of predicted risk) and
``per_site.png`` (AUC per site by row, small sites marked); and logged to MLflow (a
SQLite store ``<out>/mlflow.db``, experiment ``clinical-report``, one run per task).

The check: federated (non-DP) beats local-only at the small sites. A small site's split
holds a handful of outcomes, so the check compares the mean of that AUC over
``--repeats`` node split seeds (5; each a fresh split and fresh training of both rows).
The script prints it per task and exits 1 when it fails for any task (or a task has no
small site), so it can be asserted.

The DP runs' node homes lower the policy's ``min_cohort_size`` to ``--min-cohort-size``
(20; the node default is 100, which would leave the small sites' pregnancy cohorts out
of the DP rows only); the report says so. Run from the repository root::

    .venv/bin/python benchmarks/clinical_report.py --out /tmp/clinical-report [--task diabetes_onset]
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.clinical_metrics import ClinicalSummary, auc_delong, clinical_summary, within_group_auc  # noqa: E402

logger = logging.getLogger("clinical_report")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "experiments" / "examples"
EXPERIMENT = "clinical-report"
SMALL_SITE = 300
# The node homes' policy floor in the DP runs. The node default (100 patients) would refuse
# every small site's pregnancy cohort (20-40 mothers), and the DP rows would then be trained
# on other sites than the non-DP rows; the benchmark's officers lower it, and the report says so.
MIN_COHORT_SIZE = 20
# The node's default split (clients.hospital_node.home): the DP runs' nodes are registered with it.
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0
ORACLE = "oracle (generator's true risk)"
LOCAL, POOLED, FEDERATED = "local-only", "pooled", "federated"


# ---------------------------------------------------------------- data


@dataclass
class SiteArrays:
    """One site's cohort as the node's split arrays, and the generator's true risk of its validation rows."""

    name: str
    tier: str
    n_patients: int  # the site's patients, as generated
    cohort: int  # rows of the task's cohort
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    true_risk_val: np.ndarray  # NaN where the generator's truth has no row for the patient

    def small(self, threshold: int) -> bool:
        return self.n_patients < threshold


def spec_for_task(task: str):  # type: ignore[no-untyped-def]
    """The example spec (``experiments/examples/omop_*.toml``) whose cohort is `task`."""
    from experiments.spec import ExperimentSpec

    for path in sorted(EXAMPLES.glob("omop_*.toml")):
        mapping = tomllib.loads(path.read_text())
        if "experiment" not in mapping:
            continue  # a statistics study over the same source (kind = "statistics"), not a model
        if mapping.get("data", {}).get("cohort", {}).get("task") == task:
            return ExperimentSpec.from_mapping(mapping, source=str(path))
    raise SystemExit(f"no example spec in {EXAMPLES} builds task {task!r}")


@dataclass
class SiteCohort:
    """One site's built cohort joined with the generator's true risk, before the split."""

    name: str
    tier: str
    n_patients: int
    table: object  # pyarrow.Table: the cohort and an ``oracle_risk`` column
    label: str
    covariates: tuple[str, ...]
    scaling: Mapping[str, tuple[float, float]]

    def arrays(self, split_seed: int = SPLIT_SEED) -> SiteArrays | None:
        """The node's split of this cohort (``cohort_arrays``) at `split_seed`; None when too small to split."""
        from clients.hospital_node.cohort_connector import cohort_arrays
        from clients.hospital_node.errors import ConnectorError

        try:
            data = cohort_arrays(
                self.table,  # type: ignore[arg-type]
                source=f"{self.name} cohort",
                label=self.label,
                # The true risk rides through the node's own split as one more column: scaled
                # by (-1, 1) it is risk + 1, and a patient the truth lacks takes the center, 0.
                covariates=(*self.covariates, "oracle_risk"),
                scaling={**self.scaling, "oracle_risk": (-1.0, 1.0)},
                validation_fraction=VALIDATION_FRACTION,
                split_seed=split_seed,
            )
        except ConnectorError as err:
            logger.warning("%s: %s; left out", self.name, err)
            return None
        risk = data.x_val[:, -1].astype(np.float64)
        return SiteArrays(
            name=self.name,
            tier=self.tier,
            n_patients=self.n_patients,
            cohort=self.table.num_rows,  # type: ignore[attr-defined]
            x_train=np.ascontiguousarray(data.x_train[:, :-1]),
            y_train=data.y_train,
            x_val=np.ascontiguousarray(data.x_val[:, :-1]),
            y_val=data.y_val,
            true_risk_val=np.where(risk > 0, risk - 1.0, np.nan),
        )


def load_site(site, spec, scratch: Path) -> SiteCohort:  # type: ignore[no-untyped-def]
    """Build `spec`'s cohort at `site` (an OmopSite) as a node does, and join the generator's true risk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clients.hospital_node.data.cohorts import build_cohort
    from clients.hospital_node.data.sources import OmopSource, open_snapshot
    from models.clinical_tasks import CohortDefinition

    definition = CohortDefinition.from_mapping({**spec.data.cohort, "covariates": list(spec.data.features)})
    with open_snapshot(OmopSource("folder", str(site.folder)), scratch=scratch) as snapshot:
        table = build_cohort(snapshot.connection, definition)
    truth = pq.read_table(Path(site.truth) / f"{definition.task}.parquet", columns=["person_id", "true_risk"])
    truth = truth.rename_columns(["person_id", "oracle_risk"])
    truth = truth.set_column(1, "oracle_risk", truth.column(1).cast(pa.float64()))
    joined = table.join(truth, "person_id", join_type="left outer")
    return SiteCohort(site.site, site.tier, site.n_patients, joined, definition.label, definition.covariates,
                      dict(spec.data.scaling))


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Schedule:
    """The example spec's schedule: every row trains with it (local-only and pooled: all rounds' steps at once)."""

    rounds: int
    steps_per_round: int
    sample_rate: float
    learning_rate: float
    max_grad_norm: float
    delta: float

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round


def schedule_of(spec) -> Schedule:  # type: ignore[no-untyped-def]
    from privacy.accountant import steps_per_epoch

    return Schedule(
        rounds=spec.federation.rounds,
        steps_per_round=spec.federation.local_epochs * steps_per_epoch(spec.privacy.sample_rate),
        sample_rate=spec.privacy.sample_rate,
        learning_rate=spec.federation.learning_rate,
        max_grad_norm=spec.privacy.max_grad_norm,
        delta=spec.privacy.delta,
    )


def _tensors(x: np.ndarray, y: np.ndarray):  # type: ignore[no-untyped-def]
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def initial_model(spec):  # type: ignore[no-untyped-def]
    """The federated run's initial model: seeded by the spec's digest, as the coordinator builds it."""
    from federation.experiment import build_model

    return build_model(spec)[0]


def train_plain_model(spec, schedule: Schedule, x: np.ndarray, y: np.ndarray, *, seed: int):  # type: ignore[no-untyped-def]
    import torch

    from models.training import train_plain

    model = initial_model(spec)
    xt, yt = _tensors(x, y)
    train_plain(model, xt, yt, sample_rate=schedule.sample_rate, steps=schedule.total_steps,
                learning_rate=schedule.learning_rate, generator=torch.Generator().manual_seed(seed))
    return model


LocalStep = Callable[[object, "SiteArrays", int], None]


def fedavg(spec, schedule: Schedule, sites: Sequence[SiteArrays], local_step: LocalStep):  # type: ignore[no-untyped-def]
    """FedAvg: each round every site trains a copy of the global model; the copies are averaged by training size."""
    model = initial_model(spec)
    weights = np.array([len(s.y_train) for s in sites], dtype=np.float64)
    weights /= weights.sum()
    for r in range(schedule.rounds):
        states = []
        for i, site in enumerate(sites):
            local = copy.deepcopy(model)
            local_step(local, site, 1000 * (r + 1) + i)
            states.append(local.state_dict())
        model.load_state_dict({k: sum(float(w) * s[k] for w, s in zip(weights, states, strict=True)) for k in states[0]})
    return model


def plain_step(schedule: Schedule) -> LocalStep:
    def step(model, site: SiteArrays, seed: int) -> None:  # type: ignore[no-untyped-def]
        import torch

        from models.training import train_plain

        x, y = _tensors(site.x_train, site.y_train)
        train_plain(model, x, y, sample_rate=schedule.sample_rate, steps=schedule.steps_per_round,
                    learning_rate=schedule.learning_rate, generator=torch.Generator().manual_seed(seed))

    return step


@dataclass
class DpResult:
    """A DP-trained federated model, the ε each site was charged, and how it was trained."""

    model: object
    charged: dict[str, float]
    noise_multiplier: float
    path: str


def dp_in_process(spec, schedule: Schedule, sites: Sequence[SiteArrays], target_epsilon: float) -> DpResult:  # type: ignore[no-untyped-def]
    """FedAvg over ``train_dp`` at each site, the noise for `target_epsilon` by the ledger's accountant.

    The stand-in for the node path: the same DP-SGD (Poisson sampling, clipping, noise), the
    same schedule; charged: the DP-SGD rounds alone, composed by PLD as a ledger composes
    them (no count or evaluation release is made here).
    """
    from models.training import train_dp
    from privacy.accountant import LEDGER_ACCOUNTANT, epsilon, noise_for_target
    from privacy.events import DPEvent

    sigma = noise_for_target(target_epsilon=target_epsilon, delta=schedule.delta, sample_rate=schedule.sample_rate,
                             steps=schedule.total_steps)
    charged = epsilon([DPEvent(sigma, schedule.sample_rate, schedule.total_steps)], delta=schedule.delta,
                      accountant=LEDGER_ACCOUNTANT)

    def step(model, site: SiteArrays, seed: int) -> None:  # type: ignore[no-untyped-def]
        import torch

        x, y = _tensors(site.x_train, site.y_train)
        torch.manual_seed(seed)  # Opacus draws the noise from torch's default generator
        train_dp(model, x, y, noise_multiplier=sigma, max_grad_norm=schedule.max_grad_norm,
                 sample_rate=schedule.sample_rate, steps=schedule.steps_per_round,
                 learning_rate=schedule.learning_rate, generator=torch.Generator().manual_seed(seed))

    model = fedavg(spec, schedule, sites, step)
    return DpResult(model, {s.name: charged for s in sites}, sigma,
                    "in-process FedAvg over models.training.train_dp (not the node path)")


def scores_of(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    import torch

    from models.training import predict

    return predict(model, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))


# ---------------------------------------------------------------- the report


@dataclass
class Row:
    """One comparison row: its scores per site (aligned with each site's validation rows) and what it was charged."""

    name: str
    scores: dict[str, np.ndarray]
    charged: dict[str, float] = field(default_factory=dict)
    note: str = ""
    summary: ClinicalSummary | None = None
    per_site: dict[str, float] = field(default_factory=dict)
    small_auc: float = math.nan


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_").lower()


def evaluate_rows(rows: list[Row], sites: Sequence[SiteArrays], *, threshold: float, small_site: int) -> None:
    """Fill each row's pooled summary, per-site AUC and small sites' AUC, on the rows that have scores."""
    small = [s for s in sites if s.small(small_site)]
    for row in rows:
        present = [s for s in sites if s.name in row.scores]
        scores = np.concatenate([row.scores[s.name] for s in present])
        labels = np.concatenate([s.y_val for s in present]).astype(np.int8)
        keep = np.isfinite(scores)
        row.summary = clinical_summary(scores[keep], labels[keep], threshold=threshold)
        for s in present:
            ok = np.isfinite(row.scores[s.name])
            row.per_site[s.name] = auc_delong(row.scores[s.name][ok], s.y_val[ok].astype(np.int8)).auc
        small_present = [s for s in small if s.name in row.scores]
        if small_present:
            groups = []
            for s in small_present:
                ok = np.isfinite(row.scores[s.name])
                groups.append((row.scores[s.name][ok], s.y_val[ok].astype(np.int8)))
            row.small_auc = within_group_auc(groups)


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _charged(row: Row) -> str:
    if not row.charged:
        return "—"
    values = sorted(row.charged.values())
    return f"{values[0]:.2f}" if values[-1] - values[0] < 0.005 else f"{values[0]:.2f}–{values[-1]:.2f}"


CSV_FIELDS = ("row", "epsilon_charged", "auc", "auc_low", "auc_high", "calibration_intercept", "calibration_slope",
              "threshold", "sensitivity", "specificity", "ppv", "npv", "small_sites_auc")


def write_outputs(out: Path, task: str, spec, rows: list[Row], sites: Sequence[SiteArrays], *, threshold: float,  # type: ignore[no-untyped-def]
                  small_site: int, notes: Sequence[str]) -> dict[str, Path]:
    """report.md, report.csv, reliability.png and per_site.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    site_cols = [s.name for s in sites]
    with (out / "report.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *(f"auc_{n}" for n in site_cols)])
        for row in rows:
            s = row.summary
            assert s is not None
            t = s.at_threshold
            writer.writerow([row.name, _charged(row), s.auc.auc, s.auc.low, s.auc.high, s.calibration.intercept,
                             s.calibration.slope, threshold, t.sensitivity, t.specificity, t.ppv, t.npv, row.small_auc,
                             *(row.per_site.get(n, math.nan) for n in site_cols)])
    n_val = sum(len(s.y_val) for s in sites)
    pos_val = int(sum(s.y_val.sum() for s in sites))
    lines = [
        f"# Clinical report: {task}",
        "",
        f"Spec `{spec.experiment.name}` (experiments/examples, cohort task {task}): {len(spec.data.features)} covariates, logistic model, "
        f"{spec.federation.rounds} rounds × {spec.federation.local_epochs} local epoch(s), learning rate "
        f"{spec.federation.learning_rate:g}, sampling rate {spec.privacy.sample_rate:g}, δ = {spec.privacy.delta:g}.",
        f"Validation: {n_val} patients ({pos_val} with the outcome) over {len(sites)} sites, each site's own split "
        f"(fraction {VALIDATION_FRACTION}, seed {SPLIT_SEED}, as the node splits).",
        f"Threshold for sensitivity/specificity/PPV/NPV: **{threshold:.4f}**, the outcome's prevalence in the pooled "
        "training rows (a score at or above it is a positive prediction).",
        "DP rows are named by the target ε of their DP-SGD rounds (δ as above); the ε charged is what each site's "
        "ledger was charged for the whole run (through the node path: the DP-SGD rounds, the once-per-run noisy "
        "training size and the final evaluation's noisy score histogram, composed by PLD).",
        f"Small sites (fewer than {small_site} patients): "
        + (", ".join(s.name for s in sites if s.small(small_site)) or "none") + ".",
        "",
        "| row | ε charged per site | AUC [95% CI] (DeLong) | calib. intercept | calib. slope | sens. | spec. | PPV | NPV "
        "| AUC at small sites (within-site pairs) | " + " | ".join(site_cols) + " |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(site_cols),
    ]
    for row in rows:
        s = row.summary
        assert s is not None
        t = s.at_threshold
        lines.append(
            f"| {row.name} | {_charged(row)} | {_fmt(s.auc.auc)} [{_fmt(s.auc.low)}, {_fmt(s.auc.high)}] "
            f"| {_fmt(s.calibration.intercept, 2)} | {_fmt(s.calibration.slope, 2)} | {_fmt(t.sensitivity, 2)} "
            f"| {_fmt(t.specificity, 2)} | {_fmt(t.ppv, 2)} | {_fmt(t.npv, 2)} | {_fmt(row.small_auc)} | "
            + " | ".join(_fmt(row.per_site.get(n, math.nan)) for n in site_cols) + " |"
        )
    lines += ["", "| site | tier | patients | cohort | train (outcome) | validation (outcome) |", "|---|---|---|---|---|---|"]
    for s in sites:
        lines.append(f"| {s.name}{' (small)' if s.small(small_site) else ''} | {s.tier} | {s.n_patients} | {s.cohort} "
                     f"| {len(s.y_train)} ({int(s.y_train.sum())}) | {len(s.y_val)} ({int(s.y_val.sum())}) |")
    lines += ["", *(f"- {n}" for n in notes), ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot_reliability(out / "reliability.png", task, rows)
    _plot_per_site(out / "per_site.png", task, rows, sites, small_site=small_site)
    return {name: out / name for name in ("report.md", "report.csv", "reliability.png", "per_site.png")}


def _plot_reliability(path: Path, task: str, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    top = 0.0
    for row in rows:
        assert row.summary is not None
        curve = row.summary.reliability
        xs, ys = [b.predicted for b in curve], [b.observed for b in curve]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=row.name,
                linestyle=":" if row.name == ORACLE else "-")
    top = min(1.0, top * 1.05 + 0.01)
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--", label="perfect calibration")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted risk (decile of predicted risk)",
           ylabel="observed outcome rate", title=f"{task}: reliability, pooled validation patients")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_per_site(path: Path, task: str, rows: list[Row], sites: Sequence[SiteArrays], *, small_site: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(sites) + 2), 5.4))
    width = 0.8 / max(1, len(rows))
    positions = np.arange(len(sites))
    for i, row in enumerate(rows):
        values = [row.per_site.get(s.name, math.nan) for s in sites]
        ax.bar(positions - 0.4 + width * (i + 0.5), values, width, label=row.name)
    labels = [f"{s.name}\n{s.n_patients} pts{' (small)' if s.small(small_site) else ''}" for s in sites]
    ax.set_xticks(positions, labels, fontsize=7)
    for tick, s in zip(ax.get_xticklabels(), sites, strict=True):
        if s.small(small_site):
            tick.set_color("firebrick")
            tick.set_fontweight("bold")
    for position, s in zip(positions, sites, strict=True):
        if all(not math.isfinite(row.per_site.get(s.name, math.nan)) for row in rows):
            ax.text(position, 0.32, "no AUC:\none class in\nvalidation", ha="center", va="bottom", fontsize=6, color="grey")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set(ylim=(0.3, 1.0), ylabel="validation AUC at the site", title=f"{task}: AUC per site (small sites in red)")
    ax.legend(fontsize=7, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(tracking_uri: str, task: str, spec, rows: list[Row], files: Mapping[str, Path], *,  # type: ignore[no-untyped-def]
                  threshold: float, params: Mapping[str, object], extra: Mapping[str, float] = {}) -> str:
    """One MLflow run per task in experiment ``clinical-report``: each row's metrics and the report's files."""
    from experiments.tracking import MlflowTracker

    tracker = MlflowTracker(tracking_uri)
    run_id = tracker.start(experiment=EXPERIMENT, run_name=task, params={**params, "spec": spec.experiment.name,
                                                                        "threshold": threshold},
                           tags={"medfed.task": task})
    metrics: dict[str, float] = {}
    for row in rows:
        s = row.summary
        assert s is not None
        key = _slug(row.name)
        metrics.update({
            f"{key}.auc": s.auc.auc, f"{key}.auc_low": s.auc.low, f"{key}.auc_high": s.auc.high,
            f"{key}.calibration_intercept": s.calibration.intercept, f"{key}.calibration_slope": s.calibration.slope,
            f"{key}.sensitivity": s.at_threshold.sensitivity, f"{key}.specificity": s.at_threshold.specificity,
            f"{key}.ppv": s.at_threshold.ppv, f"{key}.npv": s.at_threshold.npv, f"{key}.small_sites_auc": row.small_auc,
        })
        metrics.update({f"{key}.{site}.auc": v for site, v in row.per_site.items()})
        if row.charged:
            metrics[f"{key}.epsilon_max"] = max(row.charged.values())
    metrics.update(extra)
    try:
        tracker.log_metrics(metrics, step=0)
        for path in files.values():
            tracker.log_artifact(path)
    except BaseException:
        tracker.finish(failed=True, reason="logging the report failed")
        raise
    tracker.finish()
    return run_id


@dataclass
class TaskResult:
    task: str
    rows: list[Row]
    small_sites: list[str]
    repeated: list[tuple[int, float, float]]  # (split seed, federated, local-only) AUC at the small sites
    check: bool
    message: str
    mlflow_run_id: str
    files: dict[str, Path]


DpRunner = Callable[[object, Schedule, Sequence[SiteArrays], float], DpResult]


def _small_sites_auc(scores: Mapping[str, np.ndarray], sites: Sequence[SiteArrays], small_site: int) -> float:
    return within_group_auc([(scores[s.name], s.y_val.astype(np.int8)) for s in sites if s.small(small_site)])


def small_site_repeats(spec, schedule: Schedule, cohorts: Sequence[SiteCohort], *, seeds: Sequence[int],  # type: ignore[no-untyped-def]
                       small_site: int) -> list[tuple[int, float, float]]:
    """(split seed, federated, local-only) AUC at the small sites, each seed a fresh node split and fresh training.

    A small site holds a few dozen validation patients and a handful of outcomes, so one
    split decides little; each seed re-splits every site (as a node with that
    ``split_seed`` would) and retrains both rows.
    """
    out = []
    for seed in seeds:
        sites = [a for a in (c.arrays(seed) for c in cohorts) if a is not None]
        local = {s.name: scores_of(train_plain_model(spec, schedule, s.x_train, s.y_train, seed=10 + i), s.x_val)
                 for i, s in enumerate(sites)}
        federated = fedavg(spec, schedule, sites, plain_step(schedule))
        fed = {s.name: scores_of(federated, s.x_val) for s in sites}
        out.append((seed, _small_sites_auc(fed, sites, small_site), _small_sites_auc(local, sites, small_site)))
    return out


def report_task(task: str, spec, sites: Sequence[SiteArrays], out: Path, *, epsilons: Sequence[float],  # type: ignore[no-untyped-def]
                small_site: int, tracking_uri: str, dp_runner: DpRunner = dp_in_process,
                notes: Sequence[str] = (), params: Mapping[str, object] | None = None,
                cohorts: Sequence[SiteCohort] = (), repeats: int = 1) -> TaskResult:
    """Train every row on `sites`, evaluate on their validation rows, write and log the report of `task`."""
    schedule = schedule_of(spec)
    started = time.monotonic()
    rows: list[Row] = []
    local = {s.name: scores_of(train_plain_model(spec, schedule, s.x_train, s.y_train, seed=10 + i), s.x_val)
             for i, s in enumerate(sites)}
    rows.append(Row(LOCAL, local, note="each site's own model on its own validation patients"))
    x_all = np.concatenate([s.x_train for s in sites])
    y_all = np.concatenate([s.y_train for s in sites])
    pooled = train_plain_model(spec, schedule, x_all, y_all, seed=7)
    rows.append(Row(POOLED, {s.name: scores_of(pooled, s.x_val) for s in sites}))
    federated = fedavg(spec, schedule, sites, plain_step(schedule))
    rows.append(Row(FEDERATED, {s.name: scores_of(federated, s.x_val) for s in sites}))
    notes = list(notes)
    for eps in epsilons:
        result = dp_runner(spec, schedule, sites, eps)
        name = f"federated, DP ε≈{eps:g}"
        rows.append(Row(name, {s.name: scores_of(result.model, s.x_val) for s in sites}, charged=result.charged))
        notes.append(f"{name}: {result.path}; noise multiplier {result.noise_multiplier:.3f}; ε charged per site "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.charged.items())) + f" (δ = {schedule.delta:g})")
    missing = sum(int(np.isnan(s.true_risk_val).sum()) for s in sites)
    if missing < sum(len(s.true_risk_val) for s in sites):
        rows.append(Row(ORACLE, {s.name: s.true_risk_val for s in sites}))
    else:
        notes.append("oracle: no validation patient has a row in the generator's truth; no oracle row")
    if missing:
        notes.append(f"oracle: {missing} validation patients have no row in the generator's truth and are left out of its row")
    threshold = float(y_all.mean())
    evaluate_rows(rows, sites, threshold=threshold, small_site=small_site)
    by_name = {r.name: r for r in rows}
    small = [s.name for s in sites if s.small(small_site)]
    fed_small, local_small = by_name[FEDERATED].small_auc, by_name[LOCAL].small_auc
    repeated = [(SPLIT_SEED, fed_small, local_small)]
    if cohorts and repeats > 1:
        repeated += small_site_repeats(spec, schedule, cohorts, seeds=range(SPLIT_SEED + 1, SPLIT_SEED + repeats),
                                       small_site=small_site)
    if not small:
        check, message = False, f"{task}: no site has fewer than {small_site} patients; the check cannot be made"
    else:
        fed_mean = float(np.nanmean([f for _, f, _ in repeated]))
        local_mean = float(np.nanmean([lo for _, _, lo in repeated]))
        wins = sum(f > lo for _, f, lo in repeated)
        check = bool(fed_mean > local_mean)
        per_site = ", ".join(f"{n} {by_name[FEDERATED].per_site.get(n, math.nan):.3f} vs {by_name[LOCAL].per_site.get(n, math.nan):.3f}"
                             for n in small)
        message = (f"{task}: federated vs local-only AUC at the {len(small)} small sites (<{small_site} patients, "
                   f"within-site pairs), mean over {len(repeated)} split seed(s): {fed_mean:.3f} vs {local_mean:.3f} "
                   f"-> {'HOLDS' if check else 'FAILS'}; federated ahead in {wins} of {len(repeated)} "
                   f"(each seed: {', '.join(f'{f:.3f}/{lo:.3f}' for _, f, lo in repeated)}); "
                   f"split seed {SPLIT_SEED} per site: {per_site}")
    notes.append(f"check: {message}")
    notes.append(f"trained and evaluated in {time.monotonic() - started:.0f} s")
    files = write_outputs(out / task, task, spec, rows, sites, threshold=threshold, small_site=small_site, notes=notes)
    extra = {"check.holds": float(check)}
    if small:
        extra.update({"check.federated_small_sites_auc_mean": fed_mean, "check.local_small_sites_auc_mean": local_mean})
    run_id = log_to_mlflow(tracking_uri, task, spec, rows, files, threshold=threshold, params=dict(params or {}), extra=extra)
    return TaskResult(task, rows, small, repeated, check, message, run_id, files)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    from models.clinical_tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the alliance, reports and MLflow store")
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="a task (repeatable); default: all")
    parser.add_argument("--hospitals", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--scale", type=float, default=1.0, help="patients_scale of the generated alliance")
    parser.add_argument("--epsilons", type=float, nargs=2, default=(1.0, 4.0), help="the DP rows' target ε per site")
    parser.add_argument("--repeats", type=int, default=5,
                        help="split seeds over which the small-site check compares local-only and federated")
    parser.add_argument("--min-cohort-size", type=int, default=MIN_COHORT_SIZE,
                        help="the DP runs' node policy floor (node default 100)")
    parser.add_argument("--small-site", type=int, default=SMALL_SITE, help="a site with fewer patients is small")
    parser.add_argument("--dp-path", choices=("node", "in-process", "auto"), default="auto",
                        help="DP rows through the node path, in process, or the node path where this checkout has it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from medfed.synth_omop import write_omop_alliance

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    alliance = write_omop_alliance(out / "alliance", n_hospitals=args.hospitals, seed=args.seed, patients_scale=args.scale)
    print(f"alliance: {len(alliance)} hospitals ({', '.join(f'{s.site} {s.n_patients}' for s in alliance)}) "
          f"in {time.monotonic() - started:.0f} s")
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    all_hold = True
    for task in args.task or list(TASKS):
        spec = spec_for_task(task)
        t0 = time.monotonic()
        cohorts = [load_site(site, spec, out / "scratch") for site in alliance]
        loaded = [c.arrays() for c in cohorts]
        sites = [s for s in loaded if s is not None]
        notes = [f"left out (cohort too small to split): {c.name}" for c, a in zip(cohorts, loaded, strict=True) if a is None]
        runner, path_note = dp_runner_for(args.dp_path, out / "dp-runs" / task, alliance,
                                          min_cohort_size=args.min_cohort_size)
        if path_note:
            notes.append(path_note)
        print(f"{task}: cohorts built in {time.monotonic() - t0:.0f} s "
              f"({', '.join(f'{s.name} {s.cohort}' for s in sites)})")
        result = report_task(task, spec, sites, out, epsilons=args.epsilons, small_site=args.small_site,
                             cohorts=cohorts, repeats=args.repeats,
                             tracking_uri=tracking_uri, dp_runner=runner, notes=notes,
                             params={"hospitals": args.hospitals, "seed": args.seed, "scale": args.scale,
                                     "epsilons": list(args.epsilons), "small_site": args.small_site})
        print((out / task / "report.md").read_text())
        print(result.message)
        all_hold &= result.check
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_uri}  (experiment {EXPERIMENT!r}); "
          f"done in {time.monotonic() - started:.0f} s")
    return 0 if all_hold else 1


def dp_runner_for(choice: str, workdir: Path, alliance, *, min_cohort_size: int = MIN_COHORT_SIZE) -> tuple[DpRunner, str]:  # type: ignore[no-untyped-def]
    """The DP rows' runner: the node path where asked and available, else in process (and a note saying so)."""
    if choice == "in-process":
        return dp_in_process, "DP rows: in-process FedAvg over train_dp (asked with --dp-path in-process)"
    reason = node_path_unavailable()
    if reason is None:
        from functools import partial

        return partial(dp_node_path, workdir=workdir, alliance=alliance, min_cohort_size=min_cohort_size), (
            f"DP rows: each node's policy min_cohort_size is {min_cohort_size} (the node default is 100), so that the "
            "sites that train without DP train with it")
    if choice == "node":
        raise SystemExit(f"--dp-path node: {reason}")
    return dp_in_process, f"DP rows: in-process FedAvg over train_dp, not the node path ({reason})"


def node_path_unavailable() -> str | None:
    """Why this checkout cannot run the DP rows through the nodes, or None."""
    from clients.hospital_node import home

    if "omop" not in getattr(home, "DATASET_KINDS", ()):
        return "this checkout's node home cannot register a dataset of kind 'omop' yet"
    return None


def _node_handler(home: Path):  # type: ignore[no-untyped-def]
    """The node's installed ClientApp, dispatching one message as Flower does (tests/federation/test_experiment.py)."""
    from flwr.app import Context, Message, RecordDict

    from clients.hospital_node.client_app import app

    def handle(message: Message) -> Message:
        context = Context(run_id=message.metadata.run_id, node_id=message.metadata.dst_node_id,
                          node_config={"home": str(home)}, state=RecordDict(), run_config={})
        return app(message=message, context=context)

    return handle


def dp_spec(spec, target_epsilon: float):  # type: ignore[no-untyped-def]
    """`spec` with the noise derived from `target_epsilon` (per site, DP-SGD rounds) and in-process waits."""
    from experiments.spec import ExperimentSpec

    import json

    mapping = json.loads(spec.canonical_json())
    mapping["experiment"]["name"] = f"{mapping['experiment']['name']}-dp-eps{target_epsilon:g}"
    mapping["privacy"].pop("noise_multiplier", None)
    mapping["privacy"]["target_epsilon"] = float(target_epsilon)
    mapping["federation"].update({"node_wait_seconds": 0.1, "approval_wait_seconds": 0.1})
    return ExperimentSpec.from_mapping(mapping, source=f"{spec.experiment.name} (DP, target ε {target_epsilon:g})")


def dp_node_path(spec, schedule: Schedule, sites: Sequence[SiteArrays], target_epsilon: float, *,  # type: ignore[no-untyped-def]
                 workdir: Path, alliance, min_cohort_size: int = MIN_COHORT_SIZE) -> DpResult:
    """The DP row through the real federated path: each site a governed node home with its OMOP folder registered.

    ``run_experiment`` over an ``InProcessGrid`` hands every message to each site's own
    ClientApp (query, signed-spec and approval checks, budget reservation, cohort built
    from the snapshot, DP-SGD, ledger charge, noisy size and evaluation releases); the
    final model is read back from the run's ``final_model.pt``, and the ε charged is each
    node's own ledger's (everything the run released, at the budget's δ).
    """
    import shutil

    import torch

    from clients.hospital_node.data.sources import OmopSource
    from clients.hospital_node.governance import set_budget
    from clients.hospital_node.home import DatasetEntry, NodeHome
    from experiments.cost import plan_privacy
    from experiments.tracking import InMemoryTracker
    from federation.experiment import run_experiment
    from federation.inprocess_grid import InProcessGrid
    from medfed.demo import Site, approve_everywhere, govern_site, partner_key_path, remaining_budgets, signed_spec

    dspec = dp_spec(spec, target_epsilon)
    dataset = dspec.data.dataset
    base = workdir / f"eps-{target_epsilon:g}"
    shutil.rmtree(base, ignore_errors=True)
    public_key = partner_key_path(base).with_suffix(".pub")
    wanted = {s.name for s in sites}
    homes: list[Site] = []
    for site in alliance:
        if site.site not in wanted:
            continue
        path = base / "homes" / site.site
        home = NodeHome.create(path, name=site.site)
        home.register_dataset(DatasetEntry(name=dataset, path=path / "omop-scratch" / dataset, kind="omop",
                                           omop=OmopSource("folder", str(site.folder)),
                                           validation_fraction=VALIDATION_FRACTION, split_seed=SPLIT_SEED))
        govern_site(home, dataset, partner_public_key=public_key, min_cohort_size=min_cohort_size)
        set_budget(home, dataset, epsilon_=40.0, delta=dspec.privacy.delta, by="clinical-report")
        homes.append(Site(site.site, path))
    approve_everywhere(homes, dspec)
    grid = InProcessGrid({10 + i: _node_handler(h.home) for i, h in enumerate(homes)}, run_id=int(target_epsilon * 1000) + 7)
    tracker = InMemoryTracker()
    result = run_experiment(grid, dspec, signed=signed_spec(dspec, base), tracker=tracker, output_dir=base / "run")
    model = initial_model(dspec)
    model.load_state_dict(torch.load(base / "run" / "final_model.pt", weights_only=True))
    spent = remaining_budgets(homes, dataset)
    statuses = {o.site: (o.status, o.reason) for o in result.sites.values()}
    refused = sorted(name for name, (status, _) in statuses.items() if status != "accepted")
    plan = plan_privacy(dspec)
    path = ("federation.experiment.run_experiment over InProcessGrid, each site's node handler and home "
            f"(OMOP folder registered; ε planned per site {plan.epsilon_charged_per_site:.3f} incl. the count and "
            "evaluation releases)")
    if refused:
        path += f"; not accepted: {'; '.join(f'{n} ({statuses[n][0]}: {statuses[n][1]})' for n in refused)}"
    return DpResult(model, {name: spent_eps for name, (spent_eps, _budget) in spent.items()}, plan.noise_multiplier, path)


if __name__ == "__main__":
    sys.exit(main())
