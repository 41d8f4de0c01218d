"""The statistics releases' noise samplers (`privacy.mechanisms`, OpenDP) against NumPy's, per vector size.

For each mechanism (discrete Laplace on int64 counts, Laplace and Gaussian on float64
sums) and each size, one call of medfed's sampler on a vector of zeros, timed as the
median of ``--repeats`` calls (wall time, and the CPU time of this process, which a
busy machine inflates less), beside NumPy's ``Generator`` drawing the same noise in
the same run: the floor of what adding noise to a vector can cost, not a DP mechanism
(floating-point Laplace and Gaussian samplers leak through their low bits, and NumPy's
generator is seeded). OpenDP draws every value exactly from the operating system's
randomness, so the ratio is the price of that.

Run from the repository root:
``python benchmarks/noise_samplers.py [--sizes 1000 100000] [--repeats 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from privacy import mechanisms

SCALE = 3.0


@dataclass
class Row:
    mechanism: str
    size: int
    seconds: float  # median of the repeats, medfed's sampler (OpenDP), wall time
    cpu_seconds: float  # the same calls' CPU time (OpenDP samples in the calling thread)
    numpy_seconds: float  # median of the repeats, NumPy's Generator, same size
    per_value_us: float  # CPU microseconds per value

    @property
    def ratio(self) -> float:
        return self.seconds / self.numpy_seconds if self.numpy_seconds else float("inf")


def _median_seconds(work: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeats` calls of `work`."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        work()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(size: int, repeats: int, only: str | None = None) -> list[Row]:
    rng = np.random.default_rng(0)
    counts, sums = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.float64)
    # NumPy's discrete Laplace: the difference of two geometrics with p = 1 - exp(-1/t).
    p = -np.expm1(-1.0 / SCALE)
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            "discrete-laplace",
            lambda: mechanisms.discrete_laplace(counts, SCALE),
            lambda: counts + rng.geometric(p, size) - rng.geometric(p, size),
        ),
        ("laplace", lambda: mechanisms.laplace(sums, SCALE), lambda: sums + rng.laplace(0.0, SCALE, size)),
        ("gaussian", lambda: mechanisms.gaussian(sums, SCALE), lambda: sums + rng.normal(0.0, SCALE, size)),
    ]
    rows = []
    for name, ours, floor in (case for case in cases if only in (None, case[0])):
        seconds, cpu = _median_seconds(ours, repeats)
        rows.append(Row(name, size, seconds, cpu, _median_seconds(floor, repeats)[0], cpu / size * 1e6))
        print(f"{name:17} {size:>10,} values: {seconds:8.3f} s wall, {cpu:8.3f} s CPU ({rows[-1].per_value_us:.1f} us/value), "
              f"NumPy {rows[-1].numpy_seconds:.4f} s, x{rows[-1].ratio:,.0f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--only", choices=["discrete-laplace", "laplace", "gaussian"], help="measure this mechanism alone")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows and the machine here")
    args = parser.parse_args()
    mechanisms.discrete_laplace([0], SCALE)  # OpenDP's import and first measurement, outside the timing
    rows = [row for size in args.sizes for row in measure(size, args.repeats, args.only)]
    if args.json:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()}
        with open(args.json, "w") as out:
            json.dump({"when": dt.datetime.now(dt.UTC).isoformat(), "machine": machine,
                       "rows": [asdict(row) | {"ratio": row.ratio} for row in rows]}, out, indent=2)


if __name__ == "__main__":
    main()
