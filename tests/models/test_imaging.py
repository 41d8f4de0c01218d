"""The imaging CNN: one logit per image, valid for Opacus, and DP-SGD clips it per patient."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from models.imaging import IMAGING_MODEL_KINDS, SmallCNN, build_imaging_model
from models.training import train_dp, train_plain


def test_the_cnn_passes_opacus_strict_validation_and_has_no_batchnorm() -> None:
    model = build_imaging_model("cnn", 32, channels=(8, 16, 32))
    assert ModuleValidator.validate(model, strict=True) == []
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)


@pytest.mark.parametrize(("size", "channels"), [(32, (8, 16)), (64, (4, 8, 16)), (16, (6,))])
def test_the_cnn_returns_one_logit_per_image(size: int, channels: tuple[int, ...]) -> None:
    model = build_imaging_model("cnn", size, channels=channels)
    assert model(torch.rand(5, 1, size, size)).shape == (5,)


def test_channels_shape_the_blocks_and_groups_divide_them() -> None:
    model = build_imaging_model("cnn", 32, channels=(6, 8))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 6), (6, 8)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(2, 6), (4, 8)]
    assert model.head.in_features == 8


def test_same_seed_same_weights_other_seed_other_weights_and_the_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, again, other = (build_imaging_model("cnn", 32, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.rand(1), expected)
    for a, b, c in zip(first.parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        if a.dim() > 1:  # GroupNorm weights start at one, biases at zero, whatever the seed
            assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("size", "channels", "message"),
    [
        (30, (8, 16), r"image_size must be a positive multiple of 2 \*\* len\(channels\) = 4; found 30"),
        (4, (8, 16, 32), r"multiple of 2 \*\* len\(channels\) = 8; found 4"),
        (32, (), r"channels must be one or more positive integers; found \[\]"),
        (32, (8, 0), r"channels must be one or more positive integers; found \[8, 0\]"),
    ],
)
def test_bad_sizes_and_channels_are_refused(size: int, channels: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SmallCNN(size, channels)


def test_an_unknown_kind_is_refused() -> None:
    assert IMAGING_MODEL_KINDS == ("cnn",)
    with pytest.raises(ValueError, match="imaging model kind must be one of cnn; found 'resnet'"):
        build_imaging_model("resnet", 32)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_sgd_clips_each_patients_gradient_through_conv_and_groupnorm() -> None:
    # Bright, large inputs give per-image gradients far above the clip norm. With every
    # image in the batch (q = 1) and negligible noise, the step is the mean of the clipped
    # gradients, so its norm is at most lr * C; the plain step is far larger.
    generator = torch.Generator().manual_seed(0)
    x = 50.0 * torch.rand(8, 1, 16, 16, generator=generator)
    y = torch.tensor([0.0, 1.0] * 4)
    lr, clip = 0.1, 0.5
    plain, private = build_imaging_model("cnn", 16), build_imaging_model("cnn", 16)
    start = _flat(plain)
    train_plain(plain, x, y, sample_rate=1.0, steps=1, learning_rate=lr)
    stats = train_dp(
        private, x, y, noise_multiplier=1e-6, max_grad_norm=clip, sample_rate=1.0, steps=1, learning_rate=lr,
        generator=generator,
    )
    assert stats.steps == 1
    plain_step = float((_flat(plain) - start).norm())
    private_step = float((_flat(private) - start).norm())
    assert plain_step > 4 * lr * clip
    assert 0 < private_step <= lr * clip * 1.001
    # No Opacus state is left on the model's parameters.
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in private.parameters())
