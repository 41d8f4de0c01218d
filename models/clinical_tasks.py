"""The alliance's clinical prediction tasks over OMOP CDM v5.4: concepts, windows, covariates.

This module is the one definition of what medfed reads from a hospital's OMOP tables and
how a task turns them into one row per unit of privacy. It is data only (no I/O): the
node's cohort builder (``clients.hospital_node.data.cohorts``) turns it into queries, the
spec validator (``experiments.spec``) checks a spec's ``[data.cohort]`` against it, the
synthetic alliance (``medfed.synth_omop``) writes rows with these concepts, and
``docs/omop_concepts.md`` lists them for people (a test keeps the two equal).

Framing, as OHDSI's PatientLevelPrediction has it: a target cohort, an index date per
row, covariates from look-back windows that end before the index date, and an outcome in
a time-at-risk window that starts after it. Windows are days relative to the index date:
``lookback_days = [-365, 0]`` reads ``[index - 365, index)``, the index day itself
excluded; ``time_at_risk_days = [1, 365]`` reads ``[index + 1, index + 365]``.

- **Onset tasks** (``hypertension_onset``, ``diabetes_onset``): index = the spec's
  calendar ``index_date`` for everyone. Target: aged 18 or more at index, an observation
  period covering the whole look-back and the index day, no record of the condition (or
  of a drug for it) at any time up to and including the index day. Outcome: the condition's first diagnosis in the
  time-at-risk. A patient without the outcome whose observation ends before the window
  does is left out (not a negative: unknown). Unit of privacy: the patient.
- **Pregnancy tasks** (``maternal_gdm_preeclampsia``, ``infant_lbw_preterm``): one row
  per mother, her first pregnancy whose index falls in the spec's ``period``; index = the
  pregnancy's start + ``index_gestation_days`` (140: 20 weeks). A pregnancy is a
  ``pregnancy`` condition row: start = estimated conception, end = delivery. Maternal
  outcome: gestational diabetes or pre-eclampsia diagnosed in the time-at-risk. Infant
  outcome: at delivery, any recorded birth weight < 2500 g or gestational age < 37 weeks
  (twins are one pregnancy: positive if either infant is). Unit of privacy: the mother;
  her later pregnancies and her twins never add a row, so one mother is one row.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

__all__ = [
    "CONCEPTS",
    "CohortDefinition",
    "CohortDefinitionError",
    "COVARIATE_KINDS",
    "Concept",
    "INDEX_GESTATION_DAYS",
    "LOW_BIRTH_WEIGHT_G",
    "PRETERM_WEEKS",
    "SIGNALS",
    "SIGNAL_SUMMARIES",
    "SLOPE_MIN_READINGS",
    "SLOPE_MIN_SPAN_DAYS",
    "Signal",
    "TASKS",
    "TYPE_DEVICE",
    "TYPE_EHR",
    "TYPE_SELF_REPORT",
    "Task",
    "cohort_problems",
    "covariates_of",
]


@dataclass(frozen=True)
class Concept:
    """A standard OMOP concept medfed reads: its id, table, name and (for values) unit."""

    name: str
    concept_id: int
    domain: str  # "condition", "measurement", "observation", "drug", "gender", "unit", "type"
    label: str  # the concept's name in the OMOP vocabulary
    vocabulary: str  # "SNOMED 38341003", "LOINC 8480-6", "RxNorm 1202", ...
    unit: str = ""  # the name of the unit concept values must carry (measurements)
    plausible: tuple[float, float] | None = None  # physiologically possible range, inclusive
    # Where the id comes from: "Athena", OHDSI's standard vocabulary, as public ETLs with
    # checked concept tables use it; "unconfirmed", the standard id we believe it is, not
    # yet seen in such a table; "local", an id in the range OHDSI reserves for local
    # concepts (above 2,000,000,000), used where the standard id could not be confirmed:
    # a hospital whose ETL wrote the standard id maps it to this one before registering.
    confirmed: str = "Athena"


def _concepts(*items: Concept) -> Mapping[str, Concept]:
    return {c.name: c for c in items}


CONCEPTS: Mapping[str, Concept] = _concepts(
    # gender
    Concept("male", 8507, "gender", "MALE", "Gender M"),
    Concept("female", 8532, "gender", "FEMALE", "Gender F"),
    # record types: where a measurement came from
    Concept("ehr", 32817, "type", "EHR", "Type Concept"),
    Concept("self_report", 32865, "type", "Patient self-report", "Type Concept"),
    Concept("device", 2000000010, "type", "Device reading (home or wearable)", "medfed local", confirmed="local"),
    # conditions
    Concept("hypertension", 320128, "condition", "Essential hypertension", "SNOMED 59621000"),
    Concept("type2_diabetes", 201826, "condition", "Type 2 diabetes mellitus", "SNOMED 44054006"),
    Concept("pregnancy", 4299535, "condition", "Pregnant", "SNOMED 77386006", confirmed="unconfirmed"),
    Concept("gestational_diabetes", 4024659, "condition", "Gestational diabetes mellitus", "SNOMED 11687002", confirmed="unconfirmed"),
    Concept("preeclampsia", 439393, "condition", "Pre-eclampsia", "SNOMED 398254007", confirmed="unconfirmed"),
    Concept("obesity", 433736, "condition", "Obesity", "SNOMED 414916001"),
    Concept("hyperlipidemia", 432867, "condition", "Hyperlipidemia", "SNOMED 55822004"),
    Concept("chronic_kidney_disease", 46271022, "condition", "Chronic kidney disease", "SNOMED 709044004", confirmed="unconfirmed"),
    # measurements: clinic, lab, home and wearable
    Concept("sbp", 3004249, "measurement", "Systolic blood pressure", "LOINC 8480-6", "mmHg", (40.0, 300.0)),
    Concept("dbp", 3012888, "measurement", "Diastolic blood pressure", "LOINC 8462-4", "mmHg", (20.0, 200.0)),
    Concept("heart_rate", 3027018, "measurement", "Heart rate", "LOINC 8867-4", "/min", (20.0, 250.0)),
    Concept("glucose", 3020491, "measurement", "Glucose [Moles/volume] in Serum or Plasma", "LOINC 14749-6",
            "mmol/L", (1.0, 45.0), confirmed="unconfirmed"),
    Concept("hba1c", 3004410, "measurement", "Hemoglobin A1c/Hemoglobin.total in Blood", "LOINC 4548-4",
            "%", (3.0, 20.0)),
    Concept("bmi", 3038553, "measurement", "Body mass index (BMI) [Ratio]", "LOINC 39156-5", "kg/m2", (10.0, 90.0)),
    Concept("body_temperature", 3020891, "measurement", "Body temperature", "LOINC 8310-5", "Cel", (30.0, 45.0)),
    Concept("steps", 2000000001, "measurement", "Number of steps in 24 hour Measured", "LOINC 41950-7",
            "/d", (0.0, 100000.0), confirmed="local"),
    Concept("sleep_hours", 2000000002, "measurement", "Sleep duration", "LOINC 93832-4", "h", (0.0, 24.0),
            confirmed="local"),
    Concept("birth_weight", 3011043, "measurement", "Birth weight Measured", "LOINC 8339-4", "g", (200.0, 7000.0)),
    # LOINC 76516-4 (concept 46234792) lies in the Observation domain; the Measurement-domain
    # standard concept for gestational age at birth is SNOMED's.
    Concept("gestational_age_at_birth", 4260747, "measurement", "Length of gestation at birth",
            "SNOMED 412726003", "wk", (20.0, 45.0)),
    # observations
    Concept("current_smoker", 4298794, "observation", "Smoker", "SNOMED 77176002", confirmed="unconfirmed"),
    Concept("family_history_hypertension", 4167217, "observation", "Family history of hypertension",
            "SNOMED 160357008", confirmed="unconfirmed"),
    # drugs (ingredients)
    Concept("amlodipine", 1332418, "drug", "amlodipine", "RxNorm 17767"),
    Concept("lisinopril", 1308216, "drug", "lisinopril", "RxNorm 29046"),
    Concept("hydrochlorothiazide", 974166, "drug", "hydrochlorothiazide", "RxNorm 5487"),
    Concept("metformin", 1503297, "drug", "metformin", "RxNorm 6809"),
    # units
    Concept("mmHg", 8876, "unit", "millimeter mercury column", "UCUM mm[Hg]"),
    Concept("/min", 8541, "unit", "per minute", "UCUM /min"),
    Concept("mmol/L", 8753, "unit", "millimole per liter", "UCUM mmol/L"),
    Concept("%", 8554, "unit", "percent", "UCUM %"),
    Concept("kg/m2", 9531, "unit", "kilogram per square meter", "UCUM kg/m2"),
    Concept("Cel", 586323, "unit", "degree Celsius", "UCUM Cel"),
    Concept("/d", 2000000003, "unit", "per day", "UCUM /d", confirmed="local"),
    Concept("h", 8505, "unit", "hour", "UCUM h"),
    Concept("g", 8504, "unit", "gram", "UCUM g"),
    Concept("wk", 8511, "unit", "week", "UCUM wk"),
)

TYPE_EHR = CONCEPTS["ehr"].concept_id
TYPE_SELF_REPORT = CONCEPTS["self_report"].concept_id
TYPE_DEVICE = CONCEPTS["device"].concept_id


@dataclass(frozen=True)
class Signal:
    """A home or wearable reading summarised over a window: device- or self-reported rows."""

    name: str  # the measurement concept's name in CONCEPTS
    threshold: float  # ``<name>_frac_above`` is the fraction of readings at or above it
    alert: tuple[float, float]  # a recent reading outside [low, high] raises a rule alert


SIGNALS: Mapping[str, Signal] = {
    s.name: s
    for s in (
        Signal("sbp", 140.0, (80.0, 180.0)),
        Signal("dbp", 90.0, (45.0, 120.0)),
        Signal("glucose", 7.8, (3.5, 16.7)),
        Signal("heart_rate", 100.0, (40.0, 130.0)),
        Signal("sleep_hours", 7.0, (3.0, 14.0)),
        Signal("steps", 7500.0, (0.0, 100000.0)),
        Signal("body_temperature", 37.5, (35.0, 38.5)),
    )
}

# Per signal, over the spec's reading window [index + start, index):
#   mean, sd (of all readings), slope (per 30 days, least squares on the reading's date; NULL
#   unless there are at least SLOPE_MIN_READINGS readings whose dates span at least
#   SLOPE_MIN_SPAN_DAYS days: two readings days apart would give hundreds of units per 30 days),
#   night_mean (readings from 00:00 to 05:59 local time), frac_above (share of readings at
#   or above the signal's threshold), days (share of the window's days with a reading:
#   adherence). A reading is in the window by its measurement_date (OMOP's required column),
#   as OHDSI FeatureExtraction windows covariates. A patient with no reading in the window
#   gets NULL for all but ``days`` (0).
SIGNAL_SUMMARIES: tuple[str, ...] = ("mean", "sd", "slope", "night_mean", "frac_above", "days")
SLOPE_MIN_READINGS = 3
SLOPE_MIN_SPAN_DAYS = 7

# Every covariate a task may name, with its kind:
#   demographic: at index; history: 1 if any record of the concept in the look-back;
#   last: the EHR value of the latest date in the look-back, the highest if that day holds
#   several (NULL if none); signal: a SIGNAL_SUMMARIES
#   value; count: how many pregnancies ended in the look-back before this one.
COVARIATE_KINDS: Mapping[str, str] = {
    "age": "demographic",
    "sex_male": "demographic",
    "history_obesity": "history",
    "history_hyperlipidemia": "history",
    "history_chronic_kidney_disease": "history",
    "history_gestational_diabetes": "history",
    "history_preeclampsia": "history",
    "history_hypertension": "history",
    "current_smoker": "history",
    "family_history_hypertension": "history",
    "bmi_last": "last",
    "hba1c_last": "last",
    "glucose_last": "last",
    "sbp_last": "last",
    "dbp_last": "last",
    "prior_pregnancies": "count",
    **{f"{s}_{summary}": "signal" for s in SIGNALS for summary in SIGNAL_SUMMARIES},
}


@dataclass(frozen=True)
class Task:
    """One prediction task: who is in it, what it predicts, and its default windows."""

    name: str
    description: str
    label: str  # the label column of the task's cohort
    outcome: tuple[str, ...]  # outcome concept names (any of them)
    exclusion: tuple[str, ...]  # a record of any of these before index leaves a patient out
    index: str  # "calendar": the spec's index_date; "gestation": pregnancy start + index_gestation_days
    lookback_days: tuple[int, int]
    reading_window_days: tuple[int, int]
    time_at_risk_days: tuple[int, int]
    unit_of_privacy: str
    covariates: tuple[str, ...]  # those it may name; excluded: covariates that would restate its target


_ALL = tuple(COVARIATE_KINDS)
_PREGNANCY_ONLY = ("prior_pregnancies", "history_gestational_diabetes", "history_preeclampsia")

TASKS: Mapping[str, Task] = {
    t.name: t
    for t in (
        Task(
            "hypertension_onset",
            "Hypertension diagnosed within a year, among adults without hypertension at index",
            "htn_onset_1y",
            ("hypertension",),
            ("hypertension", "amlodipine", "lisinopril", "hydrochlorothiazide"),
            "calendar",
            (-365, 0),
            (-90, 0),
            (1, 365),
            "the patient",
            tuple(c for c in _ALL if c not in ("history_hypertension", *_PREGNANCY_ONLY)),
        ),
        Task(
            "diabetes_onset",
            "Type 2 diabetes diagnosed within a year, among adults without diabetes at index",
            "t2d_onset_1y",
            ("type2_diabetes",),
            ("type2_diabetes", "metformin"),
            "calendar",
            (-365, 0),
            (-90, 0),
            (1, 365),
            "the patient",
            tuple(c for c in _ALL if c not in _PREGNANCY_ONLY),
        ),
        Task(
            "maternal_gdm_preeclampsia",
            "Gestational diabetes or pre-eclampsia, from data before 20 weeks' gestation",
            "gdm_or_preeclampsia",
            ("gestational_diabetes", "preeclampsia"),
            (),
            "gestation",
            (-365, 0),
            (-140, 0),
            (1, 182),
            "the mother: her first pregnancy indexed in the period; later ones and twins add no row",
            tuple(c for c in _ALL if c != "sex_male"),
        ),
        Task(
            "infant_lbw_preterm",
            "Low birth weight (< 2500 g) or preterm birth (< 37 weeks), from maternal and early-pregnancy data",
            "lbw_or_preterm",
            ("birth_weight", "gestational_age_at_birth"),
            (),
            "gestation",
            (-365, 0),
            (-140, 0),
            (1, 182),
            "the mother: her first pregnancy indexed in the period; twins are one row, positive if either infant is",
            tuple(c for c in _ALL if c != "sex_male"),
        ),
    )
}

LOW_BIRTH_WEIGHT_G = 2500.0
PRETERM_WEEKS = 37.0
INDEX_GESTATION_DAYS = 140


def covariates_of(task: str) -> tuple[str, ...]:
    """The covariates ``task`` may name, in catalogue order."""
    return TASKS[task].covariates


@dataclass(frozen=True)
class CohortDefinition:
    """What a spec's ``[data.cohort]`` asks a node to build: a task, its dates, windows, covariates.

    Build one with :meth:`from_mapping`, which reports every problem by field at once.
    ``index_date`` is for calendar tasks, ``period`` (first and last index day, inclusive)
    for pregnancy tasks; windows are ``(start, end)`` days relative to the index date as the
    module docstring says.
    """

    task: str
    covariates: tuple[str, ...]
    lookback_days: tuple[int, int]
    reading_window_days: tuple[int, int]
    time_at_risk_days: tuple[int, int]
    index_date: date | None = None
    period: tuple[date, date] | None = None
    index_gestation_days: int = INDEX_GESTATION_DAYS

    @property
    def label(self) -> str:
        """The label column of this cohort."""
        return TASKS[self.task].label

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, prefix: str = "data.cohort") -> CohortDefinition:
        """Parse and check ``raw``; raise :class:`CohortDefinitionError` listing every problem."""
        problems = cohort_problems(raw, prefix=prefix)
        if problems:
            raise CohortDefinitionError(problems)
        task = TASKS[raw["task"]]
        return cls(
            task=task.name,
            covariates=tuple(raw["covariates"]),
            lookback_days=_window(raw.get("lookback_days"), task.lookback_days),
            reading_window_days=_window(raw.get("reading_window_days"), task.reading_window_days),
            time_at_risk_days=_window(raw.get("time_at_risk_days"), task.time_at_risk_days),
            index_date=_date(raw["index_date"]) if "index_date" in raw else None,
            period=(_date(raw["period"][0]), _date(raw["period"][1])) if "period" in raw else None,
            index_gestation_days=int(raw.get("index_gestation_days", INDEX_GESTATION_DAYS)),
        )

    def to_mapping(self) -> dict[str, Any]:
        """The canonical mapping (ISO dates, lists), as a signed spec carries it."""
        out: dict[str, Any] = {
            "task": self.task,
            "covariates": list(self.covariates),
            "lookback_days": list(self.lookback_days),
            "reading_window_days": list(self.reading_window_days),
            "time_at_risk_days": list(self.time_at_risk_days),
        }
        if self.index_date is not None:
            out["index_date"] = self.index_date.isoformat()
        if self.period is not None:
            out["period"] = [d.isoformat() for d in self.period]
        if TASKS[self.task].index == "gestation":
            out["index_gestation_days"] = self.index_gestation_days
        return out


class CohortDefinitionError(ValueError):
    """A ``[data.cohort]`` table that names no known task, bad dates, or overlapping windows."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field} {message}" for field, message in problems))


_COHORT_KEYS = (
    "task", "covariates", "index_date", "period", "index_gestation_days",
    "lookback_days", "reading_window_days", "time_at_risk_days",
)


def _date(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _window(value: object, default: tuple[int, int]) -> tuple[int, int]:
    return default if value is None else (int(value[0]), int(value[1]))  # type: ignore[index]


def _date_problem(value: object) -> str | None:
    if isinstance(value, date) and not isinstance(value, datetime):
        return None
    if isinstance(value, str):
        try:
            date.fromisoformat(value)
            return None
        except ValueError:
            pass
    return f"must be a date (YYYY-MM-DD); found {value!r}"


def _window_problem(value: object) -> str | None:
    if (
        isinstance(value, (list, tuple)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] <= value[1] and all(abs(v) <= 3650 for v in value)
    ):
        return None
    return f"must be [start, end], whole days from the index date with start <= end, within 3650; found {value!r}"


def cohort_problems(raw: Mapping[str, Any], *, prefix: str = "data.cohort") -> list[tuple[str, str]]:
    """Every problem of a ``[data.cohort]`` mapping, as ``(field, message)`` pairs."""
    if not isinstance(raw, Mapping):
        return [(prefix, f"must be a table; found {type(raw).__name__}")]
    problems: list[tuple[str, str]] = []
    for key in raw:
        if key not in _COHORT_KEYS:
            close = difflib.get_close_matches(str(key), _COHORT_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_COHORT_KEYS)}"
            problems.append((f"{prefix}.{key}", f"is not a known key{hint}"))
    name = raw.get("task")
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        problems.append((f"{prefix}.task", f"must be one of {', '.join(map(repr, TASKS))}; found {name!r}"))
    covariates = raw.get("covariates")
    if not isinstance(covariates, (list, tuple)) or not all(isinstance(c, str) for c in covariates):
        problems.append((f"{prefix}.covariates", f"must be a list of covariate names; found {covariates!r}"))
    else:
        repeated = sorted({c for c in covariates if covariates.count(c) > 1})
        if repeated:
            problems.append((f"{prefix}.covariates", f"lists {', '.join(map(repr, repeated))} more than once"))
        if task is not None:
            unknown = [c for c in covariates if c not in task.covariates]
            if unknown:
                problems.append((
                    f"{prefix}.covariates",
                    f"names {', '.join(map(repr, unknown))}, which task {task.name!r} cannot provide; "
                    f"it provides: {', '.join(task.covariates)}",
                ))
    windows = {}
    for key in ("lookback_days", "reading_window_days", "time_at_risk_days"):
        if key in raw:
            problem = _window_problem(raw[key])
            if problem:
                problems.append((f"{prefix}.{key}", problem))
            else:
                windows[key] = tuple(raw[key])
        elif task is not None:
            windows[key] = getattr(task, key)
    for key in ("lookback_days", "reading_window_days"):
        if key in windows and windows[key][1] > 0:
            problems.append((f"{prefix}.{key}", f"must end on or before the index day (end <= 0): covariates come "
                                                f"only from before the index date; found {list(windows[key])}"))
    if "time_at_risk_days" in windows:
        tar = windows["time_at_risk_days"]
        if tar[0] < 1:
            problems.append((f"{prefix}.time_at_risk_days", f"must start after the index day (start >= 1); found {list(tar)}"))
    if task is not None and task.index == "calendar":
        if "index_date" not in raw:
            problems.append((f"{prefix}.index_date", f"is required for task {task.name!r} (the calendar index date)"))
        for key in ("period", "index_gestation_days"):
            if key in raw:
                problems.append((f"{prefix}.{key}", f"applies only to pregnancy tasks, not {task.name!r}"))
    if task is not None and task.index == "gestation":
        if "period" not in raw:
            problems.append((f"{prefix}.period", f"is required for task {task.name!r}: [first, last] index date"))
        if "index_date" in raw:
            problems.append((f"{prefix}.index_date", f"applies only to calendar tasks; {task.name!r} uses period"))
        days = raw.get("index_gestation_days", INDEX_GESTATION_DAYS)
        if not isinstance(days, int) or isinstance(days, bool) or not 28 <= days <= 182:
            problems.append((f"{prefix}.index_gestation_days", f"must be whole days from 28 to 182; found {days!r}"))
    if "index_date" in raw and (problem := _date_problem(raw["index_date"])):
        problems.append((f"{prefix}.index_date", problem))
    if "period" in raw:
        period = raw["period"]
        if not isinstance(period, (list, tuple)) or len(period) != 2:
            problems.append((f"{prefix}.period", f"must be [first, last] dates; found {period!r}"))
        else:
            bad = [p for p in (_date_problem(v) for v in period) if p]
            if bad:
                problems.append((f"{prefix}.period", bad[0]))
            elif _date(period[0]) > _date(period[1]):
                problems.append((f"{prefix}.period", f"must not end before it starts; found {list(map(str, period))}"))
    return problems
