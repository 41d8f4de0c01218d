"""`medfed node privacy-check`: one-run auditing of a run's DP-SGD mechanism on the node's own data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from clients.hospital_node import cli as node_cli
from clients.hospital_node.errors import NodeHomeError, PrivacyCheckError
from clients.hospital_node.home import DatasetEntry, NodeHome
from clients.hospital_node.privacy_check import (
    AUDIT_KIND,
    MechanismPhase,
    audit_mechanism,
    find_run,
    run_privacy_check,
)
from clients.hospital_node.rounds import answer
from experiments.spec import ExperimentSpec
from medfed.synth import FEATURES, ID_COLUMN, LABEL, generate_cohort
from models.tabular import build_tabular_model
from privacy.accountant import LEDGER_ACCOUNTANT, epsilon
from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger

from .conftest import example_spec, govern, signed_message

runner = CliRunner()
RUN = "77"
ROUNDS = 3  # x 20 steps (one epoch at sample rate 0.05): 60 DP-SGD steps, as a short run trains


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = int(RUN), 1, 1


def _spec(target_epsilon: float) -> ExperimentSpec:
    return example_spec(federation={"rounds": ROUNDS}, privacy={"noise_multiplier": None, "target_epsilon": target_epsilon})


def _home(folder: Path) -> NodeHome:
    folder.mkdir(parents=True, exist_ok=True)
    cohort = folder / "cohort.csv"
    generate_cohort(2, n_hospitals=3, seed=7).to_csv(cohort, index=False)
    home = NodeHome.create(folder / "home", name="hospital_4")
    home.register_dataset(
        DatasetEntry(name="htn_cohort", path=cohort, id_column=ID_COLUMN, label_column=LABEL, feature_columns=FEATURES)
    )
    return home


def _train(home: NodeHome, spec: ExperimentSpec, rounds: int = ROUNDS) -> None:
    """Run `rounds` real training rounds of `spec` through the node's message handler."""
    govern(home, "htn_cohort", approve_spec=spec)
    model = build_tabular_model(spec.model.kind, len(FEATURES))
    for server_round in range(1, rounds + 1):
        message = signed_message(MessageType.TRAIN, spec, server_round=server_round, arrays=ArrayRecord(model.state_dict()))
        reply = answer("train", message, {"home": str(home.path)})
        assert not reply.has_error(), reply.error
        model.load_state_dict(reply.content["arrays"].to_torch_state_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> NodeHome:
    """A node home that trained run 77 of the example spec at epsilon 3 (three rounds)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = int(RUN), 1, 1
    home = _home(tmp_path_factory.mktemp("trained"))
    _train(home, _spec(3.0))
    return home


def _entries(home: NodeHome) -> int:
    return len(home.audit_log().entries())
