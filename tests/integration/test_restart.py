"""A coordinator restart in the middle of a submission, on real processes.

The research partner runs `medfed experiment submit --wait`. The alliance operator holds
submissions after round 2 (a ``HOLD`` file in the coordinator's output folder), stops and
starts the SuperLink on the same state database, and lets go. The run the restart
killed ends failed (stopped with the coordinator, or "No heartbeat received from the
task"); `submit --wait` starts the same signed
submission again, which every node admits as the run continuing and the coordinator
continues from its round-2 checkpoint. Each node's noise is seeded through its
test-only hook, so the model must equal that of an uninterrupted submission of the
same spec; each ledger holds exactly 5 charges for the submission.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from clients.hospital_node.home import NodeHome
from clients.hospital_node.rounds import DEBUG_NOISE_SEED_FILE
from experiments.spec import ExperimentSpec
from experiments.errors import SubmissionError
from experiments.submit import RunStatus, follow, prepare_submission, run_status, start_run
from federation.checkpoint import CHECKPOINT_FILE
from federation.experiment import HOLD_FILE, MODEL_FILE
from medfed.cluster import LocalCluster, flower_env
from medfed.demo import DATASET, EXAMPLE_SPEC, approve_everywhere, partner_key_path, prepare_alliance
from privacy.keys import load_private_key
from privacy.ledger import PrivacyLedger

from .conftest import alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDFED = str(Path(sys.executable).parent / "medfed")
ROUNDS = 5


def _spec(path: Path) -> ExperimentSpec:
    """The example spec with 5 rounds, written to `path` for the partner's command line."""
    mapping = tomllib.loads(EXAMPLE_SPEC.read_text())
    mapping["experiment"]["name"] = "restarted"
    mapping["federation"].update({"rounds": ROUNDS, "min_nodes": 2, "approval_wait_seconds": 1.0})
    path.write_text(tomli_w.dumps(mapping))
    return ExperimentSpec.from_toml(path)


def _wait_for(condition, what: str, timeout: float, process: subprocess.Popen[bytes] | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (found := condition()) is None:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the submitting process exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(0.5)
    return found


def _held_checkpoint(runs: Path) -> dict | None:  # type: ignore[type-arg]
    for path in runs.glob(f"*/{CHECKPOINT_FILE}"):
        state = json.loads(path.read_text())
        if state["held"]:
            return state
    return None


def _finished(run_id: int, connection: str, env: dict[str, str]) -> RunStatus | None:
    try:
        status = run_status(run_id, connection=connection, env=env)
    except SubmissionError:
        return None  # the SuperLink is still starting
    return status if status.finished else None


def _charges(sites) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    out = {}
    for site in sites:
        with PrivacyLedger.open(NodeHome.open(site.home).ledger_path) as ledger:
            out[site.name] = [c.round for c in ledger.charges(DATASET)]
    return out


def _model(path: Path) -> dict:  # type: ignore[type-arg]
    import torch

    return torch.load(path, weights_only=True)


def test_a_submission_survives_a_superlink_restart_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    sites = prepare_alliance(tmp_path, n_hospitals=2, seed=11)
    for site in sites:
        (site.home / DEBUG_NOISE_SEED_FILE).write_text("7\n")
    spec = _spec(tmp_path / "spec.toml")
    approve_everywhere(sites, spec)
    runs, tracking = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs.mkdir()
    (runs / HOLD_FILE).write_text("2\n")  # the operator: hold every submission once round 2 is done
    local = LocalCluster(tmp_path / "cluster")
    submitter: subprocess.Popen[bytes] | None = None
    try:
        local.start_superlink()
        for site in sites:
            local.start_supernode(site.name, site.home)
        local.wait_for_nodes(len(sites))
        log = tmp_path / "submit.log"
        with log.open("wb") as out:
            submitter = subprocess.Popen(
                [MEDFED, "experiment", "submit", str(tmp_path / "spec.toml"), "--superlink", local.connection,
                 "--key", str(partner_key_path(tmp_path)), "--output-dir", str(runs), "--tracking-uri", tracking,
                 "--timeout", "900"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env={**flower_env(local.flwr_home), "COLUMNS": "160"},
            )
        state = _wait_for(lambda: _held_checkpoint(runs), "held checkpoint after round 2", 300, submitter)
        assert state["round"] == 2
        assert _charges(sites) == {site.name: [0, 1, 2] for site in sites}  # 0: the noisy training size

        local.stop_superlink()  # the first run's ServerApp dies with it, once its SuperExec notices
        local.start_superlink()
        env = flower_env(local.flwr_home)
        first_run = int(state["flower_runs"][0])
        _wait_for(lambda: _finished(first_run, local.connection, env), "end of the first run", 300, submitter)
        (runs / HOLD_FILE).unlink()  # the operator lets go once the old ServerApp is gone
        assert submitter.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]
        shown = log.read_text(errors="replace")
        assert "died with the coordinator" in shown
        assert f"submission {state['submission_id'][:12]} continues as run" in shown
        assert f"round {ROUNDS}/{ROUNDS}" in shown and "ε charged by this run (node ledger)" in shown

        submission = state["submission_id"]
        final = json.loads((runs / submission / CHECKPOINT_FILE).read_text())
        assert final["finished"] and len(final["flower_runs"]) == 2
        assert _charges(sites) == {site.name: [0, 1, 2, 3, 4, 5, 0] for site in sites}  # 0 last: the final evaluation

        # The same spec once more, uninterrupted (the officers approve it again).
        approve_everywhere(sites, spec)
        again = prepare_submission(spec, signing_key=load_private_key(partner_key_path(tmp_path)), tracking_uri=tracking, output_dir=runs)
        status, _ = follow(again, start_run(again, connection=local.connection, env=env), connection=local.connection, env=env, timeout=600)
        assert status.succeeded, status
        resumed, whole = _model(runs / submission / MODEL_FILE), _model(runs / again.submission_id / MODEL_FILE)
        for name, tensor in whole.items():
            assert resumed[name].numpy() == pytest.approx(tensor.numpy(), abs=1e-5), name
    finally:
        if submitter is not None and submitter.poll() is None:
            submitter.kill()
            submitter.wait(timeout=10)
        pids = local.pids
        local.stop()
        assert not [p for p in pids if alive(p)], "a Flower process outlived the cluster"
