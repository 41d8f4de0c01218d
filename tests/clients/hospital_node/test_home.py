"""The node home: node.toml, the dataset registry, and registration that never half-writes."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.hospital_node.errors import (
    ConnectorError,
    DatasetNotFoundError,
    NodeError,
    NodeHomeError,
)
from clients.hospital_node.home import DatasetEntry, NodeHome, toml_string
from medfed.synth import FEATURES, ID_COLUMN, LABEL, SITE_COLUMN

from .conftest import SENTINEL, EntryFactory

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    return NodeHome.create(tmp_path / "node", name="hospital_2")


def write_config(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "node"
    folder.mkdir(exist_ok=True)
    (folder / "node.toml").write_text(text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------- create / open


def test_create_writes_node_toml_and_open_reads_it(tmp_path: Path) -> None:
    created = NodeHome.create(tmp_path / "a" / "node", name="hospital_1")
    assert created.path == (tmp_path / "a" / "node").resolve()
    assert created.config_path == created.path / "node.toml"
    assert created.ledger_path == created.path / "ledger.sqlite"
    assert tomllib.loads(created.config_path.read_text()) == {"node": {"name": "hospital_1"}}
    opened = NodeHome.open(tmp_path / "a" / "node")
    assert opened.name == "hospital_1"
    assert opened.datasets() == {}


def test_create_refuses_an_existing_node_home(home: NodeHome) -> None:
    before = home.config_path.read_bytes()
    with pytest.raises(NodeHomeError, match="node.toml already exists; this folder is a node home already"):
        NodeHome.create(home.path, name="other")
    assert home.config_path.read_bytes() == before


def test_create_refuses_an_invalid_name(tmp_path: Path) -> None:
    with pytest.raises(NodeHomeError, match=r"node name 'bad name\]' is invalid; use 1-64 letters"):
        NodeHome.create(tmp_path / "node", name="bad name]")
    assert not (tmp_path / "node").exists()


def test_open_a_missing_folder_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(NodeHomeError, match="does not exist; create it with `medfed node init --home"):
        NodeHome.open(tmp_path / "nowhere")


def test_open_a_folder_without_node_toml(tmp_path: Path) -> None:
    with pytest.raises(NodeHomeError, match="has no node.toml; create it with `medfed node init"):
        NodeHome.open(tmp_path)


def test_open_invalid_toml_names_the_file(tmp_path: Path) -> None:
    folder = write_config(tmp_path, "[node\nname = 1\n")
    with pytest.raises(NodeHomeError, match=r"node\.toml is not valid TOML: .*line 1"):
        NodeHome.open(folder)


def test_open_reports_every_problem_by_field_with_hints(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path,
        """
        [node]
        name = "hospital_1"
        nmae = "typo"

        [datasets.htn]
        path = "cohort.csv"
        labl_column = "htn_onset_1y"
        feature_columns = ["age", "age"]
        validation_fraction = 1.5

        [datasets.other]
        path = "other.csv"
        id_column = "patient_id"
        label_column = "y"
        feature_columns = "age"
        split_seed = true

        [dataset]
        """,
    )
    with pytest.raises(NodeHomeError) as caught:
        NodeHome.open(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder.resolve() / 'node.toml'} is invalid:\n")
    for line in (
        "dataset is not a known field; did you mean 'datasets'?",
        "node.nmae is not a known field; did you mean 'name'?",
        "datasets.htn.labl_column is not a known field; did you mean 'label_column'?",
        "datasets.htn.id_column is missing",
        "datasets.htn.label_column is missing",
        "datasets.htn.feature_columns lists 'age' more than once",
        "datasets.htn.validation_fraction must be in [0, 1); found 1.5",
        "datasets.other.feature_columns must be a list of column names",
        "datasets.other.split_seed must be an integer; found bool",
    ):
        assert f"  - {line}" in message.splitlines()
    assert "datasets.htn.id_column must" not in message


def test_open_requires_a_node_name(tmp_path: Path) -> None:
    folder = write_config(tmp_path, "[node]\n")
    with pytest.raises(NodeHomeError, match="node.name is missing"):
        NodeHome.open(folder)


def test_open_resolves_relative_dataset_paths_against_the_home(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path,
        '[node]\nname = "h"\n[datasets.d]\npath = "data/c.csv"\nid_column = "i"\n'
        'label_column = "y"\nfeature_columns = ["a"]\n',
    )
    entry = NodeHome.open(folder).dataset("d")
    assert entry.path == folder.resolve() / "data" / "c.csv"
    assert (entry.validation_fraction, entry.split_seed, entry.site_column) == (0.2, 0, None)


def test_importing_the_node_home_pulls_in_neither_pandas_nor_torch() -> None:
    code = (
        "import sys, clients.hospital_node, clients.hospital_node.home, clients.hospital_node.errors; "
        "print(sorted({'pandas', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- lookup


def test_unknown_dataset_names_the_registered_ones(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory
) -> None:
    cohort.to_csv(home.path / "cohort.csv", index=False)
    home.register_dataset(make_entry(name="b_set", path=home.path / "cohort.csv"))
    home.register_dataset(make_entry(name="a_set", path=home.path / "cohort.csv"))
    with pytest.raises(DatasetNotFoundError) as caught:
        home.dataset("htn")
    assert str(caught.value) == (
        "dataset 'htn' is not registered on node 'hospital_2'; registered: a_set, b_set. "
        "Register it with `medfed node dataset add`"
    )
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, NodeError)


def test_unknown_dataset_on_an_empty_node(home: NodeHome) -> None:
    with pytest.raises(DatasetNotFoundError, match="registered: none"):
        home.dataset("htn")


# ---------------------------------------------------------------- registration


def test_register_records_the_entry_and_returns_the_validated_data(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory
) -> None:
    cohort.to_parquet(home.path / "cohort.parquet", index=False)
    entry = make_entry(path=home.path / "cohort.parquet", validation_fraction=0.25, split_seed=3)
    data = home.register_dataset(entry)
    assert data.n_train + data.n_val == len(cohort)
    assert home.dataset("htn_cohort") == entry
    assert NodeHome.open(home.path).datasets() == {"htn_cohort": entry}
    stored = tomllib.loads(home.config_path.read_text())["datasets"]["htn_cohort"]
    assert stored == {
        "path": "cohort.parquet",  # inside the home: stored relative, so the home can move
        "id_column": ID_COLUMN,
        "label_column": LABEL,
        "feature_columns": list(FEATURES),
        "validation_fraction": 0.25,
        "split_seed": 3,
    }


def test_register_keeps_absolute_paths_outside_the_home(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    home.register_dataset(make_entry(site_column=SITE_COLUMN, site_value="hospital_2"))
    stored = tomllib.loads(home.config_path.read_text())["datasets"]["htn_cohort"]
    assert stored["path"] == str(tmp_path / "cohort.csv")
    assert (stored["site_column"], stored["site_value"]) == (SITE_COLUMN, "hospital_2")


def test_a_moved_home_still_finds_its_files(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(home.path / "cohort.csv", index=False)
    home.register_dataset(make_entry(path=home.path / "cohort.csv"))
    moved = home.path.rename(tmp_path / "moved")
    assert NodeHome.open(moved).dataset("htn_cohort").path == moved.resolve() / "cohort.csv"


def test_register_refuses_a_duplicate_name_unless_replacing(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    home.register_dataset(make_entry())
    expected = "dataset 'htn_cohort' is already registered on node 'hospital_2'; pass --replace"
    with pytest.raises(NodeHomeError, match=expected):
        home.register_dataset(make_entry(split_seed=5))
    home.register_dataset(make_entry(split_seed=5), replace=True)
    assert NodeHome.open(home.path).dataset("htn_cohort").split_seed == 5


def test_failed_registration_leaves_node_toml_untouched(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    home.register_dataset(make_entry())
    before = home.config_path.read_bytes()
    bad = cohort.copy()
    bad["age"] = bad["age"].astype(object)
    bad.loc[0, "age"] = SENTINEL
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConnectorError) as caught:
        home.register_dataset(make_entry(name="bad", path=tmp_path / "bad.csv"))
    assert SENTINEL not in str(caught.value)
    assert home.config_path.read_bytes() == before
    assert sorted(p.name for p in home.path.iterdir()) == ["allowed_apps.toml", "node.toml", "policy.toml"]
    assert list(home.datasets()) == ["htn_cohort"]


def test_register_sees_changes_made_by_another_process(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    NodeHome.open(home.path).register_dataset(make_entry(name="first"))
    home.register_dataset(make_entry(name="second"))
    assert sorted(NodeHome.open(home.path).datasets()) == ["first", "second"]


def test_text_needing_escapes_round_trips(
    home: NodeHome, cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    odd = 'wéird "quoted" \\ col\tumn'
    folder = tmp_path / 'data "q" \\ ü'
    folder.mkdir()
    cohort.rename(columns={"bmi": odd}).to_csv(folder / "c.csv", index=False)
    features = tuple(odd if f == "bmi" else f for f in FEATURES)
    entry = make_entry(path=folder / "c.csv", feature_columns=features)
    home.register_dataset(entry)
    assert NodeHome.open(home.path).dataset("htn_cohort") == entry


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))))
def test_toml_string_round_trips_any_text(text: str) -> None:
    assert tomllib.loads(f"key = {toml_string(text)}")["key"] == text


# ---------------------------------------------------------------- entry validation


def test_entry_reports_every_invalid_field(tmp_path: Path) -> None:
    with pytest.raises(NodeHomeError) as caught:
        DatasetEntry(
            name="htn cohort",
            path=Path("relative.csv"),
            id_column="patient_id",
            label_column="patient_id",
            feature_columns=("age", LABEL, ""),
            site_column="site",
            validation_fraction=1.0,
            split_seed=-1,
        )
    lines = str(caught.value).splitlines()
    assert lines[0] == "dataset registration 'htn cohort' is invalid:"
    for line in (
        "dataset name 'htn cohort' is invalid; use 1-64 letters, digits, '_' or '-', starting with a letter or digit",
        "datasets.htn cohort.path must be an absolute path; found 'relative.csv'",
        "datasets.htn cohort.feature_columns must hold non-empty column names only",
        "datasets.htn cohort.site_column and datasets.htn cohort.site_value go together; set both or neither",
        "column 'patient_id' is both datasets.htn cohort.id_column and datasets.htn cohort.label_column",
        "datasets.htn cohort.validation_fraction must be in [0, 1); found 1.0",
        "datasets.htn cohort.split_seed must be in [0, 2**63); found -1",
    ):
        assert f"  - {line}" in lines


def test_entry_refuses_a_feature_that_is_also_the_label(tmp_path: Path) -> None:
    expected = "column 'htn_onset_1y' is both datasets.d.label_column and datasets.d.feature_columns"
    with pytest.raises(NodeHomeError, match=expected):
        DatasetEntry(
            name="d",
            path=tmp_path / "c.csv",
            id_column="i",
            label_column=LABEL,
            feature_columns=("age", LABEL),
        )


def test_entry_stores_canonical_types(tmp_path: Path) -> None:
    entry = DatasetEntry(
        name="d",
        path=str(tmp_path / "c.csv"),  # type: ignore[arg-type]
        id_column="i",
        label_column="y",
        feature_columns=["a", "b"],  # type: ignore[arg-type]
        validation_fraction=0,
    )
    assert entry.path == tmp_path / "c.csv"
    assert entry.feature_columns == ("a", "b")
    assert entry.validation_fraction == 0.0 and isinstance(entry.validation_fraction, float)
    assert entry.columns == ("i", "y", "a", "b")


def test_dataset_not_found_survives_pickling() -> None:
    error = DatasetNotFoundError("htn", node="hospital_1", registered=["b", "a"])
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.name, copy.node, copy.registered) == ("htn", "hospital_1", ("a", "b"))


# ---------------------------------------------------------------- imaging registrations


def test_open_reports_every_problem_of_an_imaging_registration(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path,
        """
        [node]
        name = "hospital_1"

        [datasets.chest]
        kind = "imaging"
        path = "pacs"
        labes = "labels.csv"
        modalities = "CT"
        series_description = "axial("
        feature_columns = ["age"]
        deid = { options = ["clean_descriptor"], max_date_shift_days = 0 }

        [datasets.other]
        kind = "imagng"
        path = "x"
        """,
    )
    with pytest.raises(NodeHomeError) as caught:
        NodeHome.open(folder)
    lines = str(caught.value).splitlines()
    for line in (
        "datasets.chest.labes is not a known field; did you mean 'labels'?",
        "datasets.chest.feature_columns applies only to kind 'tabular'; an imaging dataset's labels file names its patients",
        "datasets.chest.labels is missing",
        "datasets.chest.modalities must be a list of strings",
        "datasets.chest.series_description is not a valid regular expression (RE2 syntax): missing ): axial(",
        "datasets.chest.deid.options[0] 'clean_descriptor' is not a PS3.15 option; did you mean 'clean_descriptors'?",
        "datasets.chest.deid.max_date_shift_days must be an integer in 1..36500; found 0",
        "datasets.other.kind must be one of 'tabular', 'imaging', 'omop'; found 'imagng'; did you mean 'imaging'?",
    ):
        assert f"  - {line}" in lines, line


def test_an_imaging_entry_refuses_tabular_columns_and_needs_its_source(tmp_path: Path) -> None:
    from clients.hospital_node.home import ImagingSource

    with pytest.raises(NodeHomeError) as caught:
        DatasetEntry(name="chest", path=tmp_path, kind="imaging", label_column="y")
    assert str(caught.value).splitlines()[1:] == [
        "  - datasets.chest: id_column, label_column, feature_columns and the site filter apply only to kind "
        "'tabular'; an imaging dataset's labels file names its patients",
        "  - datasets.chest.imaging is required for kind 'imaging' (the labels file and settings)",
    ]
    with pytest.raises(NodeHomeError, match="datasets.chest.imaging applies only to kind 'imaging'"):
        DatasetEntry(
            name="chest", path=tmp_path, id_column="i", label_column="y", feature_columns=("a",),
            imaging=ImagingSource(labels=tmp_path / "l.csv"),
        )
    with pytest.raises(NodeHomeError, match=r"datasets.chest.labels must be an absolute path; found 'l.csv'"):
        DatasetEntry(name="chest", path=tmp_path, kind="imaging", imaging=ImagingSource(labels=Path("l.csv")))
