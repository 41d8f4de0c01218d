"""Tabular risk models: one logit per patient, deterministic weights, valid for Opacus."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from models.tabular import MODEL_KINDS, LogisticRegression, TabularMLP, build_tabular_model


@pytest.mark.parametrize(("kind", "cls"), [("logistic", LogisticRegression), ("mlp", TabularMLP)])
def test_build_returns_the_kind_asked_for(kind: str, cls: type) -> None:
    assert type(build_tabular_model(kind, 16)) is cls


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_kind_passes_opacus_strict_validation(kind: str) -> None:
    assert ModuleValidator.validate(build_tabular_model(kind, 16), strict=True) == []


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_returns_one_logit_per_patient(kind: str) -> None:
    assert build_tabular_model(kind, 7)(torch.randn(5, 7)).shape == (5,)


def test_mlp_hidden_sizes_shape_its_layers() -> None:
    model = build_tabular_model("mlp", 10, hidden=(8, 4, 2))
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(8, 10), (8,), (4, 8), (4,), (2, 4), (2,), (1, 2), (1,)]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_same_seed_same_weights_other_seed_other_weights(kind: str) -> None:
    first, again, other = (build_tabular_model(kind, 16, seed=s) for s in (3, 3, 4))
    for a, b, c in zip(first.parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_building_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_tabular_model("mlp", 16, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="model kind must be one of logistic, mlp; found 'forest'"):
        build_tabular_model("forest", 16)


def test_no_features_is_refused() -> None:
    with pytest.raises(ValueError, match="n_features must be >= 1; found 0"):
        build_tabular_model("logistic", 0)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_the_declared_linear_chain_computes_the_models_forward(kind: str) -> None:
    model = build_tabular_model(kind, 16, hidden=(8, 4), seed=3)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    out = x
    for layer in model.linear_chain():
        out = layer(out)
    torch.testing.assert_close(out.squeeze(-1), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_the_declared_linear_chain_holds_every_parameter_in_order(kind: str) -> None:
    model = build_tabular_model(kind, 16)
    in_chain = [p for layer in model.linear_chain() for p in layer.parameters()]
    assert all(a is b for a, b in zip(in_chain, model.parameters(), strict=True))
