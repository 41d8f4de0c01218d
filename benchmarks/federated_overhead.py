"""Federated overhead: medfed's app against a plain Flower FedAvg app, and against Flower's empty wave.

Two `medfed.cluster.LocalCluster` deployments in turn, each a real ``flower-superlink``
and ``--nodes`` node processes on loopback over the same node homes (the synthetic
hypertension cohort):

- *medfed nodes*: each node is the node service (``flower-supernode --isolation
  process`` and the long-lived node executor serving the installed ClientApp, warm
  between messages). It serves only the medfed release, so it runs the ``medfed``
  variant alone;
- *Flower nodes*: stock ``flower-supernode`` processes, whose SuperExec starts a fresh
  ClientApp process from the run's app bundle for every message. They run
  ``medfed-subprocess`` (our app as every node ran it before the node executor) and the
  plain Flower apps.

Each deployment runs its variants in turn, ``--repeats`` times:

- ``medfed``: our app (``experiments.submit``): one query wave, one train wave
  per round (nodes evaluate the incoming model, DP-train, charge their ledger), one
  final evaluate wave, everything tracked in MLflow; replies are pulled every 0.2 s;
- ``medfed-subprocess``: the same app on the Flower nodes;
- ``plain``: ``benchmarks/plain_app`` in mode ``fedavg``: Flower's own FedAvg and
  Grid (a pull every 3 s), one train wave per round doing the same work per message
  (same data, features, scaling, model, sigma, q, steps, learning rate), then one
  evaluate wave; no query wave, ledger, checks or MLflow;
- ``plain-fastpoll``: the same, pulling replies every 0.2 s as medfed does, so that the
  difference to ``medfed`` is governance and tracking alone;
- ``empty`` and ``empty-fastpoll``: ``--rounds`` waves of empty messages (the ClientApp
  imports nothing and replies at once): Flower's floor for one message wave, with
  Flower's pull and with a 0.2 s pull.

A run's time is Flower's own ``elapsed`` from ``flwr ls --run-id N --format json``
(``running`` to ``finished``: the ServerApp process's life, whatever our polling); the
wall time from submission to the observed ``finished`` (every variant polled alike,
``--poll``) is printed beside it. Where a run's time goes is read from outside, the
same way for every app: the SuperNodes log each message they receive and each reply
they send, and a thread here stamps those lines as they are written (every 50 ms).
A wave then lasts from its first node receiving to the next wave's first node
receiving (the last wave: to its last reply sent), and everything else of ``elapsed``
is start-up and exit. medfed's MLflow run adds when the model logging ended.

Goals: a medfed train wave <= 1.3x Flower's empty-wave floor (``empty``), which makes a
medfed round faster than a plain Flower app's; medfed <= 1.10x plain overall. A
benchmark, not a test: nothing here asserts.
Run from the repository root::

    .venv/bin/python benchmarks/federated_overhead.py [--nodes 3 --rounds 3 --json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP = Path(__file__).resolve().parent / "plain_app"
for _path in (ROOT, PLAIN_APP):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from experiments.cost import PrivacyPlan, plan_privacy  # noqa: E402
from experiments.spec import ExperimentSpec  # noqa: E402
from experiments.submit import submit, wait_for_run  # noqa: E402
from medfed.cluster import LocalCluster, flower_env  # noqa: E402
from clients.hospital_node.governance import set_budget  # noqa: E402
from clients.hospital_node.home import NodeHome  # noqa: E402
from medfed.demo import DATASET, approve_everywhere, demo_spec, partner_key_path, prepare_alliance  # noqa: E402
from privacy.keys import load_private_key  # noqa: E402
from plainfed.config import PlainConfig  # noqa: E402

GOAL = 1.10
FLOOR_GOAL = 1.30
# medfed's reply polling (federation.participants.ParticipantGrid's default).
FAST_POLL = 0.2
LOG_POLL = 0.05


@dataclass(frozen=True)
class Variant:
    """One app run per repeat: which app, which mode, how it pulls replies."""

    name: str
    app: str  # "medfed" | "fedavg" | "empty"
    poll_interval: float  # 0: Flower's Grid.send_and_receive (3 s)
    description: str
    nodes: str = "flower"  # "medfed": node services (node executor); "flower": stock SuperNodes

    def waves(self, rounds: int) -> int:
        return {"medfed": rounds + 2, "fedavg": rounds + 1, "empty": rounds}[self.app]


VARIANTS = {
    v.name: v
    for v in (
        Variant("medfed", "medfed", FAST_POLL, "our app on medfed nodes (node executor): query + R train + evaluate waves", "medfed"),
        Variant("medfed-subprocess", "medfed", FAST_POLL, "our app on stock SuperNodes: a ClientApp process per message"),
        Variant("plain", "fedavg", 0.0, "Flower FedAvg, same training, R train + evaluate waves, Flower's Grid"),
        Variant("plain-fastpoll", "fedavg", FAST_POLL, "the same, replies pulled every 0.2 s as ours"),
        Variant("empty", "empty", 0.0, "R waves of empty messages, Flower's Grid"),
        Variant("empty-fastpoll", "empty", FAST_POLL, "R waves of empty messages, pulled every 0.2 s"),
    )
}


# ---------------------------------------------------------------------------- node-side clock


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN = re.compile(r"\[RUN (\d+)\]")
_MESSAGE = re.compile(r"(Receiving|Sending): (\S+) message")


@dataclass(frozen=True)
class NodeEvent:
    """A SuperNode received a message or sent a reply, at `time` (``time.time()``)."""

    time: float
    node: str
    run_id: int
    what: str  # "receive" | "send"
    kind: str  # the message type: query, train, evaluate


class LogWatcher:
    """Stamps the SuperNodes' "Receiving:"/"Sending:" log lines as they are written.

    Each line is stamped when a poll (every `LOG_POLL` seconds) finds it; the SuperNodes
    write unbuffered (``PYTHONUNBUFFERED=1``), so a stamp is late by at most one poll.
    """

    def __init__(self, logs: dict[str, Path]) -> None:
        self._logs = logs
        self._events: list[NodeEvent] = []
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, str] = {}
        self._runs: dict[str, int] = {}  # the run each node's log is currently about
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="log-watcher", daemon=True)

    def __enter__(self) -> LogWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def events(self, run_id: int) -> list[NodeEvent]:
        """Everything the nodes logged about run `run_id` so far, oldest first."""
        self._read_new()
        with self._lock:
            return sorted((e for e in self._events if e.run_id == run_id), key=lambda e: e.time)

    def _follow(self) -> None:
        while not self._stop.wait(LOG_POLL):
            self._read_new()

    def _read_new(self) -> None:
        with self._lock:
            now = time.time()
            for node, path in self._logs.items():
                try:
                    with path.open("rb") as handle:
                        handle.seek(self._offsets.get(node, 0))
                        chunk = handle.read()
                except FileNotFoundError:
                    continue
                if not chunk:
                    continue
                self._offsets[node] = self._offsets.get(node, 0) + len(chunk)
                lines = (self._partial.pop(node, "") + chunk.decode("utf-8", "replace")).split("\n")
                self._partial[node] = lines.pop()
                for line in lines:
                    line = _ANSI.sub("", line)
                    if match := _RUN.search(line):
                        self._runs[node] = int(match.group(1))
                    elif (match := _MESSAGE.search(line)) and node in self._runs:
                        what = "receive" if match.group(1) == "Receiving" else "send"
                        self._events.append(NodeEvent(now, node, self._runs[node], what, match.group(2)))


@dataclass(frozen=True)
class Wave:
    """One message wave as the nodes saw it."""

    kind: str
    first_receive: float
    last_send: float
    nodes: int


def waves_of(events: list[NodeEvent]) -> list[Wave]:
    """The waves of one run: a node's k-th message belongs to wave k."""
    per_node: dict[str, list[NodeEvent]] = defaultdict(list)
    for event in events:
        per_node[event.node].append(event)
    grouped: dict[int, list[tuple[NodeEvent, NodeEvent]]] = defaultdict(list)
    for node_events in per_node.values():
        received = [e for e in node_events if e.what == "receive"]
        sent = [e for e in node_events if e.what == "send"]
        for k, (rec, snd) in enumerate(zip(received, sent)):
            grouped[k].append((rec, snd))
    return [
        Wave(
            kind=pairs[0][0].kind,
            first_receive=min(r.time for r, _ in pairs),
            last_send=max(s.time for _, s in pairs),
            nodes=len(pairs),
        )
        for _, pairs in sorted(grouped.items())
    ]


# ---------------------------------------------------------------------------- running


@dataclass
class RunResult:
    """One run of one variant."""

    variant: str
    repeat: int
    run_id: int
    status: str
    details: str
    wall_s: float
    elapsed_s: float
    clientapp_s: float
    # Per wave: kind, nodes, seconds from its first node receiving to the next wave's
    # (the last wave: to its last reply sent), and the nodes' part of that
    # (first receive to last reply sent).
    waves: list[dict[str, object]] = field(default_factory=list)
    # Where `elapsed_s` went (s); see `phases_of`.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def plain_config(variant: Variant, spec: ExperimentSpec, plan: PrivacyPlan) -> PlainConfig:
    """The plain app's run config: the same training as `spec` under `plan`."""
    return PlainConfig(
        mode=variant.app,
        num_rounds=spec.federation.rounds,
        min_nodes=spec.federation.min_nodes,
        dataset=spec.data.dataset,
        features=tuple(spec.data.features),
        scaling={k: (float(v[0]), float(v[1])) for k, v in spec.data.scaling.items()},
        model_kind=spec.model.kind,
        hidden=tuple(spec.model.hidden),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=spec.privacy.max_grad_norm,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        learning_rate=spec.federation.learning_rate,
        round_timeout=spec.federation.round_timeout_seconds,
        poll_interval=variant.poll_interval,
    )


def submit_plain(config: PlainConfig, *, cluster: LocalCluster, config_path: Path) -> int:
    """`flwr run` the plain app with `config`, as `experiments.submit.submit` runs ours."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.to_run_config().items()]
    config_path.write_text("\n".join(lines) + "\n")
    done = cluster.flwr("run", str(PLAIN_APP), cluster.connection, "--run-config", str(config_path), "--format", "json", timeout=300)
    try:
        payload = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"`flwr run` of the plain app printed no JSON: {(done.stderr or done.stdout).strip()[-500:]}") from None
    if not payload.get("success"):
        raise RuntimeError(f"`flwr run` of the plain app failed: {payload.get('error-message', payload)}")
    return int(payload["run-id"])


def flower_row(cluster: LocalCluster, run_id: int) -> dict[str, object]:
    """The run's row of ``flwr ls --run-id N --format json``."""
    done = cluster.flwr("ls", cluster.connection, "--run-id", str(run_id), "--format", "json", timeout=60)
    return dict(json.loads(done.stdout)["runs"][0])


def model_logging_seconds(tracking_uri: str, run_id: int, rounds: int) -> float:
    """From our final metrics to the end of our MLflow run: saving and logging the model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, filter_string=f"tags.`flwr.run_id` = '{run_id}'", max_results=1)
    final = max(m.timestamp for m in client.get_metric_history(run.info.run_id, "eval_auc") if m.step == rounds)
    return (run.info.end_time - final) / 1000


def phases_of(app: str, waves: list[Wave], elapsed: float) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Per-wave rows and the phases of `elapsed`, which sum to it.

    ``outside``: before the first message reaches a node (process start, imports,
    set-up) and after the last reply is sent (pulling it, saving, exit); ``query``,
    ``train``, ``evaluate``: the waves of that kind, each from its first node receiving
    to the next wave's (the last wave: to its last reply sent).
    """
    rows: list[dict[str, object]] = []
    for k, wave in enumerate(waves):
        end = waves[k + 1].first_receive if k + 1 < len(waves) else wave.last_send
        rows.append({
            "kind": wave.kind,
            "nodes": wave.nodes,
            "seconds": end - wave.first_receive,
            "node_seconds": wave.last_send - wave.first_receive,
            "complete": k + 1 < len(waves),
        })
    phases = {"outside": elapsed - (waves[-1].last_send - waves[0].first_receive) if waves else math.nan}
    kinds = ("query", "train", "evaluate") if app != "empty" else ("query",)
    for kind in kinds:
        phases[kind] = sum(float(r["seconds"]) for r in rows if r["kind"] == kind)  # type: ignore[arg-type]
    return rows, phases


def run_once(
    variant: Variant,
    repeat: int,
    *,
    cluster: LocalCluster,
    watcher: LogWatcher,
    spec: ExperimentSpec,
    plan: PrivacyPlan,
    workdir: Path,
    tracking_uri: str,
    poll: float,
) -> RunResult:
    env = flower_env(cluster.flwr_home)
    started = time.monotonic()
    if variant.app == "medfed":
        run_id = submit(spec, connection=cluster.connection, tracking_uri=tracking_uri,
                        output_dir=workdir / "runs", env=env,
                        signing_key=load_private_key(partner_key_path(workdir)))
    else:
        config_path = workdir / "run-configs" / f"{variant.name}-{repeat}.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        run_id = submit_plain(plain_config(variant, spec, plan), cluster=cluster, config_path=config_path)
    status = wait_for_run(run_id, connection=cluster.connection, env=env, timeout=1800, poll=poll)
    wall = time.monotonic() - started
    row = flower_row(cluster, run_id)
    elapsed = float(row["elapsed"])  # type: ignore[arg-type]
    compute = row.get("compute-time") or {}
    result = RunResult(
        variant=variant.name,
        repeat=repeat,
        run_id=run_id,
        status=status.status,
        details="" if status.details == "N/A" else status.details,  # Flower's "none"
        wall_s=wall,
        elapsed_s=elapsed,
        clientapp_s=float(compute.get("clientapp-seconds", math.nan)),  # type: ignore[union-attr]
    )
    waves = waves_of(watcher.events(run_id))
    result.waves, result.phases = phases_of(variant.app, waves, elapsed)
    if result.ok and variant.app == "medfed":
        result.phases["model_logging"] = model_logging_seconds(tracking_uri, run_id, spec.federation.rounds)
    if result.ok and len(waves) != variant.waves(spec.federation.rounds):
        result.details = f"saw {len(waves)} wave(s) in the SuperNode logs, expected {variant.waves(spec.federation.rounds)}"
    return result


# ---------------------------------------------------------------------------- reporting


def machine() -> dict[str, object]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        **{name: version(name) for name in ("flwr", "torch", "opacus", "mlflow")},
    }


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


@dataclass(frozen=True)
class Summary:
    """Medians over the successful repeats of one variant."""

    variant: str
    runs: int
    waves: int
    wall_s: float
    elapsed_s: float
    clientapp_s: float
    wave_s: float  # a complete wave of its main kind (train; empty: query), first receive to next
    node_s: float  # the nodes' part of it: first receive to last reply sent
    phases: dict[str, float]

    @property
    def elapsed_per_wave(self) -> float:
        return self.elapsed_s / self.waves


def summarise(name: str, results: list[RunResult], rounds: int) -> Summary:
    ok = [r for r in results if r.variant == name and r.ok]
    main_kind = "query" if VARIANTS[name].app == "empty" else "train"
    waves = [w for r in ok for w in r.waves if w["kind"] == main_kind and w["complete"]]
    keys = sorted({k for r in ok for k in r.phases})
    return Summary(
        variant=name,
        runs=len(ok),
        waves=VARIANTS[name].waves(rounds),
        wall_s=_median([r.wall_s for r in ok]),
        elapsed_s=_median([r.elapsed_s for r in ok]),
        clientapp_s=_median([r.clientapp_s for r in ok]),
        wave_s=_median([float(w["seconds"]) for w in waves]),  # type: ignore[arg-type]
        node_s=_median([float(w["node_seconds"]) for w in waves]),  # type: ignore[arg-type]
        phases={k: _median([r.phases.get(k, math.nan) for r in ok]) for k in keys},
    )


def report(summaries: dict[str, Summary], rounds: int, emit: Callable[[str], None]) -> dict[str, float]:
    """Print the tables; return the headline numbers."""
    emit(f"\n{'variant':17s} {'runs':>4s} {'waves':>5s} {'wall s':>8s} {'elapsed s':>9s} {'elapsed/wave':>12s} "
         f"{'s/wave':>7s} {'of it nodes':>11s} {'ClientApp s':>11s}")
    for s in summaries.values():
        emit(f"{s.variant:17s} {s.runs:4d} {s.waves:5d} {s.wall_s:8.2f} {s.elapsed_s:9.2f} {s.elapsed_per_wave:12.2f} "
             f"{s.wave_s:7.2f} {s.node_s:11.2f} {s.clientapp_s:11.2f}")
    emit("  s/wave: median complete train wave (empty: query wave), first node receiving to the next wave's;\n"
         "  of it nodes: first receive to last reply sent; ClientApp s: Flower's summed ClientApp time")
    headline: dict[str, float] = {}
    ours = summaries.get("medfed")
    if ours is None:
        return headline
    emit("")
    for base in ("plain", "plain-fastpoll"):
        if base in summaries:
            b = summaries[base]
            by_elapsed, by_wall = _ratio(ours.elapsed_s, b.elapsed_s), _ratio(ours.wall_s, b.wall_s)
            headline[f"medfed/{base} elapsed"], headline[f"medfed/{base} wall"] = by_elapsed, by_wall
            verdict = "meets" if by_elapsed <= GOAL else "misses"
            emit(f"medfed / {base:15s} elapsed {by_elapsed:5.2f}x   wall {by_wall:5.2f}x   "
                 f"({verdict} the goal of <= {GOAL:.2f}x)")
    for floor in ("empty", "empty-fastpoll"):
        if floor in summaries:
            f = summaries[floor]
            headline[f"{floor} s/wave"] = f.wave_s
            emit(f"floor {floor:15s} {f.wave_s:5.2f} s per empty wave ({f.node_s:.2f} s of it at the nodes); "
                 f"{f.elapsed_per_wave:.2f} s/wave counting start-up")
            for name in ("medfed", "medfed-subprocess", "plain", "plain-fastpoll"):
                if name in summaries:
                    s = summaries[name]
                    ratio = _ratio(s.wave_s, f.wave_s)
                    headline[f"{name} train wave / {floor}"] = ratio
                    goal = f"  (goal <= {FLOOR_GOAL:.2f}x: {'met' if ratio <= FLOOR_GOAL else 'missed'})" if name == "medfed" and floor == "empty" else ""
                    emit(f"  {name:17s} train wave {s.wave_s:5.2f} s = {ratio:4.2f}x this floor{goal}")

    bases = [b for b in ("plain", "plain-fastpoll") if b in summaries]
    names = ["medfed", *bases]
    rows = [
        ("outside", "start-up before the first message, exit after the last reply"),
        ("model_logging", "  of which medfed's model file + MLflow artifacts and model"),
        ("query", "query wave"),
        ("train", f"{rounds} train wave(s)"),
        ("evaluate", "final evaluate wave (to its last reply sent)"),
    ]
    emit(f"\nwhere Flower's elapsed goes (s, medians){'':24s}" + "".join(f"{n:>16s}" for n in names))
    for key, label in rows:
        emit(f"  {label:62s}" + "".join(f"{summaries[n].phases.get(key, 0.0):16.2f}" for n in names))
    emit(f"  {'total (Flower elapsed)':62s}" + "".join(f"{summaries[n].elapsed_s:16.2f}" for n in names))
    for base in bases:
        b = summaries[base]
        extra = ours.elapsed_s - b.elapsed_s
        diffs = {k: ours.phases.get(k, 0.0) - b.phases.get(k, 0.0) for k in ("outside", "query", "train", "evaluate")}
        logging_s = ours.phases.get("model_logging", math.nan)
        emit(f"\nmedfed's extra elapsed over {base}: {extra:+.2f} s ({_ratio(extra, b.elapsed_s):+.0%})")
        emit(f"  the query wave                                              {diffs['query']:+7.2f} s")
        emit(f"  everything else                                             {extra - diffs['query']:+7.2f} s, of which")
        emit(f"    start-up and exit, without the model logging              {diffs['outside'] - logging_s:+7.2f} s")
        emit(f"    saving and logging the model (MLflow)                     {logging_s:+7.2f} s")
        emit(f"    {rounds} train wave(s) (checks, ledger, per-round MLflow, pull)   {diffs['train']:+7.2f} s")
        emit(f"    final evaluate wave                                       {diffs['evaluate']:+7.2f} s")
        headline[f"extra over {base} s"] = extra
        headline[f"query wave s (vs {base})"] = diffs["query"]
    return headline


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (synthetic hospitals)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant (medians reported)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="medfed always runs")
    parser.add_argument("--poll", type=float, default=1.0,
                        help="seconds between `flwr ls` status checks, alike for every run; each check "
                             "starts a `flwr` process (~0.8 s of CPU), so a shorter poll loads the host it measures")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic cohorts")
    parser.add_argument("--workdir", type=Path, help="keep cohorts, cluster logs and the MLflow store here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.rounds < 1 or args.repeats < 1 or args.poll <= 0:
        parser.error("--nodes must be >= 2, --rounds and --repeats >= 1, --poll > 0")
    if "medfed" not in args.variants:
        args.variants.insert(0, "medfed")
    return args


def _prewarm(tracking_uri: str) -> None:
    """Read the heavy libraries once and create the MLflow store before anything is timed.

    Every ClientApp and ServerApp process imports them afresh anyway; this only keeps a
    cold disk cache from being charged to whichever run comes first, and keeps the
    one-off creation of an empty tracking store (a production store exists) out of ours.
    """
    import mlflow  # noqa: F401
    import opacus  # noqa: F401
    import pandas  # noqa: F401
    import torch  # noqa: F401
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).search_experiments()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM stops the clusters on the way out, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    spec = demo_spec(args.rounds, args.nodes)
    plan = plan_privacy(spec)
    print(f"workload: {args.nodes} nodes, {args.rounds} rounds, spec {spec.experiment.name} ({spec.model.kind}, "
          f"{len(spec.data.features)} features), sigma={plan.noise_multiplier:g}, q={plan.sample_rate:g}, "
          f"{plan.steps_per_round} DP-SGD steps/round, lr={spec.federation.learning_rate:g}; "
          f"status poll {args.poll:g} s; {args.repeats} repeat(s) of {', '.join(args.variants)}")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="medfed-overhead-"))).resolve()
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sites = prepare_alliance(workdir, n_hospitals=args.nodes, seed=args.seed)
    # The officers approve the benchmark's spec for every medfed run and give room for them.
    medfed_runs = args.repeats * sum(VARIANTS[n].app == "medfed" for n in args.variants)
    for site in sites:
        set_budget(NodeHome.open(site.home), DATASET, epsilon_=1000.0, delta=1e-5, by="benchmark")
    approve_everywhere(sites, spec, runs=max(medfed_runs, 1))
    _prewarm(tracking_uri)
    results: list[RunResult] = []
    loads: list[float] = []
    started = time.monotonic()
    total = args.repeats * len(args.variants)
    try:
        for nodes in ("medfed", "flower"):
            names = [n for n in args.variants if VARIANTS[n].nodes == nodes]
            if not names:
                continue
            with LocalCluster(workdir / f"cluster-{nodes}") as cluster:
                cluster.start_superlink()
                for site in sites:
                    cluster.start_supernode(site.name, site.home, plain_flower=nodes == "flower")
                cluster.wait_for_nodes(len(sites))
                print(f"cluster of {nodes} nodes: SuperLink and {len(sites)} nodes online after "
                      f"{time.monotonic() - started:.1f} s; workdir {workdir}")
                logs = {site.name: cluster.workdir / "logs" / f"supernode-{site.name}.log" for site in sites}
                with LogWatcher(logs) as watcher:
                    for repeat in range(args.repeats):
                        # Rotate the order so that drift in the host's load spreads over every variant.
                        shift = repeat % len(names)
                        for name in names[shift:] + names[:shift]:
                            result = run_once(VARIANTS[name], repeat, cluster=cluster, watcher=watcher, spec=spec, plan=plan,
                                              workdir=workdir, tracking_uri=tracking_uri, poll=args.poll)
                            results.append(result)
                            loads.append(os.getloadavg()[0])
                            waves = " ".join(f"{w['kind'][0]}{float(w['seconds']):.1f}" for w in result.waves)  # type: ignore[arg-type]
                            print(f"  [{len(results)}/{total}] {name:17s} run {result.run_id:<20d} {result.status:19s} "
                                  f"wall {result.wall_s:6.2f} s  elapsed {result.elapsed_s:6.2f} s  waves {waves}  "
                                  f"load {loads[-1]:.1f}" + (f"  {result.details}" if result.details else ""))
    finally:
        failed = [r for r in results if not r.ok]
        if failed or args.workdir or len(results) < total:
            print(f"kept {workdir} (cluster logs in {workdir}/cluster-*/logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summaries = {name: summarise(name, results, args.rounds) for name in args.variants}
    headline = report(summaries, args.rounds, print)
    print(f"\nhost load average (1 min) after each run: {', '.join(f'{v:.1f}' for v in loads)}; "
          f"total {time.monotonic() - started:.0f} s")
    if args.json:
        payload = {
            "benchmark": "federated_overhead",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "workload": {"spec": spec.experiment.name, "plan": asdict(plan)},
            "goal": {"medfed/plain elapsed <=": GOAL, "medfed train wave / empty wave <=": FLOOR_GOAL},
            "headline": headline,
            "summaries": {n: {**asdict(s), "elapsed_per_wave": s.elapsed_per_wave} for n, s in summaries.items()},
            "runs": [asdict(r) for r in results],
            "load_average_after_each_run": loads,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
