"""The clinical report's parts on hand-made arrays: FedAvg's weights, the rows' metrics, the files (fast)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.report_module import clinical_report



def _module():  # type: ignore[no-untyped-def]
    return clinical_report()


def _site(cr, name: str, n_patients: int, y_val: list[int], n_train: int = 10, width: int = 3):  # type: ignore[no-untyped-def]
    y = np.asarray(y_val, dtype=np.float32)
    return cr.SiteArrays(name, "tier2", n_patients, n_patients, np.zeros((n_train, width), np.float32),
                         np.zeros(n_train, np.float32), np.zeros((len(y), width), np.float32), y, np.full(len(y), 0.5))


def test_fedavg_weighs_each_site_by_its_training_rows() -> None:
    import torch

    cr = _module()
    spec = cr.spec_for_task("diabetes_onset")
    schedule = cr.Schedule(rounds=1, steps_per_round=1, sample_rate=0.05, learning_rate=0.5, max_grad_norm=1.0, delta=1e-5)
    sites = [_site(cr, "a", 100, [0, 1], n_train=30), _site(cr, "b", 500, [0, 1], n_train=10)]
    values = {"a": 1.0, "b": 5.0}

    def local_step(model, site, seed: int) -> None:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(values[site.name])

    model = cr.fedavg(spec, schedule, sites, local_step)
    for p in model.parameters():  # (30 * 1 + 10 * 5) / 40
        assert torch.allclose(p, torch.full_like(p, 2.0))


def test_rows_are_scored_on_the_pooled_patients_and_on_within_site_pairs_at_the_small_sites() -> None:
    cr = _module()
    sites = [_site(cr, "big", 1000, [0, 0, 1, 1]), _site(cr, "s1", 150, [0, 1]), _site(cr, "s2", 200, [0, 0, 1])]
    # s1 ranks its pair right; s2 ranks one of its two pairs right; s1's scores all sit above s2's.
    row = cr.Row("r", {"big": np.array([0.1, 0.2, 0.3, 0.4]), "s1": np.array([0.8, 0.9]), "s2": np.array([0.5, 0.7, 0.6])})
    cr.evaluate_rows([row], sites, threshold=0.55, small_site=300)
    assert row.per_site == pytest.approx({"big": 1.0, "s1": 1.0, "s2": 0.5})
    assert row.small_auc == pytest.approx((1 * 1.0 + 2 * 0.5) / 3)  # pairs: s1 one, s2 two
    assert row.summary is not None and row.summary.patients == 9
    t = row.summary.at_threshold  # >= 0.55: s1's two, s2's 0.7 and 0.6
    assert (t.true_positives, t.false_positives) == (2, 2)


def test_the_small_site_check_fails_without_a_small_site(tmp_path: Path) -> None:
    cr = _module()
    spec = cr.spec_for_task("diabetes_onset")
    rng = np.random.default_rng(0)
    width = len(spec.data.features)

    def site(name: str) -> object:
        x = rng.normal(size=(200, width)).astype(np.float32)
        y = (rng.random(200) < 1 / (1 + np.exp(-x[:, 0] * 2 + 1))).astype(np.float32)
        return cr.SiteArrays(name, "tier3", 1000, 200, x[:150], y[:150], x[150:], y[150:], np.full(50, math.nan))

    result = cr.report_task("diabetes_onset", spec, [site("a"), site("b")], tmp_path, epsilons=(), small_site=300,
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not result.check and "no site has fewer than 300 patients" in result.message
    assert (tmp_path / "diabetes_onset" / "report.md").is_file()
