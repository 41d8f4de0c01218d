"""Local risk scoring: a node scores its own current patients with approved weights; nothing leaves.

``medfed node score WEIGHTS --dataset NAME`` (:func:`score_patients`) runs entirely on the
hospital's node and sends nothing anywhere. In order:

1. **The weights** are read as safetensors (:mod:`models.weights`; a pickle or a
   ``torch.save`` file is refused unopened).
2. **The approval.** The weights name the spec digest they were trained under. The node's
   verified audit log must hold its officer's approval of that digest on this dataset
   (an approval that has since *expired* still counts: expiry bounds when runs may start,
   and scoring trains and releases nothing; a denial, a revocation or no decision is
   refused). The approved spec is the one recorded with its request, or else the copy
   the weights carry, which must hash to the approved digest. The weights' model kind,
   hidden layers, features (in order), scaling and ``[data.cohort]`` must equal that
   spec's, field by field; the first that differs is named and nothing is written.
3. **The cohort** is the approved ``[data.cohort]`` (its covariates are ``data.features``,
   as for training) rebuilt with the scoring date
   (``--as-of``, default today) as index date, by the node's cohort builder
   (``clients.hospital_node.data.cohorts.build_cohort(..., scoring=True)``): the target
   cohort of that day, no outcome required. Calendar tasks take ``index_date = as_of``;
   pregnancy tasks take ``period = [as_of - time-at-risk end, as_of]``, the pregnancies
   whose 20-week index falls in the time-at-risk before the scoring date. Every feature
   of the weights must be a column of the cohort (else it is named).
4. **The inputs.** A missing covariate is imputed with its scaling center (the value the
   coordinator's scaling treats as typical, so it scales to 0); a feature without
   scaling is imputed with 0. Then ``(x - center) / scale``, as the nodes trained.
5. **Risk and drivers.** Risk is the model's sigmoid output. The drivers are the three
   covariates that raised this patient's logit most: for a logistic model coefficient x
   scaled value, for an MLP gradient x scaled input (each at this patient's inputs).
6. **Trend.** For blood pressure, glucose, heart rate and sleep: the means of the last 4
   weeks' home and wearable readings (oldest first, ``-`` for a week without one) and,
   when the cohort has it, the ``<signal>_slope`` covariate (per 30 days).
7. **Rule alerts.** Each device or self-reported reading of the 14 days before the
   scoring date (``[as_of - 14, as_of)``, the scoring day excluded as covariates exclude
   the index day) whose value lies outside ``models.clinical_tasks.SIGNALS[s].alert``
   (strictly below its low or above its high end) is an alert naming the signal, the
   direction (``high``/``low``), the value and the reading date. EHR rows never alert.

**Order.** Patients with at least one rule alert come first, then the rest; each group by
risk, highest first (ties by pseudonymous key). ``rank`` is the 1-based place in that
order. A patient is *flagged* when their risk is above ``--threshold`` or they have a
rule alert.

**Outputs**, written atomically (mode 0600) into an owner-only folder (default
``<home>/scoring/<dataset>-<as_of>/``): ``scores.csv`` (key, risk, rank, flagged, top
drivers, trend, rule alerts, one patient a row) and ``scores.html``, one self-contained
page (every value escaped) with one trend chart (inline PNG) of the last 8 weeks per
flagged patient. Patients appear under a pseudonymous key, ``MF-...``: the HMAC-SHA256
of the person id under the node's secret (the one that keys imaging pseudonyms,
``keys/deid.secret``). The only way back is the lookup file
``<home>/scoring/<dataset>.keys.csv`` (key, person_id; owner-only), which stays in the
node home for the hospital's clinicians.

**Audit.** One ``scoring`` entry in the node's signed audit log (:class:`ScoringRecord`):
the weights file's digest, the spec digest, the dataset, the date, the threshold, how
many patients were scored, flagged and alerted, and the output paths; no patient value.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.hospital_node.errors import ScoringError
from models.clinical_tasks import (
    CONCEPTS,
    SIGNALS,
    TASKS,
    TYPE_DEVICE,
    TYPE_SELF_REPORT,
    CohortDefinition,
    CohortDefinitionError,
)
from privacy.private_files import FOLDER_MODE, make_private_folder, publish

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from clients.hospital_node.home import DatasetEntry, NodeHome
    from models.weights import WeightsMetadata

__all__ = [
    "ALERT_DAYS",
    "ApprovedWeights",
    "CHART_WEEKS",
    "CohortBuilder",
    "Driver",
    "PatientScore",
    "RuleAlert",
    "SCORING_DIR",
    "ScoringRecord",
    "ScoringResult",
    "approved_spec",
    "approved_weights",
    "check_weights_against_spec",
    "omop_connection",
    "rule_alerts",
    "score_patients",
]

logger = logging.getLogger(__name__)

SCORING_DIR = "scoring"  # in the node home: default outputs and the pseudonym lookup files
ALERT_DAYS = 14
TREND_WEEKS = 4
CHART_WEEKS = 8
TOP_DRIVERS = 3
CSV_FILE = "scores.csv"
HTML_FILE = "scores.html"
_TABULAR_TASK = "tabular-classification"
_CHARTED = ("sbp", "dbp", "glucose", "heart_rate", "sleep_hours")
_TREND_SIGNALS = ("sbp", "dbp", "glucose", "heart_rate", "sleep_hours")
_READING_TYPES = (TYPE_DEVICE, TYPE_SELF_REPORT)

#: (connection, definition, *, scoring) -> one row per patient: person_id, index_date, covariates...
CohortBuilder = Callable[..., "pa.Table"]


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RuleAlert:
    """A recent home or wearable reading outside its signal's alert range."""

    signal: str
    direction: str  # "high" or "low"
    value: float
    on: date
    limit: float  # the end of the range it crossed

    def text(self) -> str:
        unit = CONCEPTS[self.signal].unit
        sign = ">" if self.direction == "high" else "<"
        return f"{self.signal} {self.direction} {self.value:g} {unit} on {self.on.isoformat()} ({sign} {self.limit:g})"


@dataclass(frozen=True)
class Driver:
    """A covariate's contribution to one patient's logit."""

    covariate: str
    contribution: float

    def text(self) -> str:
        return f"{self.covariate} ({self.contribution:+.3f})"


@dataclass(frozen=True)
class PatientScore:
    """One scored patient. ``person_id`` stays in memory: outputs carry only ``key``."""

    key: str
    person_id: int
    risk: float
    rank: int
    flagged: bool
    drivers: tuple[Driver, ...]
    trend: str
    alerts: tuple[RuleAlert, ...]


@dataclass(frozen=True)
class ScoringRecord:
    """The audit log's ``scoring`` entry: what was scored with what, and where it went; no patient value."""

    dataset: str
    spec_digest: str
    weights_sha256: str
    model_kind: str
    approval: str  # the approval's status when scoring: "approved" or "expired"
    as_of: date
    threshold: float
    patients_scored: int
    patients_flagged: int
    patients_with_alerts: int
    outputs: tuple[str, ...]
    lookup: str

    KIND = "scoring"

    def to_payload(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "spec_digest": self.spec_digest,
            "weights_sha256": self.weights_sha256,
            "model_kind": self.model_kind,
            "approval": self.approval,
            "as_of": self.as_of.isoformat(),
            "threshold": self.threshold,
            "patients_scored": self.patients_scored,
            "patients_flagged": self.patients_flagged,
            "patients_with_alerts": self.patients_with_alerts,
            "outputs": list(self.outputs),
            "lookup": self.lookup,
            "sent": "nothing: local scoring",
        }


@dataclass(frozen=True)
class ScoringResult:
    """What :func:`score_patients` did: the patients in rank order, the files and the audit record."""

    patients: tuple[PatientScore, ...]
    csv_path: Path
    html_path: Path
    lookup_path: Path
    record: ScoringRecord


# ---------------------------------------------------------------- approval


def _canonical_json(mapping: Mapping[str, Any]) -> str:
    # The form specs are digested in (experiments.spec.canonical_json, which the node may not import).
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def approved_spec(home: NodeHome, digest: str, dataset: str, *, carried: str = "") -> tuple[dict[str, Any], str]:
    """The spec the officer approved as `digest` on `dataset`, and the approval's status.

    The spec is the one recorded with the request when the node met it; an officer who
    approved the digest before its request arrived left none, and then the spec the
    weights carry (`carried`, canonical JSON) is read, once it hashes to `digest`.

    Raises
    ------
    ScoringError
        The audit log fails verification, the digest is not approved (pending, denied or
        revoked), or the node holds no signed spec for it.
    """
    from clients.hospital_node.governance import Refusal, governance_state
    from privacy.governance import APPROVED, EXPIRED, PENDING, spec_digest

    try:
        state = governance_state(home)
    except Refusal as err:
        raise ScoringError(err.reason) from None
    status = state.status(digest, dataset, datetime.now(UTC))
    if status not in (APPROVED, EXPIRED):
        why = "no decision of this node's officer" if status == PENDING else f"the officer's decision is {status}"
        raise ScoringError(
            f"weights spec_digest {digest[:12]} is not approved on dataset '{dataset}' ({why}); "
            "score only with weights of a spec the officer approved (`medfed node requests`)"
        )
    request = state.requests.get((digest, dataset))
    spec = request.payload.get("spec") if request is not None else None
    if not isinstance(spec, dict) and carried and spec_digest(carried) == digest:
        spec = json.loads(carried)
    if not isinstance(spec, dict):
        raise ScoringError(
            f"spec {digest[:12]} was approved on dataset '{dataset}' before its request arrived, and the weights carry "
            "no copy of it: the node has no spec to check them against; use the final_model.safetensors the coordinator wrote"
        )
    if spec_digest(_canonical_json(spec)) != digest:
        raise ScoringError(f"the spec recorded for {digest[:12]} does not hash to it; run `medfed node audit verify`")
    return spec, status


def _table(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = spec.get(name)
    return value if isinstance(value, Mapping) else {}


def check_weights_against_spec(metadata: WeightsMetadata, spec: Mapping[str, Any]) -> None:
    """The weights describe the approved spec's model and inputs, field by field.

    Raises
    ------
    ScoringError
        Naming the first field (and feature) that differs.
    """
    experiment, data, model = _table(spec, "experiment"), _table(spec, "data"), _table(spec, "model")
    if experiment.get("task") != _TABULAR_TASK:
        raise ScoringError(f"the approved spec's experiment.task is {experiment.get('task')!r}; only {_TABULAR_TASK} models score patients")
    if metadata.model_kind != model.get("kind"):
        raise ScoringError(f"weights model_kind is {metadata.model_kind!r}; the approved spec's model.kind is {model.get('kind')!r}")
    if metadata.model_kind == "mlp" and list(metadata.hidden) != list(model.get("hidden") or []):
        raise ScoringError(f"weights hidden layers {list(metadata.hidden)} differ from the approved spec's model.hidden {model.get('hidden')}")
    approved = [str(f) for f in data.get("features") or []]
    ours = list(metadata.features)
    if ours != approved:
        extra = [f for f in ours if f not in approved]
        missing = [f for f in approved if f not in ours]
        if extra:
            detail = f"weights feature {extra[0]!r} is not in the approved spec's data.features"
        elif missing:
            detail = f"the approved spec's data.features has {missing[0]!r}, which the weights lack"
        else:
            at = next(i for i, (a, b) in enumerate(zip(ours, approved, strict=True)) if a != b)
            detail = f"feature {at + 1} is {ours[at]!r} in the weights and {approved[at]!r} in the approved spec"
        raise ScoringError(f"features differ: {detail}; these weights were not trained on this spec's inputs")
    scaling = {k: [float(c), float(s)] for k, (c, s) in metadata.scaling.items()}
    signed = {str(k): [float(v[0]), float(v[1])] for k, v in (data.get("scaling") or {}).items()}
    for name in sorted(set(scaling) | set(signed)):
        if scaling.get(name) != signed.get(name):
            raise ScoringError(f"scaling.{name} is {scaling.get(name)} in the weights, {signed.get(name)} in the approved spec's data.scaling")
    cohort = data.get("cohort")
    if cohort is None:
        raise ScoringError("the approved spec has no data.cohort; local scoring rebuilds the cohort it defines from OMOP")
    ours_cohort = dict(metadata.cohort or {})
    for key in sorted(set(ours_cohort) | set(cohort)):
        if ours_cohort.get(key) != cohort.get(key):
            raise ScoringError(f"cohort.{key} in the weights differs from the approved spec's data.cohort.{key}")


# ---------------------------------------------------------------- cohort and inputs


def _scoring_definition(spec: Mapping[str, Any], as_of: date) -> CohortDefinition:
    """The approved spec's cohort (its covariates are ``data.features``), indexed on the scoring date."""
    data = _table(spec, "data")
    try:
        definition = CohortDefinition.from_mapping({**data["cohort"], "covariates": list(data.get("features") or ())})
    except CohortDefinitionError as err:
        raise ScoringError(f"the approved spec's data.cohort is invalid: {err}") from None
    if TASKS[definition.task].index == "calendar":
        return dataclasses.replace(definition, index_date=as_of)
    start = as_of - timedelta(days=definition.time_at_risk_days[1])
    return dataclasses.replace(definition, period=(start, as_of))


def _inputs(table: pa.Table, metadata: WeightsMetadata) -> np.ndarray:
    """The model's scaled inputs, one row per patient; a missing value is imputed with its scaling center."""
    columns = []
    for name in metadata.features:
        center, scale = metadata.scaling.get(name, (0.0, 1.0))
        values = table.column(name).cast("float64").to_numpy(zero_copy_only=False).astype(np.float64)  # null: NaN
        columns.append((np.where(np.isfinite(values), values, center) - center) / scale)
    return np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0))


def _risk_and_drivers(
    tensors: Mapping[str, Any], metadata: WeightsMetadata, x: np.ndarray
) -> tuple[np.ndarray, list[tuple[Driver, ...]]]:
    import torch

    from models.tabular import build_tabular_model

    kwargs = {"hidden": metadata.hidden} if metadata.model_kind == "mlp" else {}
    model = build_tabular_model(metadata.model_kind, len(metadata.features), **kwargs)
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    model.eval()
    inputs = torch.tensor(x, dtype=torch.float32)
    if metadata.model_kind == "logistic":
        with torch.no_grad():
            logits = model(inputs)
        contributions = (inputs * tensors["linear.weight"].to(torch.float32)[0]).numpy()
    else:
        inputs.requires_grad_(True)
        logits = model(inputs)
        # Each row's logit depends on its own inputs only (no layer mixes patients).
        (gradient,) = torch.autograd.grad(logits.sum(), inputs)
        contributions = (gradient * inputs).detach().numpy()
        logits = logits.detach()
    risk = torch.sigmoid(logits).numpy().astype(np.float64)
    drivers = []
    for row in contributions:
        order = sorted(range(len(row)), key=lambda j: (-row[j], metadata.features[j]))[:TOP_DRIVERS]
        drivers.append(tuple(Driver(metadata.features[j], float(row[j])) for j in order))
    return risk, drivers


# ---------------------------------------------------------------- readings


@dataclass(frozen=True)
class _Readings:
    """Home and wearable readings of the cohort's patients in the chart window, by patient."""

    by_person: Mapping[int, list[tuple[str, datetime, float]]]


def _readings(connection: duckdb.DuckDBPyConnection, people: Sequence[int], as_of: date) -> _Readings:
    import pyarrow as pa

    concepts = {CONCEPTS[name].concept_id: name for name in SIGNALS}
    start = as_of - timedelta(weeks=CHART_WEEKS)
    name = "_medfed_scoring_people"
    connection.register(name, pa.table({"person_id": pa.array(list(people), pa.int64())}))
    try:
        rows = connection.execute(
            f"""
            SELECT m.person_id, m.measurement_concept_id, m.measurement_date,
                   coalesce(m.measurement_datetime, CAST(m.measurement_date AS TIMESTAMP)), m.value_as_number
            FROM measurement m JOIN {name} p ON m.person_id = p.person_id
            WHERE m.measurement_type_concept_id IN ({", ".join("?" * len(_READING_TYPES))})
              AND m.measurement_concept_id IN ({", ".join("?" * len(concepts))})
              AND m.measurement_date >= ? AND m.measurement_date < ?
              AND m.value_as_number IS NOT NULL
            ORDER BY m.person_id, 4
            """,
            [*_READING_TYPES, *concepts, start, as_of],
        ).fetchall()
    finally:
        connection.unregister(name)
    by_person: dict[int, list[tuple[str, datetime, float]]] = {}
    for person, concept, _, at, value in rows:
        when = at if isinstance(at, datetime) else datetime.combine(at, datetime.min.time())
        by_person.setdefault(int(person), []).append((concepts[int(concept)], when, float(value)))
    return _Readings(by_person)


def rule_alerts(readings: Sequence[tuple[str, datetime, float]], as_of: date) -> tuple[RuleAlert, ...]:
    """The readings of ``[as_of - 14 days, as_of)`` outside their signal's alert range, newest first."""
    first = as_of - timedelta(days=ALERT_DAYS)
    alerts = []
    for signal, when, value in readings:
        if signal not in SIGNALS or not first <= when.date() < as_of:
            continue
        low, high = SIGNALS[signal].alert
        if value > high:
            alerts.append(RuleAlert(signal, "high", value, when.date(), high))
        elif value < low:
            alerts.append(RuleAlert(signal, "low", value, when.date(), low))
    return tuple(sorted(alerts, key=lambda a: (a.on, a.signal, a.value), reverse=True))


def _trend(readings: Sequence[tuple[str, datetime, float]], covariates: Mapping[str, float | None], as_of: date) -> str:
    parts = []
    for signal in _TREND_SIGNALS:
        weeks: list[list[float]] = [[] for _ in range(TREND_WEEKS)]
        for name, when, value in readings:
            age = (as_of - when.date()).days
            if name == signal and 0 < age <= 7 * TREND_WEEKS:
                weeks[TREND_WEEKS - 1 - (age - 1) // 7].append(value)
        slope = covariates.get(f"{signal}_slope")
        if not any(weeks) and slope is None:
            continue
        means = "/".join(f"{np.mean(w):.4g}" if w else "-" for w in weeks)
        text = f"{signal} {means}"
        if slope is not None and math.isfinite(slope):
            text += f" (slope {slope:+.3g}/30d)"
        parts.append(text)
    return "; ".join(parts)


# ---------------------------------------------------------------- outputs


class _Charts:
    """8-week trend charts of blood pressure, glucose, heart rate and sleep, as base64 PNGs.

    One figure is drawn once per scoring and only its lines change from patient to
    patient: a chart costs one PNG encoding, not a new figure's layout.
    """

    _PANELS = (
        (("sbp", "dbp"), "blood pressure (mmHg)"),
        (("glucose",), "glucose (mmol/L)"),
        (("heart_rate",), "heart rate (/min)"),
        (("sleep_hours",), "sleep (h)"),
    )

    def __init__(self, as_of: date) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(8, 4.5), dpi=72)
        self.figure.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1, hspace=0.35, wspace=0.18)
        grid = self.figure.subplots(2, 2, sharex=True)
        start = datetime.combine(as_of - timedelta(weeks=CHART_WEEKS), datetime.min.time())
        end = datetime.combine(as_of, datetime.min.time())
        alert_start = datetime.combine(as_of - timedelta(days=ALERT_DAYS), datetime.min.time())
        self.lines: dict[str, Any] = {}
        self.axes: list[Any] = []
        for ax, (signals, title) in zip((grid[0][0], grid[0][1], grid[1][0], grid[1][1]), self._PANELS, strict=True):
            for signal in signals:
                (self.lines[signal],) = ax.plot([], [], marker=".", markersize=3, linewidth=0.8, label=signal)
                low, high = SIGNALS[signal].alert
                ax.axhline(high, color="red", linewidth=0.5, linestyle="--")
                ax.axhline(low, color="red", linewidth=0.5, linestyle="--")
            ax.axvspan(alert_start, end, color="0.93")  # the alert window
            ax.set_title(title, fontsize=9)
            ax.set_xlim(start, end)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(mdates.WeekdayLocator(interval=2))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
            if len(signals) > 1:
                ax.legend(fontsize=7, loc="upper left")
            self.axes.append((ax, signals))

    def png(self, readings: Sequence[tuple[str, datetime, float]]) -> str:
        for signal, line in self.lines.items():
            points = [(when, value) for name, when, value in readings if name == signal]
            line.set_data([p[0] for p in points], [p[1] for p in points])
        for ax, signals in self.axes:
            values = [v for name, _, v in readings if name in signals]
            bounds = [b for s in signals for b in SIGNALS[s].alert]
            low, high = min(values + [min(bounds)]), max(values + [max(bounds)])
            margin = 0.05 * (high - low or 1.0)
            ax.set_ylim(low - margin, high + margin)
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>medfed risk scores: {{ dataset }} on {{ as_of }}</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
.alert { color: #a00; font-weight: bold; } section { margin-top: 1.5em; border-top: 1px solid #888; }
</style></head><body>
<h1>Risk scores: dataset {{ dataset }}, {{ as_of }}</h1>
<p>Model {{ model_kind }} of spec {{ spec_digest[:12] }} (approved on this node). {{ scored }} patients scored,
{{ flagged|length }} flagged (risk above {{ threshold }} or a rule alert on a home or wearable reading of the
{{ alert_days }} days before {{ as_of }}). Patients with a rule alert come first, then by risk.
Keys are pseudonymous; the hospital's lookup file turns them back into patients.</p>
<table><tr><th>rank</th><th>patient key</th><th>risk</th><th>top drivers</th><th>rule alerts</th></tr>
{% for p in flagged %}<tr><td>{{ p.rank }}</td><td><a href="#{{ p.key }}">{{ p.key }}</a></td><td>{{ "%.3f"|format(p.risk) }}</td>
<td>{{ p.drivers|map(attribute="covariate")|join(", ") }}</td><td class="alert">{{ p.alerts|length or "" }}</td></tr>
{% endfor %}</table>
{% for p in flagged %}<section id="{{ p.key }}">
<h2>{{ p.rank }}. {{ p.key }}: risk {{ "%.3f"|format(p.risk) }}</h2>
<p>Top drivers: {% for d in p.drivers %}{{ d.text() }}{% if not loop.last %}, {% endif %}{% endfor %}</p>
<p>Trend (weekly means, last {{ trend_weeks }} weeks, oldest first): {{ p.trend or "no readings" }}</p>
{% if p.alerts %}<ul>{% for a in p.alerts %}<li class="alert">{{ a.text() }}</li>{% endfor %}</ul>{% endif %}
<img class="trend-chart" alt="8-week trend of {{ p.key }}" src="data:image/png;base64,{{ charts[p.key] }}">
</section>
{% endfor %}</body></html>
"""


def _render_html(patients: Sequence[PatientScore], charts: Mapping[str, str], **context: Any) -> str:
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    flagged = [p for p in patients if p.flagged]
    return environment.from_string(_HTML).render(
        flagged=flagged, charts=charts, scored=len(patients), alert_days=ALERT_DAYS, trend_weeks=TREND_WEEKS, **context
    )


def _csv(patients: Sequence[PatientScore]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_key", "risk", "rank", "flagged", "top_drivers", "trend", "rule_alerts"])
    for p in patients:
        writer.writerow([
            p.key, f"{p.risk:.6f}", p.rank, int(p.flagged), "; ".join(d.text() for d in p.drivers), p.trend,
            "; ".join(a.text() for a in p.alerts),
        ])
    return buffer.getvalue()


def _private_output(folder: Path) -> Path:
    folder = Path(folder).expanduser().resolve()
    if folder.exists():
        if not folder.is_dir():
            raise ScoringError(f"--out {folder} exists and is not a folder")
        if stat.S_IMODE(folder.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
            raise ScoringError(f"--out {folder} is open to other users; run `chmod 700 {folder}` or choose a new folder")
        return folder
    try:
        make_private_folder(folder)
        os.chmod(folder, FOLDER_MODE)
    except OSError as err:
        raise ScoringError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
    return folder


def _write_lookup(path: Path, patients: Sequence[PatientScore]) -> None:
    """Add the patients' keys to the node's lookup file (key, person_id), keeping earlier ones."""
    known: dict[str, str] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            known = {row["patient_key"]: row["person_id"] for row in csv.DictReader(handle)}
    known.update({p.key: str(p.person_id) for p in patients})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_key", "person_id"])
    writer.writerows(sorted(known.items()))
    publish(path, buffer.getvalue())


# ---------------------------------------------------------------- the whole


@contextmanager
def omop_connection(entry: DatasetEntry) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read snapshot of the dataset's OMOP tables (``clients.hospital_node.data.sources``).

    Raises
    ------
    ScoringError
        If the dataset is not an OMOP source.
    """
    from clients.hospital_node.data.sources import open_snapshot

    if entry.omop is None:
        raise ScoringError(
            f"dataset '{entry.name}' is of kind '{entry.kind}'; scoring builds its cohort from an OMOP source "
            "(register one with kind 'omop')"
        )
    with open_snapshot(entry.omop, scratch=entry.path) as snapshot:  # where training stages its snapshots too
        yield snapshot.connection


def _default_builder() -> CohortBuilder:
    from clients.hospital_node.data.cohorts import build_cohort

    return build_cohort


@dataclass(frozen=True)
class ApprovedWeights:
    """Weights read and checked against the officer's approval on one dataset, ready to score with."""

    path: Path
    dataset: str
    tensors: Mapping[str, Any]
    metadata: WeightsMetadata
    spec: Mapping[str, Any]
    approval: str  # "approved" or "expired"
    sha256: str


def approved_weights(home: NodeHome, weights: Path, *, dataset: str) -> ApprovedWeights:
    """Read `weights` and check them against the approval on `dataset` (steps 1 and 2); no patient data is read.

    Raises
    ------
    ScoringError
        Missing, corrupt or pickled weights; an unapproved spec; weights that differ
        from the approved spec (the field is named).
    DatasetNotFoundError
        If `dataset` is not registered on this node.
    """
    from models.weights import WeightsError, load_weights

    home.dataset(dataset)  # a registered dataset, or DatasetNotFoundError
    path = Path(weights).expanduser()
    try:
        tensors, metadata = load_weights(path)
    except WeightsError as err:
        raise ScoringError(str(err)) from None
    spec, status = approved_spec(home, metadata.spec_digest, dataset, carried=metadata.spec_json)
    check_weights_against_spec(metadata, spec)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ApprovedWeights(path, dataset, tensors, metadata, spec, status, digest)


def score_patients(  # noqa: PLR0913
    home: NodeHome,
    weights: Path | ApprovedWeights,
    *,
    dataset: str,
    connection: duckdb.DuckDBPyConnection,
    as_of: date | None = None,
    threshold: float = 0.2,
    out: Path | None = None,
    cohort_builder: CohortBuilder | None = None,
) -> ScoringResult:
    """Score the dataset's current patients with approved `weights`; write the CSV, the HTML and the audit entry.

    `connection` holds the dataset's OMOP views (:func:`omop_connection`); `cohort_builder`
    defaults to the node's ``build_cohort``. The module docstring says what is checked,
    computed and written.

    Raises
    ------
    ScoringError
        Bad weights, an unapproved spec, weights that differ from the approved spec or
        from what the cohort provides, a bad threshold or output folder; nothing is written.
    DatasetNotFoundError
        If `dataset` is not registered on this node.
    """
    import duckdb

    from clients.hospital_node.imaging_connector import node_secret
    from imaging.pseudonyms import Keyring

    if isinstance(threshold, bool) or not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
        raise ScoringError(f"--threshold must be a risk in [0, 1]; found {threshold!r}")
    as_of = as_of or date.today()
    approved = weights if isinstance(weights, ApprovedWeights) else approved_weights(home, weights, dataset=dataset)
    if approved.dataset != dataset:
        raise ScoringError(f"the weights were checked for dataset '{approved.dataset}', not '{dataset}'")
    tensors, metadata, status = approved.tensors, approved.metadata, approved.approval
    definition = _scoring_definition(approved.spec, as_of)

    builder = cohort_builder or _default_builder()
    try:
        table = builder(connection, definition, scoring=True)
    except duckdb.Error as err:
        raise ScoringError(f"cannot build the scoring cohort of dataset '{dataset}': {type(err).__name__}: {err}") from None
    missing = [f for f in metadata.features if f not in table.column_names]
    if missing:
        raise ScoringError(f"feature {missing[0]!r} of the weights is not a covariate the node's cohort provides; "
                           f"its columns: {', '.join(table.column_names)}")
    people = [int(p) for p in table.column("person_id").to_pylist()]
    x = _inputs(table, metadata)
    risk, drivers = _risk_and_drivers(tensors, metadata, x) if people else (np.zeros(0), [])
    readings = _readings(connection, people, as_of)
    keyring = Keyring(node_secret(home))
    slopes = {c: table.column(c).to_pylist() for c in table.column_names if c.endswith("_slope")}

    unranked = []
    for i, person in enumerate(people):
        own = readings.by_person.get(person, [])
        alerts = rule_alerts(own, as_of)
        unranked.append(PatientScore(
            key=keyring.patient_pseudonym(f"omop/{dataset}", str(person)),
            person_id=person,
            risk=float(risk[i]),
            rank=0,
            flagged=bool(alerts) or float(risk[i]) > threshold,
            drivers=drivers[i],
            trend=_trend(own, {c: v[i] for c, v in slopes.items()}, as_of),
            alerts=alerts,
        ))
    unranked.sort(key=lambda p: (not p.alerts, -p.risk, p.key))
    patients = tuple(dataclasses.replace(p, rank=n) for n, p in enumerate(unranked, start=1))

    folder = _private_output(out or home.path / SCORING_DIR / f"{dataset}-{as_of.isoformat()}")
    drawing = _Charts(as_of) if any(p.flagged for p in patients) else None
    charts = {p.key: drawing.png(readings.by_person.get(p.person_id, [])) for p in patients if p.flagged and drawing}
    html = _render_html(
        patients, charts, dataset=dataset, as_of=as_of.isoformat(), threshold=threshold,
        model_kind=metadata.model_kind, spec_digest=metadata.spec_digest,
    )
    lookup = home.path / SCORING_DIR / f"{dataset}.keys.csv"
    csv_path, html_path = folder / CSV_FILE, folder / HTML_FILE
    try:
        make_private_folder(lookup.parent)
        _write_lookup(lookup, patients)
        publish(csv_path, _csv(patients))
        publish(html_path, html)
    except OSError as err:
        raise ScoringError(f"cannot write the scores into {folder}: {err.strerror or err}") from None

    record = ScoringRecord(
        dataset=dataset,
        spec_digest=metadata.spec_digest,
        weights_sha256=approved.sha256,
        model_kind=metadata.model_kind,
        approval=status,
        as_of=as_of,
        threshold=float(threshold),
        patients_scored=len(patients),
        patients_flagged=sum(p.flagged for p in patients),
        patients_with_alerts=sum(bool(p.alerts) for p in patients),
        outputs=(str(csv_path), str(html_path)),
        lookup=str(lookup),
    )
    try:
        home.audit_log().append(ScoringRecord.KIND, record.to_payload())
    except BaseException:
        # Scores without their audit record must not stay behind (the lookup file only maps keys).
        csv_path.unlink(missing_ok=True)
        html_path.unlink(missing_ok=True)
        raise
    logger.info("scored %d patients of dataset %s (%d flagged)", record.patients_scored, dataset, record.patients_flagged)
    return ScoringResult(patients, csv_path, html_path, lookup, record)
