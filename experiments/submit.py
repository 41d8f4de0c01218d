"""Submitting an experiment to a Flower SuperLink and following its run.

There is no public Python API for ``flwr run`` in Flower 1.39, so this module drives the
`flwr` CLI. The validated spec travels as canonical JSON in the run config (a TOML file
passed with ``--run-config``), with the research partner's signature of it, the MLflow
tracking URI and the coordinator's output folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from experiments.errors import SubmissionError
from experiments.spec import ExperimentSpec
from federation.release import BundleError, stage_release
from privacy.governance import SpecSignature, sign_spec

__all__ = [
    "RunStatus",
    "run_status",
    "submit",
    "wait_for_run",
    "write_run_config",
]


@dataclass(frozen=True)
class RunStatus:
    """A Flower run's status as ``flwr ls`` reports it."""

    run_id: int
    status: str  # e.g. "running", "finished:completed", "finished:failed"
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


def write_run_config(
    spec: ExperimentSpec, path: Path, *, tracking_uri: str, output_dir: Path, signature: SpecSignature | None = None
) -> Path:
    """Write the TOML run config for `spec` (JSON strings are valid TOML basic strings)."""
    lines = [
        f"spec = {json.dumps(spec.canonical_json())}",
        f"spec-signature = {json.dumps(signature.signature if signature else '')}",
        f"spec-signer = {json.dumps(signature.signer if signature else '')}",
        f"tracking-uri = {json.dumps(tracking_uri)}",
        f"output-dir = {json.dumps(str(output_dir.resolve()))}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _flwr_executable() -> str:
    """`flwr` beside this interpreter (a virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    return str(beside) if beside.is_file() else (shutil.which("flwr") or "flwr")


def _flwr(args: list[str], env: Mapping[str, str] | None, timeout: float) -> dict[str, object]:
    try:
        done = subprocess.run(
            [_flwr_executable(), *args], capture_output=True, text=True, env=dict(env) if env else None, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise SubmissionError("the `flwr` command was not found; install medfed in this environment") from None
    except subprocess.TimeoutExpired:
        raise SubmissionError(f"`flwr {args[0]}` did not answer within {timeout:g} s") from None
    try:
        payload = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SubmissionError(f"`flwr {args[0]}` failed: {tail[0]}") from None
    if not payload.get("success", False):
        raise SubmissionError(f"`flwr {args[0]}` failed: {payload.get('error-message', payload)}")
    return payload


def submit(
    spec: ExperimentSpec,
    *,
    connection: str,
    tracking_uri: str,
    output_dir: Path,
    signing_key: Ed25519PrivateKey | None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> int:
    """Start a Flower run of `spec` on the SuperLink named `connection`; returns its run id.

    The run's app bundle is the medfed release installed here
    (:func:`federation.release.stage_release`): hospital nodes serve only releases on
    their allow-list, and never run the bundle's code themselves.

    The canonical spec is signed with the research partner's `signing_key`; every node
    checks that signature against its officer's trusted keys. `None` submits it unsigned,
    which every node refuses (the command line always signs).
    """
    signature = None if signing_key is None else sign_spec(spec.canonical_json(), signing_key)
    with tempfile.TemporaryDirectory(prefix="medfed-submit-") as tmp:
        try:
            app = stage_release(Path(tmp))
        except BundleError as err:
            raise SubmissionError(str(err)) from None
        config = write_run_config(
            spec, Path(tmp) / "run-config.toml", tracking_uri=tracking_uri, output_dir=output_dir, signature=signature
        )
        payload = _flwr(["run", str(app), connection, "--run-config", str(config), "--format", "json"], env, timeout)
    return int(str(payload["run-id"]))


def run_status(run_id: int, *, connection: str, env: Mapping[str, str] | None = None) -> RunStatus:
    """The status of run `run_id`."""
    payload = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env, 60.0)
    runs = payload.get("runs") or []
    if not isinstance(runs, list) or not runs:
        raise SubmissionError(f"the SuperLink does not know run {run_id}")
    row = runs[0]
    return RunStatus(run_id, str(row.get("status", "")), str(row.get("status-details", "") or ""))


def wait_for_run(
    run_id: int,
    *,
    connection: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
) -> RunStatus:
    """Poll until run `run_id` finishes (or `timeout` passes) and return its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(run_id, connection=connection, env=env)
        if status.finished:
            return status
        if time.monotonic() > deadline:
            raise SubmissionError(f"run {run_id} did not finish within {timeout:g} s (status {status.status})")
        time.sleep(poll)
