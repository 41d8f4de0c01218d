"""Closed-form per-sample gradients of linear chains and the optimizer that clips them."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from models.flat_chain import FlatDPOptimizer, FlatLinearChain
from models.tabular import build_tabular_model

CHAINS = {
    "logistic": lambda: build_tabular_model("logistic", 16, seed=5),
    "mlp": lambda: build_tabular_model("mlp", 16, seed=5),
    "deep-mlp": lambda: build_tabular_model("mlp", 16, hidden=(8, 8, 4), seed=5),
    "no-bias": lambda: _Chain(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 1, bias=False)),
    "relu-relu": lambda: _Chain(nn.Linear(16, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 1)),
}


class _Chain(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def linear_chain(self) -> tuple[nn.Module, ...]:
        return tuple(self.net)


def batch(n: int, *, seed: int = 1, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64) * scale
    return x, (torch.rand(n, generator=g, dtype=torch.float64) < 0.4).double()


def opacus_per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Opacus's reference: GradSampleModule hooks, rows in the order of ``parameters()``."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        F.binary_cross_entropy_with_logits(gsm(x), y, reduction="sum").backward()
        return torch.cat([p.grad_sample.reshape(len(x), -1) for p in model.parameters()], dim=1)
    finally:
        gsm._close()


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("kind", list(CHAINS))
def test_per_sample_gradients_equal_opacus_grad_sample_module(kind: str) -> None:
    model = CHAINS[kind]().double()
    x, y = batch(64)
    logits, rows = FlatLinearChain(model.linear_chain()).per_sample_gradients(x, y)
    torch.testing.assert_close(logits, model(x).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows, opacus_per_sample_gradients(model, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_the_reused_buffer_gives_each_batch_its_own_gradients_as_batches_grow_and_shrink() -> None:
    model = CHAINS["mlp"]().double()
    chain = FlatLinearChain(model.linear_chain())
    for n, seed in [(3, 1), (40, 2), (7, 3), (90, 4), (0, 5), (12, 6)]:
        x, y = batch(n, seed=seed)
        _, rows = chain.per_sample_gradients(x, y)
        assert rows.shape == (n, chain.size)
        if n:
            torch.testing.assert_close(rows, opacus_per_sample_gradients(model, x, y), rtol=1e-10, atol=1e-12)


def test_the_flat_vector_is_the_chains_parameters_in_order_and_is_written_back() -> None:
    model = CHAINS["mlp"]()
    chain = FlatLinearChain(model.linear_chain())
    torch.testing.assert_close(chain.flat.detach(), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert chain.size == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        chain.flat.add_(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    chain.write_back()
    for p, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), old + 1.0)


@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_the_flat_optimizer_computes_what_opacus_dp_optimizer_computes(noise: float) -> None:
    x, y = batch(50, scale=20.0)  # most gradients over the clip norm
    results = []
    for optimizer_class in (DPOptimizer, FlatDPOptimizer):
        chain = FlatLinearChain(CHAINS["mlp"]().double().linear_chain())
        optimizer = optimizer_class(torch.optim.SGD([chain.flat], lr=0.1), noise_multiplier=noise, max_grad_norm=0.5,
                                    expected_batch_size=40, loss_reduction="mean")
        _, chain.flat.grad_sample = chain.per_sample_gradients(x, y)
        torch.manual_seed(11)
        optimizer.pre_step()
        assert optimizer.params == [chain.flat]
        results.append(chain.flat.grad.clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_the_flat_optimizer_refuses_per_sample_gradients_it_has_already_clipped() -> None:
    chain = FlatLinearChain(CHAINS["logistic"]().double().linear_chain())
    optimizer = FlatDPOptimizer(torch.optim.SGD([chain.flat], lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=10, loss_reduction="mean")
    _, chain.flat.grad_sample = chain.per_sample_gradients(*batch(10))
    optimizer.pre_step()
    with pytest.raises(ValueError, match="Gradients haven't been cleared since the last optimizer step"):
        optimizer.pre_step()


@pytest.mark.parametrize("steps", [1, 20])
def test_opacus_accountant_hooked_to_the_flat_optimizer_counts_one_step_per_release(steps: int) -> None:
    chain = FlatLinearChain(CHAINS["mlp"]().double().linear_chain())
    optimizer = FlatDPOptimizer(torch.optim.SGD([chain.flat], lr=0.1), noise_multiplier=1.1, max_grad_norm=1.0,
                                expected_batch_size=5, loss_reduction="mean")
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.05))
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _, chain.flat.grad_sample = chain.per_sample_gradients(*batch(step % 3 * 4, seed=step))  # some empty
        optimizer.pre_step()
    # What the node's ledger charges for the run: (sigma, q, steps), one event.
    assert accountant.history == [(1.1, 0.05, steps)]
    expected = RDPAccountant()
    expected.history = [(1.1, 0.05, steps)]
    assert accountant.get_epsilon(delta=1e-5) == expected.get_epsilon(delta=1e-5)
