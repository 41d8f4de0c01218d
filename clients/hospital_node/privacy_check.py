"""The empirical privacy check: audit one run's DP-SGD mechanism on the node's own data.

``medfed node privacy-check --run R`` (:func:`run_privacy_check`, which the officer's
console calls too) puts a number beside the epsilon a run was charged, computed from the
hospital's own data rather than taken from the accountant: an *empirical lower bound* on
epsilon, at a stated confidence, by one-run auditing (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846). Everything
happens on the node; nothing is sent anywhere, and nothing is charged to the ledger (the
check releases nothing).

1. **The node's state verifies** (:func:`clients.hospital_node.governance.verified_entries`):
   the audit log against the node key, and every release it records against the ledger.
   A home that does not verify is refused: the check's own record would go into a log
   that cannot be trusted.
2. **The run's mechanism is what the node recorded for run R**: the ledger's DP-SGD
   charges of that run (noise multiplier, sampling rate and steps of every round: the
   numbers the accountant composed), and the training instruction its release records
   hold (clipping norm, learning rate, the features and their scaling; for a run recorded
   before releases held it, the spec the officer's request recorded). A run id that the
   node never trained with DP-SGD (unknown, a statistics study, refused before training)
   is refused, with the runs that can be checked.
3. **The re-training**: the run's dataset is read through the node's own connector (the
   same features, label and scaling as the run), ``canaries`` Dirac canaries are added,
   each with probability 1/2, and the whole of the run's DP-SGD (every charged round's
   steps in turn) runs once, through :func:`models.training.train_dp`
   (:mod:`models.canary_audit`: the audit model is a logistic regression on the run's
   features plus one input per canary, since a Dirac canary needs a coordinate of its
   own; the DP guarantee being audited depends on the noise multiplier, sampling rate,
   steps and clipping, not on the model).
4. **The bound**: each canary's score is turned into guesses and the guesses into the
   paper's lower bound (:func:`privacy.one_run_audit.audit_scores`), at ``confidence``
   and at the delta the run's epsilon was charged at.
5. **The record**: one ``privacy_check`` entry in the signed audit log, with the run, the
   mechanism, the method, the canaries and guesses, the bound, its confidence and delta,
   and the epsilon charged; no patient data, no count of patients.

What the result means: the epsilon *charged* is the ledger's composition of the run's
DP-SGD rounds (this run's alone, not the dataset's lifetime total), beside the run's
epsilon with its other releases (its noisy training-set size and evaluation histograms).
If the accounting and the training are right, the lower bound stays below the DP-SGD
epsilon, except with probability at most ``1 - confidence``; a bound above it means the
mechanism leaks more than it was charged for (or that rare chance). A bound far below is
expected and proves nothing: the check can refute an epsilon, never certify one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.hospital_node.errors import PrivacyCheckError
from clients.hospital_node.home import NodeHome
from federation.protocol import IMAGING_TASK, ProtocolError, TrainInstruction
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.events import POISSON_GAUSSIAN
from privacy.ledger import Charge, PrivacyLedger
from privacy.one_run_audit import DEFAULT_CONFIDENCE, OneRunBound

__all__ = [
    "AUDIT_KIND",
    "DEFAULT_CANARIES",
    "METHOD",
    "MechanismPhase",
    "PrivacyCheckResult",
    "RunMechanism",
    "audit_mechanism",
    "find_run",
    "run_privacy_check",
]

logger = logging.getLogger(__name__)

#: The audit log kind of the check's record.
AUDIT_KIND = "privacy_check"
#: Canaries per check: a thousand give bounds up to about 4 when nothing is private (the paper's Figure 1 setting).
DEFAULT_CANARIES = 1000
MIN_CANARIES, MAX_CANARIES = 100, 100_000
#: What the record and the report name as the method.
METHOD = (
    "one-run audit (Steinke, Nasr, Jagielski, Privacy Auditing with One (1) Training Run, NeurIPS 2023, "
    "arXiv:2305.08846): white-box Dirac canaries, each included with probability 1/2, per-step likelihood-ratio "
    "scores, top-k/bottom-k guesses with a Bonferroni correction over the guess counts tried"
)


@dataclass(frozen=True)
class MechanismPhase:
    """One charged round of DP-SGD (as the ledger holds it): noise multiplier, sampling rate, steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class RunMechanism:
    """What run `run_id` trained on `dataset` with, as the node recorded it."""

    run_id: str
    dataset: str
    spec_digest: str
    submission: str | None
    phases: tuple[MechanismPhase, ...]  # the run's charged DP-SGD rounds, in round order
    max_grad_norm: float
    learning_rate: float
    delta: float  # what the run's epsilon was charged at (the dataset budget's delta)
    epsilon_charged: float  # the run's DP-SGD rounds, composed by the ledger's accountant
    epsilon_run: float  # every charge of the run: its DP-SGD rounds and its other releases
    instruction: TrainInstruction

    @property
    def steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


@dataclass(frozen=True)
class PrivacyCheckResult:
    """The check of one run: its mechanism, the empirical lower bound, and the audit entry that records them."""

    mechanism: RunMechanism
    bound: OneRunBound
    audit_seq: int
    by: str | None = None  # who asked for the check (the CLI's user, the console's officer)

    @property
    def exceeds_charge(self) -> bool:
        """Whether the lower bound is above the epsilon the run's DP-SGD was charged: a finding."""
        return self.bound.epsilon > self.mechanism.epsilon_charged

    def to_mapping(self) -> dict[str, Any]:
        """The result as the audit log records it (and ``--json`` prints it): no patient data."""
        mechanism, bound = self.mechanism, self.bound
        return {
            "run": mechanism.run_id,
            "dataset": mechanism.dataset,
            "spec_digest": mechanism.spec_digest,
            "submission": mechanism.submission,
            "method": METHOD,
            "mechanism": {
                "kind": "DP-SGD",
                "phases": [
                    {"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate, "steps": p.steps}
                    for p in mechanism.phases
                ],
                "steps": mechanism.steps,
                "max_grad_norm": mechanism.max_grad_norm,
                "learning_rate": mechanism.learning_rate,
            },
            "canaries": bound.canaries,
            "guess_options": bound.options,
            "guesses": bound.guesses,
            "correct": bound.correct,
            "k_plus": bound.k_plus,
            "k_minus": bound.k_minus,
            "confidence": bound.confidence,
            "delta": bound.delta,
            "epsilon_lower_bound": bound.epsilon,
            "epsilon_charged": mechanism.epsilon_charged,
            "epsilon_run": mechanism.epsilon_run,
            "accountant": LEDGER_ACCOUNTANT,
            "exceeds_charge": self.exceeds_charge,
            "by": self.by,
        }


# ---------------------------------------------------------------- finding the run


def _verified(home: NodeHome) -> tuple[Any, ...]:
    """The audit log's entries once the log and the ledger verify; else the check is refused."""
    from clients.hospital_node.governance import Refusal, ledger_disagreement, verified_entries

    try:
        entries = verified_entries(home)
    except Refusal as err:
        raise PrivacyCheckError(
            f"node home {home.path}: {err.reason}; the privacy check ran nothing and wrote nothing"
        ) from None
    missing = ledger_disagreement(home, entries)
    if missing:
        raise PrivacyCheckError(
            f"node home {home.path}: the privacy ledger lacks {len(missing)} charge(s) its audit log records "
            f"(first: {missing[0]}); the privacy check ran nothing and wrote nothing until the officer restores the ledger"
        )
    return entries


def _training_charges(charges: Sequence[Charge]) -> list[Charge]:
    return sorted((c for c in charges if c.event.mechanism == POISSON_GAUSSIAN and c.round >= 1), key=lambda c: c.round)


def _checkable_runs(ledger: PrivacyLedger) -> list[str]:
    runs = {c.run_id for dataset in ledger.datasets() for c in _training_charges(ledger.charges(dataset))}
    return sorted(runs, key=lambda run: (len(run), run))


def _runs_hint(runs: Sequence[str]) -> str:
    if not runs:
        return "this node has trained no run with DP-SGD yet"
    shown = ", ".join(runs[-10:])
    return f"runs this node trained with DP-SGD: {shown}" + (f" (the last 10 of {len(runs)})" if len(runs) > 10 else "")


def find_run(home: NodeHome, run_id: str, *, dataset: str | None = None) -> RunMechanism:
    """Run `run_id`'s DP-SGD mechanism on this node, from its verified audit log and its ledger.

    Raises
    ------
    PrivacyCheckError
        The home does not verify, the run is unknown or trained no model with DP-SGD here,
        it trained on several datasets and `dataset` does not pick one, or the node holds
        no record of its clipping norm and learning rate.
    """
    if not isinstance(run_id, str) or not run_id.strip():
        raise PrivacyCheckError("--run must name a run id (as `medfed node egress` or `medfed node audit show` lists them)")
    entries = _verified(home)
    with PrivacyLedger.open(home.ledger_path) as ledger:
        runs = _checkable_runs(ledger)
        by_dataset = {d: [c for c in ledger.charges(d) if c.run_id == run_id] for d in ledger.datasets()}
        by_dataset = {d: charges for d, charges in by_dataset.items() if charges}
        if dataset is not None:
            home.dataset(dataset)  # an unregistered name is named as such
            by_dataset = {d: c for d, c in by_dataset.items() if d == dataset}
        if not by_dataset:
            where = f" on dataset '{dataset}'" if dataset is not None else ""
            raise PrivacyCheckError(
                f"run '{run_id}' has no charge in this node's privacy ledger{where}: it never trained or released "
                f"anything here; {_runs_hint(runs)}"
            )
        trained = {d: _training_charges(c) for d, c in by_dataset.items()}
        trained = {d: c for d, c in trained.items() if c}
        if not trained:
            [(name, charges)] = list(by_dataset.items())[:1]
            what = sorted({c.event.mechanism for c in charges})
            raise PrivacyCheckError(
                f"run '{run_id}' trained no model with DP-SGD on dataset '{name}' (its charges here are "
                f"{', '.join(what)} releases: a statistics study, or a run that stopped before its first round); "
                f"the privacy check re-trains a DP-SGD mechanism, so there is nothing to check; {_runs_hint(runs)}"
            )
        if len(trained) > 1:
            raise PrivacyCheckError(
                f"run '{run_id}' trained on datasets {', '.join(sorted(trained))} of this node; name one with --dataset"
            )
        [(name, rounds)] = trained.items()
        every_charge = by_dataset[name]
    instruction, delta = _recorded_training(home, entries, run_id, name, rounds)
    if instruction.task == IMAGING_TASK:
        raise PrivacyCheckError(
            f"run '{run_id}' trained an imaging model on dataset '{name}'; the privacy check re-trains tabular runs "
            "(a flat table or an OMOP cohort) only"
        )
    phases = tuple(MechanismPhase(c.event.noise_multiplier, c.event.sample_rate, c.event.steps) for c in rounds)
    return RunMechanism(
        run_id=run_id,
        dataset=name,
        spec_digest=instruction.spec_digest,
        submission=rounds[-1].submission,
        phases=phases,
        max_grad_norm=instruction.max_grad_norm,
        learning_rate=instruction.learning_rate,
        delta=delta,
        epsilon_charged=epsilon([c.event for c in rounds], delta=delta, accountant=LEDGER_ACCOUNTANT),
        epsilon_run=epsilon([c.event for c in every_charge], delta=delta, accountant=LEDGER_ACCOUNTANT),
        instruction=instruction,
    )


def _recorded_training(
    home: NodeHome, entries: Sequence[Any], run_id: str, dataset: str, rounds: Sequence[Charge]
) -> tuple[TrainInstruction, float]:
    """The run's training instruction and the delta its epsilon was charged at, from the audit log."""
    from privacy.governance import GovernanceState

    releases = [
        e.payload for e in entries
        if e.kind == "release" and e.payload.get("message") == "train"
        and str(e.payload.get("run")) == run_id and e.payload.get("dataset") == dataset
    ]
    state = GovernanceState.from_entries(entries)
    delta = next((float(r["charge"]["delta"]) for r in reversed(releases) if isinstance(r.get("charge"), Mapping)), None)
    if delta is None:
        budget = state.budgets.get(dataset)
        delta = budget.delta if budget is not None else None
    recorded = next((r["instruction"] for r in reversed(releases) if isinstance(r.get("instruction"), Mapping)), None)
    if recorded is not None:
        import json

        try:
            instruction = TrainInstruction.from_json(json.dumps(recorded))
        except ProtocolError as err:
            raise PrivacyCheckError(f"run '{run_id}': the training instruction its release records is unreadable ({err})") from None
    else:
        instruction = _instruction_from_request(state, entries, run_id, dataset, rounds)
    return instruction, float(delta if delta is not None else instruction.delta)


def _instruction_from_request(
    state: Any, entries: Sequence[Any], run_id: str, dataset: str, rounds: Sequence[Charge]
) -> TrainInstruction:
    """For a run recorded before release records held the instruction: the spec its request recorded.

    The noise multiplier, sampling rate and steps are the ledger's (a target_epsilon spec
    leaves the noise to the coordinator); the rest is the signed spec's.
    """
    submission = rounds[-1].submission
    digests = [
        str(e.payload.get("spec_digest")) for e in entries
        if e.kind in ("submission", "release") and e.payload.get("dataset") == dataset
        and (str(e.payload.get("run")) == run_id or (submission is not None and e.payload.get("submission_id") == submission))
    ]
    request = next((state.requests.get((d, dataset)) for d in reversed(digests) if (d, dataset) in state.requests), None)
    spec = request.payload.get("spec") if request is not None else None
    if not isinstance(spec, Mapping):
        raise PrivacyCheckError(
            f"run '{run_id}' on dataset '{dataset}': the node holds neither the instruction it trained by nor the spec "
            "its officer approved (approved before its request arrived), so it cannot know the run's clipping norm and "
            "learning rate; the privacy check needs them to re-train the mechanism"
        )

    def get(table: str, key: str, default: Any = None) -> Any:
        section = spec.get(table)
        value = section.get(key) if isinstance(section, Mapping) else None
        return default if value is None else value

    last = rounds[-1].event
    try:
        return TrainInstruction(
            experiment=str(get("experiment", "name", "")),
            spec_digest=str(request.spec_digest),
            dataset=dataset,
            features=tuple(get("data", "features", ())),
            label=str(get("data", "label", "")),
            model_kind=str(get("model", "kind", "")),
            hidden=tuple(int(h) for h in get("model", "hidden", ())),
            local_epochs=int(get("federation", "local_epochs", 1)),
            learning_rate=float(get("federation", "learning_rate", 0.0)),
            noise_multiplier=last.noise_multiplier,
            max_grad_norm=float(get("privacy", "max_grad_norm", 0.0)),
            sample_rate=last.sample_rate,
            steps=last.steps,
            delta=float(get("privacy", "delta", 0.0)),
            accountant=str(get("privacy", "accountant", LEDGER_ACCOUNTANT)),
            rounds=int(get("federation", "rounds", len(rounds))),
            scaling={k: (float(v[0]), float(v[1])) for k, v in (get("data", "scaling", {}) or {}).items()},
            task=str(get("experiment", "task", "")),
            channels=tuple(int(c) for c in get("model", "channels", ()) or ()),
            cohort=get("data", "cohort"),
        )
    except (ProtocolError, TypeError, ValueError, IndexError) as err:
        raise PrivacyCheckError(f"run '{run_id}': the spec its request recorded does not describe a training run ({err})") from None


# ---------------------------------------------------------------- the audit


def audit_mechanism(
    x: np.ndarray,
    y: np.ndarray,
    *,
    phases: Sequence[MechanismPhase],
    max_grad_norm: float,
    learning_rate: float,
    delta: float,
    private: bool = True,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | None = None,
) -> OneRunBound:
    """One one-run audit of a training mechanism on rows `x`, `y`: the empirical lower bound.

    `phases` is the DP-SGD mechanism, phase after phase. ``private=False`` trains the same
    schedule (sampling rates and steps) without DP instead: no clipping, no noise, the
    baseline that shows what the canaries reveal when nothing is private. `seed` fixes
    the canaries' coins, the Poisson sampling and the noise (tests and reproductions); by
    default they come from the operating system. The global torch generator is left as
    it was.
    """
    import torch

    from models.canary_audit import TrainingPhase, dirac_canary_scores
    from privacy.one_run_audit import audit_scores

    schedule = [TrainingPhase(p.noise_multiplier if private else None, p.sample_rate, p.steps) for p in phases]
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    torch_seed = int(rng.integers(0, 2**62))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        scores = dirac_canary_scores(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
            included,
            phases=schedule,
            max_grad_norm=max_grad_norm,
            learning_rate=learning_rate,
            generator=torch.Generator().manual_seed(torch_seed + 1),
        )
    return audit_scores(scores, included, delta=delta, confidence=confidence)


def _training_rows(home: NodeHome, mechanism: RunMechanism, check_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's training rows, read as its rounds read them: the node's connector, the run's features and scaling."""
    instruction = mechanism.instruction
    entry = home.dataset(mechanism.dataset)
    wanted = "omop" if instruction.cohort is not None else "tabular"
    if entry.kind != wanted:
        raise PrivacyCheckError(
            f"dataset '{mechanism.dataset}' is registered as kind '{entry.kind}' now; run '{mechanism.run_id}' trained on a "
            f"'{wanted}' dataset, so the check cannot read the run's data"
        )
    if instruction.cohort is not None:
        from clients.hospital_node.cohort_connector import load_cohort

        # A cohort of its own, built from one snapshot of the source and removed once read.
        data = load_cohort(entry, instruction.cohort_definition(), instruction.scaling, run=check_id, last=True)
    else:
        from clients.hospital_node.connectors import TabularConnector

        if entry.label_column != instruction.label:
            raise PrivacyCheckError(
                f"dataset '{mechanism.dataset}' has label '{entry.label_column}' now; run '{mechanism.run_id}' trained on "
                f"label '{instruction.label}', so the check cannot read the run's data"
            )
        data = TabularConnector(entry).load().select(instruction.features, instruction.scaling)
    return data.x_train, data.y_train


def _check_options(canaries: int, confidence: float) -> None:
    problems = []
    if isinstance(canaries, bool) or not isinstance(canaries, int) or not MIN_CANARIES <= canaries <= MAX_CANARIES:
        problems.append(f"--canaries must be an integer in {MIN_CANARIES}..{MAX_CANARIES}; found {canaries!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 <= confidence < 1:
        problems.append(f"--confidence must be in [0.5, 1), e.g. 0.95; found {confidence!r}")
    if problems:
        raise PrivacyCheckError("; ".join(problems))


def run_privacy_check(
    home: NodeHome | Path,
    run_id: str,
    *,
    dataset: str | None = None,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | None = None,
    by: str | None = None,
) -> PrivacyCheckResult:
    """Audit run `run_id`'s DP-SGD mechanism on this node's data and record the check in the audit log.

    The plain function behind ``medfed node privacy-check`` and the officer's console;
    ``by`` (the officer or user who asked) is recorded with the result.
    Every problem with the home, the run or the options is raised before anything is
    trained or written.

    Raises
    ------
    PrivacyCheckError
        See :func:`find_run`; also options out of range.
    NodeError
        The home or the run's dataset cannot be opened or read.
    """
    import uuid

    _check_options(canaries, confidence)
    node = home if isinstance(home, NodeHome) else NodeHome.open(Path(home))
    mechanism = find_run(node, run_id, dataset=dataset)
    x, y = _training_rows(node, mechanism, f"privacy-check-{uuid.uuid4().hex[:12]}")
    if len(y) == 0:
        raise PrivacyCheckError(f"dataset '{mechanism.dataset}' has no training rows now; there is nothing to re-train")
    logger.info(
        "privacy check of run %s on dataset '%s': %d canaries, %d DP-SGD steps", run_id, mechanism.dataset, canaries, mechanism.steps
    )
    bound = audit_mechanism(
        x,
        y,
        phases=mechanism.phases,
        max_grad_norm=mechanism.max_grad_norm,
        learning_rate=mechanism.learning_rate,
        delta=mechanism.delta,
        canaries=canaries,
        confidence=confidence,
        seed=seed,
    )
    if not math.isfinite(bound.epsilon):
        raise PrivacyCheckError(f"run '{run_id}': the audit gave no finite bound; nothing was recorded")
    result = PrivacyCheckResult(mechanism, bound, audit_seq=-1, by=by)
    entry = node.audit_log().append(AUDIT_KIND, result.to_mapping())
    if result.exceeds_charge:
        logger.warning(
            "privacy check of run %s: empirical lower bound %.3f exceeds the charged epsilon %.3f", run_id, bound.epsilon,
            mechanism.epsilon_charged,
        )
    return PrivacyCheckResult(mechanism, bound, audit_seq=entry.seq, by=by)
