"""Torch models and the DP-SGD training and evaluation loops; no I/O."""

from models.tabular import MODEL_KINDS, LogisticRegression, TabularMLP, build_tabular_model
from models.training import EvalMetrics, TrainStats, evaluate, train_dp, train_plain

__all__ = [
    "EvalMetrics",
    "LogisticRegression",
    "MODEL_KINDS",
    "TabularMLP",
    "TrainStats",
    "build_tabular_model",
    "evaluate",
    "train_dp",
    "train_plain",
]
