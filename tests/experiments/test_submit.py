"""Submission helpers: the run config carries the spec exactly; the app is staged lean."""

from __future__ import annotations

import base64
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from experiments.spec import ExperimentSpec
from experiments.errors import SubmissionError
from experiments.submit import RunStatus, SubmissionRecord, prepare_submission, write_run_config
from federation.release import FLOWER_APP, stage_release
from privacy.governance import Submission, submission_signing_message
from privacy.keys import fingerprint, verify

ROOT = Path(__file__).resolve().parents[2]


KEYS = {"spec", "submission", "spec-signature", "spec-signer", "tracking-uri", "output-dir", "study-options"}


def _record(tmp_path: Path, key: Ed25519PrivateKey | None = None) -> tuple[ExperimentSpec, SubmissionRecord]:
    spec = ExperimentSpec.from_toml(ROOT / "experiments" / "examples" / "hypertension.toml")
    record = prepare_submission(spec, signing_key=key, tracking_uri="sqlite:///x.db", output_dir=tmp_path / "out")
    return spec, record


def test_run_config_carries_the_spec_and_the_signed_submission_exactly(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    spec, record = _record(tmp_path, key)
    config = tomllib.loads(write_run_config(record, tmp_path / "run.toml").read_text())
    assert set(config) == KEYS
    assert ExperimentSpec.from_json(config["spec"]).digest() == spec.digest()
    assert config["output-dir"] == str((tmp_path / "out").resolve())
    assert config["spec-signer"] == fingerprint(key.public_key())
    submission = Submission.from_json(config["submission"])
    assert submission.spec_digest == spec.digest()
    assert abs((datetime.now(UTC) - submission.signed_at).total_seconds()) < 60
    # What travels is exactly what the partner signed: the submission, which names the spec.
    verify(key.public_key(), submission_signing_message(config["submission"]), base64.b64decode(config["spec-signature"]))


def test_every_submission_of_the_same_spec_is_a_new_one(tmp_path: Path) -> None:
    _, first = _record(tmp_path)
    _, second = _record(tmp_path)
    assert first.submission_id != second.submission_id


def test_a_kept_submission_loads_back_by_a_prefix_of_its_id(tmp_path: Path) -> None:
    _, record = _record(tmp_path, Ed25519PrivateKey.generate())
    path = record.with_run(42).save(tmp_path / "subs")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SubmissionRecord.load(tmp_path / "subs", record.submission_id[:8])
    assert loaded == record.with_run(42)
    with pytest.raises(SubmissionError, match="no submission in"):
        SubmissionRecord.load(tmp_path / "subs", "ffffffff")


def test_run_config_keys_are_the_apps_declared_config() -> None:
    # `flwr run` rejects keys the app does not declare in [tool.flwr.app.config].
    assert set(FLOWER_APP["config"]) == KEYS


def test_a_run_lost_with_the_coordinator_is_resumable_and_others_are_not() -> None:
    assert RunStatus(1, "finished:failed", "No heartbeat received from the task").lost_with_the_coordinator
    assert not RunStatus(1, "finished:failed", "hospital_1: refused (...)").lost_with_the_coordinator
    assert not RunStatus(1, "running").lost_with_the_coordinator


def test_staged_app_holds_the_pyproject_and_our_packages_only(tmp_path: Path) -> None:
    staged = stage_release(tmp_path)
    names = sorted(p.name for p in staged.iterdir())
    assert names == ["clients", "experiments", "federation", "imaging", "models", "privacy", "pyproject.toml"]
    assert (staged / "federation" / "server_app.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    assert tomllib.loads((staged / "pyproject.toml").read_text())["tool"]["flwr"]["app"] == FLOWER_APP


def test_run_status_reads_flowers_status_text() -> None:
    assert RunStatus(1, "finished:completed").succeeded
    failed = RunStatus(1, "finished:failed", "ServerApp failed with exception: ...")
    assert failed.finished and not failed.succeeded
    assert not RunStatus(1, "running").finished
