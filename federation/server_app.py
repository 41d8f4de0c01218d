"""The medfed Flower ServerApp: runs one experiment per Flower run.

A statistics study (a signed spec of kind ``statistics``, written by ``medfed study
submit``) runs :func:`federation.study.run_study` instead, with the coordinator's settings
for it in the run config's ``study-options``.

The run config (written by ``medfed experiment submit``) carries the validated spec as
canonical JSON, the research partner's signed submission of it, the MLflow tracking URI
and the coordinator's output folder, in which each submission has its own folder (its
checkpoint, so that a restarted coordinator continues it; its final model and summary). A bad spec
or too few nodes fail the run with a one-line reason that ``flwr ls`` shows as the
run's status details. Every reply the run receives is kept in the submission's folder
(:mod:`federation.received`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment described by the run config."""
    from experiments.spec import ExperimentSpec
    from experiments.tracking import MlflowTracker, default_tracking_uri
    from federation.experiment import run_experiment
    from federation.protocol import SignedSpec, is_statistics_spec
    from federation.received import RECEIVED_FILE, ReceivedLog
    from privacy.governance import Submission

    config = context.run_config
    spec_json = str(config.get("spec", ""))
    if not spec_json:
        raise ValueError("the run config has no 'spec': submit experiments with `medfed experiment submit`")
    if is_statistics_spec(json.loads(spec_json)):
        _run_study(grid, context)
        return
    spec = ExperimentSpec.from_json(spec_json)
    # The nodes check the signature; the coordinator only carries it.
    signed = SignedSpec(
        spec_json, str(config.get("spec-signature", "")), str(config.get("spec-signer", "")), str(config.get("submission", ""))
    )
    # A well-formed envelope (its id names a folder below); the nodes check its signature.
    submission = Submission.from_json(signed.submission)
    tracking_uri = str(config.get("tracking-uri", "")) or default_tracking_uri()
    output_root = Path(str(config.get("output-dir", "")) or ".medfed/runs")
    run_id = grid.run.run_id
    output_dir = output_root / submission.submission_id  # one per submission: its checkpoint, its model
    result = run_experiment(
        ReceivedLog(grid, output_dir / RECEIVED_FILE),
        spec,
        signed=signed,
        tracker=MlflowTracker(tracking_uri),
        output_dir=output_dir,
        tags={"flwr.run_id": str(run_id)},
        flower_run_id=run_id,
    )
    logger.info(
        "experiment %s finished: final AUC %.3f on %d site(s); MLflow run %s",
        spec.experiment.name,
        result.final.get("eval_auc", float("nan")),
        sum(1 for s in result.sites.values() if s.final),
        result.tracking_run_id,
    )


def _run_study(grid: Grid, context: Context) -> None:
    """Run the statistics study described by the run config."""
    from experiments.study import StudySpec
    from experiments.tracking import MlflowTracker, default_tracking_uri
    from federation.protocol import SignedSpec
    from experiments.study_run import StudyOptions
    from federation.received import RECEIVED_FILE, ReceivedLog
    from federation.study import run_study
    from privacy.governance import Submission

    config = context.run_config
    spec_json = str(config.get("spec", ""))
    spec = StudySpec.from_json(spec_json)
    signed = SignedSpec(
        spec_json, str(config.get("spec-signature", "")), str(config.get("spec-signer", "")), str(config.get("submission", ""))
    )
    submission = Submission.from_json(signed.submission)
    tracking_uri = str(config.get("tracking-uri", "")) or default_tracking_uri()
    output_root = Path(str(config.get("output-dir", "")) or ".medfed/runs")
    result = run_study(
        ReceivedLog(grid, output_root / submission.submission_id / RECEIVED_FILE),
        spec,
        signed=signed,
        tracker=MlflowTracker(tracking_uri),
        output_dir=output_root / submission.submission_id,
        options=StudyOptions.from_json(str(config.get("study-options", ""))),
        tags={"flwr.run_id": str(grid.run.run_id)},
    )
    logger.info("study %s finished: %d site(s) answered; MLflow run %s", spec.study.name, len(result.answers), result.tracking_run_id)
