"""Rehearsal at alliance scale: seconds per round and coordinator memory against the number of virtual hospitals.

Each N runs in its own process (``--one N``): ``medfed simulate``'s path
(:func:`medfed.simulate.simulate`) with the alliance profile on a 3-round copy of
``experiments/examples/omop_hypertension.toml``. Measured per N:

- generation and governance seconds (hospitals generated or taken from the cache, then a
  fresh governed rehearsal home each);
- seconds per round: the mean gap between consecutive MLflow timestamps of the run's
  ``epsilon_run``, which the coordinator logs after the query wave and after each of the
  3 rounds (so the first gap also carries the actors' first training imports);
- the coordinator's (driver's) peak RSS, the largest Ray worker's peak RSS, and the
  peak RSS of the driver's whole process tree (driver, Ray's processes, actors), sampled
  every 0.5 s from /proc;
- how many hospitals trained and how many refused;
- the coordinator's (driver's) CPU seconds over the rehearsal (``getrusage``).

The ratio column is seconds per round against the smallest N of the same run. With
``--png`` the curve is drawn with matplotlib. A benchmark, not a test: nothing asserts.

    .venv/bin/python benchmarks/simulation_scale.py --sites 10 50 140 540 --png docs/simulation_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = ROOT / "experiments" / "examples" / "omop_hypertension.toml"
ROUNDS = 3


def _tree_rss_mib(root: int) -> tuple[float, float]:
    """RSS of `root` and all its descendants (MiB), and the largest single descendant's."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            pid, ppid = int(entry), int(fields[1])
            rss[pid] = int(fields[21]) * page
            children.setdefault(ppid, []).append(pid)
        except (OSError, ValueError, IndexError):
            continue
    total, largest, stack = 0.0, 0.0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0.0)
        if pid != root:
            largest = max(largest, rss.get(pid, 0.0))
        stack.extend(children.get(pid, []))
    return total, largest


def one(sites: int, workdir: Path) -> dict[str, float]:
    """Run one rehearsal of `sites` hospitals here and return its numbers."""
    from rich.console import Console

    from experiments.progress import EPSILON_RUN, _client
    from medfed.simulate import simulate

    spec = workdir / "spec.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    spec.write_text(SPEC.read_text().replace("rounds = 5", f"rounds = {ROUNDS}"))
    peak = {"tree": 0.0, "worker": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            tree, worker = _tree_rss_mib(os.getpid())
            peak["tree"], peak["worker"] = max(peak["tree"], tree), max(peak["worker"], worker)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = StringIO()
    cpu_before = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    started = time.monotonic()
    result = simulate(workdir, spec, sites=sites, console=Console(file=out, width=160))
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    text = out.getvalue()
    history = sorted((m.step, m.timestamp) for m in _client(result.tracking_uri).get_metric_history(result.mlflow_run_id, EPSILON_RUN))
    stamps = [t for _, t in history]
    gaps = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    trained = int(text.split(" hospitals trained;")[0].rsplit(maxsplit=1)[-1])
    refused = int(text.split(" hospitals trained; ")[1].split()[0])

    def seconds_of(marker: str) -> float:
        line = next(line for line in text.splitlines() if marker in line)
        return float(line.split(" in ")[1].split(" s")[0])

    return {
        "sites": sites,
        "trained": trained,
        "refused": refused,
        "generate_s": seconds_of("hospital(s) in") if "hospital(s) in" in text else 0.0,
        "govern_s": seconds_of("rehearsal homes governed"),
        "simulation_s": result.seconds,
        "wall_s": wall,
        "round_s": sum(gaps) / len(gaps) if gaps else float("nan"),
        "round_gaps_s": gaps,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # The coordinator's (driver's) CPU over the whole rehearsal: ServerApp, reply polling, MLflow, Ray driver.
        "driver_cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_before, 1),
        "worker_peak_mib": peak["worker"],
        "tree_peak_mib": peak["tree"],
    }


def _plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["sites"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["round_s"] for r in rows], "o-")
    left.set_xlabel("virtual hospitals (alliance profile)")
    left.set_ylabel("seconds per round")
    left.set_title("Round time on the Simulation Engine")
    right.plot(n, [r["driver_peak_mib"] for r in rows], "o-", label="coordinator (driver) peak RSS")
    right.plot(n, [r["tree_peak_mib"] for r in rows], "s--", label="driver + Ray + actors, peak RSS")
    right.set_xlabel("virtual hospitals (alliance profile)")
    right.set_ylabel("MiB")
    right.set_title("Memory")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle(f"medfed simulate, {ROUNDS} rounds, {os.cpu_count()} CPUs ({platform.node()})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 140, 540])
    parser.add_argument("--workdir", type=Path, default=Path(".medfed/bench-simulation"),
                        help="generated hospitals are cached here across runs")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--png", type=Path, help="draw the curve here")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.workdir.resolve())))
        return
    rows = []
    for sites in args.sites:
        done = subprocess.run([sys.executable, __file__, "--one", str(sites), "--workdir", str(args.workdir)],
                              capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            print(f"N={sites} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            break
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        sys.exit(1)
    base = rows[0]["round_s"]
    print(f"\n{'N':>5} {'trained':>8} {'refused':>8} {'generate s':>11} {'govern s':>9} {'s/round':>8} {'x N=' + str(rows[0]['sites']):>8} "
          f"{'driver MiB':>11} {'worker MiB':>11} {'tree MiB':>9} {'sim s':>7}")
    for r in rows:
        print(f"{r['sites']:>5} {r['trained']:>8} {r['refused']:>8} {r['generate_s']:>11.1f} {r['govern_s']:>9.1f} "
              f"{r['round_s']:>8.1f} {r['round_s'] / base:>8.2f} {r['driver_peak_mib']:>11.0f} {r['worker_peak_mib']:>11.0f} "
              f"{r['tree_peak_mib']:>9.0f} {r['simulation_s']:>7.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.png:
        _plot(rows, args.png)


if __name__ == "__main__":
    main()
