"""Costing an experiment at the corners of `privacy.limits`: seconds and peak memory per accountant.

The limits bound what one spec may ask of an accountant (`privacy/limits.py`). This
measures the worst corners they allow: the most steps (``MAX_TOTAL_STEPS``), at the
smallest and at larger sample rates, at the smallest delta (``MIN_DELTA``) and a common
one, with the smallest noise the epsilon limit lets through ("small noise": the noise
whose dp-accounting RDP bound is exactly ``MAX_EPSILON``, found by bisection on that
bound) and with a large noise. For each corner and each accountant it composes the
whole experiment once (one self-composed event, as `experiments.cost` and a node's
admission do) in a fresh process, after the accountant's imports, and reports

- ``seconds``: wall time of the composition (median of ``--repeats`` processes);
- ``peak_mib``: the process's peak resident memory above its size after the imports.

The baseline it is read against is the one-second goal of issue 9 (and, for memory,
the 11-20 GB the unbounded specs took). ``--search`` adds what costing a target-epsilon
spec does: the noise search (``privacy.accountant.noise_for_target``, by PLD, 2-6
compositions) and the spec's PRV planning estimate at the noise found.

Run from the repository root: ``python benchmarks/accounting_limits.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

from privacy import limits
from privacy.accountant import epsilon_bound
from privacy.events import DPEvent

# One composition in a fresh process: imports first, then the timed part.
_CHILD = r"""
import json, resource, sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import dp_accounting.pld, dp_accounting.rdp, opacus.accountants
from privacy.accountant import epsilon, noise_for_target
from privacy.events import DPEvent
kind, sigma, q, steps, delta, target = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if target != "-":  # what `cost` does for a target: the search (PLD), then the spec's estimate at its noise
    value = noise_for_target(target_epsilon=float(target), delta=delta, sample_rate=q, steps=steps)
    epsilon([DPEvent(value, q, steps)], delta=delta, accountant=kind)
else:
    value = epsilon([DPEvent(sigma, q, steps)], delta=delta, accountant=kind)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"value": value, "seconds": seconds, "peak_mib": (peak - base) / 1024}))
"""


@dataclass(frozen=True)
class Corner:
    """One point of the parameter space and what composing it cost."""

    name: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float | None
    value: float  # epsilon; for a noise search, the noise multiplier it found
    seconds: float
    peak_mib: float


def smallest_noise(sample_rate: float, steps: int, delta: float) -> float:
    """The least noise the limits let through: MIN_NOISE_MULTIPLIER, or the noise whose RDP bound is MAX_EPSILON."""
    low, high = limits.MIN_NOISE_MULTIPLIER, 1e4
    if epsilon_bound([DPEvent(low, sample_rate, steps)], delta=delta) <= limits.MAX_EPSILON:
        return low
    for _ in range(80):
        mid = (low * high) ** 0.5
        if epsilon_bound([DPEvent(mid, sample_rate, steps)], delta=delta) > limits.MAX_EPSILON:
            low = mid
        else:
            high = mid
    return high


def measure(accountant: str, sigma: float, q: float, steps: int, delta: float, target: float | None, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, accountant, repr(sigma), repr(q), str(steps), repr(delta), "-" if target is None else repr(target)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "value": runs[0]["value"],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_mib": max(r["peak_mib"] for r in runs),
    }


def corners(search: bool) -> list[tuple[str, float, float, int, float, float | None]]:
    steps = limits.MAX_TOTAL_STEPS
    out: list[tuple[str, float, float, int, float, float | None]] = []
    for q in (limits.MIN_SAMPLE_RATE, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0):
        for delta in (limits.MIN_DELTA, 1e-5):
            out.append((f"small noise, q={q:g}, {steps} steps, delta={delta:g}", smallest_noise(q, steps, delta), q, steps, delta, None))
        out.append((f"large noise, q={q:g}, {steps} steps", 100.0, q, steps, limits.MIN_DELTA, None))
    out.append(("small noise, q=1, 1 step", smallest_noise(1.0, 1, limits.MIN_DELTA), 1.0, 1, limits.MIN_DELTA, None))
    if search:
        for q in (limits.MIN_SAMPLE_RATE, 0.01, 0.1, 0.5, 1.0):
            for target in (1.0, limits.MAX_EPSILON):
                for delta in (limits.MIN_DELTA, 1e-5):
                    name = f"target {target:g}, q={q:g}, {steps} steps, delta={delta:g}"
                    out.append((name, 0.0, q, steps, delta, target))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per corner and accountant (median)")
    parser.add_argument("--search", action="store_true", help="also time a target-epsilon noise search")
    parser.add_argument("--search-only", action="store_true", help="time only the target-epsilon corners")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results: list[Corner] = []
    costing: dict[str, float] = {}  # corner -> PLD + PRV seconds: what `medfed experiment cost` composes
    chosen = corners(args.search or args.search_only)
    if args.search_only:
        chosen = [c for c in chosen if c[5] is not None]
    for name, sigma, q, steps, delta, target in chosen:
        for accountant in (("prv",) if target is not None else ("pld", "prv")):
            got = measure(accountant, sigma, q, steps, delta, target, args.repeats)
            corner = Corner(name, accountant, sigma, q, steps, delta, target, **got)
            results.append(corner)
            if target is None:
                costing[name] = costing.get(name, 0.0) + corner.seconds
            found = f"sigma={corner.value:<8.4g} found" if target is not None else f"sigma={sigma:<8.4g} eps={corner.value:<8.4g}"
            print(f"{accountant:3} {name:55} {found} {corner.seconds:6.3f} s  {corner.peak_mib:7.1f} MiB", flush=True)
    for accountant in ("pld", "prv") if costing else ():
        timed = [c for c in results if c.accountant == accountant and c.target_epsilon is None]
        worst = max(timed, key=lambda c: c.seconds)
        print(f"worst {accountant}: {worst.seconds:.3f} s ({worst.name}); most memory {max(c.peak_mib for c in timed):.0f} MiB")
    if costing:
        name = max(costing, key=costing.__getitem__)
        print(f"worst costing (PLD + PRV): {costing[name]:.3f} s ({name})")
    searched = [c for c in results if c.target_epsilon is not None]
    if searched:
        worst = max(searched, key=lambda c: c.seconds)
        print(f"worst target costing (search + PRV): {worst.seconds:.3f} s ({worst.name})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                "load_average": os.getloadavg(),
                "limits": {k: getattr(limits, k) for k in limits.__all__ if k.isupper()},
                "corners": [asdict(c) for c in results],
            }, handle, indent=2)


if __name__ == "__main__":
    main()
