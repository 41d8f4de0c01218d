"""``medfed demo --task imaging``: the chest-CT lesion experiment across synthetic hospitals.

Each hospital gets a synthetic PACS export (:func:`imaging.synth.write_cohort`): chest
CT series from its own scanner (GE slices, unsigned; Siemens with implicit VR and a
rescale slope of 0.5; Philips as one enhanced multi-frame instance, signed), full of
planted identifiers, some burned into the pixels. Its labels file, keyed by the
hospital's own patient IDs, disagrees with the images for a share of patients
(:data:`LABEL_NOISE`), as labels taken from reports do. Each node home registers the
folder as an imaging dataset, which de-identifies it into the node's cache (an audited
step); then, as in the tabular demo, a SuperLink and one SuperNode per hospital run the
example spec (``experiments/examples/imaging.toml``) for real, and a final table
compares the federated model with local-only and pooled models at the same epsilon.

The label noise also bounds what any model can score on the validation splits: a model
scoring above that ceiling would be seeing validation labels, not images.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from clients.hospital_node.home import DatasetEntry, ImagingSource, NodeHome
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from experiments.tracking import default_tracking_uri
from federation.experiment import instruction_for
from experiments.progress import pooled_result, site_results
from medfed.demo import (
    Site,
    comparison_table,
    demo_console,
    govern_site,
    partner_key_path,
    print_budgets,
    report_governance,
    run_on_cluster,
    torch_split,
)

__all__ = [
    "DATASET",
    "EXAMPLE_SPEC",
    "LABEL_NOISE",
    "TRUTH_FILE",
    "imaging_demo_spec",
    "pixel_baselines",
    "prepare_imaging_alliance",
    "run_imaging_demo",
    "site_tensors",
    "validation_truth",
    "write_labels",
]

logger = logging.getLogger(__name__)

DATASET = "chest_ct"
EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "experiments" / "examples" / "imaging.toml"
#: Beside each hospital's labels file: the labels its images show (the generator's).
TRUTH_FILE = "truth.csv"
#: Share of each hospital's labels that disagree with the image (report errors).
LABEL_NOISE = 0.1
#: What every hospital's registration keeps of its export, and how it de-identifies it:
#: Clean Descriptors keeps series descriptions (scrubbed of identifiers) for selection.
MODALITIES = ("CT",)
BODY_PARTS = ("CHEST",)
DEID = {"options": ["clean_descriptors"], "burned_in": {"mode": "exclude"}}
_PROFILES = ("north", "east", "south")


def write_labels(path: Path, labels: dict[str, int], *, label_noise: float, seed: int) -> int:
    """Write ``patient_id,label`` rows, flipping a `label_noise` share of them; returns how many."""
    rng = np.random.default_rng(seed)
    ids = sorted(labels)
    flipped = set(rng.permutation(len(ids))[: round(label_noise * len(ids))].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label"])
        for index, patient in enumerate(ids):
            writer.writerow([patient, 1 - labels[patient] if index in flipped else labels[patient]])
    return len(flipped)


def prepare_imaging_alliance(
    workdir: Path,
    *,
    n_hospitals: int,
    n_patients: int = 150,
    seed: int = 7,
    label_noise: float = LABEL_NOISE,
    burned_in_fraction: float = 0.1,
) -> list[Site]:
    """Write a synthetic export and labels per hospital and register them in node homes.

    Hospitals take the scanner profiles north, east and south in turn.
    """
    from imaging.synth import write_cohort

    partner_public_key = partner_key_path(workdir).with_suffix(".pub")
    sites = []
    for index in range(n_hospitals):
        name = f"hospital_{index + 1}"
        folder = workdir / "data" / name / "dicom"
        cohort = write_cohort(
            folder,
            hospital=_PROFILES[index % len(_PROFILES)],
            modality="CT",
            n_patients=n_patients,
            size=32,
            slices=4,
            seed=seed * 1000 + index,
            burned_in_fraction=burned_in_fraction,
        )
        labels = workdir / "data" / name / "labels.csv"
        write_labels(labels, cohort.labels, label_noise=label_noise, seed=seed * 1000 + index)
        # What the images show, for checks that know the generated data; never registered.
        write_labels(workdir / "data" / name / TRUTH_FILE, cohort.labels, label_noise=0.0, seed=0)
        path = workdir / "homes" / name
        home = NodeHome.open(path) if (path / "node.toml").exists() else NodeHome.create(path, name=name)
        entry = DatasetEntry(
            name=DATASET,
            path=folder.resolve(),
            kind="imaging",
            imaging=ImagingSource(labels=labels.resolve(), modalities=MODALITIES, body_parts=BODY_PARTS, deid=DEID),
        )
        home.register_dataset(entry, replace=True)
        # Imaging cohorts are small: the officer lowers the policy's cohort floor to fit them.
        govern_site(home, DATASET, partner_public_key=partner_public_key, min_cohort_size=min(n_patients // 2, 20))
        sites.append(Site(name, path))
    return sites


def imaging_demo_spec(rounds: int, n_hospitals: int) -> ExperimentSpec:
    """The example imaging spec with the demo's number of rounds."""
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["federation"]["rounds"] = rounds
    mapping["federation"]["min_nodes"] = min(mapping["federation"].get("min_nodes", 2), n_hospitals)
    return ExperimentSpec.from_mapping(mapping, source=str(EXAMPLE_SPEC))


def site_tensors(spec: ExperimentSpec, sites: list[Site]) -> dict[str, tuple]:  # type: ignore[type-arg]
    """Each site's (x_train, y_train, x_val, y_val), from its cache as its node loads them."""
    from clients.hospital_node.imaging_connector import ImagingConnector

    request = instruction_for(spec, plan_privacy(spec)).imaging
    assert request is not None  # an imaging spec's instruction carries it
    tensors = {}
    for site in sites:
        home = NodeHome.open(site.home)
        tensors[site.name] = torch_split(ImagingConnector(home, home.dataset(spec.data.dataset)).load(request))
    return tensors


def pixel_baselines(tensors: dict[str, tuple]) -> dict[str, Any]:  # type: ignore[type-arg]
    """The non-learned baseline row: a threshold on one global pixel statistic, no CNN.

    The statistic (image max, mean, standard deviation or 99th percentile, whichever ranks
    best) and its threshold are chosen on the pooled training images of every site, which
    only the demo, knowing the data it generated, can do; it is scored on the validation
    patients the CNN is scored on. Without DP: it shows what no spatial feature can do.
    """
    import torch

    from models.pixel_threshold import fit_pixel_threshold

    model = fit_pixel_threshold(torch.cat([t[0] for t in tensors.values()]), torch.cat([t[1] for t in tensors.values()]))
    return {f"threshold on image {_STATISTIC_NAMES[model.statistic]} (no CNN; fit on pooled training, no DP)": model}


_STATISTIC_NAMES = {"max": "maximum", "mean": "mean", "std": "std", "p99": "99th percentile"}


def validation_truth(spec: ExperimentSpec, sites: list[Site]) -> dict[str, Any]:
    """Each site's validation labels as its images show them, in :func:`site_tensors`' order.

    The node's connector, loading the same cached images with the generator's own labels
    (:data:`TRUTH_FILE`) instead of the hospital's noisy ones: where the two disagree, a
    model reading the images is bound to be wrong.
    """
    import dataclasses

    import torch

    from clients.hospital_node.imaging_connector import ImagingConnector

    request = instruction_for(spec, plan_privacy(spec)).imaging
    assert request is not None
    truth = {}
    for site in sites:
        home = NodeHome.open(site.home)
        entry = home.dataset(spec.data.dataset)
        assert entry.imaging is not None
        source = dataclasses.replace(entry.imaging, labels=entry.imaging.labels.with_name(TRUTH_FILE))
        data = ImagingConnector(home, dataclasses.replace(entry, imaging=source)).load(request)
        truth[site.name] = torch.from_numpy(data.y_val)
    return truth


def run_imaging_demo(
    workdir: Path,
    *,
    n_hospitals: int = 3,
    rounds: int = 5,
    seed: int = 7,
    n_patients: int = 150,
    console: Console | None = None,
) -> None:
    """Run the whole imaging demo; raises DemoError (or a package's error) with a clear message."""
    console = console or demo_console()
    workdir = workdir.resolve()
    spec = imaging_demo_spec(rounds, n_hospitals)
    plan = plan_privacy(spec)
    started = time.monotonic()
    console.print(
        f"[bold]medfed demo --task imaging[/]: {n_hospitals} synthetic hospitals x {n_patients} CT patients, "
        f"{rounds} rounds, spec {spec.experiment.name} ({spec.digest()[:12]})"
    )
    shutil.rmtree(workdir / "homes", ignore_errors=True)  # a fresh alliance every time, as in the tabular demo
    sites = prepare_imaging_alliance(workdir, n_hospitals=n_hospitals, n_patients=n_patients, seed=seed)
    console.print(
        f"  each hospital's export de-identified into its node home ({time.monotonic() - started:.0f} s); "
        f"{LABEL_NOISE:.0%} of its labels disagree with the image"
    )
    console.print(f"  cost: each site's dataset is charged ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g} "
                  f"(PLD; planning estimate {plan.epsilon_per_site:.3f} by {plan.accountant.upper()}; "
                  f"σ = {plan.noise_multiplier:.3f}, q = {plan.sample_rate:g}, {plan.total_steps} steps)")
    report_governance(console, sites, spec)
    tracking_uri = default_tracking_uri()
    submission_id, mlflow_run_id = run_on_cluster(
        workdir, spec, sites, tracking_uri=tracking_uri, console=console, started=started, show_accuracy=True
    )
    model_path = workdir / "runs" / submission_id / "final_model.pt"
    results = site_results(tracking_uri, mlflow_run_id) if mlflow_run_id else {}
    tensors = site_tensors(spec, sites)
    released = pooled_result(tracking_uri, mlflow_run_id) if mlflow_run_id else {}
    table = comparison_table(
        spec, plan, tensors, model_path, results, metrics=("accuracy", "auc"), released=released,
        baselines=pixel_baselines(tensors),
    )
    console.print(table)
    print_budgets(console, sites, DATASET)
    console.print(f"MLflow run {mlflow_run_id}: `mlflow ui --backend-store-uri {tracking_uri}`")
    console.print(f"done in {time.monotonic() - started:.0f} s; every process stopped.")
