"""``medfed simulate``: bad input is refused before anything is generated or started.

More sites than memory allows gets the estimate it was judged by; a Ray cluster address
that does not answer is named, with how to start one; either way the work folder is not
created and no Ray runs in this process. The rehearsal itself runs in
tests/integration/test_simulation.py.
"""

from __future__ import annotations

import re
import socket
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
from medfed.errors import SimulationError
from medfed.simulate import ACTOR_MIB, PER_SITE_MIB, estimate_memory, simulate
from medfed.synth_omop import ALLIANCE_CITIES, alliance_plan

ROOT = Path(__file__).resolve().parents[2]
OMOP_SPEC = ROOT / "experiments" / "examples" / "omop_hypertension.toml"
TABULAR_SPEC = ROOT / "experiments" / "examples" / "hypertension.toml"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def test_the_memory_estimate_grows_with_sites_and_actors() -> None:
    small = estimate_memory(10, concurrency=2, available_mib=4096)
    alliance = estimate_memory(540, concurrency=2, available_mib=4096)
    assert alliance.total_mib - small.total_mib == pytest.approx(530 * PER_SITE_MIB)
    assert estimate_memory(10, concurrency=4, available_mib=4096).total_mib - small.total_mib == pytest.approx(2 * ACTOR_MIB)
    # On a Ray cluster the actors run elsewhere: this machine holds the coordinator only.
    assert estimate_memory(540, concurrency=16, available_mib=4096, remote=True).actors_mib == 0
    tight = estimate_memory(540, concurrency=2, available_mib=1024)
    assert not tight.fits
    assert re.fullmatch(
        r"540 virtual hospitals need about \d+\.\d GiB: 2 Ray actor\(s\) x \d+ MiB \+ Ray \d+ MiB \+ coordinator \d+ MiB "
        r"\+ 540 sites x [\d.]+ MiB; 1\.0 GiB is available",
        tight.describe(),
    )


def test_more_sites_than_memory_allows_is_refused_with_the_estimate_before_anything_starts(tmp_path: Path) -> None:
    workdir = tmp_path / "rehearsal"
    with pytest.raises(SimulationError, match=r"not enough memory for this rehearsal: 50000000 virtual hospitals need about "
                                              r"\d+\.\d GiB: .* GiB is available\. Ask for fewer --sites.*Nothing was started"):
        simulate(workdir, OMOP_SPEC, sites=50_000_000, console=None)  # type: ignore[arg-type]
    assert not workdir.exists()
    assert not _ray_running()


def test_a_ray_address_that_does_not_answer_is_named_and_nothing_starts(tmp_path: Path) -> None:
    workdir = tmp_path / "rehearsal"
    port = _closed_port()
    with pytest.raises(SimulationError, match=f"no Ray cluster answers at --ray-address 127.0.0.1:{port} .*"
                                              f"`ray start --head --port {port}`.*Nothing was started"):
        simulate(workdir, OMOP_SPEC, sites=3, ray_address=f"127.0.0.1:{port}", console=None)  # type: ignore[arg-type]
    assert not workdir.exists()
    assert not _ray_running()


def test_the_cli_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    workdir = tmp_path / "rehearsal"
    port = _closed_port()
    for args, expected in (
        (["--sites", "50000000"], "error: not enough memory for this rehearsal: 50000000 virtual hospitals need about"),
        (["--sites", "3", "--ray-address", f"127.0.0.1:{port}"], f"error: no Ray cluster answers at --ray-address 127.0.0.1:{port}"),
        (["--sites", "3", "--ray-address", "head:port"], "error: --ray-address 'head:port' is not host:port"),
        (["--sites", "3", "--profile", "city"], "error: --profile 'city' is not a profile; choose one of default, alliance"),
        (["--sites", "1"], "error: " + str(OMOP_SPEC) + ": federation.min_nodes = 2 is more than --sites 1"),
    ):
        result = _cli([str(OMOP_SPEC), *args, "--workdir", str(workdir)])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(expected), result.stderr
        assert "Traceback" not in result.output + result.stderr
    result = _cli([str(TABULAR_SPEC), "--sites", "3", "--workdir", str(workdir)])
    assert result.exit_code == 2 and "a rehearsal generates OMOP hospitals, so the spec must build its cohort from OMOP" in result.stderr
    assert not workdir.exists()


@dataclass(frozen=True)
class _Result:
    exit_code: int
    output: str
    stderr: str


def _cli(args: list[str]) -> _Result:
    """`medfed simulate ARGS` through the console script's error handling (``main``), in this process."""
    from medfed import cli

    argv, out, err = sys.argv, StringIO(), StringIO()
    sys.argv = ["medfed", "simulate", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exit_:
                code = int(exit_.code or 0)
    finally:
        sys.argv = argv
    return _Result(code, out.getvalue(), err.getvalue())


def test_the_alliance_profile_has_the_alliances_shape() -> None:
    plan = alliance_plan(540, tier2_scale=0.35)
    assert sum(h.tier == "tier3" for h in plan) == 140 and sum(h.tier == "tier2" for h in plan) == 400
    assert {h.city for h in plan} == set(range(1, ALLIANCE_CITIES + 1))
    assert {h.scale for h in plan if h.tier == "tier2"} == {0.35} and {h.scale for h in plan if h.tier == "tier3"} == {1.0}
    assert len({h.name for h in plan}) == 540
    # Any prefix keeps the mix: 100 sites hold 25 or 26 tier-3 hospitals (140/540 of them).
    assert sum(h.tier == "tier3" for h in alliance_plan(100)) in (25, 26)
    assert [h.name for h in alliance_plan(3)] == [h.name for h in plan[:3]]


def test_a_sampled_round_too_small_for_min_nodes_is_refused_before_anything_starts(tmp_path: Path) -> None:
    spec = tmp_path / "sampled.toml"
    spec.write_text(OMOP_SPEC.read_text().replace("rounds = 5", "rounds = 4\nfraction_per_round = 0.5"))
    workdir = tmp_path / "rehearsal"
    with pytest.raises(SimulationError, match=r"federation.fraction_per_round = 0.5 schedules 2 of 4 rounds per hospital, so a "
                                              r"round of --sites 3 has as few as 1 hospitals, fewer than federation.min_nodes = 2"):
        simulate(workdir, spec, sites=3, console=None)  # type: ignore[arg-type]
    assert not workdir.exists()
    assert not _ray_running()
