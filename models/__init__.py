"""Torch models and the DP-SGD training and evaluation loops; no I/O."""

from models.imaging import IMAGING_MODEL_KINDS, SmallCNN, build_imaging_model
from models.tabular import MODEL_KINDS, LogisticRegression, TabularMLP, build_tabular_model
from models.training import EvalMetrics, TrainStats, evaluate, train_dp, train_plain

__all__ = [
    "EvalMetrics",
    "IMAGING_MODEL_KINDS",
    "LogisticRegression",
    "MODEL_KINDS",
    "SmallCNN",
    "TabularMLP",
    "TrainStats",
    "build_imaging_model",
    "build_tabular_model",
    "evaluate",
    "train_dp",
    "train_plain",
]
