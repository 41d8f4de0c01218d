"""``medfed simulate``: rehearse a spec at alliance scale on Flower's Simulation Engine (Ray).

The rehearsal runs the same apps as a deployment: the ServerApp is
:data:`federation.server_app.app` with the run config ``medfed experiment submit``
writes, and every virtual hospital answers with the installed ClientApp
(:data:`clients.hospital_node.client_app.app`). Only Flower's engine differs: the
Simulation Engine instead of a SuperLink and SuperNodes, Ray actors instead of node
executors. So each virtual hospital is governed as a real one, from its own node home:
policy, a trusted partner key, the officer's approval of the signed spec, a budget, a
privacy ledger and a signed audit log. Admission, charging and egress records happen
at scale exactly as on a node; a hospital whose cohort is below its policy's minimum
refuses, and the coordinator leaves it out, as in a deployment.

Rehearsal state is marked as such so that it can never pass for real governance: the
homes are rehearsal homes (``[node] rehearsal = true``), the partner key that signs the
rehearsal is trusted as a rehearsal key, and the approvals are rehearsal approvals. A
real node refuses all three (:mod:`clients.hospital_node.governance`,
:mod:`clients.hospital_node.runtime.rehearsal`).

The ClientApp finds its virtual hospital's home through the environment of the Ray
workers (``MEDFED_REHEARSAL_HOMES``, a folder of homes with a manifest in partition
order), never through the run config the coordinator sends.

Before anything starts, the memory the rehearsal needs is estimated (see
:func:`estimate_memory`) and a Ray cluster address (``--ray-address``) is checked; either
failing is a :class:`~medfed.errors.SimulationError` with nothing generated or started.
Generated hospitals are cached under ``<workdir>/data`` by profile, seed and scales.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from experiments.spec import ExperimentSpec
from medfed.errors import SimulationError

__all__ = [
    "PROFILE_TIER2_SCALE",
    "MemoryEstimate",
    "RehearsalSite",
    "SimulationResult",
    "check_ray_address",
    "estimate_memory",
    "prepare_rehearsal",
    "run_simulation",
    "simulate",
]

logger = logging.getLogger(__name__)

#: The rehearsal's research partner, trusted by every virtual hospital as a rehearsal key.
REHEARSAL_PARTNER = "alliance_rehearsal"
REHEARSAL_OFFICER = "rehearsal-officer"
#: Tier-2 hospitals of the alliance profile are generated at this share of their size by
#: default: a 540-site rehearsal stays quick to generate, and the smallest fall below a
#: node's minimum cohort size (100 patients by default), as small hospitals do; 0.35 leaves about half of them below it.
PROFILE_TIER2_SCALE = 0.35

# Memory, measured by benchmarks/simulation_scale.py (BENCHMARKS.md, "Rehearsal at alliance
# scale"), with headroom: a Ray actor serving the ClientApp (torch, Opacus, DuckDB, polars
# imported, a cohort built and trained), Ray's own processes, the coordinator with MLflow
# and torch, and what each virtual node adds to the coordinator (link state, node context,
# replies kept by the coordinator).
ACTOR_MIB = 900.0
RAY_BASE_MIB = 700.0
DRIVER_BASE_MIB = 900.0
PER_SITE_MIB = 2.0
_RAY_PORT = 6379
# The Flower release whose (internal) simulation loop `_engine` reassembles.
_FLWR_VERSION = "1.39.0"


@dataclass(frozen=True)
class MemoryEstimate:
    """What a rehearsal of `sites` virtual hospitals with `concurrency` Ray actors needs, in MiB."""

    sites: int
    concurrency: int
    actors_mib: float
    ray_mib: float
    driver_mib: float
    sites_mib: float
    available_mib: float

    @property
    def total_mib(self) -> float:
        return self.actors_mib + self.ray_mib + self.driver_mib + self.sites_mib

    @property
    def fits(self) -> bool:
        return self.total_mib <= self.available_mib

    def describe(self) -> str:
        return (
            f"{self.sites} virtual hospitals need about {self.total_mib / 1024:.1f} GiB: "
            f"{self.concurrency} Ray actor(s) x {ACTOR_MIB:.0f} MiB + Ray {self.ray_mib:.0f} MiB + "
            f"coordinator {self.driver_mib:.0f} MiB + {self.sites} sites x {PER_SITE_MIB:g} MiB; "
            f"{self.available_mib / 1024:.1f} GiB is available"
        )


def available_memory_mib() -> float:
    """MemAvailable from /proc/meminfo (what can be used without swapping), in MiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) / 2**20


def estimate_memory(sites: int, *, concurrency: int, available_mib: float | None = None, remote: bool = False) -> MemoryEstimate:
    """The memory a rehearsal needs on this machine (on a Ray cluster the actors live elsewhere).

    The actors' memory does not grow with the number of sites (each actor serves virtual
    nodes one after another); the coordinator's does, by ``PER_SITE_MIB`` per site.
    """
    return MemoryEstimate(
        sites=sites,
        concurrency=concurrency,
        actors_mib=0.0 if remote else concurrency * ACTOR_MIB,
        ray_mib=0.0 if remote else RAY_BASE_MIB,
        driver_mib=DRIVER_BASE_MIB,
        sites_mib=sites * PER_SITE_MIB,
        available_mib=available_memory_mib() if available_mib is None else available_mib,
    )


def check_ray_address(address: str, *, timeout: float = 3.0) -> tuple[str, int]:
    """Check that a Ray cluster's head answers at `address` (``host:port``; port 6379 if left out).

    Raises
    ------
    SimulationError
        The address is malformed or nothing answers there within `timeout` seconds.
    """
    host, _, port_text = address.rpartition(":") if ":" in address else (address, "", str(_RAY_PORT))
    host = host.removeprefix("ray://") if host else address
    try:
        port = int(port_text)
    except ValueError:
        raise SimulationError(f"--ray-address {address!r} is not host:port (e.g. 10.0.0.5:6379)") from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise SimulationError(
            f"no Ray cluster answers at --ray-address {host}:{port} ({err.strerror or err}); start its head with "
            f"`ray start --head --port {port}` there (see README, 'Rehearsal at alliance scale'). Nothing was started"
        ) from None
    return host, port


@dataclass(frozen=True)
class RehearsalSite:
    """A virtual hospital: its name, rehearsal home, tier and generated size."""

    name: str
    home: Path
    tier: str
    n_patients: int


def _data_folder(workdir: Path, profile: str, seed: int, patients_scale: float, tier2_scale: float) -> Path:
    return workdir / "data" / f"{profile}-seed{seed}-scale{patients_scale:g}-tier2x{tier2_scale:g}"


def _generate(workdir: Path, *, sites: int, profile: str, seed: int, patients_scale: float, tier2_scale: float,
              on_progress: Callable[[str], None]) -> list[Any]:
    """Each planned hospital's OMOP tables, generated once per profile/seed/scales and reused (cached)."""
    from medfed.synth_omop import OmopSite, alliance_plan, default_plan

    plan = (
        alliance_plan(sites, patients_scale=patients_scale, tier2_scale=tier2_scale)
        if profile == "alliance"
        else default_plan(sites, patients_scale=patients_scale)
    )
    folder = _data_folder(workdir, profile, seed, patients_scale, tier2_scale)
    started = time.monotonic()
    missing = [h for h in plan if not (folder / h.name / "generated.json").is_file()]
    for hospital in _in_parallel(_write_cached, [(folder, h, seed) for h in missing]):
        del hospital  # written; read back below with the cached ones
    out = []
    for hospital in plan:
        meta = json.loads((folder / hospital.name / "generated.json").read_text())
        out.append(OmopSite(hospital.name, folder / hospital.name / "omop", folder / hospital.name / "truth",
                            meta["tier"], int(meta["n_patients"])))
    if missing:
        on_progress(f"  generated {len(missing)} hospital(s) in {time.monotonic() - started:.1f} s into {folder} "
                    f"({len(plan) - len(missing)} cached)")
    else:
        on_progress(f"  {len(plan)} hospitals from the cache in {folder}")
    return out


def _write_cached(args: tuple[Path, Any, int]) -> str:
    """Write one planned hospital and mark it complete (a worker process's job)."""
    from medfed.synth_omop import write_hospital

    folder, hospital, seed = args
    site = write_hospital(folder, hospital, seed=seed)
    (folder / hospital.name / "generated.json").write_text(json.dumps({"tier": site.tier, "n_patients": site.n_patients}) + "\n")
    return site.site


def _in_parallel(work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`work` over `items`, in order, on one worker process per CPU (serially for a handful).

    Generating hospitals and governing their homes is independent per hospital and
    CPU-bound; it runs before Ray starts, so the CPUs are free.
    """
    workers = min(os.cpu_count() or 1, len(items))
    if workers <= 1 or len(items) < 8:
        return [work(item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(work, items, chunksize=max(1, len(items) // (workers * 8))))


def rehearsal_key_path(workdir: Path) -> Path:
    """The rehearsal partner's private key (``<workdir>/partner``), created on first use."""
    from privacy.keys import generate_keypair

    path = workdir / "partner" / f"{REHEARSAL_PARTNER}.key"
    if not path.exists():
        generate_keypair(path.parent, REHEARSAL_PARTNER)
    return path


def _govern_home(args: tuple[Path, str, Path, str, Path, str, float | None]) -> Path:
    """One virtual hospital's officer, once: a rehearsal home with the OMOP source, the key, a budget, the approval."""
    from clients.hospital_node.data.sources import OmopSource
    from clients.hospital_node.governance import approve, set_budget
    from clients.hospital_node.home import DatasetEntry, NodeHome
    from medfed.demo import BUDGET_DELTA, BUDGET_EPSILON

    path, name, folder, dataset, partner_public_key, digest, budget_epsilon = args
    home = NodeHome.create(path, name=name, rehearsal=True)
    entry = DatasetEntry(name=dataset, path=path / "omop-scratch" / dataset, kind="omop", omop=OmopSource("folder", str(folder)))
    home.register_dataset(entry, replace=True)
    home.trusted_partners().add(REHEARSAL_PARTNER, partner_public_key, added_by=REHEARSAL_OFFICER, rehearsal=True)
    set_budget(home, dataset, epsilon_=budget_epsilon or BUDGET_EPSILON, delta=BUDGET_DELTA, by=REHEARSAL_OFFICER)
    approve(home, digest, dataset=dataset, by=REHEARSAL_OFFICER, not_yet_requested=True, rehearsal=True)
    return home.path


def prepare_rehearsal(
    workdir: Path,
    spec: ExperimentSpec,
    *,
    sites: int,
    profile: str = "alliance",
    seed: int = 7,
    patients_scale: float = 1.0,
    tier2_scale: float = PROFILE_TIER2_SCALE,
    budget_epsilon: float | None = None,
    on_progress: Callable[[str], None] = lambda line: None,
) -> list[RehearsalSite]:
    """Generate (or reuse) the hospitals and give each a fresh, governed rehearsal home.

    Each home registers its hospital's OMOP folder under the spec's dataset name, trusts
    the rehearsal partner's key (as a rehearsal key), has the demo's lifetime budget on
    the dataset and a rehearsal approval of exactly this spec. The homes are rebuilt on
    every rehearsal, so their ledgers and audit logs describe this rehearsal only; the
    folder of homes gets the manifest the ClientApp finds them by.
    """
    from clients.hospital_node.runtime.rehearsal import write_manifest

    generated = _generate(workdir, sites=sites, profile=profile, seed=seed, patients_scale=patients_scale,
                          tier2_scale=tier2_scale, on_progress=on_progress)
    homes_dir = workdir / "homes"
    shutil.rmtree(homes_dir, ignore_errors=True)
    homes_dir.mkdir(parents=True)
    partner_public_key = rehearsal_key_path(workdir).with_suffix(".pub")
    started = time.monotonic()
    jobs = [(homes_dir / h.site, h.site, h.folder.resolve(), spec.data.dataset, partner_public_key, spec.digest(), budget_epsilon)
            for h in generated]
    paths = _in_parallel(_govern_home, jobs)
    out = [RehearsalSite(h.site, path, h.tier, h.n_patients) for h, path in zip(generated, paths, strict=True)]
    write_manifest(homes_dir, [s.name for s in out])
    on_progress(f"  {len(out)} rehearsal homes governed in {time.monotonic() - started:.1f} s (rehearsal key "
                f"{REHEARSAL_PARTNER}, rehearsal approvals of spec {spec.digest()[:12]})")
    return out


@dataclass(frozen=True)
class SimulationResult:
    """What a finished rehearsal left: its submission, MLflow run and timings."""

    submission_id: str
    mlflow_run_id: str | None
    tracking_uri: str
    seconds: float  # the simulation itself, Ray start to the ServerApp's end
    round_seconds: tuple[float, ...]  # wall time of each round, as its progress line was printed
    driver_peak_mib: float


def _ray_init(address: str | None, homes_dir: Path, num_cpus: int | None) -> None:
    """Start (or join) Ray with the rehearsal homes in every worker's environment."""
    import ray

    pythonpath = os.pathsep.join(p for p in sys.path if p)
    env = {"PYTHONPATH": pythonpath, "MEDFED_REHEARSAL_HOMES": str(homes_dir.resolve()),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    os.environ.update(env)  # a local Ray's raylet (and so its workers) inherits it as well
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
                              "runtime_env": {"env_vars": env}}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SimulationError(f"Ray did not start{' at ' + address if address else ''}: {err}") from None


def _engine(num_sites: int, run_config: dict[str, str], cpus_per_node: float) -> None:
    """Flower's simulation loop (``flwr.simulation.run_simulation._main_loop``), with the nodes registered first.

    Built from Flower 1.39's own pieces rather than its public ``run_simulation``, which
    takes no run config (our ServerApp reads the spec, signature and tracking URI from
    it) and starts the ServerApp thread before it registers the virtual nodes: our
    coordinator waits for ``federation.min_nodes`` and then takes the nodes it sees, so
    here every node is registered first. The ServerApp and ClientApp are the installed
    ones; the run config is what ``medfed experiment submit`` sends.
    """
    from queue import Empty, Queue

    import flwr

    if flwr.__version__ != _FLWR_VERSION:
        raise SimulationError(
            f"medfed simulate drives Flower {_FLWR_VERSION}'s simulation loop; this environment has flwr "
            f"{flwr.__version__}. Install flwr[simulation]=={_FLWR_VERSION}"
        )
    from flwr.app import Context, RecordDict
    from flwr.server.superlink.fleet import vce
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.server.run_serverapp import run as run_serverapp
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from clients.hospital_node.client_app import app as client_app
    from federation.server_app import app as server_app

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    # What Flower's own simulation entry point sets for the coordinator's task (run_simulation._run_simulation).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state_factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = state_factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)  # type: ignore[attr-defined]
    nodes = _register_nodes(num_nodes=num_sites, state_factory=state_factory)
    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    stop = threading.Event()
    errors: Queue[BaseException] = Queue()

    def coordinate() -> None:
        try:
            run_serverapp(grid=grid, context=context, server_app_dir="", loaded_server_app=server_app)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.put(err)
        finally:
            stop.set()  # ends the engine's loop

    # A daemon, unlike Flower's own ServerApp thread: on Ctrl-C the coordinator may be
    # waiting out a wave's timeout, and the rehearsal must stop now, Ray with it.
    thread = threading.Thread(target=coordinate, name="medfed-serverapp", daemon=True)
    thread.start()
    backend_config = {"client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0}, "init_args": {}, "actor": {"tensorflow": 0}}
    try:
        vce.start_vce(
            backend_name="ray",
            backend_config_json_stream=json.dumps(backend_config),
            app_dir="",
            is_app=False,
            f_stop=stop,
            run=run,
            metrics=VceMetrics(),
            client_app=client_app,
            state_factory=state_factory,
            existing_nodes_mapping=nodes,
        )
    except BaseException:
        stop.set()
        raise
    thread.join()
    try:
        failure = errors.get_nowait()
    except Empty:
        return
    raise SimulationError(f"the coordinator (ServerApp) failed: {failure}") from failure


class _StopQuietly(logging.Filter):
    """Once the rehearsal is being stopped (Ctrl-C, SIGTERM), drop Flower's engine logging the actors' end as errors."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.stopping


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_simulation(
    workdir: Path,
    spec: ExperimentSpec,
    sites: Sequence[RehearsalSite],
    *,
    tracking_uri: str,
    console: Console,
    ray_address: str | None = None,
    cpus: int | None = None,
    cpus_per_node: float = 1.0,
) -> SimulationResult:
    """Sign a submission of `spec` with the rehearsal key and run it on the Simulation Engine; print each round."""
    import ray

    from experiments.progress import RunProgress, round_line
    from experiments.submit import prepare_submission
    from privacy.keys import load_private_key

    rounds = spec.federation.rounds
    progress = RunProgress(tracking_uri)  # opens the store before the ServerApp does
    record = prepare_submission(
        spec, signing_key=load_private_key(rehearsal_key_path(workdir)), tracking_uri=tracking_uri, output_dir=workdir / "runs"
    )
    run_config = {
        "spec": record.spec_json,
        "submission": record.submission_json,
        "spec-signature": record.signature,
        "spec-signer": record.signer,
        "tracking-uri": record.tracking_uri,
        "output-dir": record.output_dir,
        "study-options": record.study_options,
    }
    progress.follow(record.submission_id)
    started = time.monotonic()
    round_ends: list[float] = []
    done = threading.Event()

    def follow() -> None:
        while True:
            finished = done.wait(2.0)
            try:
                for step, metrics in progress.new_rounds():
                    round_ends.append(time.monotonic())
                    console.print(f"  {round_line(step, rounds, metrics)} ({time.monotonic() - started:.0f} s)")
            except Exception as err:  # noqa: BLE001 - progress is best effort; the run goes on
                logger.warning("progress from MLflow: %s", err)
            if finished:
                return

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)  # Flower's per-message DEBUG lines; progress is ours
    if not ray.is_initialized():  # `simulate` joins a cluster before it generates anything
        _ray_init(ray_address, workdir / "homes", cpus)
    watcher = threading.Thread(target=follow, name="rehearsal-progress", daemon=True)
    watcher.start()
    console.print(f"  submission {record.submission_id[:12]} (signed with the rehearsal key) on the Simulation Engine: "
                  f"{len(sites)} virtual hospitals, {ray.cluster_resources().get('CPU', 0):g} CPUs in Ray"
                  f"{' at ' + ray_address if ray_address else ''}; tracking in {tracking_uri}")
    stopping = _StopQuietly()
    flwr_logger.addFilter(stopping)
    try:
        _engine(len(sites), run_config, cpus_per_node)
    except BaseException:
        stopping.stopping = True
        raise
    finally:
        done.set()
        watcher.join()
        ray.shutdown()
        flwr_logger.removeFilter(stopping)
    seconds = time.monotonic() - started
    marks = [started, *round_ends]
    return SimulationResult(
        record.submission_id,
        progress.mlflow_run_id,
        tracking_uri,
        seconds,
        tuple(b - a for a, b in zip(marks, marks[1:])),
        _rss_mib(),
    )


def _participation(sites: Sequence[RehearsalSite]) -> tuple[list[str], list[str]]:
    """Which sites trained (a charged release) and which refused, from their own audit logs."""
    from clients.hospital_node.home import NodeHome

    trained, refused = [], []
    for site in sites:
        kinds = {e.kind for e in NodeHome.open(site.home).audit_log().entries()}
        if "refusal" in kinds and "release" not in kinds:
            refused.append(site.name)
        elif "release" in kinds:
            trained.append(site.name)
    return trained, refused


#: At most this many sites get a column of their own in the final table; MLflow has all.
TABLE_SITES = 8


def simulate(
    workdir: Path,
    spec_path: Path,
    *,
    sites: int,
    profile: str = "alliance",
    seed: int = 7,
    patients_scale: float = 1.0,
    tier2_scale: float = PROFILE_TIER2_SCALE,
    ray_address: str | None = None,
    cpus: int | None = None,
    tracking_uri: str | None = None,
    console: Console,
) -> SimulationResult:
    """The whole rehearsal: checks, hospitals and homes, the run, the final table and the budgets."""
    from experiments.cost import plan_privacy
    from experiments.progress import released_rows, results_table, pooled_result, site_results
    from experiments.tracking import default_tracking_uri
    from medfed.synth_omop import PROFILES

    if profile not in PROFILES:
        raise SimulationError(f"--profile {profile!r} is not a profile; choose one of {', '.join(PROFILES)}")
    if sites < 1:
        raise SimulationError(f"--sites must be at least 1; found {sites}")
    spec = ExperimentSpec.from_toml(spec_path)
    if spec.data.cohort is None:
        raise SimulationError(
            f"{spec_path}: a rehearsal generates OMOP hospitals, so the spec must build its cohort from OMOP "
            "([data.cohort], e.g. experiments/examples/omop_hypertension.toml)"
        )
    if spec.federation.min_nodes > sites:
        raise SimulationError(f"{spec_path}: federation.min_nodes = {spec.federation.min_nodes} is more than --sites {sites}")
    fed = spec.federation
    per_round = sites * fed.rounds_per_node // fed.rounds  # the fewest a round is scheduled (federation.schedule)
    if per_round < fed.min_nodes:
        raise SimulationError(
            f"{spec_path}: federation.fraction_per_round = {fed.fraction_per_round:g} schedules {fed.rounds_per_node} of "
            f"{fed.rounds} rounds per hospital, so a round of --sites {sites} has as few as {per_round} hospitals, fewer than "
            f"federation.min_nodes = {fed.min_nodes}; raise fraction_per_round or --sites, or lower min_nodes"
        )
    if ray_address:
        check_ray_address(ray_address)
        concurrency = 0
    else:
        concurrency = max(1, cpus or os.cpu_count() or 1)  # one CPU per virtual node at a time
    estimate = estimate_memory(sites, concurrency=concurrency, remote=bool(ray_address))
    if not estimate.fits:
        raise SimulationError(
            f"not enough memory for this rehearsal: {estimate.describe()}. Ask for fewer --sites, fewer --cpus "
            "(fewer Ray actors at once), or run it on a Ray cluster (--ray-address; README). Nothing was started"
        )
    workdir = workdir.resolve()
    if ray_address:
        # Join the cluster now: one that answers on its port but is no Ray head fails here,
        # before anything is written.
        _ray_init(ray_address, workdir / "homes", None)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = plan_privacy(spec)
    started = time.monotonic()
    console.print(f"[bold]medfed simulate[/]: {sites} virtual hospitals ({profile} profile), spec {spec.experiment.name} "
                  f"({spec.digest()[:12]}), {spec.federation.rounds} rounds on Flower's Simulation Engine")
    console.print(f"  memory: {estimate.describe()}")
    console.print(f"  cost: each site's dataset is charged ε = {plan.epsilon_charged_per_site:.3f} at δ = {plan.delta:g}")
    if fed.rounds_per_node < fed.rounds:
        console.print(f"  sampling: each hospital trains {fed.rounds_per_node} of {fed.rounds} rounds (fraction_per_round "
                      f"{fed.fraction_per_round:g}), {per_round}-{-(-sites * fed.rounds_per_node // fed.rounds)} hospitals a round")
    try:
        homes = prepare_rehearsal(workdir, spec, sites=sites, profile=profile, seed=seed, patients_scale=patients_scale,
                                  tier2_scale=tier2_scale, on_progress=console.print)
    except BaseException:
        import ray

        ray.shutdown()
        raise
    tracking_uri = tracking_uri or default_tracking_uri(workdir)
    result = run_simulation(workdir, spec, homes, tracking_uri=tracking_uri, console=console,
                            ray_address=ray_address, cpus=cpus)
    trained, refused = _participation(homes)
    console.print(f"  {len(trained)} hospitals trained; {len(refused)} refused (each node's own audit log says why, e.g. "
                  f"a cohort below its minimum size){': ' + ', '.join(refused[:10]) if refused else ''}"
                  f"{' ...' if len(refused) > 10 else ''}")
    if result.mlflow_run_id is not None:
        results = site_results(tracking_uri, result.mlflow_run_id)
        shown = dict(list(results.items())[:TABLE_SITES])
        label = "federated model: validation AUC from the sites' DP score histograms"
        cells, pooled = released_rows(shown, pooled_result(tracking_uri, result.mlflow_run_id))
        title = f"Validation AUC at ε ≈ {plan.epsilon_charged_per_site:.2f} per patient (δ = {plan.delta:g})"
        console.print(results_table(title, {label: cells}, shown, all_sites={label: pooled}, show_rounds=fed.rounds_per_node < fed.rounds))
        if len(results) > len(shown):
            console.print(f"  ({len(results) - len(shown)} more sites' columns are in MLflow run {result.mlflow_run_id})")
    from medfed.demo import remaining_budgets

    left = [budget - spent for spent, budget in remaining_budgets(list(homes), spec.data.dataset).values()]
    console.print(f"remaining budget on '{spec.data.dataset}' per site (ε, from each node's ledger): "
                  f"min {min(left):.2f}, max {max(left):.2f} over {len(left)} sites")
    console.print(f"MLflow run {result.mlflow_run_id}: `mlflow ui --backend-store-uri {tracking_uri}`")
    console.print(f"done in {time.monotonic() - started:.0f} s (simulation {result.seconds:.0f} s); Ray stopped; "
                  f"the rehearsal homes stay in {workdir / 'homes'} (`medfed node audit verify --home ...`)")
    return result
