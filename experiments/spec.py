"""The experiment spec: what a research partner asks the alliance to run, validated once.

A spec is a TOML file with five tables::

    [experiment]  name, task, description, mlflow_experiment
    [data]        dataset, features, label, scaling
    [model]       kind, hidden
    [federation]  strategy, rounds, min_nodes, local_epochs, learning_rate, proximal_mu,
                  server_learning_rate, node_wait_seconds, round_timeout_seconds
    [privacy]     delta, max_grad_norm, sample_rate, noise_multiplier | target_epsilon,
                  accountant

:meth:`ExperimentSpec.from_toml` and :meth:`ExperimentSpec.from_mapping` are the only
ways in. They report every problem at once, by field (unknown keys with a "did you
mean", missing keys, wrong types, out-of-range values, rules between fields), as one
:class:`~experiments.errors.SpecError`. The result is frozen; :meth:`canonical_json` is
the spec as the system understands it (every default filled) and :meth:`digest` its
SHA-256, which is what a hospital's officer approves.

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
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from experiments.errors import SpecError

__all__ = [
    "ACCOUNTANTS",
    "DataSection",
    "ExperimentSection",
    "ExperimentSpec",
    "FederationSection",
    "MODEL_KINDS",
    "ModelSection",
    "PrivacySection",
    "STRATEGIES",
    "TASKS",
]

Task = Literal["tabular-classification"]
ModelKind = Literal["logistic", "mlp"]
Strategy = Literal["fedavg", "fedprox", "fedadam"]
Accountant = Literal["prv", "rdp"]  # privacy.accountant.ACCOUNTANTS; a test keeps them equal

TASKS: tuple[str, ...] = get_args(Task)
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

_NAME_CHARS = "letters, digits, '_', '.' and '-'"

Text = Annotated[str, Strict(), Field(min_length=1)]
Name = Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(ge=1)]


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
    """``[data]``: the dataset each node must have registered, and its columns."""

    dataset: Text
    features: Annotated[tuple[Text, ...], Field(min_length=1)]
    label: Text
    scaling: dict[Text, tuple[Number, Positive]] = Field(default_factory=dict)

    @field_validator("features")
    @classmethod
    def _features_unique(cls, features: tuple[str, ...]) -> tuple[str, ...]:
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
        scaling = raw.get("scaling")
        if isinstance(scaling, Mapping):
            for key in scaling:
                if isinstance(key, str) and key not in features:
                    problems.append(
                        ("scaling", f"data.scaling.{key} is not one of data.features{_did_you_mean(key, features)}")
                    )
        return problems


class ModelSection(_Table):
    """``[model]``: the model every node trains."""

    kind: ModelKind
    hidden: Annotated[tuple[Count, ...], Field(min_length=1)] = (32, 16)  # mlp only


class FederationSection(_Table):
    """``[federation]``: rounds, aggregation strategy and how long to wait for nodes."""

    strategy: Strategy = "fedavg"
    rounds: Count
    min_nodes: Count = 2
    local_epochs: Count = 1
    learning_rate: Positive = 0.1
    proximal_mu: NonNegative = 0.0  # FedProx only; must then be > 0
    server_learning_rate: Positive = 0.1  # FedAdam's eta
    node_wait_seconds: Positive = 120.0
    round_timeout_seconds: Positive = 600.0

    @classmethod
    def table_problems(cls, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
        mu = raw.get("proximal_mu", 0.0)
        if raw.get("strategy") == "fedprox" and _is_number(mu) and mu == 0:
            found = "0 (the default)" if "proximal_mu" not in raw else _show(mu)
            return [("proximal_mu", f"federation.proximal_mu must be > 0 when strategy = 'fedprox'; found {found}")]
        return []


class PrivacySection(_Table):
    """``[privacy]``: DP-SGD at each node; exactly one of noise_multiplier or target_epsilon."""

    delta: Annotated[float, Strict(), Field(gt=0, lt=1, allow_inf_nan=False)]
    max_grad_norm: Positive = 1.0
    sample_rate: Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]
    noise_multiplier: Positive | None = None
    target_epsilon: Positive | None = None  # per site, for this experiment
    accountant: Accountant = "prv"

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
    model: ModelSection
    federation: FederationSection
    privacy: PrivacySection

    @classmethod
    def from_toml(cls, path: Path | str) -> ExperimentSpec:
        """Read and validate the spec in the TOML file at `path`.

        Raises
        ------
        SpecError
            The file cannot be read, is not TOML (the message gives the line), or has
            problems; every problem is listed.
        """
        source = str(path)
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as err:
            raise SpecError(source, [f"cannot read the file: {err.strerror or err}"]) from None
        except UnicodeDecodeError as err:
            raise SpecError(source, [f"not UTF-8 text (byte {err.start})"]) from None
        try:
            mapping = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise SpecError(source, [f"not valid TOML: {err}"]) from None
        return cls.from_mapping(mapping, source=source)

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
        """The spec as plain JSON-compatible tables, every default filled."""
        return self.model_dump(mode="json")

    def canonical_json(self) -> str:
        """The spec as the system understands it: sorted keys, no whitespace, all defaults."""
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_json`; what approvals and signatures refer to."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


_TABLES: dict[str, type[_Table]] = {
    "experiment": ExperimentSection,
    "data": DataSection,
    "model": ModelSection,
    "federation": FederationSection,
    "privacy": PrivacySection,
}
_TABLE_ORDER = list(_TABLES)


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
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _literal_choices(loc: tuple[Any, ...]) -> tuple[str, ...]:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None else None
    return get_args(field.annotation) if field is not None else ()


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
