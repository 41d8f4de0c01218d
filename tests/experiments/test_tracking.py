"""Experiment tracking: parameters flattened, metrics per step, MLflow on a SQLite file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from experiments.tracking import InMemoryTracker, MlflowTracker, default_tracking_uri, flatten_params


def test_flatten_params_names_sections_and_serialises_lists() -> None:
    flat = flatten_params({"privacy": {"delta": 1e-5, "accountant": "prv"}, "data": {"features": ["age", "bmi"]}, "x": None})
    assert flat == {"privacy.delta": "1e-05", "privacy.accountant": "prv", "data.features": '["age", "bmi"]', "x": ""}


def test_in_memory_tracker_keeps_finite_metrics_by_step() -> None:
    tracker = InMemoryTracker()
    tracker.start(experiment="e", run_name="r", params={"a": {"b": 1}}, tags={"t": "1"})
    tracker.log_metrics({"auc": 0.7, "undefined": math.nan}, step=0)
    tracker.log_metrics({"auc": 0.8}, step=1)
    tracker.finish(failed=True, reason="round 2: too few nodes")
    assert tracker.metrics == {"auc": {0: 0.7, 1: 0.8}}
    assert tracker.params == {"a.b": "1"}
    assert (tracker.status, tracker.reason) == ("FAILED", "round 2: too few nodes")


def test_default_tracking_uri_is_an_absolute_sqlite_file(tmp_path: Path) -> None:
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/.medfed/mlflow.db"


@pytest.mark.slow
def test_mlflow_tracker_records_a_run_with_its_model(tmp_path: Path) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    run_id = tracker.start(experiment="htn", run_name="htn-1", params={"privacy": {"delta": 1e-5}}, tags={"flwr.run_id": "7"})
    tracker.log_metrics({"eval_auc": 0.71, "hospital_1.epsilon": 0.5}, step=1)
    tracker.log_text('{"a": 1}', "privacy_summary.json")
    model = torch.nn.Linear(3, 1)
    tracker.log_model(model, input_example=torch.zeros(2, 3).numpy())
    tracker.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"privacy.delta": "1e-05"}
    assert run.data.metrics == {"eval_auc": 0.71, "hospital_1.epsilon": 0.5}
    assert run.data.tags["flwr.run_id"] == "7"
    assert (tmp_path / "mlartifacts" / "htn").is_dir()  # artifacts beside the database
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.randn(4, 3)
    assert torch.allclose(loaded(x), model(x))
