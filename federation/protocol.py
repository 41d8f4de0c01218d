"""The wire contract between the coordinator and a hospital node.

This module is the *whole* contract: the ServerApp and the ClientApp import nothing
else of each other. It depends only on Flower's record types, the standard library, the
plain numbers of :mod:`privacy.limits` and the score bins of :mod:`models.evaluation`
(numpy), so a node imports it cheaply.

One experiment is three kinds of message wave:

``query``     before anything runs: will the node take part (signature, its officer's
              approval, policy, budget; dataset registered and readable, features
              present)? Reply: the node's training-set size as a discrete Laplace
              count released once per run (charged), no arrays; or a refusal, of which
              ``AWAITING_APPROVAL`` means "ask again later".
``train``     one per round: the node trains the incoming global model with DP-SGD
              and charges its ledger. Reply: the trained arrays, the released size
              and the node's epsilon; with ``privacy.evaluate_every_round`` also the
              incoming model's noisy validation-score histogram.
``evaluate``  once, after the last round: the node scores the final model on its
              validation split and releases the histogram of the scores by label
              (discrete Laplace, charged once per run); the coordinator computes
              each site's and the pooled AUC, loss and calibration from them.

Every message's config carries the instruction and the research partner's
:class:`SignedSpec`; the node checks the signature and that the instruction is what the
signed spec says (:func:`spec_mismatches`), and trusts nothing else the coordinator adds.

With ``federation.secure_aggregation`` a train wave runs through Flower's SecAgg+
(``SecAggPlusWorkflow`` on the coordinator, ``secaggplus_mod`` on the node), which only
knows Flower's legacy fit layout: the instruction's config travels as
``LEGACY_FIT_CONFIG`` with the global model as the numbered arrays of
``LEGACY_FIT_ARRAYS`` (in the model's ``state_dict`` order), and the node answers with
a legacy fit result whose arrays the mod masks before they leave. The node judges
whether SecAgg+ would clip its weighted update by the settings its own mod took from the
round's setup stage (what it will mask with), never by anything restated beside them.
The reply's ``METRICS_KEY`` and ``NODE_KEY`` records travel in plain, beside the masked
vector: the released training size, the node's epsilon and, when the spec evaluates
every round, its noisy score histogram, each a DP release or an accounting value. The
SecAgg+ weight (``fitres.num_examples``) is the node's released noisy training size.

A node that refuses answers with an error reply whose code is one of
``REFUSAL_CODES`` and whose reason is a one-line message meant for the researcher.

The instruction names its task. A ``tabular-classification`` instruction carries the
feature columns, label and scaling; an ``imaging-classification`` one carries an
:class:`ImagingInstruction` (which series, how to turn them into one image per patient)
and the CNN's channels instead, and no columns: each node maps its own labels to its
patients. Fields of the other task must be empty; :class:`TrainInstruction` checks it.

An instruction also stays within :mod:`privacy.limits` (rounds, local epochs, steps per
round and in all, the smallest noise, sample rate and delta): the node's own check, whatever
the coordinator validated, before it composes anything.

A *statistics study* is the second kind of signed spec (``"kind": "statistics"`` in its
canonical JSON, :data:`STATISTICS_TASK` in the node policy's task kinds). Its messages
carry the signed spec and no instruction: the node parses the query from the signed spec
itself (``privacy.query``), so nothing the coordinator adds can change what is asked. It
takes two message waves:

``query``             the same admission query as an experiment's: signature, approval,
                      policy, and the whole query's releases reserved in the ledger. The
                      reply carries no number (:data:`STUDY_QUERY_METRICS`).
``query.statistics``  (:data:`STATISTICS_ACTION`) the node evaluates the query, adds the
                      noise, suppresses cells, charges its ledger and answers with one
                      :class:`SiteAnswer` (the ``STATISTICS_KEY`` ConfigRecord, entry
                      ``ANSWER_KEY``) and :data:`STATISTICS_METRICS`.

A study that ends early sends the same ``query.release`` as an experiment. A
:class:`SiteAnswer` holds one :class:`SiteRelease` per release of the query's release plan,
in its order, and nothing else; :meth:`SiteAnswer.problems` checks it against the plan's
:class:`ReleaseLayout` (the node's egress guard before it leaves, the coordinator when it
arrives).

A study whose signed spec says ``[federation] secure_aggregation = true`` is answered
through SecAgg+ instead of ``query.statistics`` (a node refuses the other way): the four
``train`` waves of Flower's ``SecAggPlusWorkflow``, whose collect stage carries the
signed spec as the legacy fit config. Each node sends its noisy answer as a masked
integer vector (:func:`secure_encoding`): per release, its values in whole *quanta*
(:func:`release_quantum`: 1 for a count, the scale / :data:`SUM_QUANTA_PER_SCALE` for a
sum, which the node rounds to), zero in its suppressed cells, then a 0/1 "reported"
indicator per cell. Every node reports the weight :data:`SECURE_SUM_WEIGHT` and the
coordinator sets it as the workflow's ``max_weight``, so the workflow's weighted mean
times the number of contributors is the plain sum; the clipping range ``C``
(:func:`secure_clipping_range`) and quantisation range ``2C`` make SecAgg+'s quantisation
the identity on integers in ``[-C, C]``, so the coordinator recovers the sum exactly
(:meth:`SecureTotals.from_sums`). The reply beside the masked vector carries
:data:`STATISTICS_METRICS` and the site's name in plain, nothing else. The coordinator
learns the per-element totals and how many sites reported each cell, never a site's
answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord

from models.clinical_tasks import CohortDefinition, CohortDefinitionError
from models.evaluation import SCORE_BINS
from privacy import limits

__all__ = [
    "ACCOUNTING_METRICS",
    "ARRAYS_KEY",
    "AWAITING_APPROVAL",
    "CONFIG_KEY",
    "DP_METRICS",
    "EVAL_METRICS",
    "SCHEDULE_KEY",
    "SCORE_METRICS",
    "score_histogram_of",
    "score_metrics",
    "IMAGING_TASK",
    "INSTRUCTION_KEY",
    "ImagingInstruction",
    "LEGACY_FIT_ARRAYS",
    "LEGACY_FIT_CONFIG",
    "METRICS_KEY",
    "MODEL_KINDS_BY_TASK",
    "NODE_KEY",
    "ANSWER_KEY",
    "POLICY_TASKS",
    "ProtocolError",
    "QUERY_METRICS",
    "ReleaseLayout",
    "REFUSAL_CODES",
    "RELEASE_ACTION",
    "SECAGG_MODULUS",
    "SECURE_SUM_WEIGHT",
    "SUM_QUANTA_PER_SCALE",
    "SecureTotals",
    "RELEASE_METRICS",
    "REFUSED_BAD_INSTRUCTION",
    "REFUSED_BUDGET",
    "REFUSED_APP",
    "REFUSED_APPROVAL",
    "REFUSED_DATASET",
    "REFUSED_INTEGRITY",
    "REFUSED_POLICY",
    "REFUSED_REPLAY",
    "REFUSED_SIGNATURE",
    "SIGNATURE_KEY",
    "SIGNER_KEY",
    "STATISTICS_ACTION",
    "STATISTICS_KEY",
    "STATISTICS_METRICS",
    "STATISTICS_TASK",
    "STUDY_QUERY_METRICS",
    "SUBMISSION_KEY",
    "SPEC_KEY",
    "SignedSpec",
    "SiteAnswer",
    "SiteRelease",
    "TABULAR_TASK",
    "TASKS",
    "TRAIN_METRICS",
    "TrainInstruction",
    "is_statistics_spec",
    "node_record",
    "read_metrics",
    "read_refusal",
    "read_schedule",
    "read_site",
    "refusal_reason",
    "release_quantum",
    "secure_clipping_range",
    "secure_encoding",
    "secure_sum_problems",
    "schedule_problems",
    "spec_fraction",
    "spec_mismatches",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NODE_KEY = "node"
INSTRUCTION_KEY = "medfed.instruction"

# The task kinds and the model kinds each accepts; experiments.spec and models define
# the same (tests keep them equal), but a node must not import either to read a message.
TABULAR_TASK = "tabular-classification"
IMAGING_TASK = "imaging-classification"
TASKS = (TABULAR_TASK, IMAGING_TASK)
MODEL_KINDS_BY_TASK: Mapping[str, tuple[str, ...]] = {TABULAR_TASK: ("logistic", "mlp"), IMAGING_TASK: ("cnn",)}
INTENSITIES = ("window", "minmax", "zscore")
PROJECTIONS = ("mip", "middle")

# Error codes of a node's refusal (Flower's own codes are below 1000).
REFUSED_BAD_INSTRUCTION = 4001
REFUSED_DATASET = 4002
REFUSED_BUDGET = 4003
REFUSED_SIGNATURE = 4004  # unsigned, bad signature, unknown signer, instruction not the signed spec
AWAITING_APPROVAL = 4005  # recorded for the officer; ask again later
REFUSED_APPROVAL = 4006  # denied, revoked or expired, or over the approval's cap
REFUSED_POLICY = 4007  # the node's policy forbids it
REFUSED_INTEGRITY = 4008  # the node's ledger or audit log failed verification
REFUSED_APP = 4009  # the run's app bundle is not a release on the node's allow-list
REFUSED_REPLAY = 4010  # a stale submission, or one whose approval has no run left
REFUSAL_CODES = (
    REFUSED_BAD_INSTRUCTION,
    REFUSED_DATASET,
    REFUSED_BUDGET,
    REFUSED_SIGNATURE,
    AWAITING_APPROVAL,
    REFUSED_APPROVAL,
    REFUSED_POLICY,
    REFUSED_INTEGRITY,
    REFUSED_APP,
    REFUSED_REPLAY,
)

# Secure aggregation: Flower's legacy fit layout.
LEGACY_FIT_CONFIG = "fitins.config"
LEGACY_FIT_ARRAYS = "fitins.parameters"

# The signed spec travels beside the instruction in every message's config record: the
# node checks the signature and that the instruction is what the signed spec says.
SPEC_KEY = "medfed.spec"
SIGNATURE_KEY = "medfed.spec-signature"
SIGNER_KEY = "medfed.spec-signer"
SUBMISSION_KEY = "medfed.submission"
# Node sampling (federation.fraction_per_round < 1): a query (and, when the coordinator
# sends it, a train message) carries the receiving node's own scheduled rounds, a list of
# ints. The node checks them against the signed spec, reserves exactly those rounds and
# records them at admission; it trains no round outside them. Absent, a node takes it to
# be every round, which only a spec without sampling allows.
SCHEDULE_KEY = "medfed.schedule"

# The metric keys a reply may carry: a node sends exactly these, the coordinator
# rejects anything else. "num-examples" is Flower's weighting key: the site's
# training-set size as a discrete Laplace count released once per run (charged to the
# node's ledger, privacy.count_epsilon) and clamped at 1, the same value in every reply of
# the run. No reply carries an exact count or a metric computed on private rows: a
# model's quality leaves as SCORE_METRICS, a validation-score histogram by label over
# models.evaluation's fixed bins ("eval-scores-<label>-<bin>"), each count with discrete
# Laplace noise (privacy.evaluation_epsilon), from which the coordinator computes AUC,
# loss, accuracy, Brier score and calibration (post-processing).
SCORE_METRICS = tuple(f"eval-scores-{label}-{b:02d}" for label in (0, 1) for b in range(SCORE_BINS))
# Numbers that come from the signed spec and the node's ledger, not from patient rows.
ACCOUNTING_METRICS = (
    "steps",  # the spec's steps per round
    "epsilon",  # the dataset's lifetime epsilon after this reply's charge, at its budget's delta (the node's ledger)
    "epsilon-run",  # what this submission alone has charged the dataset so far, same delta
)
EVAL_METRICS = (*SCORE_METRICS, "epsilon", "epsilon-run")
TRAIN_METRICS = ("num-examples", *ACCOUNTING_METRICS, *SCORE_METRICS)  # scores only with evaluate_every_round
QUERY_METRICS = ("num-examples",)
# The metrics whose value must be the output of a DP mechanism the node released (or its
# declared post-processing): the egress guard checks each against the release, and every
# other metric against the accounting values the node recorded.
DP_METRICS = ("num-examples", *SCORE_METRICS)
# A run that ends before its last round tells the nodes that accepted it (a query message
# with this action, type "query.release"): each gives back the budget it reserved for the
# rounds that will not come, and takes no further message of that submission. The reply
# carries no number.
RELEASE_ACTION = "release"
RELEASE_METRICS: tuple[str, ...] = ()

# Statistics studies. The task kind a node policy allows them by (beside the training tasks).
STATISTICS_TASK = "statistics"
POLICY_TASKS = (*TASKS, STATISTICS_TASK)
# The admission query of a study: its reply carries no number at all.
STUDY_QUERY_METRICS: tuple[str, ...] = ()
# "query.statistics": answer the study. The reply holds exactly the STATISTICS_KEY
# ConfigRecord, whose one entry ANSWER_KEY is the SiteAnswer's JSON, and the METRICS_KEY
# MetricRecord with these keys, both about the ledger (no patient data): the dataset's
# lifetime epsilon after the answer, and what the study charged it, at the budget's delta.
STATISTICS_ACTION = "statistics"
STATISTICS_KEY = "statistics"
ANSWER_KEY = "medfed.answer"
STATISTICS_METRICS = ("epsilon", "epsilon-run")
# The fields of a site answer and of each of its releases: nothing else is accepted.
_ANSWER_FIELDS = ("releases", "suppressed")
_RELEASE_FIELDS = ("mechanism", "name", "scale", "sensitivity", "statistic", "values")
_COUNT_MECHANISMS = ("discrete-laplace",)

# A study's answer through SecAgg+ (see the module docstring and `secure_encoding`).
#: The weight (legacy ``num_examples``) every node reports and the workflow's ``max_weight``:
#: SecAgg+ then scales no vector (ratio 1) and divides the sum by the number of contributors.
SECURE_SUM_WEIGHT = 1
#: SecAgg+'s modulus, Flower's default and documented maximum (2**32).
SECAGG_MODULUS = 1 << 32
#: A noisy sum travels in quanta of its noise scale / this: rounding moves it by at most
#: scale/512, against the Laplace noise's standard deviation of 1.41 scale (0.08 % of it in
#: standard deviation, 6e-7 of its variance).
SUM_QUANTA_PER_SCALE = 256
# SecAgg+ rounds each quantised value through an int32 (`flwr...quantization._stochastic_round`).
_INT32_MAX = (1 << 31) - 1
# How far from a whole number of quanta a decoded total may be (floating point of the workflow's mean).
_QUANTUM_TOLERANCE = 1e-3


def _re2_problem(pattern: object) -> str | None:
    """Why RE2 (linear-time matching, which the node uses for Series Descriptions) refuses `pattern`, or None."""
    import re2

    if not isinstance(pattern, str):
        return "not a string"
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as err:
        return str(err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else err)
    return None


class ProtocolError(ValueError):
    """A message between coordinator and node does not follow this contract."""


@dataclass(frozen=True)
class ImagingInstruction:
    """How a node turns its imaging dataset into one model input per patient.

    Attributes
    ----------
    modalities, body_parts
        Accepted DICOM Modality and Body Part Examined values; no body parts: any.
    series_description
        A regular expression searched, case-insensitively, in the Series Description;
        empty: any.
    size
        Images are resampled to ``size`` x ``size``.
    intensity
        ``window`` (through ``window``, a preset or ``voi``, or ``window_center`` and
        ``window_width`` in modality units), ``minmax`` or ``zscore``.
    projection
        ``mip`` (maximum over the series' slices) or ``middle`` (its middle slice).
    """

    modalities: tuple[str, ...]
    size: int
    intensity: str
    projection: str
    body_parts: tuple[str, ...] = ()
    series_description: str = ""
    window: str = ""
    window_center: float | None = None
    window_width: float | None = None

    def problems(self) -> list[str]:
        """Every problem of this part of an instruction (empty when valid)."""
        problems = []
        if not self.modalities or not all(isinstance(m, str) and m for m in self.modalities):
            problems.append("imaging.modalities must be one or more non-empty strings")
        if not all(isinstance(b, str) and b for b in self.body_parts):
            problems.append("imaging.body_parts must hold non-empty strings")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 8 <= self.size <= 512:
            problems.append(f"imaging.size must be an integer in 8..512; found {self.size!r}")
        if self.intensity not in INTENSITIES:
            problems.append(f"imaging.intensity must be one of {', '.join(INTENSITIES)}; found {self.intensity!r}")
        if self.projection not in PROJECTIONS:
            problems.append(f"imaging.projection must be one of {', '.join(PROJECTIONS)}; found {self.projection!r}")
        if _re2_problem(self.series_description) is not None:
            problems.append("imaging.series_description is not a valid regular expression (RE2 syntax)")
        pair = (self.window_center, self.window_width)
        if self.intensity == "window":
            if bool(self.window) == (pair != (None, None)):
                problems.append("imaging needs exactly one of window or window_center and window_width")
            elif not self.window and (
                None in pair
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
                or pair[1] < 1  # type: ignore[operator]
            ):
                problems.append(f"imaging.window_center and window_width must be finite, width >= 1; found {pair}")
        elif self.window or pair != (None, None):
            problems.append(f"imaging.window applies only to intensity 'window'; found {self.intensity!r}")
        return problems

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ImagingInstruction:
        """Rebuild from the JSON form (lists become tuples)."""
        values = dict(data)
        for key in ("modalities", "body_parts"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


@dataclass(frozen=True)
class TrainInstruction:
    """What a node needs to evaluate and train one round of an experiment.

    Built by the coordinator from a validated spec; every value is explicit so the node
    never has to interpret the spec itself.
    """

    experiment: str
    spec_digest: str
    dataset: str
    features: tuple[str, ...]
    label: str
    model_kind: str
    hidden: tuple[int, ...]
    local_epochs: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    rounds: int
    scaling: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    task: str = TABULAR_TASK
    channels: tuple[int, ...] = ()
    imaging: ImagingInstruction | None = None
    # The spec's data.cohort, canonical (models.clinical_tasks.CohortDefinition without its
    # covariates, which are `features`): the node builds this cohort from its OMOP source.
    cohort: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("experiment", "spec_digest", "dataset", "model_kind", "accountant"):
            if not getattr(self, name):
                problems.append(f"{name} must be a non-empty string")
        problems += self._task_problems()
        problems += self._schedule_problems()
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be > 0; found {value}")
        if problems:
            raise ProtocolError("invalid training instruction: " + "; ".join(problems))

    def _schedule_problems(self) -> list[str]:
        """The counts and rates the node's accounting multiplies, against :mod:`privacy.limits`."""
        return limits.schedule_problems(
            rounds=self.rounds,
            steps=self.steps,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            delta=self.delta,
            local_epochs=self.local_epochs,
        )

    def _task_problems(self) -> list[str]:
        if self.task not in TASKS:
            return [f"task must be one of {', '.join(TASKS)}; found {self.task!r}"]
        problems = []
        kinds = MODEL_KINDS_BY_TASK[self.task]
        if self.model_kind and self.model_kind not in kinds:
            problems.append(f"model_kind must be one of {', '.join(kinds)} for task {self.task}; found {self.model_kind!r}")
        if self.task == TABULAR_TASK:
            if not self.label:
                problems.append("label must be a non-empty string")
            if not self.features:
                problems.append("features must not be empty")
            if self.imaging is not None or self.channels:
                problems.append(f"imaging and channels apply only to task {IMAGING_TASK}")
            if self.cohort is not None:
                problems += self._cohort_problems()
            return problems
        if self.imaging is None:
            problems.append(f"task {IMAGING_TASK} needs its imaging parameters")
        else:
            problems += self.imaging.problems()
        if self.features or self.label or self.scaling or self.cohort is not None:
            problems.append(f"features, label, scaling and cohort apply only to task {TABULAR_TASK}")
        if not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            problems.append(f"channels must be one or more positive integers; found {list(self.channels)}")
        elif self.imaging is not None and isinstance(self.imaging.size, int) and self.imaging.size % 2 ** len(self.channels):
            problems.append(f"imaging.size must be a multiple of 2 ** len(channels) = {2 ** len(self.channels)}")
        return problems

    def _cohort_problems(self) -> list[str]:
        if not isinstance(self.cohort, Mapping) or "covariates" in self.cohort:
            return ["cohort must be a table without covariates (they are the features)"]
        try:
            definition = self.cohort_definition()
        except CohortDefinitionError as err:
            return [f"cohort: {err}"]
        problems = []
        if definition.label != self.label:
            problems.append(f"label must be {definition.label!r} for cohort task {definition.task!r}; found {self.label!r}")
        if set(self.features) - set(self.scaling):
            problems.append("every feature of a cohort needs a scaling (its center stands in for a missing value)")
        return problems

    def cohort_definition(self) -> CohortDefinition:
        """The cohort to build: the instruction's cohort with the features as covariates."""
        assert self.cohort is not None
        return CohortDefinition.from_mapping({**self.cohort, "covariates": list(self.features)})

    def to_json(self) -> str:
        """Serialise to the canonical JSON carried in a ConfigRecord."""
        data = asdict(self)
        data["scaling"] = {k: [float(c), float(s)] for k, (c, s) in sorted(self.scaling.items())}
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TrainInstruction:
        """Parse what `to_json` wrote; a malformed instruction raises ProtocolError."""
        try:
            data: dict[str, Any] = json.loads(text)
            data["features"] = tuple(data["features"])
            data["hidden"] = tuple(int(h) for h in data["hidden"])
            data["scaling"] = {k: (float(c), float(s)) for k, (c, s) in data["scaling"].items()}
            data["channels"] = tuple(int(c) for c in data.get("channels", ()))
            if data.get("imaging") is not None:
                data["imaging"] = ImagingInstruction.from_mapping(data["imaging"])
            return cls(**data)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"malformed training instruction: {err}") from None

    def to_config(self, server_round: int = 0) -> ConfigRecord:
        """The ConfigRecord a coordinator sends (Flower adds its own keys to it)."""
        return ConfigRecord({INSTRUCTION_KEY: self.to_json(), "server-round": server_round})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> TrainInstruction:
        """Read the instruction from a received ConfigRecord."""
        text = config.get(INSTRUCTION_KEY)
        if not isinstance(text, str):
            raise ProtocolError(f"the message has no '{INSTRUCTION_KEY}' entry in its config")
        return cls.from_json(text)


@dataclass(frozen=True)
class SignedSpec:
    """The partner-signed submission a run carries: the spec, the submission envelope, its signature.

    ``spec_json`` is the spec's canonical JSON; ``submission`` the canonical JSON of the
    partner's submission envelope (spec digest, submission id, signing time; see
    ``privacy.governance.Submission``), which ``signature`` (base64 Ed25519) signs and
    ``signer`` (key fingerprint) names. Empty signature and signer mean an unsigned
    submission, which every node refuses.
    """

    spec_json: str
    signature: str = ""
    signer: str = ""
    submission: str = ""

    def add_to(self, config: ConfigRecord) -> ConfigRecord:
        """`config` with the signed submission's four entries added."""
        config[SPEC_KEY] = self.spec_json
        config[SIGNATURE_KEY] = self.signature
        config[SIGNER_KEY] = self.signer
        config[SUBMISSION_KEY] = self.submission
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord) -> SignedSpec:
        keys = (SPEC_KEY, SIGNATURE_KEY, SIGNER_KEY, SUBMISSION_KEY)
        values = [config.get(key, "") for key in keys]
        if not all(isinstance(v, str) for v in values):
            raise ProtocolError(f"{', '.join(repr(k) for k in keys)} must be strings")
        if not values[0]:
            raise ProtocolError(f"the message carries no experiment spec ('{SPEC_KEY}')")
        return cls(*values)  # type: ignore[arg-type]

    @property
    def submission_id(self) -> str:
        """The envelope's submission id as sent (unverified; the node verifies the envelope first)."""
        try:
            value = json.loads(self.submission).get("submission_id", "")
        except (json.JSONDecodeError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""

    def mapping(self) -> dict[str, Any]:
        """The spec as plain JSON tables (the node reads it without the coordinator's spec types)."""
        try:
            value = json.loads(self.spec_json)
        except json.JSONDecodeError as err:
            raise ProtocolError(f"the experiment spec is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise ProtocolError("the experiment spec is not a JSON object")
        return value


# Where each instruction field comes from in the spec's canonical JSON (table, key).
_SPEC_FIELDS = {
    "experiment": ("experiment", "name"),
    "task": ("experiment", "task"),
    "dataset": ("data", "dataset"),
    "model_kind": ("model", "kind"),
    "local_epochs": ("federation", "local_epochs"),
    "learning_rate": ("federation", "learning_rate"),
    "rounds": ("federation", "rounds"),
    "max_grad_norm": ("privacy", "max_grad_norm"),
    "sample_rate": ("privacy", "sample_rate"),
    "delta": ("privacy", "delta"),
}


def spec_mismatches(instruction: TrainInstruction, spec: Mapping[str, Any]) -> list[str]:
    """Where `instruction` says something other than the signed `spec`; empty when it agrees.

    The noise is checked only when the spec fixes it; a spec with ``target_epsilon``
    leaves the noise to the coordinator, and the node then checks the cost instead.
    """

    def get(table: str, key: str) -> Any:
        section = spec.get(table)
        return section.get(key) if isinstance(section, Mapping) else None

    problems = []
    for name, (table, key) in _SPEC_FIELDS.items():
        if getattr(instruction, name) != get(table, key):
            problems.append(f"{name} is {getattr(instruction, name)!r}, the signed spec says {table}.{key} = {get(table, key)!r}")
    if list(instruction.hidden) != get("model", "hidden"):
        problems.append("hidden layers differ from the signed spec's model.hidden")
    if instruction.task == TABULAR_TASK:
        if list(instruction.features) != get("data", "features"):
            problems.append("features differ from the signed spec's data.features")
        if instruction.label != get("data", "label"):
            problems.append(f"label is {instruction.label!r}, the signed spec says data.label = {get('data', 'label')!r}")
        scaling = {k: [c, s] for k, (c, s) in instruction.scaling.items()}
        if scaling != (get("data", "scaling") or {}):
            problems.append("scaling differs from the signed spec's data.scaling")
        if (dict(instruction.cohort) if instruction.cohort is not None else None) != get("data", "cohort"):
            problems.append("cohort differs from the signed spec's data.cohort")
        return problems + _noise_mismatch(instruction, get("privacy", "noise_multiplier"))
    if list(instruction.channels) != get("model", "channels"):
        problems.append("channels differ from the signed spec's model.channels")
    signed = spec.get("imaging") if isinstance(spec.get("imaging"), Mapping) else {}
    assert instruction.imaging is not None  # TrainInstruction checks it
    for name, value in asdict(instruction.imaging).items():
        expected = signed.get(name)
        if expected is None:
            expected = [] if isinstance(value, list | tuple) else "" if isinstance(value, str) else None
        if (list(value) if isinstance(value, tuple) else value) != expected:
            problems.append(f"imaging.{name} differs from the signed spec's imaging.{name}")
    return problems + _noise_mismatch(instruction, get("privacy", "noise_multiplier"))


def _noise_mismatch(instruction: TrainInstruction, noise: Any) -> list[str]:
    if noise is not None and instruction.noise_multiplier != noise:
        return [f"noise_multiplier is {instruction.noise_multiplier!r}, the signed spec says privacy.noise_multiplier = {noise!r}"]
    return []


def node_record(site: str) -> ConfigRecord:
    """The record a node attaches to name itself (its site name, never patient data)."""
    return ConfigRecord({"site": site})


def score_metrics(histogram: Sequence[Sequence[float]]) -> dict[str, float]:
    """A ``(2, SCORE_BINS)`` score histogram (row 0 the negatives) as a reply's SCORE_METRICS."""
    flat = [float(v) for row in histogram for v in row]
    if len(histogram) != 2 or len(flat) != len(SCORE_METRICS):
        raise ProtocolError(f"a score histogram has 2 rows of {SCORE_BINS} bins")
    return dict(zip(SCORE_METRICS, flat, strict=True))


def score_histogram_of(metrics: Mapping[str, float]) -> list[list[float]] | None:
    """The score histogram a reply's metrics carry, as 2 rows; None if it carries none.

    Raises
    ------
    ProtocolError
        The reply carries some of the histogram's bins but not all.
    """
    present = [key for key in SCORE_METRICS if key in metrics]
    if not present:
        return None
    if len(present) != len(SCORE_METRICS):
        raise ProtocolError(f"reply carries {len(present)} of the {len(SCORE_METRICS)} bins of a score histogram")
    values = [float(metrics[key]) for key in SCORE_METRICS]
    return [values[:SCORE_BINS], values[SCORE_BINS:]]


def read_site(content: Mapping[str, Any], fallback: str) -> str:
    """The site name of a reply, or `fallback` when the node did not send one."""
    record = content.get(NODE_KEY) if hasattr(content, "get") else None
    if isinstance(record, ConfigRecord) and isinstance(record.get("site"), str):
        return str(record["site"])
    return fallback


def read_metrics(content: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, float]:
    """The metrics of a reply, refusing keys that the contract does not declare."""
    record = content.get(METRICS_KEY) if hasattr(content, "get") else None
    if not isinstance(record, MetricRecord):
        raise ProtocolError(f"reply has no '{METRICS_KEY}' MetricRecord")
    unexpected = sorted(set(record) - set(allowed))
    if unexpected:
        raise ProtocolError(f"reply carries undeclared metrics: {', '.join(unexpected)}")
    return {key: float(value) for key, value in record.items()}  # type: ignore[arg-type]


def refusal_reason(site: str, reason: str) -> str:
    """The reason text of a refusal: the site name, then the one-line reason."""
    return f"{site}\t{reason}"


def read_refusal(text: str | None, fallback: str) -> tuple[str, str]:
    """Split a refusal's reason into ``(site, reason)``; other errors keep `fallback` as site."""
    site, sep, reason = (text or "").partition("\t")
    if sep and site and "\n" not in site:
        return site, reason
    return fallback, text or ""


# ---------------------------------------------------------------- statistics studies


def is_statistics_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a signed spec's tables are a statistics study's (``"kind": "statistics"``)."""
    return spec.get("kind") == STATISTICS_TASK


@dataclass(frozen=True)
class ReleaseLayout:
    """What one release of a study's release plan may carry, as both sides compute it from the signed spec.

    ``shape`` is the vector's layout, row-major; the cells are its first axis, except in
    a three-axis release (Kaplan-Meier events: events then censorings, cells, bins),
    where they are the second.
    """

    statistic: str
    name: str
    mechanism: str
    scale: float
    sensitivity: float
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def cell_of(self, index: int) -> int:
        """The cell the value at flat `index` belongs to."""
        if len(self.shape) == 3:
            return (index // self.shape[2]) % self.shape[1]
        return index // math.prod(self.shape[1:]) if len(self.shape) > 1 else index


@dataclass(frozen=True)
class SiteRelease:
    """One noisy release of a site: its values (None in a suppressed cell) and its noise."""

    statistic: str
    name: str
    values: tuple[float | None, ...]
    scale: float
    mechanism: str
    sensitivity: float

    def to_mapping(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "name": self.name,
            "values": list(self.values),
            "scale": self.scale,
            "mechanism": self.mechanism,
            "sensitivity": self.sensitivity,
        }


@dataclass(frozen=True)
class SiteAnswer:
    """What a node's statistics reply carries: every noisy release, and the cells it suppressed.

    A cell is suppressed when its noisy count fell below the node policy's
    ``min_cell_size`` (post-processing of the noisy count, never the true one); its
    values are None in every release.
    """

    releases: tuple[SiteRelease, ...]
    suppressed: tuple[int, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, no NaN."""
        data = {"releases": [r.to_mapping() for r in self.releases], "suppressed": list(self.suppressed)}
        return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> SiteAnswer:
        """Parse a site answer, refusing any field the contract does not declare.

        Raises
        ------
        ProtocolError
            Not JSON, a missing or undeclared field, or a value of the wrong type.
        """
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as err:
            raise ProtocolError(f"the statistics answer is not valid JSON: {err}") from None
        if not isinstance(data, dict) or sorted(data) != sorted(_ANSWER_FIELDS):
            raise ProtocolError(f"a statistics answer holds exactly {', '.join(_ANSWER_FIELDS)}")
        releases, suppressed = data["releases"], data["suppressed"]
        if not isinstance(releases, list) or not isinstance(suppressed, list):
            raise ProtocolError("the statistics answer's releases and suppressed must be lists")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in suppressed):
            raise ProtocolError("the statistics answer's suppressed cells must be integers")
        parsed = []
        for index, release in enumerate(releases):
            if not isinstance(release, dict) or sorted(release) != sorted(_RELEASE_FIELDS):
                raise ProtocolError(f"release {index} of the statistics answer must hold exactly {', '.join(_RELEASE_FIELDS)}")
            values = release["values"]
            if not isinstance(values, list) or not all(
                v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
            ):
                raise ProtocolError(f"release {index} of the statistics answer: values must be numbers or null")
            if not all(isinstance(release[k], str) for k in ("statistic", "name", "mechanism")) or not all(
                isinstance(release[k], int | float) and not isinstance(release[k], bool) for k in ("scale", "sensitivity")
            ):
                raise ProtocolError(f"release {index} of the statistics answer has a field of the wrong type")
            parsed.append(
                SiteRelease(
                    statistic=release["statistic"],
                    name=release["name"],
                    values=tuple(None if v is None else float(v) for v in values),
                    scale=float(release["scale"]),
                    mechanism=release["mechanism"],
                    sensitivity=float(release["sensitivity"]),
                )
            )
        return cls(tuple(parsed), tuple(suppressed))

    def to_record(self) -> ConfigRecord:
        """The reply's ``STATISTICS_KEY`` record."""
        return ConfigRecord({ANSWER_KEY: self.to_json()})

    @classmethod
    def from_content(cls, content: Mapping[str, Any]) -> SiteAnswer:
        """The answer of a statistics reply.

        Raises
        ------
        ProtocolError
            The reply has no ``STATISTICS_KEY`` record, or the record holds anything but the answer.
        """
        record = content.get(STATISTICS_KEY) if hasattr(content, "get") else None
        if not isinstance(record, ConfigRecord) or set(record) != {ANSWER_KEY} or not isinstance(record[ANSWER_KEY], str):
            raise ProtocolError(f"a statistics reply carries one '{STATISTICS_KEY}' ConfigRecord holding only '{ANSWER_KEY}'")
        return cls.from_json(str(record[ANSWER_KEY]))

    def problems(self, layout: Sequence[ReleaseLayout], cells: int) -> list[str]:
        """Where this answer departs from the release plan `layout` of a query with `cells` cells; empty when it agrees.

        Each release must be the plan's, in order, with its mechanism, scale and
        sensitivity; hold one value per element of its shape, finite, an integer for a
        count; and None exactly in the suppressed cells.
        """
        problems = []
        if len(self.releases) != len(layout):
            return [f"the answer holds {len(self.releases)} release(s); the query's plan has {len(layout)}"]
        suppressed = set(self.suppressed)
        if len(suppressed) != len(self.suppressed) or any(not 0 <= i < cells for i in suppressed):
            problems.append(f"suppressed cells must be distinct cell indices in 0..{cells - 1}")
        if list(self.suppressed) != sorted(suppressed):
            problems.append("suppressed cells must be in increasing order")
        for index, (release, plan) in enumerate(zip(self.releases, layout, strict=True)):
            where = f"release {index} ({plan.statistic}.{plan.name})"
            sent = (release.statistic, release.name, release.mechanism, release.scale, release.sensitivity)
            planned = (plan.statistic, plan.name, plan.mechanism, plan.scale, plan.sensitivity)
            if sent != planned:
                problems.append(f"{where} is {sent}, the plan says {planned}")
                continue
            if len(release.values) != plan.size:
                problems.append(f"{where} holds {len(release.values)} values; its shape {list(plan.shape)} has {plan.size}")
                continue
            for at, value in enumerate(release.values):
                hidden = plan.cell_of(at) in suppressed
                if hidden != (value is None):
                    problems.append(f"{where} value {at}: " + ("a suppressed cell's value left" if not hidden else "missing"))
                    break
                if value is not None and not math.isfinite(value):
                    problems.append(f"{where} value {at} is not finite")
                    break
                if value is not None and plan.mechanism in _COUNT_MECHANISMS and value != int(value):
                    problems.append(f"{where} value {at} is not an integer, as a noisy count is")
                    break
        return problems


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a statistics answer may hold")


# ---------------------------------------------------------------- a study's answer under SecAgg+


def release_quantum(mechanism: str, scale: float) -> float:
    """The unit a release's values travel in under SecAgg+: 1 for a noisy count (exact), scale / 256 for a sum."""
    return 1.0 if mechanism in _COUNT_MECHANISMS else float(scale) / SUM_QUANTA_PER_SCALE


def secure_clipping_range(nodes: int) -> int:
    """SecAgg+'s clipping range ``C`` for a round of `nodes` sites; its quantisation range is ``2C``.

    The largest integer with ``2C`` within an int32 (SecAgg+ rounds through one) and
    ``nodes * 2C < SECAGG_MODULUS``, so that the sum of every site's shifted values
    (each in ``[0, 2C]``) and of their weights (each ``2C``) never wraps around the
    modulus. With ``T = 2C`` SecAgg+ quantises an integer ``v`` in ``[-C, C]`` to
    ``v + C`` exactly (no stochastic rounding), and the sum comes back exact.
    Capacity: about 7e8 quanta per value at 3 sites, 7e7 at 30, 4e6 at 540.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ProtocolError(f"a secure sum needs a positive number of nodes; found {nodes!r}")
    return min(_INT32_MAX // 2, (SECAGG_MODULUS - 1) // (2 * nodes))


def secure_sum_problems(
    *, sample_num: int, clipping_range: float, quantization_range: int, modulus_range: int, max_weight: float, minimum: int = 2
) -> list[str]:
    """Why SecAgg+ settings would not carry a study's answer exactly (empty when they would).

    A node checks the settings its ``secaggplus_mod`` will use before it reads a row: at
    least `minimum` sites (a sum over one site is its answer), the weight that leaves
    every vector as it is, a quantisation range of twice an integral clipping range
    within an int32, and a modulus the sum of `sample_num` sites cannot wrap around.
    """
    problems = []
    if sample_num < minimum:
        problems.append(f"a secure sum over {sample_num} site(s) would reveal a site's answer; it needs at least {minimum}")
    if max_weight != SECURE_SUM_WEIGHT:
        problems.append(f"SecAgg+ max_weight must be {SECURE_SUM_WEIGHT} (each answer unscaled); found {max_weight!r}")
    if not (float(clipping_range).is_integer() and 1 <= clipping_range and quantization_range == 2 * int(clipping_range)):
        problems.append(
            "SecAgg+ quantization_range must be twice an integral clipping_range, so that integers pass exactly; "
            f"found {quantization_range!r} and {clipping_range!r}"
        )
    elif quantization_range > _INT32_MAX:
        problems.append(f"SecAgg+ quantization_range must fit an int32; found {quantization_range}")
    elif modulus_range & (modulus_range - 1) or sample_num * quantization_range >= modulus_range:
        problems.append(
            f"SecAgg+ modulus_range {modulus_range} would wrap around the sum of {sample_num} site(s) at quantization "
            f"range {quantization_range}"
        )
    return problems


def secure_encoding(answer: SiteAnswer, layout: Sequence[ReleaseLayout], cells: int) -> tuple[SiteAnswer, list[np.ndarray]]:
    """A site's noisy answer as SecAgg+ sums it: the answer as it is sent, and its vectors.

    Each value is rounded to whole quanta of its release (:func:`release_quantum`; a noisy
    count is one already): post-processing of the noisy release. The vectors, float64
    holding integers: per release the values in quanta, 0 in suppressed cells; then one
    per cell, 1 where the site reported the cell and 0 where it suppressed it.

    Raises
    ------
    ProtocolError
        The answer is not the plan's (:meth:`SiteAnswer.problems`).
    """
    problems = answer.problems(layout, cells)
    if problems:
        raise ProtocolError("the answer is not the query's release plan (" + "; ".join(problems[:3]) + ")")
    sent, vectors = [], []
    for release, plan in zip(answer.releases, layout, strict=True):
        quantum = release_quantum(plan.mechanism, plan.scale)
        whole = np.array([0.0 if v is None else float(np.rint(v / quantum)) for v in release.values], dtype=np.float64)
        vectors.append(whole)
        values = tuple(None if v is None else float(k * quantum) for v, k in zip(release.values, whole, strict=True))
        sent.append(SiteRelease(release.statistic, release.name, values, release.scale, release.mechanism, release.sensitivity))
    reported = np.ones(cells, dtype=np.float64)
    reported[list(answer.suppressed)] = 0.0
    vectors.append(reported)
    return SiteAnswer(tuple(sent), answer.suppressed), vectors


@dataclass(frozen=True)
class SecureTotals:
    """A study's answers summed over the sites by SecAgg+: all the coordinator learns of them.

    ``releases`` hold, per release of the plan, the total of the sites' values (None in a
    cell no site reported); ``sites`` how many sites reported each cell; ``contributors``
    how many sites' vectors the sum holds.
    """

    releases: tuple[SiteRelease, ...]
    sites: tuple[int, ...]
    contributors: int

    @classmethod
    def from_sums(
        cls, sums: Sequence[np.ndarray], layout: Sequence[ReleaseLayout], cells: int, *, contributors: int
    ) -> SecureTotals:
        """Read the element-wise sums of :func:`secure_encoding`'s vectors over `contributors` sites.

        Raises
        ------
        ProtocolError
            The sums are not what honest sites' vectors add up to: not whole quanta, a
            cell reported by more sites than contributed or by a negative number, or a
            value in a cell no site reported (a site's weight, range or layout was not
            the agreed one).
        """
        if len(sums) != len(layout) + 1:
            raise ProtocolError(f"the secure sum holds {len(sums)} vector(s); the plan's {len(layout)} releases and the reported cells need {len(layout) + 1}")
        whole = []
        for index, (vector, size) in enumerate(zip(sums, [p.size for p in layout] + [cells], strict=True)):
            values = np.asarray(vector, dtype=np.float64).ravel()
            if values.size != size:
                raise ProtocolError(f"vector {index} of the secure sum holds {values.size} values; it should hold {size}")
            rounded = np.rint(values)
            if not np.all(np.isfinite(values)) or np.any(np.abs(values - rounded) > _QUANTUM_TOLERANCE):
                raise ProtocolError(
                    f"vector {index} of the secure sum is not in whole quanta: a site's weight or range was not the agreed one"
                )
            whole.append(rounded)
        sites = whole[-1].astype(np.int64)
        if np.any(sites < 0) or np.any(sites > contributors):
            raise ProtocolError(f"the secure sum says a cell was reported by fewer than 0 or more than {contributors} site(s)")
        releases = []
        for plan, quanta in zip(layout, whole[:-1], strict=True):
            silent = np.array([sites[plan.cell_of(i)] == 0 for i in range(plan.size)], dtype=bool)
            if np.any(quanta[silent] != 0):
                raise ProtocolError(f"the secure sum of {plan.statistic}.{plan.name} has a value in a cell no site reported")
            quantum = release_quantum(plan.mechanism, plan.scale)
            values = tuple(None if hidden else float(k * quantum) for k, hidden in zip(quanta, silent, strict=True))
            releases.append(SiteRelease(plan.statistic, plan.name, values, plan.scale, plan.mechanism, plan.sensitivity))
        return cls(tuple(releases), tuple(int(n) for n in sites), contributors)

    def to_mapping(self) -> dict[str, Any]:
        """The totals in a site answer's wire layout, plus ``sites`` per cell (what pooling reads)."""
        return {
            "releases": [r.to_mapping() for r in self.releases],
            "suppressed": [cell for cell, n in enumerate(self.sites) if n == 0],
            "sites": list(self.sites),
            "contributors": self.contributors,
        }


def spec_fraction(spec: Mapping[str, Any]) -> object:
    """The signed spec's ``federation.fraction_per_round`` as written (1.0 when absent: every node every round)."""
    federation = spec.get("federation")
    return federation.get("fraction_per_round", 1.0) if isinstance(federation, Mapping) else 1.0


def read_schedule(config: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The node's scheduled rounds a message carries (:data:`SCHEDULE_KEY`), or None when it carries none.

    Raises
    ------
    ProtocolError
        The entry is not a list of integers.
    """
    value = config.get(SCHEDULE_KEY)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"'{SCHEDULE_KEY}' must be a list of round numbers; found {value!r}")
    return tuple(value)


def schedule_problems(schedule: Sequence[int], *, rounds: int, fraction: object) -> list[str]:
    """Why `schedule` is not a node's rounds under the signed spec's `rounds` and `fraction`; empty when it is.

    A node's schedule names exactly ``ceil(fraction x rounds)`` distinct rounds within
    ``1..rounds``: no coordinator can give a node more rounds than the signed spec allows.
    """
    problem = limits.fraction_problem(fraction)
    if problem is not None:
        return [f"the signed spec's {problem}"]
    wanted = limits.rounds_per_node(rounds, float(fraction))  # type: ignore[arg-type]
    problems = []
    outside = sorted({r for r in schedule if not 1 <= r <= rounds})
    if outside:
        problems.append(f"round(s) {', '.join(map(str, outside))} of the schedule lie outside 1..{rounds} (federation.rounds)")
    twice = sorted({r for r in schedule if list(schedule).count(r) > 1})
    if twice:
        problems.append(f"the schedule names round(s) {', '.join(map(str, twice))} more than once")
    if len(schedule) != wanted:
        problems.append(
            f"the schedule names {len(schedule)} round(s); the signed spec's federation.fraction_per_round "
            f"{float(fraction):g} of {rounds} round(s) gives every node exactly {wanted}"  # type: ignore[arg-type]
        )
    return problems
