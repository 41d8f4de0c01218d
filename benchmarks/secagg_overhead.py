"""Secure aggregation overhead: a SecAgg+ run against a plain run of our app, same nodes, same spec.

For each ``--nodes`` count, one `medfed.cluster.LocalCluster` (a real ``flower-superlink``
and that many ``flower-supernode`` processes on loopback, TLS and node authentication
on, each node home holding the synthetic hypertension cohort) runs, in turn and
``--repeats`` times:

- ``plain``: the example spec (``medfed.demo.demo_spec``): one query wave, one train
  wave per round, one final evaluate wave;
- ``secagg``: the same spec with ``federation.secure_aggregation = true`` (defaults:
  every node holds a share, a majority reconstructs): each round is Flower's SecAgg+
  workflow, four waves (setup, share keys, collect masked vectors, which is the
  training wave, and unmask).

Both are submitted with ``experiments.submit.submit`` and tracked in MLflow. A run's
time is Flower's ``elapsed`` (``flwr ls``); the wall time from submission to the
observed finish is printed beside it. Where the time goes is read from the SuperNode
logs as ``benchmarks/federated_overhead.py`` reads it (its ``LogWatcher``): a wave lasts
from its first node receiving to the next wave's first node receiving. The extra
seconds per round of ``secagg`` are split into the protocol's three extra waves, the
difference between its collect wave and the plain train wave (masking, the legacy
layout), and everything else (start-up, query and evaluate waves, exit).

A benchmark, not a test: nothing here asserts. Run from the repository root::

    .venv/bin/python benchmarks/secagg_overhead.py [--nodes 3 10 --rounds 2 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from clients.hospital_node.governance import set_budget  # noqa: E402
from clients.hospital_node.home import NodeHome  # noqa: E402
from experiments.spec import ExperimentSpec  # noqa: E402
from experiments.submit import submit, wait_for_run  # noqa: E402
from federated_overhead import LogWatcher, Wave, _prewarm, flower_row, machine, waves_of  # noqa: E402
from medfed.cluster import LocalCluster, flower_env  # noqa: E402
from medfed.demo import DATASET, approve_everywhere, demo_spec, partner_key_path, prepare_alliance  # noqa: E402
from privacy.keys import load_private_key  # noqa: E402

STAGES = ("setup", "share keys", "collect", "unmask")
EXTRA_STAGES = ("setup", "share keys", "unmask")


@dataclass
class Run:
    """One run of one variant at one node count."""

    nodes: int
    variant: str  # "plain" | "secagg"
    repeat: int
    run_id: int
    status: str
    details: str
    wall_s: float
    elapsed_s: float
    # Seconds per phase: outside (start-up and exit), query, evaluate, and per round
    # "train" (plain) or each SecAgg+ stage (secagg), summed over the rounds.
    phases: dict[str, float] = field(default_factory=dict)
    waves: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def specs(rounds: int, nodes: int) -> dict[str, ExperimentSpec]:
    """The plain spec and its SecAgg+ twin (same name apart from a suffix, same training)."""
    plain = demo_spec(rounds, nodes)
    mapping = plain.to_mapping()
    mapping["experiment"] = {**mapping["experiment"], "name": f"{plain.experiment.name}-secagg"}
    mapping["experiment"].pop("mlflow_experiment", None)
    mapping["federation"] = {**mapping["federation"], "secure_aggregation": True}
    return {"plain": plain, "secagg": ExperimentSpec.from_mapping(mapping, source="benchmark")}


def phases_of(variant: str, waves: list[Wave], elapsed: float, rounds: int) -> tuple[dict[str, float], str]:
    """Seconds per phase (summing to `elapsed`), and a note if the waves are not as expected."""
    per_round = 4 if variant == "secagg" else 1
    expected = 2 + per_round * rounds
    if len(waves) != expected:
        return {}, f"saw {len(waves)} wave(s) in the SuperNode logs, expected {expected}"
    seconds = [
        (waves[k + 1].first_receive if k + 1 < len(waves) else wave.last_send) - wave.first_receive
        for k, wave in enumerate(waves)
    ]
    phases = {"outside": elapsed - (waves[-1].last_send - waves[0].first_receive), "query": seconds[0], "evaluate": seconds[-1]}
    names = STAGES if variant == "secagg" else ("train",)
    for index, name in enumerate(names):
        phases[name] = sum(seconds[1 + r * per_round + index] for r in range(rounds))
    return phases, ""


def run_once(variant: str, repeat: int, spec: ExperimentSpec, *, cluster: LocalCluster, watcher: LogWatcher,
             workdir: Path, tracking_uri: str, poll: float, nodes: int) -> Run:
    env = flower_env(cluster.flwr_home)
    started = time.monotonic()
    run_id = submit(spec, connection=cluster.connection, tracking_uri=tracking_uri, output_dir=workdir / "runs",
                    env=env, signing_key=load_private_key(partner_key_path(workdir)))
    status = wait_for_run(run_id, connection=cluster.connection, env=env, timeout=3600, poll=poll)
    wall = time.monotonic() - started
    elapsed = float(flower_row(cluster, run_id)["elapsed"])  # type: ignore[arg-type]
    waves = waves_of(watcher.events(run_id))
    phases, note = phases_of(variant, waves, elapsed, spec.federation.rounds)
    details = "" if status.details == "N/A" else status.details
    return Run(nodes, variant, repeat, run_id, status.status, "; ".join(d for d in (details, note) if d),
               wall, elapsed, phases, len(waves))


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def report(runs: list[Run], rounds: int) -> dict[str, dict[str, float]]:
    """Print per node count the ratio and the breakdown of the extra seconds per round; return the headline."""
    headline: dict[str, dict[str, float]] = {}
    for nodes in sorted({r.nodes for r in runs}):
        by = {v: [r for r in runs if r.nodes == nodes and r.variant == v and r.ok] for v in ("plain", "secagg")}
        if not by["plain"] or not by["secagg"]:
            print(f"\n{nodes} nodes: no successful pair of runs to compare")
            continue
        med = {v: {"elapsed": _median([r.elapsed_s for r in rs]), "wall": _median([r.wall_s for r in rs])} for v, rs in by.items()}
        keys = sorted({k for rs in by.values() for r in rs for k in r.phases})
        ph = {v: {k: _median([r.phases.get(k, math.nan) for r in rs]) for k in keys} for v, rs in by.items()}
        ratio_e = med["secagg"]["elapsed"] / med["plain"]["elapsed"]
        ratio_w = med["secagg"]["wall"] / med["plain"]["wall"]
        extra = (med["secagg"]["elapsed"] - med["plain"]["elapsed"]) / rounds
        protocol = sum(ph["secagg"].get(s, math.nan) for s in EXTRA_STAGES) / rounds
        collect = (ph["secagg"].get("collect", math.nan) - ph["plain"].get("train", math.nan)) / rounds
        rest = extra - protocol - collect
        print(f"\n{nodes} nodes, {rounds} round(s), medians of {len(by['plain'])} plain and {len(by['secagg'])} secagg run(s)")
        print(f"  elapsed  plain {med['plain']['elapsed']:7.2f} s   secagg {med['secagg']['elapsed']:7.2f} s   "
              f"ratio {ratio_e:4.2f}x   (wall {med['plain']['wall']:.2f} / {med['secagg']['wall']:.2f} s, {ratio_w:4.2f}x)")
        print(f"  extra per round {extra:+7.2f} s, of which")
        for stage in EXTRA_STAGES:
            print(f"    SecAgg+ {stage:10s} wave                        {ph['secagg'].get(stage, math.nan) / rounds:+7.2f} s")
        print(f"    collect wave minus the plain train wave           {collect:+7.2f} s "
              f"({ph['secagg'].get('collect', math.nan) / rounds:.2f} vs {ph['plain'].get('train', math.nan) / rounds:.2f} s)")
        print(f"    everything else (start-up, query, evaluate, exit) {rest:+7.2f} s")
        headline[str(nodes)] = {
            "plain_elapsed_s": med["plain"]["elapsed"], "secagg_elapsed_s": med["secagg"]["elapsed"],
            "ratio_elapsed": ratio_e, "ratio_wall": ratio_w, "extra_per_round_s": extra,
            **{f"{s.replace(' ', '_')}_wave_per_round_s": ph["secagg"].get(s, math.nan) / rounds for s in EXTRA_STAGES},
            "collect_minus_plain_train_per_round_s": collect, "everything_else_per_round_s": rest,
        }
    return headline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10], help="SuperNode counts, one cluster each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant per node count (medians reported)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between `flwr ls` status checks")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic cohorts")
    parser.add_argument("--workdir", type=Path, help="keep cohorts, cluster logs and the MLflow store here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.nodes) < 3 or args.rounds < 1 or args.repeats < 1 or args.poll <= 0:
        parser.error("--nodes must each be >= 3 (SecAgg+ with a node to spare), --rounds and --repeats >= 1, --poll > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="medfed-secagg-"))).resolve()
    runs: list[Run] = []
    started = time.monotonic()
    try:
        for nodes in args.nodes:
            workdir = root / f"n{nodes}"
            tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
            pair = specs(args.rounds, nodes)
            sites = prepare_alliance(workdir, n_hospitals=nodes, seed=args.seed)
            for site in sites:
                set_budget(NodeHome.open(site.home), DATASET, epsilon_=1000.0, delta=1e-5, by="benchmark")
            for spec in pair.values():
                approve_everywhere(sites, spec, runs=args.repeats)
            _prewarm(tracking_uri)
            with LocalCluster(workdir / "cluster") as cluster:
                cluster.start_superlink()
                for site in sites:
                    cluster.start_supernode(site.name, site.home)
                cluster.wait_for_nodes(len(sites), timeout=300)
                print(f"{nodes} nodes: cluster online after {time.monotonic() - started:.0f} s (workdir {workdir})")
                logs = {site.name: cluster.log_path(f"supernode-{site.name}") for site in sites}
                with LogWatcher(logs) as watcher:
                    for repeat in range(args.repeats):
                        order = ("plain", "secagg") if repeat % 2 == 0 else ("secagg", "plain")
                        for variant in order:
                            run = run_once(variant, repeat, pair[variant], cluster=cluster, watcher=watcher,
                                           workdir=workdir, tracking_uri=tracking_uri, poll=args.poll, nodes=nodes)
                            runs.append(run)
                            print(f"  {variant:6s} run {run.run_id:<20d} {run.status:19s} wall {run.wall_s:7.2f} s  "
                                  f"elapsed {run.elapsed_s:7.2f} s  waves {run.waves}  load {os.getloadavg()[0]:.1f}"
                                  + (f"  {run.details}" if run.details else ""))
    finally:
        failed = [r for r in runs if not r.ok]
        if failed or args.workdir:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    headline = report(runs, args.rounds)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "secagg_overhead", "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "headline": headline, "runs": [asdict(r) for r in runs],
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
