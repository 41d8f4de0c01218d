"""Submitting an experiment to a Flower SuperLink, following its run, and resuming it.

There is no public Python API for ``flwr run`` in Flower 1.39, so this module drives the
`flwr` CLI. A research partner signs not the spec but a *submission* of it
(:class:`privacy.governance.Submission`: the spec's digest, a random submission id and the
signing time). The run config carries the spec as canonical JSON, the submission, its
signature, the MLflow tracking URI and the coordinator's output folder.

Each submission is kept in the partner's submissions folder
(``.medfed/submissions/<submission id>.json``, mode 0600) so that it can be followed and,
after the coordinator restarts, resumed: resuming starts a new Flower run of the *same*
signed submission, which every node recognises as the run continuing (not a new run) and
which the ServerApp continues from its last checkpoint. :func:`follow` does this by
itself when a run dies of a coordinator restart (:data:`RESTART_FAILURES`),
and waits through the SuperLink being unreachable meanwhile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from experiments.errors import SubmissionError
from experiments.spec import ExperimentSpec
from experiments.study import StudySpec
from federation.release import BundleError, stage_release
from privacy.governance import Submission, sign_submission
from privacy.private_files import make_private_folder, publish

__all__ = [
    "RESTART_FAILURES",
    "RunStatus",
    "SubmissionRecord",
    "follow",
    "prepare_submission",
    "run_status",
    "start_run",
    "submit",
    "wait_for_run",
    "write_run_config",
]

#: Flower's status details for a run whose ServerApp died with the coordinator (killed with
#: it, or stopped by its signal before it could say why): resumable. A ServerApp that
#: failed on its own reports its reason instead.
RESTART_FAILURES = ("No heartbeat received from the task", "Task failed with unknown error.")
DEFAULT_SUBMISSIONS_DIR = Path(".medfed/submissions")


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

    @property
    def lost_with_the_coordinator(self) -> bool:
        """Failed because its ServerApp died with the coordinator (resumable), not for a reason of its own."""
        return self.status == "finished:failed" and any(text in self.details for text in RESTART_FAILURES)


@dataclass(frozen=True)
class SubmissionRecord:
    """A signed submission as the partner keeps it, to follow and resume it.

    ``signature`` and ``signer`` are empty for an unsigned submission (every node refuses
    it; only tests make one).
    """

    spec_json: str
    submission_json: str
    signature: str
    signer: str
    tracking_uri: str
    output_dir: str
    flower_runs: tuple[int, ...] = field(default=())
    study_options: str = ""  # a statistics study's coordinator settings (JSON), carried in the run config

    @property
    def submission_id(self) -> str:
        return Submission.from_json(self.submission_json).submission_id

    def with_run(self, run_id: int) -> SubmissionRecord:
        return replace(self, flower_runs=(*self.flower_runs, run_id))

    def save(self, folder: Path) -> Path:
        """Write the record to ``<folder>/<submission id>.json`` (0600, folder 0700), atomically."""
        make_private_folder(folder)
        path = folder / f"{self.submission_id}.json"
        publish(path, json.dumps({**asdict(self), "flower_runs": list(self.flower_runs)}, indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, folder: Path, submission_id: str) -> SubmissionRecord:
        """The record of `submission_id` (or the one unique id starting with it) in `folder`.

        Raises
        ------
        SubmissionError
            No such submission, an ambiguous prefix, or an unreadable record.
        """
        prefix = submission_id.strip().lower()
        matches = sorted(folder.glob(f"{prefix}*.json")) if len(prefix) >= 6 and prefix.isalnum() else []
        if len(matches) != 1:
            what = "no submission" if not matches else f"{len(matches)} submissions"
            raise SubmissionError(
                f"{what} in {folder} start with {submission_id!r}; give 6 or more characters of the id that "
                "`medfed experiment submit` printed (and --submissions-dir if you used one)"
            )
        try:
            raw = json.loads(matches[0].read_text(encoding="utf-8"))
            return cls(**{**raw, "flower_runs": tuple(int(r) for r in raw.get("flower_runs", ()))})
        except (OSError, ValueError, TypeError) as err:
            raise SubmissionError(f"the submission record {matches[0]} is unreadable ({err})") from None


def prepare_submission(
    spec: ExperimentSpec | StudySpec,
    *,
    signing_key: Ed25519PrivateKey | None,
    tracking_uri: str,
    output_dir: Path,
    study_options: str = "",
) -> SubmissionRecord:
    """A fresh submission of `spec` (a new id, signed now) with where its run records results.

    A statistics study (:class:`~experiments.study.StudySpec`) is signed and submitted the
    same way; `study_options` are its coordinator settings (JSON).
    """
    spec_json = spec.canonical_json()
    submission = Submission.new(spec_json)
    signature = None if signing_key is None else sign_submission(submission, signing_key)
    return SubmissionRecord(
        spec_json=spec_json,
        submission_json=submission.to_json(),
        signature=signature.signature if signature else "",
        signer=signature.signer if signature else "",
        tracking_uri=tracking_uri,
        output_dir=str(output_dir.resolve()),
        study_options=study_options,
    )


def write_run_config(record: SubmissionRecord, path: Path) -> Path:
    """Write the TOML run config of `record` (JSON strings are valid TOML basic strings)."""
    lines = [
        f"spec = {json.dumps(record.spec_json)}",
        f"submission = {json.dumps(record.submission_json)}",
        f"spec-signature = {json.dumps(record.signature)}",
        f"spec-signer = {json.dumps(record.signer)}",
        f"tracking-uri = {json.dumps(record.tracking_uri)}",
        f"output-dir = {json.dumps(record.output_dir)}",
        f"study-options = {json.dumps(record.study_options)}",
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


def start_run(record: SubmissionRecord, *, connection: str, env: Mapping[str, str] | None = None, timeout: float = 300.0) -> int:
    """Start a Flower run of the signed submission `record`; returns its run id.

    The run's app bundle is the medfed release installed here
    (:func:`federation.release.stage_release`): hospital nodes serve only releases on
    their allow-list, and never run the bundle's code themselves. Starting the same
    record again continues the same submission.
    """
    with tempfile.TemporaryDirectory(prefix="medfed-submit-") as tmp:
        try:
            app = stage_release(Path(tmp))
        except BundleError as err:
            raise SubmissionError(str(err)) from None
        config = write_run_config(record, Path(tmp) / "run-config.toml")
        payload = _flwr(["run", str(app), connection, "--run-config", str(config), "--format", "json"], env, timeout)
    return int(str(payload["run-id"]))


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
    """Sign a fresh submission of `spec` and start it on the SuperLink named `connection`; its run id.

    Every node checks the signature against its officer's trusted keys; `signing_key`
    None submits it unsigned, which every node refuses (the command line always signs).
    """
    record = prepare_submission(spec, signing_key=signing_key, tracking_uri=tracking_uri, output_dir=output_dir)
    return start_run(record, connection=connection, env=env, timeout=timeout)


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


def follow(
    record: SubmissionRecord,
    run_id: int,
    *,
    connection: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    max_resumes: int = 3,
    on_tick: Callable[[RunStatus | None], None] | None = None,
    on_resume: Callable[[RunStatus, int], None] | None = None,
) -> tuple[RunStatus, SubmissionRecord]:
    """Follow the submission's run to its end, through coordinator restarts.

    While the SuperLink does not answer, keep asking (`on_tick` gets None). A run that
    died with the coordinator (:attr:`RunStatus.lost_with_the_coordinator`) is resumed as
    a new Flower run of the same submission, at most `max_resumes` times; `on_resume`
    gets the lost status and the new run id. Returns the last status and the record with
    every run started for it.

    Raises
    ------
    SubmissionError
        The submission did not end within `timeout`.
    """
    deadline = time.monotonic() + timeout
    resumes = 0
    while True:
        try:
            status: RunStatus | None = run_status(run_id, connection=connection, env=env)
        except SubmissionError:
            status = None  # the coordinator is restarting, or unreachable for a moment
        if on_tick is not None:
            on_tick(status)
        if status is not None and status.lost_with_the_coordinator and resumes < max_resumes:
            try:
                new_run = start_run(record, connection=connection, env=env)
            except SubmissionError:
                new_run = None  # not ready yet: try again at the next poll
            if new_run is not None:
                resumes += 1
                record = record.with_run(new_run)
                if on_resume is not None:
                    on_resume(status, new_run)
                run_id = new_run
                continue
        elif status is not None and status.finished:
            return status, record
        if time.monotonic() > deadline:
            shown = status.status if status is not None else "the SuperLink does not answer"
            raise SubmissionError(f"submission {record.submission_id[:12]} did not end within {timeout:g} s ({shown})")
        time.sleep(poll)
