"""Local risk scoring: approved weights only, ranking, rule alerts, outputs and the audit record.

The cohort here comes from a stand-in builder with ``build_cohort``'s signature (a table
of person_id, index_date and covariates) so that these tests pin down scoring alone;
readings are real rows of an OMOP ``measurement`` table in DuckDB.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import stat
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from clients.hospital_node.data.scoring import approved_weights, rule_alerts, score_patients
from clients.hospital_node.errors import DatasetNotFoundError, ScoringError
from clients.hospital_node.governance import approve, revoke
from clients.hospital_node.home import NodeHome
from models.clinical_tasks import CONCEPTS, TYPE_DEVICE, TYPE_EHR, TYPE_SELF_REPORT, CohortDefinition
from models.tabular import build_tabular_model
from models.weights import WeightsMetadata, save_weights
from privacy.keys import load_public_key

DATASET = "htn_omop"
AS_OF = date(2025, 12, 1)
FEATURES = ("age", "sbp_mean", "bmi_last", "glucose_mean")
SCALING = {"age": (50.0, 15.0), "sbp_mean": (130.0, 15.0), "bmi_last": (27.0, 5.0), "glucose_mean": (6.0, 1.5)}
COEFFICIENTS = (0.8, 1.2, 0.5, 0.7)
INTERCEPT = -2.0
COHORT = {  # canonical, as a validated spec carries it: its covariates are data.features
    "task": "hypertension_onset",
    "index_date": "2024-01-01",
    "lookback_days": [-365, 0],
    "reading_window_days": [-90, 0],
    "time_at_risk_days": [1, 365],
}
# Person ids no output may show: long and distinctive.
BASE_ID = 7_340_000_000


def _canonical(mapping: dict[str, Any]) -> str:
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _spec(**data: Any) -> dict[str, Any]:
    return {
        "experiment": {"name": "htn-risk", "task": "tabular-classification"},
        "data": {
            "dataset": DATASET,
            "features": list(FEATURES),
            "label": "htn_onset_1y",
            "scaling": {k: list(v) for k, v in SCALING.items()},
            "cohort": COHORT,
            **data,
        },
        "model": {"kind": "logistic", "hidden": []},
    }


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(spec).encode("ascii")).hexdigest()


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    node = NodeHome.create(tmp_path / "home", name="hospital_1")
    omop = tmp_path / "omop"
    omop.mkdir()
    with node.config_path.open("a") as handle:
        handle.write(
            f'\n[datasets.{DATASET}]\npath = "{omop}"\nid_column = "person_id"\nlabel_column = "htn_onset_1y"\n'
            'feature_columns = ["age"]\n'
        )
    return NodeHome.open(node.path)


def _approve(home: NodeHome, spec: dict[str, Any]) -> str:
    """The node met `spec` (a request with the signed spec) and its officer approved it."""
    digest = _digest(spec)
    home.audit_log().append("request", {"spec_digest": digest, "dataset": DATASET, "task": "tabular-classification", "spec": spec})
    approve(home, digest, dataset=DATASET, by="officer")
    return digest


def _weights(
    path: Path, spec: dict[str, Any], *, kind: str = "logistic", features: tuple[str, ...] = FEATURES,
    carry_spec: bool = False,
) -> Path:
    hidden = (8,) if kind == "mlp" else ()
    model = build_tabular_model(kind, len(features), hidden=hidden or (32, 16), seed=1)
    if kind == "logistic":
        with torch.no_grad():
            model.linear.weight.copy_(torch.tensor([COEFFICIENTS[: len(features)]], dtype=torch.float32))
            model.linear.bias.fill_(INTERCEPT)
    metadata = WeightsMetadata(
        spec_digest=_digest(spec), model_kind=kind, hidden=hidden, features=features,
        scaling={k: v for k, v in SCALING.items() if k in features}, cohort=spec["data"]["cohort"],
        medfed_version="0.1.0", spec_json=_canonical(spec) if carry_spec else "",
    )
    save_weights(path, model.state_dict(), metadata)
    return path


def _true_risk(row: dict[str, float]) -> float:
    z = INTERCEPT + sum(b * (row[f] - SCALING[f][0]) / SCALING[f][1] for b, f in zip(COEFFICIENTS, FEATURES, strict=True))
    return 1.0 / (1.0 + math.exp(-z))


def _cohort_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({
            "person_id": BASE_ID + i,
            "age": float(rng.normal(50, 15)),
            "sbp_mean": float(rng.normal(130, 15)),
            "bmi_last": float(rng.normal(27, 5)),
            "glucose_mean": float(rng.normal(6, 1.5)),
            "sbp_slope": float(rng.normal(0, 2)),
        })
    return rows


class StandInCohort:
    """``build_cohort``'s signature over fixed rows; it records the definition it was asked for."""

    def __init__(self, rows: list[dict[str, Any]], columns: tuple[str, ...] = (*FEATURES, "sbp_slope")) -> None:
        self.rows = rows
        self.columns = columns
        self.asked: list[tuple[CohortDefinition, bool]] = []

    def __call__(self, connection: duckdb.DuckDBPyConnection, definition: CohortDefinition, *, scoring: bool = False) -> pa.Table:
        self.asked.append((definition, scoring))
        table = {
            "person_id": pa.array([r["person_id"] for r in self.rows], pa.int64()),
            "index_date": pa.array([definition.index_date] * len(self.rows), pa.date32()),
        }
        for column in self.columns:
            table[column] = pa.array([r.get(column) for r in self.rows], pa.float64())
        return pa.table(table)


@pytest.fixture
def connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE measurement (measurement_id BIGINT, person_id BIGINT, measurement_concept_id INTEGER, "
        "measurement_date DATE, measurement_datetime TIMESTAMP, measurement_type_concept_id INTEGER, "
        "value_as_number DOUBLE, unit_concept_id INTEGER)"
    )
    return con


def _reading(con: duckdb.DuckDBPyConnection, person: int, signal: str, days_before: int, value: float,
             kind: int = TYPE_DEVICE, hour: int = 9) -> None:
    day = AS_OF - timedelta(days=days_before)
    at = datetime.combine(day, datetime.min.time()) + timedelta(hours=hour)
    unit = CONCEPTS[CONCEPTS[signal].unit].concept_id
    count = con.execute("SELECT count(*) FROM measurement").fetchone()[0]
    con.execute(
        "INSERT INTO measurement VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [count + 1, person, CONCEPTS[signal].concept_id, day, at, kind, value, unit],
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _score(home: NodeHome, weights: Path, connection: duckdb.DuckDBPyConnection, builder: StandInCohort, **kw: Any):
    return score_patients(home, weights, dataset=DATASET, connection=connection, as_of=AS_OF, cohort_builder=builder, **kw)


# ---------------------------------------------------------------- ranking


def test_scores_rank_patients_as_their_known_risk(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    rows = _cohort_rows(300)
    builder = StandInCohort(rows)
    # threshold 1: nobody flagged, no charts drawn (the HTML test counts those)
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, builder, threshold=1.0)

    by_person = {p.person_id: p for p in result.patients}
    known = np.array([_true_risk(r) for r in rows])
    scored = np.array([by_person[r["person_id"]].risk for r in rows])
    assert 0.95 <= _spearman(scored, known) <= 1.0
    assert np.max(np.abs(scored - known)) < 1e-4  # the exact coefficients: the exact risk, to float32
    # No alerts: rank is the order of risk, highest first.
    assert [p.rank for p in result.patients] == list(range(1, 301))
    assert all(a.risk >= b.risk for a, b in zip(result.patients, result.patients[1:]))
    # The cohort asked for: the approved definition, indexed on the scoring date, for scoring.
    ((definition, scoring),) = builder.asked
    assert scoring is True and definition.index_date == AS_OF and definition.covariates == FEATURES


def test_logistic_drivers_are_coefficient_times_scaled_value(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    row = {"person_id": BASE_ID, "age": 50.0, "sbp_mean": 160.0, "bmi_last": 17.0, "glucose_mean": 7.5, "sbp_slope": 1.0}
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort([row]))
    (patient,) = result.patients
    # sbp 1.2 * 2 = 2.4, glucose 0.7 * 1 = 0.7, age 0.8 * 0 = 0; bmi 0.5 * -2 = -1 comes last.
    assert [d.covariate for d in patient.drivers] == ["sbp_mean", "glucose_mean", "age"]
    assert [round(d.contribution, 4) for d in patient.drivers] == [2.4, 0.7, 0.0]


def test_mlp_drivers_are_gradient_times_input(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    spec["model"] = {"kind": "mlp", "hidden": [8]}
    _approve(home, spec)
    weights = _weights(tmp_path / "w.safetensors", spec, kind="mlp")
    result = _score(home, weights, connection, StandInCohort(_cohort_rows(20)), threshold=1.0)
    assert all(len(p.drivers) == 3 and 0.0 < p.risk < 1.0 for p in result.patients)
    assert all(p.drivers[0].contribution >= p.drivers[1].contribution >= p.drivers[2].contribution for p in result.patients)


def test_a_missing_covariate_is_imputed_with_its_scaling_center(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    row = {"person_id": BASE_ID, "age": 65.0, "sbp_mean": None, "bmi_last": 27.0, "glucose_mean": None}
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort([row]))
    expected = 1.0 / (1.0 + math.exp(-(INTERCEPT + 0.8 * 1.0)))  # sbp and glucose at their centers: 0
    assert result.patients[0].risk == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- rule alerts


def test_rule_alerts_fire_exactly_on_planted_readings(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    rows = _cohort_rows(6)
    ids = [r["person_id"] for r in rows]
    _reading(connection, ids[0], "sbp", 3, 192.0)  # planted: high, device
    _reading(connection, ids[1], "glucose", 14, 2.4, kind=TYPE_SELF_REPORT)  # planted: low, self-reported, 14 days
    _reading(connection, ids[2], "sbp", 15, 205.0)  # 15 days old: no alert
    _reading(connection, ids[3], "sbp", 2, 150.0)  # within range
    _reading(connection, ids[3], "glucose", 1, 16.7)  # at the high end: within range
    _reading(connection, ids[4], "sbp", 1, 210.0, kind=TYPE_EHR)  # a clinic reading: not a home alert
    _reading(connection, ids[5], "heart_rate", 0, 150.0)  # on the scoring day itself: not before it
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(rows), threshold=1.0)

    alerted = {p.person_id: p.alerts for p in result.patients if p.alerts}
    assert set(alerted) == {ids[0], ids[1]}
    (high,) = alerted[ids[0]]
    assert (high.signal, high.direction, high.value, high.on) == ("sbp", "high", 192.0, AS_OF - timedelta(days=3))
    (low,) = alerted[ids[1]]
    assert (low.signal, low.direction, low.on) == ("glucose", "low", AS_OF - timedelta(days=14))
    # Alerted patients first and flagged (the threshold flags nobody by risk here).
    assert {p.person_id for p in result.patients[:2]} == {ids[0], ids[1]}
    assert [p.person_id for p in result.patients if p.flagged] == [p.person_id for p in result.patients[:2]]


def test_rule_alerts_name_signal_direction_and_date() -> None:
    when = datetime(2025, 11, 28, 7, 30)
    (alert,) = rule_alerts([("sbp", when, 181.0), ("sbp", when, 179.0)], AS_OF)
    assert alert.text() == "sbp high 181 mmHg on 2025-11-28 (> 180)"


# ---------------------------------------------------------------- outputs


def test_html_has_one_chart_per_flagged_patient_and_no_person_id(home: NodeHome, connection, tmp_path: Path, caplog) -> None:
    caplog.set_level("DEBUG")
    spec = _spec()
    _approve(home, spec)
    rows = _cohort_rows(40, seed=3)
    for r in rows:
        _reading(connection, r["person_id"], "sbp", 20, 135.0)
        _reading(connection, r["person_id"], "sleep_hours", 5, 6.5)
    _reading(connection, rows[0]["person_id"], "glucose", 2, 19.0)
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(rows), threshold=0.3)

    flagged = [p for p in result.patients if p.flagged]
    assert 0 < len(flagged) < len(rows)
    html = result.html_path.read_text()
    assert html.count('<img class="trend-chart"') == len(flagged)
    assert html.count("data:image/png;base64,") == len(flagged)
    assert all(p.key in html for p in flagged)
    text = html + result.csv_path.read_text() + caplog.text
    assert not any(str(r["person_id"]) in text for r in rows)

    with result.csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["patient_key", "risk", "rank", "flagged", "top_drivers", "trend", "rule_alerts"]
    assert [int(r["rank"]) for r in table] == list(range(1, 41))
    assert table[0]["rule_alerts"].startswith("glucose high 19 mmol/L")
    assert "sbp -/-/-/-" not in table[0]["trend"] and "sleep_hours -/-/-/6.5" in table[0]["trend"]
    assert "slope" in table[0]["trend"]


def test_html_escapes_what_it_shows(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(_cohort_rows(3)), threshold=0.0)
    html = result.html_path.read_text()
    assert "<script" not in html and html.startswith("<!DOCTYPE html>")


def test_outputs_are_owner_only_and_keys_map_back_only_through_the_lookup_file(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    rows = _cohort_rows(5)
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(rows))
    folder = result.csv_path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (result.csv_path, result.html_path, result.lookup_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with result.lookup_path.open() as handle:
        lookup = {r["patient_key"]: int(r["person_id"]) for r in csv.DictReader(handle)}
    assert lookup == {p.key: p.person_id for p in result.patients}
    assert all(p.key.startswith("MF-") for p in result.patients)
    # The same patient gets the same key on the next scoring.
    again = _score(home, tmp_path / "w.safetensors", connection, StandInCohort(rows), out=tmp_path / "again")
    assert {p.key for p in again.patients} == set(lookup)


def test_an_output_folder_open_to_others_is_refused(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ScoringError, match="open to other users"):
        _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(_cohort_rows(3)), out=shared)
    assert list(shared.iterdir()) == []


def test_an_empty_cohort_writes_empty_outputs_and_is_audited(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    result = _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort([]))
    assert result.patients == () and result.record.patients_scored == 0
    assert result.csv_path.read_text().splitlines() == ["patient_key,risk,rank,flagged,top_drivers,trend,rule_alerts"]
    assert "trend-chart" not in result.html_path.read_text()
    assert home.audit_log().entries()[-1].kind == "scoring"


# ---------------------------------------------------------------- the audit record


def test_scoring_is_audited_and_the_log_verifies(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    digest = _approve(home, spec)
    weights = _weights(tmp_path / "w.safetensors", spec)
    rows = _cohort_rows(10)
    _reading(connection, rows[0]["person_id"], "sbp", 1, 197.3)  # a value that can be in no hash or time
    result = _score(home, weights, connection, StandInCohort(rows), threshold=0.5)

    log = home.audit_log()
    assert log.verify(load_public_key(home.audit_public_key_path)).ok
    entry = log.entries()[-1]
    assert entry.kind == "scoring"
    payload = entry.payload
    assert payload["spec_digest"] == digest
    assert payload["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert payload["patients_scored"] == 10
    assert payload["patients_flagged"] == sum(p.flagged for p in result.patients)
    assert payload["patients_with_alerts"] == 1
    assert payload["outputs"] == [str(result.csv_path), str(result.html_path)]
    assert payload["as_of"] == "2025-12-01" and payload["approval"] == "approved"
    # No patient value: neither a person id (as a whole token: a hash or a time may hold its
    # digits by chance) nor the planted reading.
    recorded = entry.to_json()
    tokens = set(re.findall(r"[0-9A-Za-z_.]+", recorded))
    assert not any(str(r["person_id"]) in tokens for r in rows) and "197.3" not in recorded


# ---------------------------------------------------------------- refusals


def test_an_unapproved_digest_is_refused_and_nothing_written(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    digest = _digest(spec)
    home.audit_log().append("request", {"spec_digest": digest, "dataset": DATASET, "spec": spec})  # never approved
    with pytest.raises(ScoringError, match=rf"spec_digest {digest[:12]} is not approved on dataset '{DATASET}'"):
        _score(home, _weights(tmp_path / "w.safetensors", spec), connection, StandInCohort(_cohort_rows(3)))
    assert not (home.path / "scoring").exists()
    assert [e.kind for e in home.audit_log().entries()] == ["request"]


def test_a_revoked_approval_is_refused(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    digest = _approve(home, spec)
    revoke(home, digest, dataset=DATASET, reason="model withdrawn", by="officer")
    with pytest.raises(ScoringError, match="the officer's decision is revoked"):
        approved_weights(home, _weights(tmp_path / "w.safetensors", spec), dataset=DATASET)


def test_weights_whose_features_differ_from_the_approved_spec_are_refused_naming_the_feature(
    home: NodeHome, connection, tmp_path: Path
) -> None:
    approved = _spec()
    _approve(home, approved)
    # The same digest, but the file's features say otherwise.
    other = ("age", "sbp_mean", "bmi_last", "heart_rate_mean")
    metadata = WeightsMetadata(
        spec_digest=_digest(approved), model_kind="logistic", features=other,
        scaling={k: v for k, v in SCALING.items() if k in other}, cohort=COHORT, medfed_version="0.1.0",
    )
    save_weights(tmp_path / "w.safetensors", build_tabular_model("logistic", 4).state_dict(), metadata)
    with pytest.raises(ScoringError, match="weights feature 'heart_rate_mean' is not in the approved spec's data.features"):
        _score(home, tmp_path / "w.safetensors", connection, StandInCohort(_cohort_rows(3)))
    assert not (home.path / "scoring").exists()


def test_a_feature_the_cohort_does_not_provide_is_refused_naming_it(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    builder = StandInCohort(_cohort_rows(3), columns=("age", "sbp_mean", "bmi_last"))
    with pytest.raises(ScoringError, match="feature 'glucose_mean' of the weights is not a covariate the node's cohort provides"):
        _score(home, _weights(tmp_path / "w.safetensors", spec), connection, builder)


def test_differing_scaling_is_refused_naming_the_feature(home: NodeHome, connection, tmp_path: Path) -> None:
    approved = _spec(scaling={**{k: list(v) for k, v in SCALING.items()}, "age": [45.0, 15.0]})
    _approve(home, approved)
    metadata = WeightsMetadata(
        spec_digest=_digest(approved), model_kind="logistic", features=FEATURES, scaling=SCALING, cohort=COHORT,
    )
    save_weights(tmp_path / "w.safetensors", build_tabular_model("logistic", 4).state_dict(), metadata)
    with pytest.raises(ScoringError, match=r"scaling\.age is \[50\.0, 15\.0\] in the weights"):
        approved_weights(home, tmp_path / "w.safetensors", dataset=DATASET)


def test_weights_carrying_their_spec_score_where_the_officer_approved_it_before_the_request(
    home: NodeHome, connection, tmp_path: Path
) -> None:
    spec = _spec()
    approve(home, _digest(spec), dataset=DATASET, by="officer", not_yet_requested=True)
    with pytest.raises(ScoringError, match="carry no copy of it"):
        approved_weights(home, _weights(tmp_path / "bare.safetensors", spec), dataset=DATASET)
    checked = approved_weights(home, _weights(tmp_path / "w.safetensors", spec, carry_spec=True), dataset=DATASET)
    assert checked.spec == spec


def test_pickled_weights_are_refused(home: NodeHome, connection, tmp_path: Path) -> None:
    spec = _spec()
    _approve(home, spec)
    torch.save(build_tabular_model("logistic", 4).state_dict(), tmp_path / "final_model.pt")
    with pytest.raises(ScoringError, match=r"final_model\.pt is a torch\.save file"):
        approved_weights(home, tmp_path / "final_model.pt", dataset=DATASET)


def test_an_unknown_dataset_is_refused(home: NodeHome, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="'elsewhere' is not registered"):
        approved_weights(home, tmp_path / "w.safetensors", dataset="elsewhere")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run `medfed ...` as the console script does; expect exit code 2 and return its one-line error."""
    from medfed.cli import main

    monkeypatch.setattr(sys, "argv", ["medfed", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_the_cli_refuses_an_unapproved_spec_in_one_line(home: NodeHome, tmp_path: Path, capsys, monkeypatch) -> None:
    weights = _weights(tmp_path / "w.safetensors", _spec())
    err = _cli(["node", "score", str(weights), "--home", str(home.path), "--dataset", DATASET], capsys, monkeypatch)
    assert "is not approved on dataset 'htn_omop'" in err


def test_the_cli_refuses_an_unknown_dataset_in_one_line(home: NodeHome, tmp_path: Path, capsys, monkeypatch) -> None:
    weights = _weights(tmp_path / "w.safetensors", _spec())
    err = _cli(["node", "score", str(weights), "--home", str(home.path), "--dataset", "nowhere"], capsys, monkeypatch)
    assert "dataset 'nowhere' is not registered" in err


def test_the_cli_refuses_features_that_differ_in_one_line(home: NodeHome, tmp_path: Path, capsys, monkeypatch) -> None:
    approved = _spec()
    _approve(home, approved)
    other = ("age", "sbp_mean", "bmi_last", "steps_mean")
    metadata = WeightsMetadata(spec_digest=_digest(approved), model_kind="logistic", features=other, cohort=COHORT)
    save_weights(tmp_path / "w.safetensors", build_tabular_model("logistic", 4).state_dict(), metadata)
    err = _cli(["node", "score", str(tmp_path / "w.safetensors"), "--home", str(home.path), "--dataset", DATASET],
               capsys, monkeypatch)
    assert "'steps_mean'" in err


def test_the_cli_scores_only_an_omop_dataset(home: NodeHome, tmp_path: Path, capsys, monkeypatch) -> None:
    spec = _spec()
    _approve(home, spec)
    weights = _weights(tmp_path / "w.safetensors", spec)
    err = _cli(["node", "score", str(weights), "--home", str(home.path), "--dataset", DATASET], capsys, monkeypatch)
    assert "is of kind 'tabular'; scoring builds its cohort from an OMOP source" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"\x80\x04K\x01."), "is a Python pickle"),
        (lambda p: p.write_text("garbage garbage"), "is not a safetensors file"),
    ],
)
def test_the_cli_answers_bad_weights_in_one_line(home: NodeHome, tmp_path: Path, capsys, monkeypatch, make, message) -> None:
    weights = tmp_path / "w.safetensors"
    make(weights)
    err = _cli(["node", "score", str(weights), "--home", str(home.path), "--dataset", DATASET], capsys, monkeypatch)
    assert message in err and str(weights) in err


# ---------------------------------------------------------------- with the node's cohort builder


def test_scoring_builds_the_approved_cohort_on_the_scoring_date_from_omop_rows(home: NodeHome, tmp_path: Path) -> None:
    from models.clinical_tasks import CONCEPTS as C

    from .omop_folder import open_omop, write_omop

    features = ("age", "sbp_mean")
    spec = _spec(features=list(features), scaling={"age": [50.0, 15.0], "sbp_mean": [130.0, 15.0]})
    _approve(home, spec)
    weights = _weights(tmp_path / "w.safetensors", spec, features=features)
    old, young, treated, unobserved = BASE_ID + 1, BASE_ID + 2, BASE_ID + 3, BASE_ID + 4
    people = [(old, 1955), (young, 1985), (treated, 1960), (unobserved, 1970)]
    observed = {"observation_period_start_date": date(2020, 1, 1), "observation_period_end_date": date(2026, 6, 30)}

    def sbp(person: int, days_before: int, value: float) -> dict[str, Any]:
        day = AS_OF - timedelta(days=days_before)
        return {"person_id": person, "measurement_concept_id": C["sbp"].concept_id, "measurement_date": day,
                "measurement_datetime": datetime.combine(day, datetime.min.time()) + timedelta(hours=8),
                "measurement_type_concept_id": TYPE_DEVICE, "value_as_number": value,
                "unit_concept_id": C["mmHg"].concept_id}

    folder = write_omop(tmp_path / "omop-rows", {
        "person": [{"person_id": p, "gender_concept_id": C["female"].concept_id, "year_of_birth": y,
                    "month_of_birth": 6, "day_of_birth": 1} for p, y in people],
        "observation_period": [{"person_id": p, **observed} for p in (old, young, treated)],
        "condition_occurrence": [{"person_id": treated, "condition_concept_id": C["hypertension"].concept_id,
                                  "condition_start_date": date(2023, 5, 1), "condition_type_concept_id": TYPE_EHR}],
        "measurement": [sbp(old, d, 150.0) for d in (30, 20, 10)] + [sbp(old, 2, 186.0)]
        + [sbp(young, d, 118.0) for d in (30, 20, 10)],
    })
    connection = open_omop(folder)
    result = score_patients(home, weights, dataset=DATASET, connection=connection, as_of=AS_OF, threshold=1.0)

    assert [p.person_id for p in result.patients] == [old, young]  # the treated and the unobserved are not in the target
    first = result.patients[0]
    assert [(a.signal, a.direction, a.on) for a in first.alerts] == [("sbp", "high", AS_OF - timedelta(days=2))]
    expected = 1.0 / (1.0 + math.exp(-(INTERCEPT + 0.8 * (70 - 50) / 15 + 1.2 * ((3 * 150 + 186) / 4 - 130) / 15)))
    assert first.risk == pytest.approx(expected, abs=1e-3)
    assert "sbp" in first.trend
