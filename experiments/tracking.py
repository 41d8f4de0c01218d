"""Experiment tracking on the coordinator: MLflow, and an in-memory tracker for tests.

One tracked run per experiment: the spec as parameters, per-round metrics (aggregate and
per site), the final model, the spec and a privacy summary as artifacts. The hospital
side never imports this module (nor MLflow).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

__all__ = [
    "DEFAULT_TRACKING_URI",
    "InMemoryTracker",
    "MlflowTracker",
    "Tracker",
    "default_tracking_uri",
    "flatten_params",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///.medfed/mlflow.db"


def default_tracking_uri(base: Path | None = None) -> str:
    """The embedded default store: a SQLite file under ``<base>/.medfed/`` (absolute)."""
    root = (base or Path.cwd()).resolve() / ".medfed"
    return f"sqlite:///{root / 'mlflow.db'}"


class Tracker(Protocol):
    """What the coordinator records about one experiment run."""

    def prepare(self) -> None:
        """Load what tracking needs, writing nothing (called while the nodes answer the query)."""
        ...

    def start(self, *, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str: ...

    def resume(self, run_id: str) -> None:
        """Continue recording into the run `run_id` that an earlier coordinator started."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, path: Path, artifact_dir: str = "") -> None:
        """Record the file at `path` (text or binary) under `artifact_dir` of the run."""
        ...

    def log_model(self, model: Any, *, input_example: Any, name: str = "model") -> None: ...

    def finish(self, *, failed: bool = False, reason: str = "") -> None: ...


def flatten_params(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested spec mapping to ``section.key -> str`` parameters."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = "" if value is None else str(value)
    return flat


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


@dataclass
class InMemoryTracker:
    """A tracker that keeps everything in memory (tests, dry runs)."""

    experiment: str = ""
    run_name: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    status: str = "NONE"
    reason: str = ""
    resumed: str = ""

    def prepare(self) -> None:
        return None

    def start(self, *, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        self.experiment, self.run_name = experiment, run_name
        self.params = flatten_params(params)
        self.tags = dict(tags)
        self.status = "RUNNING"
        return "in-memory"

    def resume(self, run_id: str) -> None:
        self.status = "RUNNING"
        self.resumed = run_id

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        for key, value in _finite(metrics).items():
            self.metrics.setdefault(key, {})[step] = value

    def log_text(self, text: str, artifact_file: str) -> None:
        self.artifacts[artifact_file] = text

    def log_artifact(self, path: Path, artifact_dir: str = "") -> None:
        name = Path(path).name
        self.files[f"{artifact_dir}/{name}" if artifact_dir else name] = Path(path).read_bytes()

    def log_model(self, model: Any, *, input_example: Any, name: str = "model") -> None:
        self.models[name] = model

    def finish(self, *, failed: bool = False, reason: str = "") -> None:
        self.status = "FAILED" if failed else "FINISHED"
        self.reason = reason


class MlflowTracker:
    """Tracks a run in MLflow at `tracking_uri` (a SQLite file by default, or a server).

    For a SQLite store the artifacts go to ``mlartifacts/`` beside the database file, so
    the store is self-contained and ``mlflow ui --backend-store-uri <uri>`` shows it.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._mlflow_client: Any = None
        self._run_id: str | None = None

    def prepare(self) -> None:
        """Import MLflow's client (seconds); opens no store."""
        from mlflow.tracking import MlflowClient

        if self._mlflow_client is None:
            self._mlflow_client = MlflowClient(self.tracking_uri)

    @property
    def _client(self) -> Any:
        self.prepare()
        return self._mlflow_client

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("the tracker has not started a run")
        return self._run_id

    def _artifact_location(self, experiment: str) -> str | None:
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme != "sqlite":
            return None
        database = Path(self.tracking_uri.removeprefix("sqlite:///"))
        return (database.parent / "mlartifacts" / experiment).resolve().as_uri()

    def start(self, *, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param

        found = self._client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self._client.create_experiment(experiment, artifact_location=self._artifact_location(experiment))
        )
        run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self._run_id = run.info.run_id
        flat = flatten_params(params)
        self._client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in sorted(flat.items())])
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Record into `run_id` again: a restarted coordinator continues the submission's run."""
        self._client.get_run(run_id)  # raises if the store does not know it
        self._run_id = run_id
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "medfed.resumed", "true")

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in sorted(_finite(metrics).items())]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: Path, artifact_dir: str = "") -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_dir or None)

    def log_model(self, model: Any, *, input_example: Any, name: str = "model") -> None:
        """Log `model` in MLflow's ``pt2`` (torch.export) format: loadable without medfed."""
        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            # Explicit requirements: inferring them imports the whole environment.
            mlflow.pytorch.log_model(
                model,
                name=name,
                input_example=input_example,
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )

    def finish(self, *, failed: bool = False, reason: str = "") -> None:
        if self._run_id is None:
            return
        if reason:
            self._client.set_tag(self.run_id, "medfed.failure", reason[:5000])
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
