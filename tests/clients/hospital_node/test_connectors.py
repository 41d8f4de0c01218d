"""Tabular connectors: reading, validation without leaking cell values, and the patient split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.hospital_node.connectors import (
    MIN_ROWS,
    InMemoryConnector,
    TabularConnector,
    TabularData,
    split_fraction,
)
from clients.hospital_node.errors import ConnectorError
from medfed.synth import FEATURES, ID_COLUMN, LABEL, SITE_COLUMN

from .conftest import SENTINEL, EntryFactory


def load_frame(frame: pd.DataFrame, make_entry: EntryFactory, **overrides: object) -> TabularData:
    return InMemoryConnector(frame, make_entry(**overrides)).load()


def error_of(frame: pd.DataFrame, make_entry: EntryFactory, **overrides: object) -> str:
    with pytest.raises(ConnectorError) as caught:
        load_frame(frame, make_entry, **overrides)
    return str(caught.value)


def assert_same(one: TabularData, other: TabularData) -> None:
    assert one.feature_names == other.feature_names
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(one, name), getattr(other, name))


# ---------------------------------------------------------------- reading


def test_csv_loads_into_float32_arrays(cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    data = TabularConnector(make_entry()).load()
    assert data.feature_names == FEATURES
    assert data.n_train + data.n_val == len(cohort)
    assert data.x_train.shape == (data.n_train, len(FEATURES))
    assert data.x_val.shape == (data.n_val, len(FEATURES))
    for array in (data.x_train, data.y_train, data.x_val, data.y_val):
        assert array.dtype == np.float32
        assert array.flags["C_CONTIGUOUS"]
    assert set(np.unique(data.y_train)) == {0.0, 1.0}
    assert float(np.concatenate([data.y_train, data.y_val]).sum()) == cohort[LABEL].sum()


def test_csv_and_parquet_give_identical_arrays(
    cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    cohort.to_parquet(tmp_path / "cohort.parquet", index=False)
    from_csv = TabularConnector(make_entry(path=tmp_path / "cohort.csv")).load()
    from_parquet = TabularConnector(make_entry(path=tmp_path / "cohort.parquet")).load()
    assert_same(from_csv, from_parquet)


def test_integer_ids_split_alike_in_csv_and_parquet(
    cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort[ID_COLUMN] = np.arange(len(cohort)) * 7 + 1000
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    cohort.to_parquet(tmp_path / "cohort.pq", index=False)
    assert_same(
        TabularConnector(make_entry(path=tmp_path / "cohort.csv")).load(),
        TabularConnector(make_entry(path=tmp_path / "cohort.pq")).load(),
    )


def test_in_memory_connector_matches_the_file_connector(
    cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.to_parquet(tmp_path / "cohort.parquet", index=False)
    entry = make_entry(path=tmp_path / "cohort.parquet")
    assert_same(TabularConnector(entry).load(), InMemoryConnector(cohort, entry).load())


def test_unknown_suffix_is_refused(make_entry: EntryFactory, tmp_path: Path) -> None:
    (tmp_path / "cohort.xlsx").write_bytes(b"")
    expected = r"cannot read files ending in '\.xlsx'; supported: \.csv, \.parquet, \.pq"
    with pytest.raises(ConnectorError, match=expected):
        TabularConnector(make_entry(path=tmp_path / "cohort.xlsx")).load()


def test_missing_file_is_named(make_entry: EntryFactory, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(ConnectorError, match="the file does not exist") as caught:
        TabularConnector(make_entry(path=missing)).load()
    assert str(missing) in str(caught.value)
    assert "'htn_cohort'" in str(caught.value)


def test_a_folder_is_not_a_file(make_entry: EntryFactory, tmp_path: Path) -> None:
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ConnectorError, match="not a file"):
        TabularConnector(make_entry(path=tmp_path / "folder.csv")).load()


def test_unreadable_parquet_names_the_failure_not_the_content(
    make_entry: EntryFactory, tmp_path: Path
) -> None:
    path = tmp_path / "cohort.parquet"
    path.write_bytes(f"patient,{SENTINEL}\n".encode() * 20)
    with pytest.raises(ConnectorError, match=r"not readable as PARQUET \(\w+\)") as caught:
        TabularConnector(make_entry(path=path)).load()
    assert SENTINEL not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_undeclared_columns_are_never_read(cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path) -> None:
    cohort["patient_name"] = SENTINEL
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    data = TabularConnector(make_entry()).load()
    assert data.n_train + data.n_val == len(cohort)


def test_boolean_features_are_numeric(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort["smoker"] = cohort["smoker"].astype(bool)
    data = load_frame(cohort, make_entry)
    column = FEATURES.index("smoker")
    assert set(np.unique(np.concatenate([data.x_train[:, column], data.x_val[:, column]]))) == {0.0, 1.0}


# ---------------------------------------------------------------- validation


def test_missing_columns_are_listed(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    message = error_of(cohort.drop(columns=["bmi", "egfr"]), make_entry)
    assert "missing columns: bmi, egfr" in message
    assert message.startswith("dataset 'htn_cohort' (in-memory frame) does not fit its registration:")


def test_non_numeric_feature_counts_bad_rows_without_values(
    cohort: pd.DataFrame, make_entry: EntryFactory
) -> None:
    cohort["bmi"] = cohort["bmi"].astype(object)
    cohort.loc[[3, 9], "bmi"] = SENTINEL
    message = error_of(cohort, make_entry)
    assert "feature column 'bmi' is not numeric: 2 rows hold non-numeric values" in message
    assert SENTINEL not in message


def test_non_numeric_csv_cell_is_not_echoed(cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path) -> None:
    cohort["egfr"] = cohort["egfr"].astype(object)
    cohort.loc[5, "egfr"] = SENTINEL
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    with pytest.raises(ConnectorError, match="feature column 'egfr' is not numeric: 1 row hold") as caught:
        TabularConnector(make_entry()).load()
    assert SENTINEL not in str(caught.value)


def test_missing_values_are_counted_per_column(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort.loc[[1, 2, 3], "age"] = np.nan
    cohort.loc[[4], "fasting_glucose"] = np.nan
    message = error_of(cohort, make_entry)
    assert "feature column 'age' has 3 rows with missing values" in message
    assert "feature column 'fasting_glucose' has 1 row with missing values" in message


def test_infinite_values_are_refused(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort.loc[[0, 1], "sodium_intake_g"] = np.inf
    assert "feature column 'sodium_intake_g' has 2 rows with infinite values" in error_of(cohort, make_entry)


def test_duplicate_ids_are_counted_not_shown(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort.loc[[0, 1, 2], ID_COLUMN] = SENTINEL
    cohort.loc[10, ID_COLUMN] = cohort.loc[11, ID_COLUMN]
    message = error_of(cohort, make_entry)
    assert "id column 'patient_id' has 2 ids on more than one row (5 rows)" in message
    assert "one row per patient" in message
    assert SENTINEL not in message
    assert str(cohort.loc[11, ID_COLUMN]) not in message


def test_missing_ids_are_counted(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort.loc[[7, 8], ID_COLUMN] = None
    assert "id column 'patient_id' has 2 rows without an id" in error_of(cohort, make_entry)


def test_label_must_be_binary(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort[LABEL] = cohort[LABEL].astype(object)
    cohort.loc[0, LABEL] = 2
    cohort.loc[1, LABEL] = SENTINEL
    cohort.loc[2, LABEL] = None
    message = error_of(cohort, make_entry)
    assert (
        "label column 'htn_onset_1y' must hold 0 or 1 only; 3 rows hold something else "
        "(1 missing, 1 non-numeric, 1 other numbers)"
    ) in message
    assert SENTINEL not in message


def test_too_few_rows_are_refused(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    message = error_of(cohort.head(MIN_ROWS - 3), make_entry)
    assert f"the dataset has 7 rows; at least {MIN_ROWS} are needed" in message


def test_every_problem_is_reported_at_once(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    cohort = cohort.drop(columns=["egfr"])
    cohort["bmi"] = cohort["bmi"].astype(object)
    cohort.loc[0, "bmi"] = SENTINEL
    cohort.loc[1, ID_COLUMN] = cohort.loc[2, ID_COLUMN]
    cohort.loc[3, LABEL] = 5
    message = error_of(cohort, make_entry)
    assert message.count("\n  - ") == 4
    for fragment in ("missing columns: egfr", "'bmi' is not numeric", "on more than one row", "must hold 0 or 1"):
        assert fragment in message


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    planted=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20),
    column=st.sampled_from(["bmi", LABEL, ID_COLUMN, SITE_COLUMN]),
)
def test_no_planted_cell_value_appears_in_any_message(
    cohort: pd.DataFrame, make_entry: EntryFactory, planted: str, column: str
) -> None:
    value = f"PHI:{planted}"  # never numeric, never a word of the messages
    frame = cohort.head(40).copy()
    frame[column] = frame[column].astype(object)
    frame.loc[[0, 1], column] = value
    frame.loc[2, ID_COLUMN] = value
    with pytest.raises(ConnectorError) as caught:
        InMemoryConnector(frame, make_entry(site_column=SITE_COLUMN, site_value="hospital_9")).load()
    assert value not in str(caught.value)


# ---------------------------------------------------------------- site filter


def test_site_filter_keeps_only_that_sites_rows(alliance_frame: pd.DataFrame, make_entry: EntryFactory) -> None:
    data = load_frame(alliance_frame, make_entry, site_column=SITE_COLUMN, site_value="hospital_2")
    assert data.n_train + data.n_val == int((alliance_frame[SITE_COLUMN] == "hospital_2").sum())
    only_site = alliance_frame[alliance_frame[SITE_COLUMN] == "hospital_2"]
    assert_same(data, load_frame(only_site, make_entry))


def test_site_filter_without_match_lists_the_sites(alliance_frame: pd.DataFrame, make_entry: EntryFactory) -> None:
    message = error_of(alliance_frame, make_entry, site_column=SITE_COLUMN, site_value="hospital_9")
    assert (
        "site filter kept no rows: no row of column 'site' holds 'hospital_9'; "
        "the column holds: hospital_1, hospital_2, hospital_3"
    ) in message
    assert "at least" not in message


def test_site_filter_never_lists_rare_values(alliance_frame: pd.DataFrame, make_entry: EntryFactory) -> None:
    alliance_frame[SITE_COLUMN] = alliance_frame[SITE_COLUMN].astype(object)
    alliance_frame.loc[5, SITE_COLUMN] = SENTINEL
    message = error_of(alliance_frame, make_entry, site_column=SITE_COLUMN, site_value="hospital_9")
    assert "the column holds 4 distinct values" in message
    assert SENTINEL not in message


def test_numeric_site_codes_match_their_text(alliance_frame: pd.DataFrame, make_entry: EntryFactory) -> None:
    alliance_frame[SITE_COLUMN] = alliance_frame[SITE_COLUMN].str.removeprefix("hospital_").astype(int)
    data = load_frame(alliance_frame, make_entry, site_column=SITE_COLUMN, site_value="3")
    assert data.n_train + data.n_val == int((alliance_frame[SITE_COLUMN] == 3).sum())


def test_site_filter_on_a_real_like_multi_site_file(
    alliance_frame: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    alliance_frame.sample(frac=1.0, random_state=0).to_parquet(tmp_path / "extract.parquet", index=False)
    entry = make_entry(path=tmp_path / "extract.parquet", site_column=SITE_COLUMN, site_value="hospital_1")
    data = TabularConnector(entry).load()
    assert data.n_train + data.n_val == int((alliance_frame[SITE_COLUMN] == "hospital_1").sum())


# ---------------------------------------------------------------- split


def test_split_is_deterministic_across_runs(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    assert_same(load_frame(cohort, make_entry), load_frame(cohort.copy(), make_entry))


def test_split_is_stable_under_row_shuffling(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    shuffled = cohort.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert_same(load_frame(cohort, make_entry), load_frame(shuffled, make_entry))


def test_validation_rows_are_those_whose_id_hash_is_below_the_fraction(
    cohort: pd.DataFrame, make_entry: EntryFactory
) -> None:
    data = load_frame(cohort, make_entry, validation_fraction=0.3, split_seed=4)
    expected = sum(split_fraction(pid, split_seed=4) < 0.3 for pid in cohort[ID_COLUMN])
    assert data.n_val == expected
    expected_positives = cohort[LABEL][[split_fraction(p, split_seed=4) < 0.3 for p in cohort[ID_COLUMN]]].sum()
    assert data.y_val.sum() == expected_positives


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_validation_share_is_near_the_fraction(
    alliance_frame: pd.DataFrame, make_entry: EntryFactory, fraction: float
) -> None:
    data = load_frame(alliance_frame, make_entry, validation_fraction=fraction)
    share = data.n_val / (data.n_train + data.n_val)
    assert fraction - 0.03 <= share <= fraction + 0.03


def test_another_seed_gives_another_split(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    first = load_frame(cohort, make_entry, split_seed=0)
    second = load_frame(cohort, make_entry, split_seed=1)
    assert not np.array_equal(first.y_val, second.y_val) or first.n_val != second.n_val


def test_zero_fraction_keeps_every_row_for_training(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    data = load_frame(cohort, make_entry, validation_fraction=0.0)
    assert (data.n_train, data.n_val) == (len(cohort), 0)
    assert data.x_val.shape == (0, len(FEATURES))


def test_split_that_leaves_no_training_row_is_refused(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    frame = cohort.head(60)
    fraction = 0.999
    # The ten ids that the hash puts below the fraction: every one goes to validation.
    chosen = [pid for pid in frame[ID_COLUMN] if split_fraction(pid, split_seed=0) < fraction][:MIN_ROWS]
    message = error_of(frame[frame[ID_COLUMN].isin(chosen)], make_entry, validation_fraction=fraction)
    assert "validation_fraction 0.999 leaves no training rows out of 10 rows" in message


def test_split_fraction_is_a_stable_hash() -> None:
    assert split_fraction("H1-000123", split_seed=0) == split_fraction("H1-000123", split_seed=0)
    assert 0.0 <= split_fraction("H1-000123", split_seed=0) < 1.0
    assert split_fraction("H1-000123", split_seed=0) != split_fraction("H1-000123", split_seed=1)


# ---------------------------------------------------------------- select


def test_select_orders_and_scales_features(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    data = load_frame(cohort, make_entry)
    chosen = data.select(["egfr", "age"], {"age": (50.0, 10.0)})
    assert chosen.feature_names == ("egfr", "age")
    age, egfr = FEATURES.index("age"), FEATURES.index("egfr")
    np.testing.assert_allclose(chosen.x_train[:, 0], data.x_train[:, egfr])
    np.testing.assert_allclose(chosen.x_train[:, 1], (data.x_train[:, age] - 50.0) / 10.0, rtol=1e-6)
    np.testing.assert_allclose(chosen.x_val[:, 1], (data.x_val[:, age] - 50.0) / 10.0, rtol=1e-6)
    np.testing.assert_array_equal(chosen.y_train, data.y_train)
    assert chosen.x_train.dtype == np.float32 and chosen.x_train.flags["C_CONTIGUOUS"]


def test_select_lists_unregistered_features(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    data = load_frame(cohort, make_entry, feature_columns=("age", "bmi"))
    expected = "features not registered for this dataset: egfr, hba1c; registered: age, bmi"
    with pytest.raises(ConnectorError, match=expected):
        data.select(["age", "egfr", "hba1c"], {})


def test_select_refuses_bad_scaling(cohort: pd.DataFrame, make_entry: EntryFactory) -> None:
    data = load_frame(cohort, make_entry)
    with pytest.raises(ConnectorError) as caught:
        data.select(["age", "age"], {"age": (0.0, 0.0), "bmi": (25.0, 5.0)})
    message = str(caught.value)
    assert "features requested more than once: age" in message
    assert "scaling names features that are not requested: bmi" in message
    assert "scaling of 'age' must have a finite center and a finite scale > 0; found (0.0, 0.0)" in message


def test_a_file_without_any_declared_column_lists_them_all(
    cohort: pd.DataFrame, make_entry: EntryFactory, tmp_path: Path
) -> None:
    cohort.rename(columns=str.upper).to_csv(tmp_path / "cohort.csv", index=False)
    with pytest.raises(ConnectorError) as caught:
        TabularConnector(make_entry(feature_columns=("age", "bmi"))).load()
    lines = str(caught.value).splitlines()
    assert lines[1:] == ["  - missing columns: patient_id, htn_onset_1y, age, bmi"]
