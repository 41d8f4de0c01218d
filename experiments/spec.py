"""The experiment spec: what a research partner asks the alliance to run, validated once.

A spec is a TOML file with five tables, six for an imaging task::

    [experiment]  name, task, description, mlflow_experiment
    [data]        dataset; for a tabular task also features, label, scaling
    [imaging]     imaging tasks only: modalities, body_parts, series_description, size,
                  intensity, window | window_center + window_width, projection
    [model]       kind, hidden (mlp), channels (cnn)
    [federation]  strategy, rounds, min_nodes, local_epochs, learning_rate, proximal_mu,
                  server_learning_rate, node_wait_seconds, approval_wait_seconds,
                  round_timeout_seconds, round_deadline_seconds, fraction_per_round,
                  secure_aggregation, secagg_num_shares, secagg_reconstruction_threshold
    [privacy]     delta, max_grad_norm, sample_rate, noise_multiplier | target_epsilon,
                  accountant, min_cohort_size

:meth:`ExperimentSpec.from_toml` and :meth:`ExperimentSpec.from_mapping` are the only
ways in. They report every problem at once, by field (unknown keys with a "did you
mean", missing keys, wrong types, out-of-range values, rules between fields), as one
:class:`~experiments.errors.SpecError`. The result is frozen; :meth:`canonical_json` is
the spec as the system understands it (every default filled) and :meth:`digest` its
SHA-256, which is what a hospital's officer approves.

The task decides which tables and keys apply: ``tabular-classification`` trains a
logistic or MLP model on the named feature columns; ``imaging-classification`` trains a
CNN on one preprocessed image per patient, selected and preprocessed as ``[imaging]``
says, and its labels come from the node's registration, not from the spec. A key that
belongs to the other task is a problem, not silently ignored. Keys that only one task
has are left out of the canonical JSON of the other, so adding the imaging task left
the digest of every tabular spec unchanged; keys added later are likewise left out while
at their default (``_LATER_KEYS``).

The counts that multiply into the cost of accounting (rounds, local epochs, steps per
round and in all, the smallest sample rate and delta, the largest epsilon) stay within
:mod:`privacy.limits`, which the nodes enforce again on their own.

Types are strict where a TOML slip would change meaning: a boolean is never an
integer or a number, and a string is never a number. An integer is accepted wherever a
number is (``learning_rate = 1``) and becomes a float, so it digests like ``1.0``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from experiments.errors import SpecError
from models.clinical_tasks import TASKS as CLINICAL_TASKS
from models.clinical_tasks import CohortDefinition, cohort_problems
from privacy import limits
from privacy.accountant import epsilon_bound, steps_per_epoch
from privacy.events import DPEvent
from privacy.query import STUDY_KIND

__all__ = [
    "ACCOUNTANTS",
    "DataSection",
    "ExperimentSection",
    "ExperimentSpec",
    "FederationSection",
    "IMAGING_TASK",
    "ImagingSection",
    "MODEL_KINDS",
    "MODEL_KINDS_BY_TASK",
    "ModelSection",
    "PrivacySection",
    "STRATEGIES",
    "TABULAR_TASK",
    "TASKS",
    "WINDOW_PRESETS",
    "canonical_json",
    "read_toml",
]

TABULAR_TASK = "tabular-classification"
IMAGING_TASK = "imaging-classification"
Task = Literal["tabular-classification", "imaging-classification"]  # federation.protocol.TASKS too
ModelKind = Literal["logistic", "mlp", "cnn"]
Strategy = Literal["fedavg", "fedprox", "fedadam"]
Accountant = Literal["prv", "rdp"]  # privacy.accountant.ACCOUNTANTS; a test keeps them equal
# imaging.preprocess.WINDOW_PRESETS plus "voi" (the image's own window); a test keeps them equal.
WindowPreset = Literal[
    "abdomen", "bone", "brain", "liver", "lung", "mediastinum", "soft_tissue", "stroke", "subdural", "voi"
]
Intensity = Literal["window", "minmax", "zscore"]
Projection = Literal["mip", "middle"]

TASKS: tuple[str, ...] = get_args(Task)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
MODEL_KINDS_BY_TASK: dict[str, tuple[str, ...]] = {TABULAR_TASK: ("logistic", "mlp"), IMAGING_TASK: ("cnn",)}
WINDOW_PRESETS: tuple[str, ...] = get_args(WindowPreset)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

_NAME_CHARS = "letters, digits, '_', '.' and '-'"

Text = Annotated[str, Strict(), Field(min_length=1)]
Name = Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(ge=1)]
Flag = Annotated[bool, Strict()]
ImageSize = Annotated[int, Strict(), Field(ge=8, le=512)]
WindowWidth = Annotated[float, Strict(), Field(ge=1, allow_inf_nan=False)]

_DEFAULT_CHANNELS = (8, 16)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        problems = self.table_problems(self.model_dump())
        if problems:
            raise PydanticCustomError("cross_field", "; ".join(message for _, message in problems))
        return self

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems between fields of this table in `raw`, as (key, message) pairs.

        Rules read a plain mapping so that ``from_mapping`` can apply them to the raw
        input even when another field of the same table is invalid (pydantic skips
        after-validators then), and so report every problem at once.
        """
        return []


class ExperimentSection(_Table):
    """``[experiment]``: what the run is called and which kind of task it is."""

    name: Name
    task: Task
    description: Annotated[str, Strict()] = ""
    mlflow_experiment: Text | None = None  # defaults to `name`

    @model_validator(mode="before")
    @classmethod
    def _default_mlflow_experiment(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("mlflow_experiment") is None and isinstance(data.get("name"), str):
            return {**data, "mlflow_experiment": data["name"]}
        return data


class DataSection(_Table):
    """``[data]``: the dataset each node must have registered and, if tabular, its columns.

    ``features`` and ``label`` are required for a tabular task and refused for an imaging
    one (a rule of :class:`ExperimentSpec`).
    """

    dataset: Text
    features: Annotated[tuple[Text, ...], Field(min_length=1)] | None = None
    label: Text | None = None
    scaling: dict[Text, tuple[Number, Positive]] = Field(default_factory=dict)
    # A cohort the node builds from an OMOP source (models.clinical_tasks): the task, its
    # dates and windows; its covariates are `features`. Kept in canonical form (ISO dates,
    # every window filled) so that the signed spec says exactly what each node builds.
    cohort: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _canonical_cohort(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("cohort"), Mapping) or "covariates" in raw["cohort"]:
            return raw
        try:
            definition = CohortDefinition.from_mapping({**raw["cohort"], "covariates": list(raw.get("features") or ())})
        except (ValueError, TypeError, KeyError, IndexError):
            return raw  # table_problems reports it, by field
        canonical = definition.to_mapping()
        del canonical["covariates"]
        return {**raw, "cohort": canonical}

    @field_validator("features")
    @classmethod
    def _features_unique(cls, features: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if features is None:
            return None
        repeated = sorted({f for f in features if features.count(f) > 1})
        if repeated:
            raise PydanticCustomError(
                "duplicate", "lists {repeated} more than once", {"repeated": ", ".join(map(repr, repeated))}
            )
        return features

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        features = raw.get("features")
        if not isinstance(features, (list, tuple)) or not features or not all(isinstance(f, str) for f in features):
            return []  # the field itself is reported; comparing against it would only add noise
        problems = []
        label = raw.get("label")
        if isinstance(label, str) and label in features:
            problems.append(("label", f"data.label {label!r} must not also be one of data.features"))
        if raw.get("cohort") is not None:
            problems += cls._cohort_problems(raw, features)
        scaling = raw.get("scaling")
        if isinstance(scaling, Mapping):
            for key in scaling:
                if isinstance(key, str) and key not in features:
                    problems.append(
                        ("scaling", f"data.scaling.{key} is not one of data.features{_did_you_mean(key, features)}")
                    )
        return problems

    @staticmethod
    def _cohort_problems(raw: Mapping[str, Any], features: Sequence[str]) -> list[tuple[str, str]]:
        """A cohort's own problems (its covariates are data.features), its label, and its scaling."""
        cohort = raw["cohort"]
        if not isinstance(cohort, Mapping):
            return [("cohort", f"data.cohort must be a table; found {_show(cohort)}")]
        if "covariates" in cohort:
            return [("cohort", "data.cohort.covariates is not a key: a cohort's covariates are data.features")]
        problems = []
        for field, message in cohort_problems({**cohort, "covariates": list(features)}):
            field = "data.features" if field == "data.cohort.covariates" else field
            problems.append(("cohort", f"{field} {message}"))
        task = CLINICAL_TASKS.get(cohort.get("task")) if isinstance(cohort.get("task"), str) else None
        if task is not None and raw.get("label") != task.label:
            problems.append(("label", f"data.label must be {task.label!r}, the label of task {task.name!r}; "
                                      f"found {raw.get('label')!r}"))
        scaling = raw.get("scaling") if isinstance(raw.get("scaling"), Mapping) else {}
        unscaled = [f for f in features if f not in scaling]
        if unscaled:
            problems.append(("scaling", f"data.scaling needs (center, scale) for every covariate of a cohort, "
                                        f"the center also standing in for a missing value; missing: {', '.join(unscaled)}"))
        return problems


class ImagingSection(_Table):
    """``[imaging]``: which series make a patient's image, and how it becomes model input.

    Each node selects, per patient, one series whose modality, body part and description
    match; reduces it to one 2-D image (``mip``: the maximum over its slices, so a
    finding on any slice shows; ``middle``: its middle slice); maps intensities
    (``window`` through a preset, ``voi`` or ``window_center``/``window_width`` in
    modality units such as HU; ``minmax`` or ``zscore`` per image); and resamples it to
    ``size`` x ``size``.
    """

    modalities: Annotated[tuple[Text, ...], Field(min_length=1)]
    body_parts: Annotated[tuple[Text, ...], Field(min_length=1)] | None = None  # any
    series_description: Text | None = None  # a regular expression, case-insensitive
    size: ImageSize = 32
    intensity: Intensity = "minmax"
    window: WindowPreset | None = None
    window_center: Number | None = None
    window_width: WindowWidth | None = None
    projection: Projection = "mip"

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        pattern = raw.get("series_description")
        if isinstance(pattern, str) and pattern:
            import re2

            options = re2.Options()
            options.log_errors = False
            try:
                re2.compile(pattern, options)
            except re2.error as err:
                reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
                problems.append(
                    ("series_description", f"imaging.series_description is not a valid regular expression (RE2 syntax, "
                     f"which nodes match in linear time): {reason}")
                )
        intensity = raw.get("intensity", "minmax")
        given = [key for key in ("window", "window_center", "window_width") if raw.get(key) is not None]
        if intensity == "window":
            pair = [key for key in given if key != "window"]
            if not given:
                problems.append((
                    "window",
                    "imaging.intensity = 'window' needs imaging.window (a preset or 'voi') or "
                    "imaging.window_center and imaging.window_width",
                ))
            elif "window" in given and pair:
                problems.append((
                    "window",
                    f"imaging.window and imaging.{pair[0]} are both set; give a preset or a "
                    "centre and width, not both",
                ))
            elif len(pair) == 1:
                missing = "window_width" if pair[0] == "window_center" else "window_center"
                problems.append((missing, f"imaging.{pair[0]} needs imaging.{missing} too"))
        elif intensity in get_args(Intensity) and given:
            problems.append((
                given[0],
                f"imaging.{given[0]} applies only when imaging.intensity = 'window'; found {_show(intensity)}",
            ))
        return problems


class ModelSection(_Table):
    """``[model]``: the model every node trains."""

    kind: ModelKind
    hidden: Annotated[tuple[Count, ...], Field(min_length=1)] = (32, 16)  # mlp only
    channels: Annotated[tuple[Count, ...], Field(min_length=1)] | None = None  # cnn only

    @model_validator(mode="before")
    @classmethod
    def _default_channels(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("kind") == "cnn" and data.get("channels") is None:
            return {**data, "channels": _DEFAULT_CHANNELS}
        return data

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        kind = raw.get("kind")
        if raw.get("channels") is not None and isinstance(kind, str) and kind in MODEL_KINDS and kind != "cnn":
            return [("channels", f"model.channels applies only to model.kind = 'cnn'; found kind {kind!r}")]
        return []


class FederationSection(_Table):
    """``[federation]``: rounds, aggregation strategy and how long to wait for nodes."""

    strategy: Strategy = "fedavg"
    rounds: Annotated[int, Strict(), Field(ge=1, le=limits.MAX_ROUNDS)]
    min_nodes: Count = 2
    local_epochs: Annotated[int, Strict(), Field(ge=1, le=limits.MAX_LOCAL_EPOCHS)] = 1
    learning_rate: Positive = 0.1
    proximal_mu: NonNegative = 0.0  # FedProx only; must then be > 0
    server_learning_rate: Positive = 0.1  # FedAdam's eta
    node_wait_seconds: Positive = 120.0
    approval_wait_seconds: Positive = 3600.0  # how long to wait for the officers' approvals
    round_timeout_seconds: Positive = 600.0
    # Node sampling (README, "Sampling and deadlines"): each node trains, and is charged
    # for, exactly ceil(fraction_per_round x rounds) rounds, drawn by the coordinator
    # before the run and carried in each node's query; 1.0 is every node every round.
    fraction_per_round: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    # How long a train wave waits for replies; later ones are left out of the round's
    # aggregate (the node was charged: the report lists them as late). Unset: round_timeout_seconds.
    round_deadline_seconds: Positive | None = None
    # SecAgg+ (Flower's SecAggPlusWorkflow): the coordinator sees only the sum of the
    # updates. Each node's private-key shares go to `secagg_num_shares` nodes (default:
    # every node of the round); `secagg_reconstruction_threshold` of them (default: a
    # majority) recover a node that drops out, and no fewer can unmask anything.
    secure_aggregation: Flag = False
    secagg_num_shares: Annotated[int, Strict(), Field(ge=3)] | None = None
    secagg_reconstruction_threshold: Annotated[int, Strict(), Field(ge=2)] | None = None

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        mu = raw.get("proximal_mu", 0.0)
        if raw.get("strategy") == "fedprox" and _is_number(mu) and mu == 0:
            found = "0 (the default)" if "proximal_mu" not in raw else _show(mu)
            problems.append(("proximal_mu", f"federation.proximal_mu must be > 0 when strategy = 'fedprox'; found {found}"))
        deadline, timeout = raw.get("round_deadline_seconds"), raw.get("round_timeout_seconds", 600.0)
        if _is_number(deadline) and _is_number(timeout) and 0 < timeout < deadline:
            problems.append((
                "round_deadline_seconds",
                f"federation.round_deadline_seconds must be <= federation.round_timeout_seconds ({_show(timeout)}); "
                f"found {_show(deadline)}; a round never waits longer than its timeout",
            ))
        return problems + _secagg_problems(raw)

    @property
    def deadline_seconds(self) -> float:
        """How long a train wave waits for replies: the deadline, or the round timeout when none is set."""
        return self.round_deadline_seconds if self.round_deadline_seconds is not None else self.round_timeout_seconds

    @property
    def rounds_per_node(self) -> int:
        """The rounds each node trains and is charged for: ``ceil(fraction_per_round x rounds)``."""
        return limits.rounds_per_node(self.rounds, self.fraction_per_round)


def _secagg_problems(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The rules of secure aggregation between the keys of ``[federation]``."""
    secure = raw.get("secure_aggregation", False)
    shares, threshold = raw.get("secagg_num_shares"), raw.get("secagg_reconstruction_threshold")
    min_nodes = raw.get("min_nodes", 2)
    if secure is not True:
        return [
            (key, f"federation.{key} applies only when federation.secure_aggregation = true")
            for key in ("secagg_num_shares", "secagg_reconstruction_threshold")
            if raw.get(key) is not None
        ]
    problems = []
    strategy = raw.get("strategy", "fedavg")
    if strategy in STRATEGIES and strategy != "fedavg":
        problems.append((
            "strategy",
            f"federation.secure_aggregation = true works with strategy = 'fedavg' only; found {_show(strategy)} "
            "(SecAgg+ reveals only the weighted sum of the updates, which FedAvg alone aggregates)",
        ))
    min_ok = _is_int(min_nodes) and min_nodes >= 1
    if min_ok and min_nodes < 2:
        problems.append(("min_nodes", f"federation.min_nodes must be >= 2 with secure aggregation; found {min_nodes}"))
    if _is_int(shares) and shares >= 3 and min_ok and shares > min_nodes:
        problems.append((
            "secagg_num_shares",
            f"federation.secagg_num_shares must be <= federation.min_nodes ({min_nodes}), the fewest nodes a round "
            f"may have; found {shares}",
        ))
    if _is_int(threshold) and threshold >= 2:
        if _is_int(shares) and shares >= 3:
            if threshold >= shares:
                problems.append((
                    "secagg_reconstruction_threshold",
                    f"federation.secagg_reconstruction_threshold must be < federation.secagg_num_shares ({shares}) "
                    f"so that a node may drop out; found {threshold}",
                ))
        elif shares is None and min_ok and threshold >= min_nodes:
            problems.append((
                "secagg_reconstruction_threshold",
                f"federation.secagg_reconstruction_threshold must be < federation.min_nodes ({min_nodes}) when "
                f"every node of a round holds a share (secagg_num_shares unset); found {threshold}",
            ))
    return problems


class PrivacySection(_Table):
    """``[privacy]``: DP-SGD at each node; exactly one of noise_multiplier or target_epsilon."""

    delta: Annotated[float, Strict(), Field(ge=limits.MIN_DELTA, lt=1, allow_inf_nan=False)]
    max_grad_norm: Positive = 1.0
    sample_rate: Annotated[float, Strict(), Field(ge=limits.MIN_SAMPLE_RATE, le=1, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Strict(), Field(ge=limits.MIN_NOISE_MULTIPLIER, allow_inf_nan=False)] | None = None
    target_epsilon: Annotated[float, Strict(), Field(gt=0, le=limits.MAX_EPSILON, allow_inf_nan=False)] | None = None  # per site, for this experiment
    accountant: Accountant = "prv"
    min_cohort_size: Count | None = None  # tightens each node's policy, never loosens it
    # Each site's training-set size, released once per run (discrete Laplace, this epsilon,
    # composed on top of the DP-SGD rounds) and reused to weight every round.
    count_epsilon: Annotated[float, Strict(), Field(gt=0, le=limits.MAX_COUNT_EPSILON, allow_inf_nan=False)] = (
        limits.DEFAULT_COUNT_EPSILON
    )
    # Each site's validation scores of the final model, released as a histogram by label
    # (discrete Laplace, this epsilon) for the site's and the pooled AUC and calibration;
    # with evaluate_every_round also those of the model each round starts from, every round.
    evaluation_epsilon: Annotated[
        float, Strict(), Field(gt=0, le=limits.MAX_EVALUATION_EPSILON, allow_inf_nan=False)
    ] = limits.DEFAULT_EVALUATION_EPSILON
    evaluate_every_round: Annotated[bool, Strict()] = False

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        noise, target = raw.get("noise_multiplier"), raw.get("target_epsilon")
        if noise is not None and target is not None:
            return [(
                "noise_multiplier",
                "privacy.noise_multiplier and privacy.target_epsilon are both set; keep exactly one "
                "(the noise is derived from the target)",
            )]
        if noise is None and target is None:
            return [(
                "noise_multiplier",
                "privacy needs exactly one of noise_multiplier or target_epsilon; found neither",
            )]
        return []


class ExperimentSpec(_Table):
    """A validated, frozen experiment spec. Build it with :meth:`from_toml` or :meth:`from_mapping`."""

    experiment: ExperimentSection
    data: DataSection
    imaging: ImagingSection | None = None
    model: ModelSection
    federation: FederationSection
    privacy: PrivacySection

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [(".".join(loc), message) for loc, message in _task_problems(raw) + _schedule_problems(raw)]

    @classmethod
    def from_toml(cls, path: Path | str) -> ExperimentSpec:
        """Read and validate the spec in the TOML file at `path`.

        Raises
        ------
        SpecError
            The file cannot be read, is not TOML (the message gives the line), or has
            problems; every problem is listed.
        """
        return cls.from_mapping(read_toml(path), source=str(path))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "<mapping>") -> ExperimentSpec:
        """Validate a spec given as nested mappings (TOML tables, parsed JSON).

        Raises
        ------
        SpecError
            Listing every problem, named ``table.key``.
        """
        if not isinstance(mapping, Mapping):
            raise SpecError(source, [f"a spec must be a table of tables; found {_show(mapping)}"])
        if mapping.get("kind") == STUDY_KIND:
            # A signed statistics spec is never read as an experiment, nor the other way round.
            raise SpecError(source, [f"this is a statistics spec (kind = {STUDY_KIND!r}); use `medfed study` for it"])
        try:
            return cls.model_validate(dict(mapping))
        except ValidationError as err:
            raise SpecError(source, _problems(err, mapping)) from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "<json>") -> ExperimentSpec:
        """Validate a spec given as JSON, such as :meth:`canonical_json` wrote."""
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(source, [f"not valid JSON: {err}"]) from None
        return cls.from_mapping(mapping, source=source)

    def to_mapping(self) -> dict[str, Any]:
        """The spec as plain JSON-compatible tables, every default filled.

        Keys of the other task (``[imaging]`` for a tabular spec; ``data.features``,
        ``data.label`` and ``model.channels`` where they do not apply) are left out.
        """
        mapping = self.model_dump(mode="json")
        if mapping["imaging"] is None:
            del mapping["imaging"]
        for table, key in _TASK_SPECIFIC_KEYS:
            if mapping[table][key] is None:
                del mapping[table][key]
        for (table, key), default in _LATER_KEYS.items():
            if mapping[table][key] == default:
                del mapping[table][key]
        return mapping

    def secure_aggregation_summary(self) -> str:
        """One line on how the updates are combined, for `medfed experiment validate` and `cost`."""
        fed = self.federation
        if not fed.secure_aggregation:
            return "off (the coordinator sees each site's DP-noised update)"
        shares = f"{fed.secagg_num_shares} nodes" if fed.secagg_num_shares else "every node of the round"
        threshold = (
            str(fed.secagg_reconstruction_threshold) if fed.secagg_reconstruction_threshold else "a majority of the shares"
        )
        return f"SecAgg+ (key shares to {shares}, reconstruction threshold {threshold}; the coordinator sees only the sum)"

    def canonical_json(self) -> str:
        """The spec as the system understands it: sorted keys, no whitespace, all defaults."""
        return canonical_json(self.to_mapping())

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_json`; what approvals and signatures refer to."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


def read_toml(path: Path | str) -> dict[str, Any]:
    """The tables of the spec file at `path`, for any kind of spec.

    Raises
    ------
    SpecError
        The file cannot be read, is not UTF-8, or is not TOML (the message gives the line).
    """
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise SpecError(source, [f"cannot read the file: {err.strerror or err}"]) from None
    except UnicodeDecodeError as err:
        raise SpecError(source, [f"not UTF-8 text (byte {err.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(source, [f"not valid TOML: {err}"]) from None


def canonical_json(mapping: Mapping[str, Any]) -> str:
    """A spec's tables as canonical JSON: sorted keys, no whitespace, ASCII, no NaN.

    Every kind of spec (experiment, statistics study) is signed, approved and digested
    through this one form.
    """
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


_TABLES: dict[str, type[_Table]] = {
    "experiment": ExperimentSection,
    "data": DataSection,
    "imaging": ImagingSection,
    "model": ModelSection,
    "federation": FederationSection,
    "privacy": PrivacySection,
}
_TABLE_ORDER = list(_TABLES)
_TASK_SPECIFIC_KEYS = (("data", "features"), ("data", "label"), ("model", "channels"))
# Keys added after specs were first approved: left out of the canonical form while at
# their default, so the digest (and every approval of it) of an older spec stays the same.
_LATER_KEYS: dict[tuple[str, str], object] = {
    ("federation", "approval_wait_seconds"): 3600.0,
    ("privacy", "min_cohort_size"): None,
    ("data", "cohort"): None,
    ("privacy", "count_epsilon"): limits.DEFAULT_COUNT_EPSILON,
    ("privacy", "evaluation_epsilon"): limits.DEFAULT_EVALUATION_EPSILON,
    ("privacy", "evaluate_every_round"): False,
    ("federation", "secure_aggregation"): False,
    ("federation", "secagg_num_shares"): None,
    ("federation", "secagg_reconstruction_threshold"): None,
    ("federation", "fraction_per_round"): 1.0,
    ("federation", "round_deadline_seconds"): None,
}


# ---------------------------------------------------------------- rules between tables


def _task_problems(raw: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """What the task requires or refuses of the other tables, as (location, message) pairs."""
    experiment = raw.get("experiment")
    task = experiment.get("task") if isinstance(experiment, Mapping) else None
    if not isinstance(task, str) or task not in TASKS:
        return []  # the task itself is reported; what it implies cannot be judged
    data = raw.get("data") if isinstance(raw.get("data"), Mapping) else None
    model = raw.get("model") if isinstance(raw.get("model"), Mapping) else None
    imaging = raw.get("imaging")
    problems: list[tuple[tuple[str, ...], str]] = []
    if task == TABULAR_TASK:
        if data is not None:
            problems += [(("data", key), f"data.{key} is required") for key in ("features", "label") if data.get(key) is None]
        if imaging is not None:
            problems.append(
                (("imaging",), f"[imaging] applies only to experiment.task = '{IMAGING_TASK}'; found {_show(task)}")
            )
    else:
        if imaging is None:
            problems.append((("imaging",), f"the [imaging] table is required for experiment.task = '{IMAGING_TASK}'"))
        if data is not None:
            for key in ("features", "label", "scaling", "cohort"):
                if data.get(key):
                    problems.append((
                        ("data", key),
                        f"data.{key} applies only to experiment.task = '{TABULAR_TASK}'; an imaging "
                        "dataset's inputs are its images and its labels are registered on each node",
                    ))
    kind = model.get("kind") if model is not None else None
    allowed = MODEL_KINDS_BY_TASK[task]
    if isinstance(kind, str) and kind in MODEL_KINDS and kind not in allowed:
        choices = f"one of {', '.join(map(repr, allowed))}" if len(allowed) > 1 else repr(allowed[0])
        problems.append(
            (("model", "kind"), f"model.kind {kind!r} does not fit experiment.task = {task!r}; use {choices}")
        )
    if task == IMAGING_TASK and isinstance(imaging, Mapping) and kind == "cnn":
        size = imaging.get("size", 32)
        channels = model.get("channels") if model is not None else None
        channels = _DEFAULT_CHANNELS if channels is None else channels
        if _is_int(size) and isinstance(channels, (list, tuple)) and channels and size >= 8:
            factor = 2 ** len(channels)
            if size % factor:
                problems.append((
                    ("imaging", "size"),
                    f"imaging.size must be a multiple of {factor} (each of the {len(channels)} "
                    f"model.channels blocks halves the image); found {size}",
                ))
    return problems


def _schedule_problems(raw: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """The limits on what the fields multiply into: steps per round, steps in all, epsilon.

    Judged only when each field is valid on its own (that field is reported otherwise).
    """
    federation = raw.get("federation") if isinstance(raw.get("federation"), Mapping) else {}
    privacy = raw.get("privacy") if isinstance(raw.get("privacy"), Mapping) else {}
    rounds, epochs = federation.get("rounds"), federation.get("local_epochs", 1)
    rate, delta, noise = privacy.get("sample_rate"), privacy.get("delta"), privacy.get("noise_multiplier")
    if not (
        _is_int(rounds) and 1 <= rounds <= limits.MAX_ROUNDS
        and _is_int(epochs) and 1 <= epochs <= limits.MAX_LOCAL_EPOCHS
        and _is_number(rate) and limits.MIN_SAMPLE_RATE <= rate <= 1
    ):
        return []
    per_epoch = steps_per_epoch(rate)
    per_round = epochs * per_epoch
    if per_round > limits.MAX_STEPS_PER_ROUND:
        return [(
            ("federation", "local_epochs"),
            f"federation.local_epochs x steps per epoch (1 / privacy.sample_rate = {per_epoch}) must be <= "
            f"{limits.MAX_STEPS_PER_ROUND} DP-SGD steps per round; found {per_round}; lower local_epochs or raise the sample rate",
        )]
    total = rounds * per_round
    if total > limits.MAX_TOTAL_STEPS:
        return [(
            ("federation", "rounds"),
            f"federation.rounds x steps per round ({per_round}) must be <= {limits.MAX_TOTAL_STEPS} DP-SGD steps "
            f"in all; found {total}; lower rounds or local_epochs, or raise the sample rate",
        )]
    if not (
        _is_number(noise) and math.isfinite(noise) and noise >= limits.MIN_NOISE_MULTIPLIER
        and _is_number(delta) and limits.MIN_DELTA <= delta < 1
    ):
        return []
    bound = epsilon_bound([DPEvent(noise, rate, total)], delta=delta)
    if bound > limits.MAX_EPSILON:
        return [(
            ("privacy", "noise_multiplier"),
            f"privacy.noise_multiplier must keep the experiment's epsilon (RDP bound at privacy.delta) <= "
            f"{limits.MAX_EPSILON:g}; found {_show(noise)}, which gives {bound:.4g}; raise the noise or lower "
            "rounds, local_epochs or the sample rate",
        )]
    return []


# ---------------------------------------------------------------- problems, by field


def _problems(err: ValidationError, raw: Mapping[str, Any]) -> list[str]:
    """Every problem in `raw`: pydantic's field errors plus the rules between fields."""
    found: list[tuple[tuple[Any, ...], str]] = []
    unknown: dict[tuple[Any, ...], str] = {}  # location of the typo -> the key it suggests
    for error in err.errors():
        loc = tuple(error["loc"])
        if error["type"] == "cross_field":
            continue  # recomputed on the raw input below, with one message per rule
        if error["type"] == "extra_forbidden":
            suggestion = _suggest(loc)
            if suggestion:
                unknown[loc[:-1] + (suggestion,)] = str(loc[-1])
        found.append((loc, _message(loc, error, raw)))
    # A typo and the key it was meant to be are one problem, not two.
    found = [(loc, msg) for loc, msg in found if not (msg.endswith(" is required") and loc in unknown)]
    for table, model in _TABLES.items():
        section = raw.get(table)
        if isinstance(section, Mapping):
            found.extend(((table, key), message) for key, message in model.table_problems(section))
    found.extend(_task_problems(raw))
    found.extend(_schedule_problems(raw))
    found.sort(key=lambda item: _order(item[0]))
    return list(dict.fromkeys(message for _, message in found))


def _message(loc: tuple[Any, ...], error: Any, raw: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    where = _path(loc)
    value = _lookup(raw, loc)
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        if len(loc) == 1:
            return f"the [{loc[0]}] table is required"
        if len(loc) == 4 and loc[:2] == ("data", "scaling"):
            return f"data.scaling.{loc[2]} must be a pair [center, scale]; found {_show(_lookup(raw, loc[:3]))}"
        return f"{where} is required"
    if len(loc) == 3 and loc[:2] == ("data", "scaling") and kind in ("too_long", "too_short", "tuple_type"):
        return f"{where} must be a pair [center, scale]; found {_show(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{where} must be true or false; found {_show(value)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{where} must be an integer; found {_show(value)}"
    if kind in ("float_type", "float_parsing"):
        return f"{where} must be a number; found {_show(value)}"
    if kind == "finite_number":
        return f"{where} must be a finite number; found {_show(value)}"
    if kind in ("string_type", "string_unicode"):
        return f"{where} must be a string; found {_show(value)}"
    if kind in ("tuple_type", "list_type"):
        return f"{where} must be a list; found {_show(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{where} must be a table; found {_show(value)}"
    if kind == "literal_error":
        choices = _literal_choices(loc)
        if loc == ("model", "kind"):
            choices = MODEL_KINDS_BY_TASK.get(_lookup(raw, ("experiment", "task")), choices)
        hint = _did_you_mean(value, choices) if isinstance(value, str) and len(choices) > 1 else ""
        return f"{where} must be one of {', '.join(map(repr, choices))}; found {_show(value)}{hint}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{where} must be {bounds[kind]} {_show(limit)}; found {_show(value)}"
    if kind in ("string_too_short", "too_short"):
        return f"{where} must not be empty"
    if kind == "duplicate":
        return f"{where} {error['msg']}"
    if kind == "string_pattern_mismatch":
        return f"{where} must contain only {_NAME_CHARS}; found {_show(value)}"
    return f"{where} {error['msg'][0].lower()}{error['msg'][1:]}; found {_show(value)}"


def _unknown_key(loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    known = _known_keys(loc[:-1])
    if len(loc) == 1:
        hint = _did_you_mean(key, known, fmt="[{}]") or f"; the tables are {', '.join(f'[{k}]' for k in known)}"
        return f"[{key}] is not a known table{hint}"
    hint = _did_you_mean(key, known) or f"; the keys of [{_path(loc[:-1])}] are {', '.join(known)}"
    return f"{_path(loc)} is not a known key{hint}"


def _suggest(loc: tuple[Any, ...]) -> str | None:
    matches = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
    return matches[0] if matches else None


def _did_you_mean(word: str, choices: Sequence[str], *, fmt: str = "'{}'") -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {fmt.format(matches[0])}?" if matches else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = ExperimentSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        # An optional table (``[imaging]``) is annotated ``ImagingSection | None``.
        tables = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not tables:
            return None
        model = tables[0]
    return model


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _literal_choices(loc: tuple[Any, ...]) -> tuple[str, ...]:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None else None
    if field is None:
        return ()
    # An optional choice (``WindowPreset | None``) lists the literal's values.
    args = get_args(field.annotation)
    return tuple(c for a in args for c in (get_args(a) if get_origin(a) is Literal else (a,)) if isinstance(c, str))


def _order(loc: tuple[Any, ...]) -> tuple[int, int]:
    """Sort key: table order, then field order, unknown names last."""
    table = _TABLE_ORDER.index(loc[0]) if loc and loc[0] in _TABLE_ORDER else len(_TABLE_ORDER)
    fields = list(_TABLES[loc[0]].model_fields) if table < len(_TABLE_ORDER) else []
    key = fields.index(loc[1]) if len(loc) > 1 and loc[1] in fields else len(fields)
    return table, key


def _path(loc: tuple[Any, ...]) -> str:
    if len(loc) == 4 and loc[:2] == ("data", "scaling") and loc[3] in (0, 1):
        return f"data.scaling.{loc[2]} {('center', 'scale')[loc[3]]}"
    names = ".".join(str(p) for p in loc if not isinstance(p, int))
    return names + "".join(f"[{p}]" for p in loc if isinstance(p, int))


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(raw, Mapping) and part in raw:
            raw = raw[part]
        elif isinstance(raw, (list, tuple)) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _show(value: Any) -> str:
    """A value as the spec's author wrote it (TOML spelling for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = json.dumps(list(value), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    if value is None:
        return "nothing"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
