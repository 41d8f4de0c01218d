"""The imaging demo's final table: the federated CNN beside a baseline that needs no CNN."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.cost import plan_privacy
from experiments.progress import SiteResult
from medfed.demo import comparison_table
from medfed.demo_imaging import imaging_demo_spec, pixel_baselines


def _site(seed: int, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose maximum gives the label away: a bright pixel in the positives."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.rand(n, 1, size, size, generator=generator)
    y = (torch.arange(n) % 2).float()
    x[y == 1, 0, 3, 4] = 1.0
    return x, y


def test_the_table_shows_the_federated_cnn_and_the_pixel_threshold_on_the_same_patients(tmp_path: Path) -> None:
    from federation.experiment import build_model

    spec = imaging_demo_spec(rounds=1, n_hospitals=2)
    plan = plan_privacy(spec)
    size = spec.imaging.size  # type: ignore[union-attr]
    tensors = {}
    for i, name in enumerate(("hospital_1", "hospital_2")):
        x_train, y_train = _site(i, 16, size)
        x_val, y_val = _site(10 + i, 6, size)
        tensors[name] = (x_train, y_train, x_val, y_val)
    model, _ = build_model(spec)
    path = tmp_path / "final_model.pt"
    torch.save(model.state_dict(), path)

    baselines = pixel_baselines(tensors)
    [(label, baseline)] = baselines.items()
    assert label == "threshold on image maximum (no CNN; fit on pooled training, no DP)"
    assert baseline.statistic == "max"

    results = {name: SiteResult({}, 1.0, 1.0) for name in tensors}
    table = comparison_table(spec, plan, tensors, path, results, metrics=("accuracy", "auc"), baselines=baselines)
    labels = list(table.columns[0]._cells)
    assert labels[:2] == ["federated (all sites)", label]
    row = labels.index(label)
    # The maximum separates these images: the baseline is exact on every site and all together.
    assert [column._cells[row] for column in table.columns[1:]] == ["1.000 / 1.000"] * 3


def test_validation_truth_is_what_the_images_show_whatever_the_labels_file_says(tmp_path: Path) -> None:
    from medfed.demo_imaging import prepare_imaging_alliance, site_tensors, validation_truth
    from tests.clients.hospital_node.conftest import write_node_secret

    for index, byte in ((1, 7), (2, 8)):  # secrets that leave validation patients at both sites
        write_node_secret(tmp_path / "homes" / f"hospital_{index}", bytes([byte]) * 32)
    sites = prepare_imaging_alliance(tmp_path, n_hospitals=2, n_patients=12, seed=3, label_noise=1.0)
    spec = imaging_demo_spec(rounds=1, n_hospitals=2)
    truth = validation_truth(spec, sites)
    for name, (_, _, _, y_val) in site_tensors(spec, sites).items():
        assert len(y_val) > 0 and torch.equal(truth[name], 1 - y_val)  # every label in the file flipped
