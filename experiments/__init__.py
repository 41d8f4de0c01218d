"""The research partner's side: experiment specs, their privacy cost, submission and tracking.

Importing the package loads the specs (experiments and statistics studies), their errors
and costing (pydantic, no Opacus until an epsilon is computed). The rest is imported from
its module: ``cli`` (the `medfed experiment` commands), ``submit`` (Flower runs),
``tracking`` (MLflow), ``study_report`` (a statistics study's table, CSV, plots and
tracked run), ``study_cli`` (the `medfed study` commands) and ``study_run`` (a study
run's options and report folder).
"""

from experiments.cost import PrivacyPlan, plan_privacy
from experiments.errors import ExperimentError, SpecError, SubmissionError
from experiments.spec import ExperimentSpec
from experiments.study import StudyCost, StudySpec, study_cost

__all__ = [
    "ExperimentError",
    "ExperimentSpec",
    "PrivacyPlan",
    "SpecError",
    "StudyCost",
    "StudySpec",
    "SubmissionError",
    "plan_privacy",
    "study_cost",
]
