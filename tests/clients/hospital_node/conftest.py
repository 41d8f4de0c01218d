"""Synthetic cohorts, DICOM exports and dataset registrations shared by the hospital node tests."""

from __future__ import annotations

import csv
import os
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, Message, RecordDict

from clients.hospital_node.governance import approve, set_budget
from clients.hospital_node.home import DatasetEntry, ImagingSource, NodeHome
from experiments.cost import plan_privacy
from experiments.spec import ExperimentSpec
from federation.experiment import instruction_for
from federation.protocol import ImagingInstruction, SignedSpec, TrainInstruction
from medfed.demo import EXAMPLE_SPEC
from privacy.governance import Submission, sign_submission
from imaging.synth import SynthCohort, write_cohort
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from tests.postgres import fresh_database, postgres_server  # noqa: F401 - fixtures: one server per session

# Planted in synthetic cells; must never appear in any message.
SENTINEL = "PHI-SENTINEL-123"

EntryFactory = Callable[..., DatasetEntry]


@pytest.fixture(scope="session")
def _cohort() -> pd.DataFrame:
    # A tier-2 site: a few hundred patients keeps the tests fast.
    return generate_cohort(2, n_hospitals=3, seed=7)


@pytest.fixture
def cohort(_cohort: pd.DataFrame) -> pd.DataFrame:
    """One hospital's cohort; each test gets its own copy to plant problems in."""
    return _cohort.copy()


@pytest.fixture(scope="session")
def _alliance_frame() -> pd.DataFrame:
    return pd.concat([generate_cohort(i, n_hospitals=3, seed=7) for i in (1, 2, 3)], ignore_index=True)


@pytest.fixture
def alliance_frame(_alliance_frame: pd.DataFrame) -> pd.DataFrame:
    """A 'real-like' extract: three hospitals' rows in one table with a site column."""
    return _alliance_frame.copy()


@pytest.fixture
def make_entry(tmp_path: Path) -> EntryFactory:
    """Build a registration of the synthetic cohort; keyword arguments override fields."""

    def make(**overrides: Any) -> DatasetEntry:
        fields: dict[str, Any] = {
            "name": "htn_cohort",
            "path": tmp_path / "cohort.csv",
            "id_column": ID_COLUMN,
            "label_column": LABEL,
            "feature_columns": FEATURES,
        }
        fields.update(overrides)
        return DatasetEntry(**fields)

    return make


# ---------------------------------------------------------------- imaging datasets


@dataclass(frozen=True)
class ImagingSite:
    """A node home beside a copy of a synthetic PACS export and its labels file."""

    home: NodeHome
    entry: DatasetEntry
    folder: Path
    labels: Path
    cohort: SynthCohort  # the original export: planted identifiers, labels by patient ID


#: What an imaging experiment asks of a node in these tests: a lesion window, 16 x 16 MIPs.
IMAGING_REQUEST = ImagingInstruction(
    modalities=("CT",), size=16, intensity="window", window_center=240.0, window_width=400.0, projection="mip"
)


@pytest.fixture(scope="session")
def _dicom_export(tmp_path_factory: pytest.TempPathFactory) -> SynthCohort:
    # 14 patients of 2 slices: above the connector's minimum of 10 labelled patients.
    return write_cohort(
        tmp_path_factory.mktemp("dicom") / "export",
        hospital="north",
        modality="CT",
        n_patients=14,
        size=16,
        slices=2,
        seed=3,
        burned_in_fraction=0.0,
    )


def write_node_secret(home: Path, secret: bytes) -> None:
    """Give a node home a known de-identification secret: the same pseudonyms, hence the
    same train/validation split, on every run."""
    keys = home / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    fd = os.open(keys / "deid.secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)


def write_imaging_labels(path: Path, labels: dict[str, int]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label"])
        writer.writerows(sorted(labels.items()))
    return path


@pytest.fixture
def imaging_site(_dicom_export: SynthCohort, tmp_path: Path) -> ImagingSite:
    """An unregistered imaging dataset: each test gets its own export to change."""
    folder = tmp_path / "pacs"
    shutil.copytree(_dicom_export.root, folder)
    labels = write_imaging_labels(tmp_path / "labels.csv", _dicom_export.labels)
    home = NodeHome.create(tmp_path / "home", name="hospital_7")
    write_node_secret(home.path, b"\x07" * 32)
    entry = DatasetEntry(
        name="chest_ct",
        path=folder,
        kind="imaging",
        imaging=ImagingSource(labels=labels, modalities=("CT",), deid={"options": ["clean_descriptors"]}),
    )
    return ImagingSite(home=home, entry=entry, folder=folder, labels=labels, cohort=_dicom_export)


# ---------------------------------------------------------------- governance

# The research partner of these tests; every governed test home trusts this key.
PARTNER_KEY = Ed25519PrivateKey.generate()
PARTNER = "test_partner"
OFFICER = "test-officer"


def example_spec(path: Path | None = None, **sections: dict[str, Any]) -> ExperimentSpec:
    """The example spec (tabular unless `path` says otherwise), with tables updated."""
    mapping = tomllib.loads((path or EXAMPLE_SPEC).read_text())
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    return ExperimentSpec.from_mapping(mapping, source="test")


_SUBMISSIONS: dict[tuple[str, bytes], SignedSpec] = {}


def sign(spec: ExperimentSpec, key: Ed25519PrivateKey = PARTNER_KEY, *, fresh: bool = False) -> SignedSpec:
    """A signed submission of `spec`: the same one for every message of a test's run, unless `fresh`."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cache_key = (spec.digest(), key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    if fresh or cache_key not in _SUBMISSIONS:
        submission = Submission.new(spec.canonical_json())
        signature = sign_submission(submission, key)
        _SUBMISSIONS[cache_key] = SignedSpec(spec.canonical_json(), signature.signature, signature.signer, submission.to_json())
    return _SUBMISSIONS[cache_key]


def govern(
    home: NodeHome, dataset: str, *, approve_spec: ExperimentSpec | None = None, budget: float = 50.0, min_cohort_size: int | None = None
) -> None:
    """Trust the test partner, give `dataset` a budget, optionally approve a spec: the officer's part."""
    if PARTNER not in {p.name for p in home.trusted_partners().list()}:
        home.trusted_partners().add(PARTNER, PARTNER_KEY.public_key(), added_by=OFFICER)
    set_budget(home, dataset, epsilon_=budget, delta=1e-5, by=OFFICER)
    if min_cohort_size is not None:
        home.policy_path.write_text(replace(home.policy(), min_cohort_size=min_cohort_size).render())
    if approve_spec is not None:
        approve(home, approve_spec.digest(), dataset=dataset, by=OFFICER, not_yet_requested=True)


def governed_home(folder: Path, name: str) -> NodeHome:
    """A node home beside a synthetic cohort file, registered as `htn_cohort`, trusting the test
    partner, with a budget and no approval."""
    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(cohort, index=False)
    home = NodeHome.create(folder / "home", name=name)
    home.register_dataset(
        DatasetEntry(name="htn_cohort", path=cohort, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    govern(home, "htn_cohort")
    return home


def signed_message(
    kind: str,
    spec: ExperimentSpec,
    *,
    instruction: TrainInstruction | None = None,
    signed: SignedSpec | None = None,
    server_round: int = 1,
    arrays: ArrayRecord | None = None,
) -> Message:
    """A coordinator's message for `spec`: its instruction (or `instruction`) with the signed spec."""
    instruction = instruction or instruction_for(spec, plan_privacy(spec))
    config = (signed or sign(spec)).add_to(instruction.to_config(server_round))
    content = RecordDict({"config": config})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, dst_node_id=5, message_type=kind)
