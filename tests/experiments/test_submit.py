"""Submission helpers: the run config carries the spec exactly; the app is staged lean."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from experiments.spec import ExperimentSpec
from experiments.submit import RunStatus, write_run_config
from federation.release import FLOWER_APP, stage_release
from privacy.governance import sign_spec, spec_signing_message
from privacy.keys import fingerprint, verify

ROOT = Path(__file__).resolve().parents[2]


def test_run_config_round_trips_the_canonical_spec(tmp_path: Path) -> None:
    spec = ExperimentSpec.from_toml(ROOT / "experiments" / "examples" / "hypertension.toml")
    key = Ed25519PrivateKey.generate()
    signature = sign_spec(spec.canonical_json(), key)
    path = write_run_config(
        spec, tmp_path / "run.toml", tracking_uri="sqlite:///x.db", output_dir=tmp_path / "out", signature=signature
    )
    config = tomllib.loads(path.read_text())
    assert set(config) == {"spec", "spec-signature", "spec-signer", "tracking-uri", "output-dir"}
    assert ExperimentSpec.from_json(config["spec"]).digest() == spec.digest()
    assert config["output-dir"] == str((tmp_path / "out").resolve())
    assert config["spec-signer"] == fingerprint(key.public_key())
    # What travels is exactly what the partner signed.
    verify(key.public_key(), spec_signing_message(config["spec"]), base64.b64decode(config["spec-signature"]))


def test_run_config_keys_are_the_apps_declared_config() -> None:
    # `flwr run` rejects keys the app does not declare in [tool.flwr.app.config].
    declared = FLOWER_APP["config"]
    assert set(declared) == {"spec", "spec-signature", "spec-signer", "tracking-uri", "output-dir"}


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
