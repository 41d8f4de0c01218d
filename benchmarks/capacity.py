"""Deployment capacity: one real SuperLink and N real node services on this machine, against N.

For each N in ``--nodes`` (ascending) a fresh `medfed.cluster.LocalCluster` (TLS, node
authentication, every node its own EC key registered with ``flwr supernode register``)
starts N node services: ``flower-supernode --isolation process`` plus the node executor,
``--executor on-demand`` by default (the executor starts when the node holds a task and
stops after ``--idle`` seconds without one; ``warm`` keeps one per node from the start).
Each node has its own governed node home (policy, trusted partner, budget, approval,
ledger, audit log) over a synthetic hypertension cohort (500–2,500 rows, 16 features).
Then, per N:

1. *online*: seconds from the first node started to ``flwr supernode ls`` listing all N
   online (readiness, no sleeps), then ``--idle-seconds`` of idle sampling: SuperLink
   CPU and RSS, each node's processes' RSS, and USS/PSS for the SuperLink and a few nodes;
2. *run*: the example DP experiment (``experiments/examples/hypertension.toml``, a
   logistic model, DP-SGD with the PRV accountant, ``--rounds`` rounds) through the real
   coordinator, sampled the same way. It is skipped when the memory it would need,
   extrapolated from the previous N's per-node peak, would leave under ``--reserve-gib``
   available (the machine is shared), and stopped if available memory falls under
   ``--abort-gib`` while it runs.

Measured and how:

- CPU and RSS of every process from ``/proc/<pid>/stat`` every ``--interval`` seconds
  (cheap: one pass over /proc), grouped as SuperLink (``flower-superlink`` and its
  SuperExec), coordinator (the run's ``flwr-serverapp``: medfed's ServerApp), and per
  node: service (the supervisor), SuperNode, executor. USS and PSS (``smaps_rollup``,
  what a process would free, and its fair share of shared pages) for the SuperLink tree
  and ``--uss-nodes`` nodes every few seconds (smaps is too costly for all nodes);
- seconds per round: gaps between the MLflow timestamps of ``epsilon_run``, which the
  coordinator logs after the query wave and after each round. Round 1 carries the
  on-demand executors' start (process, Flower and torch imports); rounds 2.. are warm;
- bytes per round: the kernel's per-connection TCP counters (``ss -ti``: ``bytes_sent``
  and ``bytes_received`` of every established socket on the SuperLink's Fleet port,
  read every second and summed per connection). That is what crossed the wire between
  the coordinator and the hospitals, TLS records and gRPC framing included, and nothing
  else (loopback interface counters would add the runtime API hops on each node and the
  other users of this machine). The run's bytes minus the idle rate (the SuperNodes'
  3 s polls) over the same time, divided by the rounds, is the bytes per round; the
  ServerApp's own traffic to the SuperLink (its reply polling, on the HTTP port) is
  counted the same way and shown beside it.

Every process is stopped at the end, also on Ctrl-C or an error; the harness then checks
that no process of this run (SuperLink, SuperNode, executor, ServerApp) remains.

Run it alone (it starts hundreds of processes), under the shared lock::

    flock /tmp/medfed-heavy.lock .venv/bin/python benchmarks/capacity.py \\
        --nodes 10 25 50 100 --rounds 3 --json docs/capacity.json --png docs/capacity.png

A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from clients.hospital_node.governance import set_budget  # noqa: E402
from clients.hospital_node.home import NodeHome  # noqa: E402
from experiments.submit import prepare_submission, run_status, start_run  # noqa: E402
from experiments.errors import SubmissionError  # noqa: E402
from experiments.spec import ExperimentSpec  # noqa: E402
from medfed.cluster import LocalCluster, flower_env  # noqa: E402
from medfed.demo import DATASET, approve_everywhere, demo_spec, partner_key_path, prepare_alliance  # noqa: E402
from privacy.keys import load_private_key  # noqa: E402

MIB = 2**20
GIB = 2**30
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
#: What each process of a run is, from its command line (checked in this order).
_ROLES = (
    ("flwr-serverapp", "coordinator"),
    ("flower-superexec", "superexec"),
    ("flower-superlink", "superlink"),
    ("flower-supernode", "supernode"),
    ("hospital_node.runtime.executor", "executor"),
    ("hospital_node.runtime.forkserver", "forkserver"),  # its children are executors
    ("hospital_node.runtime.supervisor", "service"),
    ("flwr-clientapp", "clientapp"),
)


# ---------------------------------------------------------------------------- sampling


@dataclass
class _Proc:
    role: str
    node: str  # the node's name for node processes, "" for the SuperLink's
    cpu_s: float = 0.0
    rss: int = 0
    peak_rss: int = 0
    alive: bool = True


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, CPU seconds, RSS bytes) of `pid` from /proc, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE


def _role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return "other"
    return next((role for marker, role in _ROLES if marker in cmdline), "other")


def _smaps(pid: int) -> tuple[int, int] | None:
    """(USS, PSS) in bytes from /proc/<pid>/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
    return values.get("Private_Clean", 0) + values.get("Private_Dirty", 0), values.get("Pss", 0)


def _tcp_bytes(port: int) -> dict[str, tuple[int, int]]:
    """(bytes_sent, bytes_received) of each established TCP socket whose local port is `port`."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=False
    ).stdout
    sockets: dict[str, tuple[int, int]] = {}
    key = ""
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            key = " ".join(parts[-2:]) if len(parts) >= 2 else line
            continue
        sent = re.search(r"bytes_sent:(\d+)", line)
        received = re.search(r"bytes_received:(\d+)", line)
        sockets[key] = (int(sent.group(1)) if sent else 0, int(received.group(1)) if received else 0)
    return sockets


class Sampler:
    """Samples the cluster's process trees, memory and Fleet traffic on a thread."""

    def __init__(self, cluster: LocalCluster, nodes: dict[int, str], *, interval: float, uss_nodes: int) -> None:
        self.cluster = cluster
        self.nodes = nodes  # service pid -> node name
        self.interval = interval
        self.uss_nodes = set(sorted(nodes, key=lambda p: nodes[p])[:uss_nodes])
        self.procs: dict[int, _Proc] = {}
        self.series: list[dict[str, float]] = []
        self.traffic_series: list[tuple[float, int, int]] = []  # wall time, Fleet bytes, HTTP bytes so far
        self.smaps: dict[str, list[tuple[int, int]]] = {}  # role -> (USS, PSS) samples
        self.min_available = psutil.virtual_memory().available
        self._sockets: dict[str, dict[str, tuple[int, int]]] = {"fleet": {}, "http": {}}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capacity-sampler", daemon=True)
        self._last_smaps = 0.0
        self._last_ss = 0.0
        self.on_low_memory: threading.Event = threading.Event()
        self.abort_bytes = 0

    def __enter__(self) -> Sampler:
        self.tick()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        stats: dict[int, tuple[int, float, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (got := _stat(int(entry))) is not None:
                stats[int(entry)] = got
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        roots = {pid: name for pid, name in self.nodes.items()}
        roots.update({pid: "" for pid in self.cluster.pids if pid not in self.nodes})
        seen: set[int] = set()
        with self._lock:
            for root, node in roots.items():
                stack = [root]
                while stack:
                    pid = stack.pop()
                    stack.extend(children.get(pid, []))
                    if pid not in stats:
                        continue
                    seen.add(pid)
                    proc = self.procs.get(pid)
                    if proc is None:
                        role = _role(pid)
                        parent = self.procs.get(stats[pid][0])
                        if role == "forkserver" and parent is not None and parent.role == "forkserver":
                            role = "executor"  # forked from it
                        proc = self.procs[pid] = _Proc(role, node)
                    _, proc.cpu_s, proc.rss = stats[pid]
                    proc.peak_rss = max(proc.peak_rss, proc.rss)
            for pid, proc in self.procs.items():
                proc.alive = pid in seen
            available = psutil.virtual_memory().available
            self.min_available = min(self.min_available, available)
            if self.abort_bytes and available < self.abort_bytes:
                self.on_low_memory.set()
            row: dict[str, float] = {"t": now, "available": available}
            for proc in self.procs.values():
                if proc.alive:
                    row[f"rss:{proc.role}"] = row.get(f"rss:{proc.role}", 0) + proc.rss
                    row[f"n:{proc.role}"] = row.get(f"n:{proc.role}", 0) + 1
            self.series.append(row)
            if now - self._last_ss >= 1.0:
                self._last_ss = now
                for name, port in (("fleet", self.cluster.fleet_port), ("http", self.cluster.http_port)):
                    for key, value in _tcp_bytes(port).items():
                        self._sockets[name][key] = value
                self.traffic_series.append(
                    (time.time(), *(sum(a + b for a, b in self._sockets[name].values()) for name in ("fleet", "http")))
                )
            if now - self._last_smaps >= 5.0:
                self._sample_smaps(now)

    def _sample_smaps(self, now: float) -> None:
        """USS/PSS of the SuperLink's processes and of a few nodes' (the caller holds the lock)."""
        self._last_smaps = now
        forked = 0
        for pid, proc in self.procs.items():
            if not proc.alive:
                continue
            if proc.node == "" and proc.role == "executor":  # forked: a few of them, as for the nodes
                forked += 1
                if forked > len(self.uss_nodes):
                    continue
            elif proc.node != "" and not any(self.nodes.get(r) == proc.node for r in self.uss_nodes):
                continue
            if (got := _smaps(pid)) is not None:
                self.smaps.setdefault(proc.role, []).append(got)


    def cpu(self, *roles: str) -> float:
        """CPU seconds so far of every process with one of `roles` (the dead ones: at their last sample)."""
        with self._lock:
            return sum(p.cpu_s for p in self.procs.values() if p.role in roles)

    def traffic(self, name: str) -> int:
        """Bytes so far both ways on the SuperLink's `name` port ("fleet" or "http"), all connections."""
        with self._lock:
            return sum(s + r for s, r in self._sockets[name].values())

    def window(self, start: float, end: float) -> list[dict[str, float]]:
        with self._lock:
            return [row for row in self.series if start <= row["t"] <= end]

    def traffic_at(self, wall: float) -> tuple[float, float]:
        """(Fleet, HTTP) bytes so far at wall-clock time `wall`, interpolated between samples."""
        with self._lock:
            series = list(self.traffic_series)
        before = [row for row in series if row[0] <= wall]
        after = [row for row in series if row[0] >= wall]
        if not before or not after:
            row = (before or after)[-1 if before else 0]
            return float(row[1]), float(row[2])
        (t0, f0, h0), (t1, f1, h1) = before[-1], after[0]
        share = 0.0 if t1 == t0 else (wall - t0) / (t1 - t0)
        return f0 + share * (f1 - f0), h0 + share * (h1 - h0)

    def min_available_since(self, start: float) -> float:
        with self._lock:
            return min((row["available"] for row in self.series if row["t"] >= start), default=psutil.virtual_memory().available)

    def take_smaps(self) -> dict[str, list[tuple[int, int]]]:
        """The USS/PSS samples since the last call, with one taken now."""
        with self._lock:
            self._sample_smaps(time.monotonic())
            taken, self.smaps = self.smaps, {}
        return taken

    def node_peaks(self, role: str) -> list[int]:
        """Each process of `role`'s peak RSS."""
        with self._lock:
            return [p.peak_rss for p in self.procs.values() if p.role == role]


# ---------------------------------------------------------------------------- one N


@dataclass
class Result:
    """What one N measured (memory in MiB, CPU in seconds)."""

    nodes: int
    executor: str
    online_s: float = float("nan")
    idle: dict[str, float] = field(default_factory=dict)
    run: dict[str, object] = field(default_factory=dict)
    skipped: str = ""


@dataclass
class Estimate:
    """Bytes of available memory one node took at the previous N: online and idle, and more while a run is out."""

    idle: float = 0.0
    run: float = 0.0


def _mib(value: float) -> float:
    return round(value / MIB, 1)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _smaps_summary(samples: dict[str, list[tuple[int, int]]]) -> dict[str, float]:
    out = {}
    for role, values in samples.items():
        out[f"uss_{role}_mib"] = _mib(_median([u for u, _ in values]))
        out[f"pss_{role}_mib"] = _mib(_median([p for _, p in values]))
    return out


def _window_summary(rows: list[dict[str, float]], n: int) -> dict[str, float]:
    def peak(key: str) -> float:
        return max((row.get(key, 0.0) for row in rows), default=0.0)

    def mean(key: str) -> float:
        return statistics.fmean(row.get(key, 0.0) for row in rows) if rows else float("nan")

    node_keys = ("rss:service", "rss:supernode", "rss:executor")
    return {
        "superlink_rss_peak_mib": _mib(max((row.get("rss:superlink", 0) + row.get("rss:superexec", 0) for row in rows), default=0)),
        "coordinator_rss_peak_mib": _mib(peak("rss:coordinator")),
        "nodes_rss_peak_mib": _mib(max((sum(row.get(k, 0.0) for k in node_keys) for row in rows), default=0)),
        "per_node_rss_mean_mib": _mib(statistics.fmean(sum(row.get(k, 0.0) for k in node_keys) / n for row in rows) if rows else 0),
        "supernode_rss_mean_mib": _mib(mean("rss:supernode") / n),
        "service_rss_mean_mib": _mib(mean("rss:service") / n),
        "executors_alive_peak": peak("n:executor"),
        "executor_rss_mean_mib": _mib(statistics.fmean(row["rss:executor"] / row["n:executor"] for row in rows if row.get("n:executor"))
                                      if any(row.get("n:executor") for row in rows) else 0.0),
        "available_min_gib": round(min((row["available"] for row in rows), default=0) / GIB, 2),
    }


def _round_stamps(tracking_uri: str, submission_id: str) -> list[float]:
    """Wall-clock seconds of each ``epsilon_run`` the coordinator logged: after the query wave, after each round."""
    from experiments.progress import EPSILON_RUN, RunProgress, _client

    progress = RunProgress(tracking_uri)
    progress.follow(submission_id)
    run_id = progress.mlflow_run_id
    if run_id is None:
        return []
    return [t / 1000 for _, t in sorted((m.step, m.timestamp) for m in _client(tracking_uri).get_metric_history(run_id, EPSILON_RUN))]


def measure(
    n: int,
    sites: list,  # type: ignore[type-arg]
    *,
    spec: ExperimentSpec,
    workdir: Path,
    args: argparse.Namespace,
    estimate: Estimate,
) -> Result:
    """Bring N nodes online, sample them idle, run the experiment unless memory forbids; every process stopped."""
    result = Result(nodes=n, executor=args.executor + (" forked" if args.fork else ""))
    cluster_dir = workdir / f"cluster-{n}"
    shutil.rmtree(cluster_dir, ignore_errors=True)
    before = psutil.virtual_memory().available
    if estimate.idle and before - n * estimate.idle < args.reserve_gib * GIB:
        result.skipped = (
            f"not started: {n} idle nodes at {estimate.idle / MIB:.0f} MiB each (measured at the previous N) would leave "
            f"{(before - n * estimate.idle) / GIB:.1f} GiB of the {before / GIB:.1f} GiB available, under the {args.reserve_gib:g} GiB reserve"
        )
        print(f"N={n}: {result.skipped}", flush=True)
        return result
    with _StoppedWithoutInterruption(LocalCluster(cluster_dir)) as cluster:
        cluster.start_superlink()
        fork_server = cluster.start_executor_fork_server() if args.fork else None
        started = time.monotonic()
        for site in sites[:n]:
            cluster.start_supernode(
                site.name, site.home, executor=args.executor, executor_idle_seconds=args.idle, fork_server=fork_server
            )
        nodes = {pid: name.removeprefix("supernode-") for name, pid in cluster.named_pids.items() if name.startswith("supernode-")}
        cluster.wait_for_nodes(n, timeout=max(120.0, 3.0 * n))
        result.online_s = round(time.monotonic() - started, 1)
        print(f"N={n}: {n} nodes online after {result.online_s:.0f} s", flush=True)
        with Sampler(cluster, nodes, interval=args.interval, uss_nodes=args.uss_nodes) as sampler:
            sampler.abort_bytes = int(args.abort_gib * GIB)
            idle_start, cpu0, fleet0 = time.monotonic(), sampler.cpu("superlink", "superexec"), sampler.traffic("fleet")
            sampler.take_smaps()
            sampler._stop.wait(args.idle_seconds)
            sampler.tick()
            idle_s = time.monotonic() - idle_start
            fleet_idle_rate = (sampler.traffic("fleet") - fleet0) / idle_s
            smaps = _smaps_summary(sampler.take_smaps())
            result.idle = {
                # The node's processes' PSS: their own pages and their share of the pages they share.
                "memory_per_node_mib": round(
                    smaps.get("pss_service_mib", 0) + smaps.get("pss_supernode_mib", 0) + smaps.get("pss_forkserver_mib", 0) / n, 1
                ),
                "available_drop_per_node_mib": _mib((before - psutil.virtual_memory().available) / n),
                **_window_summary(sampler.window(idle_start, time.monotonic()), n),
                **smaps,
                "superlink_cpu_per_s": round((sampler.cpu("superlink", "superexec") - cpu0) / idle_s, 3),
                "fleet_bytes_per_s": round(fleet_idle_rate),
            }
            print(f"N={n}: idle {json.dumps(result.idle)}", flush=True)
            available = psutil.virtual_memory().available
            if estimate.run and available - n * estimate.run < args.reserve_gib * GIB:
                result.skipped = (
                    f"not run: {n} nodes needing {estimate.run / MIB:.0f} MiB more each while the run is out (measured at "
                    f"the previous N) would leave {(available - n * estimate.run) / GIB:.1f} GiB of the "
                    f"{available / GIB:.1f} GiB available, under the {args.reserve_gib:g} GiB reserve"
                )
                print(f"N={n}: {result.skipped}", flush=True)
                return result
            result.run = _run(cluster, spec, sampler, workdir=workdir, n=n, rounds=args.rounds, fleet_idle_rate=fleet_idle_rate)
            result.run["nodes_lost"] = lost_nodes(cluster_dir / "logs")
            if args.executor == "on-demand" and args.idle <= args.wait_idle_stop:
                result.run["executors_stopped_after_s"] = _wait_executors_stopped(sampler, timeout=args.idle + 15)
            print(f"N={n}: run {json.dumps(result.run)}", flush=True)
    return result


class _StoppedWithoutInterruption:
    """Stops the cluster on the way out with SIGTERM and SIGINT held back, so that a Ctrl-C
    (or the SIGTERM that ends this harness) cannot cut the stop short and leave nodes behind;
    the signal is delivered once every process is stopped."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def __enter__(self) -> LocalCluster:
        return self.cluster

    def __exit__(self, *exc: object) -> None:
        held = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            self.cluster.stop()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _run(
    cluster: LocalCluster, spec, sampler: Sampler, *, workdir: Path, n: int, rounds: int, fleet_idle_rate: float  # type: ignore[no-untyped-def]
) -> dict[str, object]:
    env = flower_env(cluster.flwr_home)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    record = prepare_submission(
        spec, signing_key=load_private_key(partner_key_path(workdir)), tracking_uri=tracking_uri, output_dir=workdir / "runs"
    )
    start = time.monotonic()
    cpu_link0, cpu_coord0 = sampler.cpu("superlink", "superexec"), sampler.cpu("coordinator")
    cpu_nodes0 = sampler.cpu("service", "supernode", "executor")
    fleet0, http0 = sampler.traffic("fleet"), sampler.traffic("http")
    sampler.take_smaps()
    available0, submitted = psutil.virtual_memory().available, time.time()
    run_id = start_run(record, connection=cluster.connection, env=env)
    status = None
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and not sampler.on_low_memory.is_set():
        try:
            status = run_status(run_id, connection=cluster.connection, env=env)
        except SubmissionError as err:  # `flwr ls` may not answer in time under this load: ask again
            print(f"N={n}: {err}; asking again", flush=True)
        else:
            if status.finished:
                break
        sampler._stop.wait(2.0)
    sampler.tick()
    end = time.monotonic()
    out: dict[str, object] = {"run_id": run_id}
    if sampler.on_low_memory.is_set():
        out["status"] = f"stopped: available memory fell under {sampler.abort_bytes / GIB:g} GiB"
    else:
        out["status"] = status.status if status else "unknown"
        out["details"] = "" if status is None or status.details == "N/A" else status.details
    stamps = _round_stamps(tracking_uri, record.submission_id)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    fleet = sampler.traffic("fleet") - fleet0
    out.update(
        {
            "wall_s": round(end - start, 1),
            "round_gaps_s": [round(g, 1) for g in gaps],
            # Submission to the end of the query wave: the ServerApp's start, and (on demand) the executors'.
            "to_query_end_s": round(stamps[0] - submitted, 1) if stamps else float("nan"),
            "first_round_s": round(gaps[0], 1) if gaps else float("nan"),
            "round_s": round(statistics.fmean(gaps[1:] or gaps), 1) if gaps else float("nan"),
            "available_drop_per_node_mib": _mib((available0 - sampler.min_available_since(start)) / n),
            "superlink_cpu_s": round(sampler.cpu("superlink", "superexec") - cpu_link0, 1),
            "coordinator_cpu_s": round(sampler.cpu("coordinator") - cpu_coord0, 1),
            "nodes_cpu_s": round(sampler.cpu("service", "supernode", "executor") - cpu_nodes0, 1),
            "fleet_bytes": fleet,
            "serverapp_http_bytes": sampler.traffic("http") - http0,
            **_window_summary(sampler.window(start, end), n),
            **_smaps_summary(sampler.take_smaps()),
        }
    )
    # Bytes in each round: the counters at the round's end stamp minus at the previous one's.
    marks = [sampler.traffic_at(t) for t in stamps]
    fleet_rounds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    http_rounds = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out["fleet_bytes_rounds"] = [round(b) for b in fleet_rounds]
    out["fleet_bytes_per_round"] = round(statistics.fmean(fleet_rounds)) if fleet_rounds else float("nan")
    out["serverapp_http_bytes_per_round"] = round(statistics.fmean(http_rounds)) if http_rounds else float("nan")
    out["fleet_bytes_idle_per_round"] = round(fleet_idle_rate * float(out["round_s"]))  # type: ignore[arg-type]
    # What a node holds while the run is out (PSS): service, SuperNode and executor; minus its idle share.
    # With a fork server, each node also holds its share of the parent's pages.
    out["node_memory_mib"] = round(
        sum(float(out.get(f"pss_{role}_mib", 0.0)) for role in ("service", "supernode", "executor"))  # type: ignore[arg-type]
        + float(out.get("pss_forkserver_mib", 0.0)) / n,  # type: ignore[arg-type]
        1,
    )
    out["superlink_cpu_s_per_round"] = round(float(out["superlink_cpu_s"]) / rounds, 2)  # type: ignore[arg-type]
    out["coordinator_cpu_s_per_round"] = round(float(out["coordinator_cpu_s"]) / rounds, 2)  # type: ignore[arg-type]
    return out


def _wait_executors_stopped(sampler: Sampler, *, timeout: float) -> float:
    """Seconds after the run until no executor is alive (on demand, each stops when idle); NaN if some still run."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        sampler.tick()
        if not any(p.alive and p.role == "executor" for p in list(sampler.procs.values())):
            return round(time.monotonic() - started, 1)
        sampler._stop.wait(0.5)
    return float("nan")


def lost_nodes(logs: Path) -> list[str]:
    """Nodes whose SuperNode gave up on the SuperLink (an RPC answered "Internal server error").

    Under CPU starvation the SuperLink's SQLite state can stay locked past its 5 s busy
    timeout; the RPC fails with INTERNAL and Flower 1.39's SuperNode deactivates itself
    while its process lives on: the node no longer answers.
    """
    return sorted(
        path.stem.removeprefix("supernode-") for path in logs.glob("supernode-*.log")
        if "Internal server error" in path.read_text(errors="replace")
    )


# ---------------------------------------------------------------------------- leftovers


def leftovers(workdir: Path) -> list[str]:
    """Processes of this harness's clusters still running (their command line or cwd under `workdir`)."""
    found = []
    markers = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "hospital_node.runtime")
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if any(m in cmdline for m in markers) and (str(workdir) in cmdline or str(proc.info.get("cwd") or "").startswith(str(workdir))):
            found.append(f"{proc.info['pid']} {cmdline[:100]}")
    return found


# ---------------------------------------------------------------------------- reporting


def machine() -> dict[str, object]:
    memory = psutil.virtual_memory()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory.total / GIB, 1),
        "available_gib_at_start": round(memory.available / GIB, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **{name: version(name) for name in ("flwr", "torch", "opacus")},
    }


def table(results: list[Result]) -> str:
    def num(value: object) -> float:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return float("nan")

    head = (f"{'N':>4} {'online s':>8} {'MiB/node idle':>13} {'MiB/node run':>12} {'SL cpu/s idle':>13} {'SL MiB':>6} "
            f"{'SL cpu s/rnd':>12} {'app cpu s/rnd':>13} {'to query s':>10} {'s/rnd':>6} {'Fleet KiB/rnd':>13} {'min avail GiB':>13}")
    lines = [head]
    for r in results:
        run, idle = r.run, r.idle
        lines.append(
            f"{r.nodes:>4} {r.online_s:>8.0f} {num(idle.get('memory_per_node_mib')):>13.0f} "
            f"{num(run.get('node_memory_mib')):>12.0f} "
            f"{num(idle.get('superlink_cpu_per_s')):>13.3f} {num(run.get('superlink_rss_peak_mib', idle.get('superlink_rss_peak_mib'))):>6.0f} "
            f"{num(run.get('superlink_cpu_s_per_round')):>12.1f} {num(run.get('coordinator_cpu_s_per_round')):>13.1f} "
            f"{num(run.get('to_query_end_s')):>10.1f} {num(run.get('round_s')):>6.1f} {num(run.get('fleet_bytes_per_round')) / 1024:>13.0f} "
            f"{num(run.get('available_min_gib', idle.get('available_min_gib'))):>13.2f}"
            + (f"  {r.skipped}" if r.skipped else f"  {run.get('status', '')}")
        )
    return "\n".join(lines)


def plot(series: dict[str, list[Result]], path: Path) -> None:
    """Memory, seconds per round and the coordinator's cost per round against N, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for index, (label, results) in enumerate(series.items()):
        marker = "os^vD"[index % 5]
        online = [r for r in results if r.idle]
        ran = [r for r in results if r.run and r.run.get("round_gaps_s")]
        axes[0].plot([r.nodes for r in online], [r.idle["memory_per_node_mib"] * r.nodes / 1024 for r in online],
                     f"{marker}--", label=f"{label}: N nodes idle")
        axes[0].plot([r.nodes for r in ran], [float(r.run["node_memory_mib"]) * r.nodes / 1024 for r in ran],  # type: ignore[arg-type]
                     f"{marker}-", label=f"{label}: N nodes, run out")
        axes[1].plot([r.nodes for r in ran], [r.run["round_s"] for r in ran], f"{marker}-", label=f"{label}: rounds 2-3")
        axes[2].plot([r.nodes for r in ran], [r.run["superlink_cpu_s_per_round"] for r in ran], f"{marker}-",
                     label=f"{label}: SuperLink CPU s")
        axes[2].plot([r.nodes for r in ran], [float(r.run["fleet_bytes_per_round"]) / 2**10 / 100 for r in ran],  # type: ignore[arg-type]
                     f"{marker}:", label=f"{label}: Fleet bytes (100 KiB)")
    axes[0].axhline(psutil.virtual_memory().total / GIB - 3.0, color="grey", lw=0.8)
    axes[0].set_ylabel("GiB (sum of the nodes' PSS)")
    axes[0].set_title("Node memory (grey: all but the 3 GiB reserve)")
    axes[1].set_ylabel("seconds")
    axes[1].set_title("Seconds per round")
    axes[2].set_title("Per round, at the coordinator")
    for axis in axes:
        axis.set_xlabel("real SuperNodes (TLS + node auth)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"medfed capacity: 1 SuperLink + N node services on {os.cpu_count()} CPUs, "
                 f"{psutil.virtual_memory().total / GIB:.0f} GiB (shared host, loaded)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _load(path: Path) -> tuple[str, list[Result]]:
    data = json.loads(path.read_text())
    fields = {"nodes", "executor", "online_s", "idle", "run", "skipped"}
    return data["label"] or path.stem, [Result(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]]


# ---------------------------------------------------------------------------- main


def prepare(workdir: Path, n: int, *, seed: int) -> list:  # type: ignore[type-arg]
    """N governed node homes over synthetic cohorts, each dataset with a budget no benchmark exhausts."""
    sites = prepare_alliance(workdir, n_hospitals=n, seed=seed)
    for site in sites:
        set_budget(NodeHome.open(site.home), DATASET, epsilon_=1000.0, delta=1e-5, by="benchmark")
    return sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", choices=("on-demand", "warm"), default="on-demand")
    parser.add_argument("--idle", type=float, default=60.0, help="on-demand: the executor's idle seconds before it stops")
    parser.add_argument("--wait-idle-stop", type=float, default=30.0,
                        help="on demand, with --idle at most this: after the run, time the executors' idle stop")
    parser.add_argument("--fork", action="store_true",
                        help="fork the executors from one pre-imported parent (clients.hospital_node.runtime.forkserver)")
    parser.add_argument("--idle-seconds", type=float, default=15.0, help="idle sampling per N before the run")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between process samples")
    parser.add_argument("--uss-nodes", type=int, default=3, help="nodes whose USS/PSS is sampled")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="skip a run that would leave less available")
    parser.add_argument("--abort-gib", type=float, default=1.5, help="stop a run when available memory falls under this")
    parser.add_argument("--workdir", type=Path, default=Path(".medfed/bench-capacity"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--label", default="", help="a name for this configuration in the JSON")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--plot-from", type=Path, nargs="+", help="only draw --png from these JSON results")
    args = parser.parse_args(argv)
    if args.plot_from:
        if not args.png:
            parser.error("--plot-from needs --png")
        plot(dict(_load(path) for path in args.plot_from), args.png)
        return 0
    if sorted(args.nodes) != args.nodes or min(args.nodes) < 2:
        parser.error(f"--nodes must be ascending and >= 2 (the experiment needs two sites); found {args.nodes}")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    prepared = time.monotonic()
    sites = prepare(workdir, max(args.nodes), seed=args.seed)
    print(f"{len(sites)} node homes governed in {time.monotonic() - prepared:.0f} s", flush=True)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    results: list[Result] = []
    estimate = Estimate()
    problem = ""
    spec = demo_spec(args.rounds, max(args.nodes))
    approve_everywhere(sites, spec, runs=len(args.nodes))
    try:
        for n in args.nodes:
            result = measure(n, sites, spec=spec, workdir=workdir, args=args, estimate=estimate)
            results.append(result)
            if result.idle:
                estimate.idle = max(estimate.idle, result.idle["memory_per_node_mib"] * MIB)
            if result.run:
                extra = float(result.run["node_memory_mib"]) - result.idle["memory_per_node_mib"]  # type: ignore[arg-type]
                estimate.run = max(estimate.run, extra * MIB)
            if result.skipped.startswith("not started") or str(result.run.get("status", "")).startswith("stopped"):
                break
    except KeyboardInterrupt:
        problem = "interrupted"
    except Exception as err:  # noqa: BLE001 - report what was measured, then fail
        problem = f"{type(err).__name__}: {err}"
    finally:
        left = leftovers(workdir)
    print(table(results), flush=True)
    if left:
        print(f"LEFT RUNNING: {left}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"label": args.label, "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": [asdict(r) for r in results], "problem": problem, "leftovers": left},
                                        indent=2) + "\n")
    if args.png and results:
        plot({args.label or args.executor: results}, args.png)
    if problem:
        print(f"stopped early: {problem}", file=sys.stderr)
    return 1 if problem or left else 0


if __name__ == "__main__":
    sys.exit(main())
