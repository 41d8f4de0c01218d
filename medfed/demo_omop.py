"""The care-service alliance: generated OMOP hospitals, each with a governed node home.

:func:`prepare_omop_alliance` writes the synthetic alliance v2
(:func:`medfed.synth_omop.write_omop_alliance`) and gives each hospital a node home with
its OMOP folder registered as the dataset :data:`OMOP_DATASET` (validated on
registration), the demo partner trusted, and a lifetime budget on the source, which every
cohort built from it draws on. Approving a spec is left to the caller, as to a real
officer (:func:`medfed.demo.approve_everywhere`).

:data:`TASK_SPECS` names the example spec of each care service's task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clients.hospital_node.data.sources import OmopSource
from clients.hospital_node.home import DatasetEntry, NodeHome
from medfed.demo import EXAMPLE_SPEC, Site, govern_site, partner_key_path
from medfed.synth_omop import OmopSite, write_omop_alliance

__all__ = ["OMOP_DATASET", "TASK_SPECS", "OmopAllianceSite", "prepare_omop_alliance"]

#: The name each node registers its OMOP source under, as the example specs name it.
OMOP_DATASET = "omop"

_EXAMPLES = EXAMPLE_SPEC.parent
#: The example spec of each task in models.clinical_tasks.TASKS.
TASK_SPECS: Mapping[str, Path] = {
    "hypertension_onset": _EXAMPLES / "omop_hypertension.toml",
    "diabetes_onset": _EXAMPLES / "omop_diabetes.toml",
    "maternal_gdm_preeclampsia": _EXAMPLES / "omop_maternal.toml",
    "infant_lbw_preterm": _EXAMPLES / "omop_infant.toml",
}


@dataclass(frozen=True)
class OmopAllianceSite(Site):
    """A generated hospital: its node home and what the generator wrote for it (tables, truth)."""

    generated: OmopSite


def prepare_omop_alliance(
    workdir: Path,
    *,
    n_hospitals: int,
    seed: int,
    patients_scale: float = 1.0,
    budget_epsilon: float | None = None,
    min_cohort_size: int | None = None,
) -> list[OmopAllianceSite]:
    """Generate the hospitals' OMOP tables and a governed node home for each.

    ``budget_epsilon`` replaces the demo budget (:data:`medfed.demo.BUDGET_EPSILON`) on
    the source; ``min_cohort_size`` the node policy's floor.
    """
    from clients.hospital_node.governance import set_budget
    from medfed.demo import BUDGET_DELTA, OFFICER

    generated = write_omop_alliance(workdir / "data", n_hospitals=n_hospitals, seed=seed, patients_scale=patients_scale)
    partner_public_key = partner_key_path(workdir).with_suffix(".pub")
    sites = []
    for hospital in generated:
        path = workdir / "homes" / hospital.site
        home = NodeHome.open(path) if (path / "node.toml").exists() else NodeHome.create(path, name=hospital.site)
        entry = DatasetEntry(
            name=OMOP_DATASET,
            path=path / "omop-scratch" / OMOP_DATASET,
            kind="omop",
            omop=OmopSource("folder", str(hospital.folder.resolve())),
        )
        home.register_dataset(entry, replace=True)
        govern_site(home, OMOP_DATASET, partner_public_key=partner_public_key, min_cohort_size=min_cohort_size)
        if budget_epsilon is not None:
            set_budget(home, OMOP_DATASET, epsilon_=budget_epsilon, delta=BUDGET_DELTA, by=OFFICER)
        sites.append(OmopAllianceSite(hospital.site, path, hospital))
    return sites
