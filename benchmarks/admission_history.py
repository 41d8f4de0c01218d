"""Admission time against a node's history: 100 000 audit entries and 10 000 charges, against 100 and 10.

Issue 12, part 4: a node's per-message checks must not grow with its history. This
builds two real node homes that differ only in their history, and times the node's
admission path on each, alternating between them in the same run so that machine load
falls on both alike:

- ``small``: 100 audit entries, 10 charges (one past run of 9 training rounds and its
  once-per-run count release);
- ``large``: 100 000 audit entries, 10 000 charges (1 000 past runs of the same shape,
  under 20 approved specs; the rest of the log is refusal entries, as a node that
  refused many runs of apps not on its allow-list holds).

Each history is written with the audit log's own line format and the node key (a hash
chain of signed entries and a signed head), and the ledger's charges and released run
reservations with its own schema: a real node would take 100 000 fsync'd appends to get
there. The benchmark then runs the node's start (``governance.full_check``: the whole
log verified, every release checked against the ledger, the running composition
recomputed, the checkpoint recorded), and checks that the log verifies.

Each iteration, on each home, a fresh signed submission of the example spec (approved
for a million runs) goes through :func:`clients.hospital_node.governance.admit` as the
run's ``query`` message (the log checked from its checkpoint, signature, policy,
approval, caps, and the run reserved: the budget check composes the dataset's running
composition with the live reservations and the run) and then as its ``train`` message of
round 1 (the same checks; the reservation is found), then the run is ended (not timed).
Reported: the median seconds of each, and large / small; and the node-state check alone
(:func:`clients.hospital_node.governance.checked_state`, the part that used to read the
whole log and ledger), right after the run, with the size of the checkpoint it reads.

The two histories spend about the same epsilon (the large one's rounds are noisier),
because PLD's cost follows the composed privacy loss, which a budget bounds, and not
the number of charges: the budget check composes one event per distinct mechanism,
noise and sample rate (the running composition), whatever the history's length. The
composed epsilon of each history is printed with the rest.

A second table times the budget check's composition alone (what ``reserve_run``
composes: the history, the live reservations, the new run), median of 5: from the
running composition (what the node does now) and from every charge read back (what it
did before), on both homes; and, with no home, the large history's events at the small
one's noise, an epsilon beyond any budget, to show what PLD's cost follows.

Run from the repository root: ``python benchmarks/admission_history.py [--iterations 15] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from clients.hospital_node import governance  # noqa: E402
from clients.hospital_node.home import DatasetEntry, NodeHome  # noqa: E402
from experiments.cost import plan_privacy  # noqa: E402
from experiments.spec import ExperimentSpec  # noqa: E402
from federation.experiment import instruction_for  # noqa: E402
from federation.protocol import SignedSpec, TrainInstruction  # noqa: E402
from medfed.demo import EXAMPLE_SPEC  # noqa: E402
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort  # noqa: E402
from privacy import audit  # noqa: E402
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon  # noqa: E402
from privacy.events import DISCRETE_LAPLACE, POISSON_GAUSSIAN, DPEvent  # noqa: E402
from privacy.governance import Submission, sign_submission  # noqa: E402
from privacy.keys import load_private_key  # noqa: E402
from privacy.ledger import PrivacyLedger  # noqa: E402

DATASET = "htn_cohort"
PARTNER = "bench_partner"
OFFICER = "bench-officer"
BUDGET = 10.0
DELTA = 1e-5
ROUNDS_PER_RUN = 9  # and one once-per-run count: 10 charges a run
Q, STEPS = 0.01, 100  # a past round: 100 DP-SGD steps at sample rate 0.01
SMALL_SIGMA, SMALL_COUNT_SCALE = 1.0, 10.0


@dataclass
class Node:
    name: str
    home: NodeHome
    entries: int
    charges: int
    history_epsilon: float
    start_seconds: float  # the full check at node start


@dataclass
class Result:
    history: str
    audit_entries: int
    charges: int
    history_epsilon: float
    start_full_check_s: float
    query_admission_s: float
    train_admission_s: float
    state_check_s: float  # governance.checked_state alone: the log from its checkpoint, the ledger against it
    checkpoint_bytes: int


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def write_history(home: NodeHome, entries: list[tuple[str, dict[str, Any]]]) -> int:
    """Append `entries` to the node's log in its own format, signed by its key; returns the count."""
    log = home.audit_log()
    key = load_private_key(home.audit_key_path)
    last = log.entries()[-1]
    seq, prev = last.seq, last.hash
    start = dt.datetime.now(dt.UTC)
    lines = []
    for offset, (kind, payload) in enumerate(entries, start=1):
        seq += 1
        when = (start + dt.timedelta(microseconds=offset)).strftime(audit._TIME_FORMAT)
        digest = audit._content_hash(seq, when, kind, payload, prev)
        signature = audit._sign(key, audit._ENTRY_CONTEXT + digest.encode("ascii"))
        lines.append(_canonical({"seq": seq, "time": when, "kind": kind, "payload": payload, "prev": prev, "hash": digest, "sig": signature}))
        prev = digest
    with log.path.open("a", encoding="ascii") as handle:
        handle.write("\n".join(lines) + "\n")
    log._write_head(key, count=seq + 1, last=prev)
    return seq + 1


def write_charges(home: NodeHome, runs: int, sigma: float, count_scale: float) -> int:
    """`runs` past runs in the ledger: each 9 rounds and a once-per-run count, its reservation released."""
    PrivacyLedger.open(home.ledger_path).close()  # the schema
    at = "2026-11-01T09:00:00+00:00"
    conn = sqlite3.connect(home.ledger_path)
    with conn:
        for run in range(runs):
            submission = f"past-submission-{run:05d}"
            rows = [(DATASET, f"past-run-{run:05d}", r, 0, POISSON_GAUSSIAN, sigma, Q, STEPS, at, submission) for r in range(1, ROUNDS_PER_RUN + 1)]
            rows.append((DATASET, f"past-run-{run:05d}", 0, 1, DISCRETE_LAPLACE, count_scale, 1.0, 1, at, submission))
            conn.executemany(
                "INSERT INTO charges (dataset, run_id, round, release, mechanism, noise_multiplier, sample_rate, steps, "
                "charged_at, submission) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            cursor = conn.execute(
                "INSERT INTO run_reservations (dataset, submission, rounds, charged, reserved_at, active_at, released_at, "
                "once_charged) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (DATASET, submission, ROUNDS_PER_RUN, ROUNDS_PER_RUN, at, at, at, 1),
            )
            conn.executemany(
                "INSERT INTO run_reservation_events (reservation, release, mechanism, noise_multiplier, sample_rate, steps, once) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(cursor.lastrowid, 0, POISSON_GAUSSIAN, sigma, Q, STEPS, 0), (cursor.lastrowid, 1, DISCRETE_LAPLACE, count_scale, 1.0, 1, 1)],
            )
    conn.close()
    return runs * (ROUNDS_PER_RUN + 1)


def history_entries(runs: int, total: int, already: int, sigma: float, count_scale: float, spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The audit entries of `runs` past runs under max(1, runs // 50) past specs, then refusals up to `total`."""
    specs = max(1, runs // 50)
    out: list[tuple[str, dict[str, Any]]] = []
    for s in range(specs):
        digest = f"{s:064x}"
        out.append(("request", {"spec_digest": digest, "dataset": DATASET, "experiment": f"past-{s}", "signer": PARTNER, "spec": spec}))
        out.append(("approval", {"spec_digest": digest, "dataset": DATASET, "max_epsilon": None, "expires": None, "runs": 50, "by": OFFICER}))
    for run in range(runs):
        submission, run_id = f"past-submission-{run:05d}", f"past-run-{run:05d}"
        out.append(("submission", {"submission_id": submission, "spec_digest": f"{run % specs:064x}", "dataset": DATASET,
                                    "signer": PARTNER, "signed_at": "2026-11-01T09:00:00+00:00", "run": run_id}))
        for r in range(1, ROUNDS_PER_RUN + 1):
            releases = {"num-examples": {"charged": "now", "mechanism": DISCRETE_LAPLACE, "scale": count_scale}} if r == 1 else {}
            out.append(("release", {"run": run_id, "round": r, "message": "train", "dataset": DATASET, "bytes": 68,
                                    "charge": {"noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}, "dp_releases": releases}))
    filler = total - already - len(out)
    out.extend(("refusal", {"run": str(10_000 + i), "message": "train", "code": 9, "reason": "the run's app is not on this node's allow-list"})
               for i in range(filler))
    return out


def build_node(folder: Path, name: str, *, entries: int, runs: int, sigma: float, count_scale: float,
               partner: Ed25519PrivateKey, spec: ExperimentSpec) -> Node:
    folder.mkdir(parents=True)
    cohort = folder / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(cohort, index=False)
    home = NodeHome.create(folder / "home", name=name)
    home.register_dataset(DatasetEntry(name=DATASET, path=cohort, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES))
    home.trusted_partners().add(PARTNER, partner.public_key(), added_by=OFFICER)
    governance.set_budget(home, DATASET, epsilon_=BUDGET, delta=DELTA, by=OFFICER)
    governance.approve(home, spec.digest(), dataset=DATASET, by=OFFICER, runs=1_000_000, not_yet_requested=True)
    already = len(home.audit_log().entries())
    spec_mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    count = write_history(home, history_entries(runs, entries, already, sigma, count_scale, spec_mapping))
    charges = write_charges(home, runs, sigma, count_scale)
    start = time.perf_counter()
    governance.full_check(home)  # what the node does at start: records the checkpoint
    seconds = time.perf_counter() - start
    with PrivacyLedger.open(home.ledger_path) as ledger:
        spent = ledger.spent(DATASET, delta=DELTA)
    return Node(name, home, count, charges, spent, seconds)


def _signed(spec: ExperimentSpec, partner: Ed25519PrivateKey) -> SignedSpec:
    submission = Submission.new(spec.canonical_json())
    signature = sign_submission(submission, partner)
    return SignedSpec(spec.canonical_json(), signature.signature, signature.signer, submission.to_json())


def admit_once(node: Node, instruction: TrainInstruction, signed: SignedSpec, run: str) -> tuple[float, float]:
    """One run's query and train admission on `node`: their seconds. The run is ended after (not timed)."""
    start = time.perf_counter()
    query = governance.admit(node.home, instruction, signed, run_id=run, kind="query")
    middle = time.perf_counter()
    governance.admit(node.home, instruction, signed, run_id=run, kind="train")
    end = time.perf_counter()
    governance.end_run(node.home, DATASET, query.submission.submission_id)
    return middle - start, end - middle


def _median_seconds(work, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    spans = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        spans.append(time.perf_counter() - start)
    return statistics.median(spans)


def composition_times(node: Node, wanted: list[DPEvent]) -> dict[str, float]:
    """Seconds of the budget check's composition on `node`: from the running composition, and from every charge."""
    from datetime import timedelta

    hold = timedelta(hours=24)
    with PrivacyLedger.open(node.home.ledger_path) as ledger:
        running = _median_seconds(lambda: epsilon([*ledger.held(DATASET, hold=hold), *wanted], delta=DELTA, accountant=LEDGER_ACCOUNTANT))
        scratch = _median_seconds(
            lambda: epsilon([*ledger.events(DATASET), *ledger.reserved(DATASET, hold=hold), *wanted], delta=DELTA, accountant=LEDGER_ACCOUNTANT)
        )
        assert epsilon([*ledger.held(DATASET, hold=hold), *wanted], delta=DELTA, accountant=LEDGER_ACCOUNTANT) == epsilon(
            [*ledger.events(DATASET), *ledger.reserved(DATASET, hold=hold), *wanted], delta=DELTA, accountant=LEDGER_ACCOUNTANT
        )
    return {"running_s": round(running, 4), "from_every_charge_s": round(scratch, 4)}


def matching_sigma(target: float, steps: int) -> float:
    """The noise at which `steps` DP-SGD steps at Q compose to about `target` (bisection on log noise)."""
    low, high = 1.0, 64.0
    for _ in range(10):
        middle = math.sqrt(low * high)
        if epsilon([DPEvent(middle, Q, steps)], delta=DELTA, accountant=LEDGER_ACCOUNTANT) > target:
            low = middle
        else:
            high = middle
    return round(high, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--charges", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    spec = ExperimentSpec.from_mapping(tomllib.loads(EXAMPLE_SPEC.read_text()), source=str(EXAMPLE_SPEC))
    instruction = instruction_for(spec, plan_privacy(spec))
    partner = Ed25519PrivateKey.generate()
    small_runs, large_runs = 1, args.charges // (ROUNDS_PER_RUN + 1)
    small_rounds = epsilon([DPEvent(SMALL_SIGMA, Q, STEPS * ROUNDS_PER_RUN * small_runs)], delta=DELTA, accountant=LEDGER_ACCOUNTANT)
    large_sigma = matching_sigma(small_rounds, STEPS * ROUNDS_PER_RUN * large_runs)
    large_count_scale = round(SMALL_COUNT_SCALE * math.sqrt(large_runs), 1)

    with tempfile.TemporaryDirectory(prefix="admission-history-") as tmp:
        built = time.perf_counter()
        small = build_node(Path(tmp) / "small", "hospital_small", entries=100, runs=small_runs, sigma=SMALL_SIGMA,
                           count_scale=SMALL_COUNT_SCALE, partner=partner, spec=spec)
        large = build_node(Path(tmp) / "large", "hospital_large", entries=args.entries, runs=large_runs, sigma=large_sigma,
                           count_scale=large_count_scale, partner=partner, spec=spec)
        print(f"built both homes in {time.perf_counter() - built:.1f} s; large history: rounds at noise {large_sigma}, "
              f"counts at scale {large_count_scale}", flush=True)
        times: dict[str, list[tuple[float, float]]] = {small.name: [], large.name: []}
        checks: dict[str, list[float]] = {small.name: [], large.name: []}
        # One warm-up run each (imports, the accountant's first composition), then alternate.
        for node in (small, large):
            admit_once(node, instruction, _signed(spec, partner), "warm-up")
        for i in range(args.iterations):
            order = (small, large) if i % 2 == 0 else (large, small)
            for node in order:
                times[node.name].append(admit_once(node, instruction, _signed(spec, partner), f"bench-{i}"))
                start = time.perf_counter()
                governance.checked_state(node.home)
                checks[node.name].append(time.perf_counter() - start)
        wanted = [DPEvent(instruction.noise_multiplier, instruction.sample_rate, instruction.steps).times(instruction.rounds)]
        compositions = {"small": composition_times(small, wanted), "large": composition_times(large, wanted)}
        same_noise = [DPEvent(SMALL_SIGMA, Q, STEPS * ROUNDS_PER_RUN * large_runs),
                      DPEvent(SMALL_COUNT_SCALE, 1.0, large_runs, DISCRETE_LAPLACE), *wanted]
        compositions["large, small's noise (no home)"] = {
            "running_s": round(_median_seconds(lambda: epsilon(same_noise, delta=DELTA, accountant=LEDGER_ACCOUNTANT), repeats=3), 4),
            "epsilon": round(epsilon(same_noise, delta=DELTA, accountant=LEDGER_ACCOUNTANT), 1),
        }
        results = []
        for label, node in (("small", small), ("large", large)):
            queries, trains = zip(*times[node.name], strict=True)
            results.append(Result(label, node.entries, node.charges, round(node.history_epsilon, 3), round(node.start_seconds, 3),
                                  round(statistics.median(queries), 4), round(statistics.median(trains), 4),
                                  round(statistics.median(checks[node.name]), 4), node.home.audit_log().checkpoint_path.stat().st_size))
            assert node.home.audit_log().verify(load_public_key_of(node)).ok

    small_r, large_r = results
    ratios = {
        "query": large_r.query_admission_s / small_r.query_admission_s,
        "train": large_r.train_admission_s / small_r.train_admission_s,
        "query+train": (large_r.query_admission_s + large_r.train_admission_s) / (small_r.query_admission_s + small_r.train_admission_s),
        "state check": large_r.state_check_s / small_r.state_check_s,
    }
    print(f"{'history':8} {'entries':>8} {'charges':>8} {'eps spent':>9} {'start (full) s':>14} {'query s':>8} {'train s':>8} "
          f"{'state check s':>13} {'checkpoint B':>12}")
    for r in results:
        print(f"{r.history:8} {r.audit_entries:8d} {r.charges:8d} {r.history_epsilon:9.3f} {r.start_full_check_s:14.3f} "
              f"{r.query_admission_s:8.4f} {r.train_admission_s:8.4f} {r.state_check_s:13.4f} {r.checkpoint_bytes:12d}")
    print("large / small: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f" (median of {args.iterations})")
    print("budget check composition alone (median of 5):")
    for label, found in compositions.items():
        print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
            "iterations": args.iterations, "results": [asdict(r) for r in results], "ratios": ratios,
            "compositions": compositions,
        }, indent=2))
    return 0


def load_public_key_of(node: Node):  # type: ignore[no-untyped-def]
    from privacy.keys import load_public_key

    return load_public_key(node.home.audit_public_key_path)


if __name__ == "__main__":
    raise SystemExit(main())
