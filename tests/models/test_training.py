"""DP-SGD and plain training loops, and the evaluation metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.nn import functional as F

from models.flat_chain import FlatLinearChain
from models.tabular import LogisticRegression, build_tabular_model
from models.training import (
    TrainStats,
    _flat_chain_step,
    _is_small_step,
    _linear_chain,
    _poisson_batches,
    auc_score,
    evaluate,
    train_dp,
    train_plain,
)

# Over 2**20 parameters: every step is large, so train_dp takes Opacus's ghost clipping.
WIDE = (1024, 1024)


def cohort(n: int, *, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable synthetic cohort of 16 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) * scale
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).float()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, **overrides: float) -> TrainStats:
    """train_dp with seeded sampling and noise; keyword overrides replace the defaults."""
    params = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=3, learning_rate=0.1, proximal_mu=0.0)
    params.update(overrides)
    torch.manual_seed(seed)  # Opacus draws its noise from torch's default generator
    return train_dp(
        model,
        x,
        y,
        noise_multiplier=params["noise_multiplier"],
        max_grad_norm=params["max_grad_norm"],
        sample_rate=params["sample_rate"],
        steps=int(params["steps"]),
        learning_rate=params["learning_rate"],
        proximal_mu=params["proximal_mu"],
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------- which Opacus path runs


def test_tabular_models_take_the_flat_linear_chain_and_wide_ones_ghost_clipping() -> None:
    for kind in ("logistic", "mlp"):
        model = build_tabular_model(kind, 16)
        assert _linear_chain(model) is not None and _is_small_step(model, expected_batch_size=125)
    assert not _is_small_step(build_tabular_model("mlp", 16, hidden=WIDE), expected_batch_size=1)


class _Declared(nn.Module):
    """A model declaring `layers` as its chain (forward is irrelevant to the check)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def linear_chain(self) -> tuple[nn.Module, ...]:
        return tuple(self.layers)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)),  # declares no chain
        _Declared(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)),  # a layer other than Linear, ReLU
        _Declared(nn.Linear(4, 4), nn.ReLU()),  # does not end in one logit
        _Declared(nn.Linear(4, 2)),
    ],
    ids=["undeclared", "layernorm", "relu-last", "two-outputs"],
)
def test_a_model_that_is_not_a_declared_linear_chain_does_not_take_the_flat_path(model: nn.Module) -> None:
    assert _linear_chain(model) is None


def test_a_chain_that_leaves_out_a_trainable_parameter_does_not_take_the_flat_path() -> None:
    model = _Declared(nn.Linear(4, 1))
    model.extra = nn.Linear(4, 4)
    assert _linear_chain(model) is None
    model.extra.requires_grad_(False)
    assert _linear_chain(model) is not None


# ---------------------------------------------------------------- sampling


def test_poisson_batches_yield_one_sorted_index_set_per_step_across_chunks() -> None:
    n = 2**21  # two steps per draw, so 5 steps span three draws
    batches = list(_poisson_batches(n, 1e-5, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 5
    for batch in batches:
        assert torch.equal(batch, batch.unique())  # sorted, no patient twice
        assert 0 <= int(batch.min()) and int(batch.max()) < n
        assert 0 < len(batch) < 60  # expected 21


def test_poisson_batch_sizes_average_the_sample_rate() -> None:
    sizes = [len(b) for b in _poisson_batches(1000, 0.05, 400, torch.Generator().manual_seed(1))]
    assert sum(sizes) / len(sizes) == pytest.approx(50, abs=1.5)


# ---------------------------------------------------------------- DP-SGD


@pytest.mark.parametrize("hidden", [None, (32, 16), WIDE], ids=["logistic", "mlp", "wide-mlp"])
def test_train_dp_changes_the_weights(hidden: tuple[int, ...] | None) -> None:
    model = build_tabular_model("logistic", 16) if hidden is None else build_tabular_model("mlp", 16, hidden=hidden)
    before = flat(model)
    x, y = cohort(200)
    dp(model, x, y)
    assert not torch.equal(flat(model), before)


@pytest.mark.parametrize("hidden", [(32, 16), WIDE], ids=["flat-chain", "ghost-clipping"])
def test_without_clipping_or_noise_a_dp_step_is_a_plain_sgd_step(hidden: tuple[int, ...]) -> None:
    x, y = cohort(300)
    private, plain = build_tabular_model("mlp", 16, hidden=hidden), build_tabular_model("mlp", 16, hidden=hidden)
    dp(private, x, y, noise_multiplier=1e-10, max_grad_norm=1e4, steps=2, learning_rate=0.05, seed=4)
    train_plain(plain, x, y, sample_rate=0.1, steps=2, learning_rate=0.05, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(flat(plain), flat(build_tabular_model("mlp", 16, hidden=hidden)))
    torch.testing.assert_close(flat(private), flat(plain), rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["logistic", "mlp"]),
    n=st.integers(min_value=10, max_value=300),
    sample_rate=st.floats(min_value=0.02, max_value=0.6),
    clip=st.floats(min_value=0.01, max_value=10.0),
    learning_rate=st.floats(min_value=0.01, max_value=1.0),
    scale=st.floats(min_value=0.1, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_one_step_moves_the_weights_at_most_lr_times_clip_per_sampled_patient(
    kind: str, n: int, sample_rate: float, clip: float, learning_rate: float, scale: float, seed: int
) -> None:
    # Double precision, so that float32 rounding of the weights does not blur the bound.
    model = build_tabular_model(kind, 16).double()
    before = flat(model)
    x, y = cohort(n, seed=seed, scale=scale)
    noise = 1e-9
    dp(model, x.double(), y.double(), noise_multiplier=noise, max_grad_norm=clip, sample_rate=sample_rate,
       steps=1, learning_rate=learning_rate, seed=seed)
    batch = len(next(_poisson_batches(n, sample_rate, 1, torch.Generator().manual_seed(seed))))
    expected_batch_size = max(1, round(sample_rate * n))
    # Each sampled patient moves the weights by at most lr * clip / expected batch size;
    # the noise adds a vector of norm about noise * clip * sqrt(parameters) on top.
    noise_norm = noise * clip * (math.sqrt(len(before)) + 6)
    bound = learning_rate * (clip * batch + noise_norm) / expected_batch_size
    assert float((flat(model) - before).norm()) <= bound * (1 + 1e-9)


def test_the_clipping_bound_is_reached_when_every_gradient_is_clipped_and_aligned() -> None:
    # One feature, every patient positive with a large feature value: each per-sample
    # gradient of the logistic model points the same way and exceeds the clip norm.
    x, y = torch.full((100, 16), 0.0), torch.ones(100)
    x[:, 0] = 50.0
    model = LogisticRegression(16)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.zero_()
    dp(model, x, y, noise_multiplier=1e-9, max_grad_norm=0.5, sample_rate=0.2, steps=1, learning_rate=1.0, seed=2)
    batch = len(next(_poisson_batches(100, 0.2, 1, torch.Generator().manual_seed(2))))
    assert float(flat(model).norm()) == pytest.approx(1.0 * 0.5 * batch / 20, rel=1e-4)


@pytest.mark.parametrize("hidden", [(32, 16), WIDE], ids=["flat-chain", "ghost-clipping"])
def test_an_empty_batch_takes_a_pure_noise_step_of_the_calibrated_size(hidden: tuple[int, ...]) -> None:
    model = build_tabular_model("mlp", 16, hidden=hidden)
    before = flat(model)
    x, y = cohort(50)
    # sample_rate * n rounds to 0, so the expected batch size is 1 and no patient is drawn.
    dp(model, x, y, noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=1e-9, steps=1, learning_rate=0.1)
    assert len(next(_poisson_batches(50, 1e-9, 1, torch.Generator().manual_seed(0)))) == 0
    step = (flat(model) - before) / 0.1
    assert float(step.std()) == pytest.approx(2.0 * 0.5, rel=0.1)
    assert abs(float(step.mean())) < 0.2


def test_the_proximal_term_is_added_after_the_noise_and_pulls_towards_the_received_weights() -> None:
    x, y = cohort(200)
    received = flat(build_tabular_model("mlp", 16))
    after_one = build_tabular_model("mlp", 16)
    dp(after_one, x, y, steps=1, seed=9)
    without, with_prox = build_tabular_model("mlp", 16), build_tabular_model("mlp", 16)
    dp(without, x, y, steps=2, seed=9)
    dp(with_prox, x, y, steps=2, seed=9, proximal_mu=0.5)
    # Same batches and noise; step 2 differs only by -lr * mu * (w1 - w_received).
    expected = flat(without) - 0.1 * 0.5 * (flat(after_one) - received)
    torch.testing.assert_close(flat(with_prox), expected, rtol=1e-5, atol=1e-7)
    assert (flat(with_prox) - received).norm() < (flat(without) - received).norm()


@pytest.mark.parametrize("hidden", [(32, 16), WIDE], ids=["flat-chain", "ghost-clipping"])
def test_train_dp_reports_its_steps_and_mean_loss_and_leaves_no_opacus_state(hidden: tuple[int, ...]) -> None:
    x, y = cohort(200)
    model = build_tabular_model("mlp", 16, hidden=hidden)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = train_dp(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=4,
                         learning_rate=0.01, generator=torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == 2  # whatever ran inside, the caller's setting after
    finally:
        torch.set_num_threads(previous)
    assert stats.steps == 4
    assert 0.3 < stats.mean_loss < 1.5  # binary cross-entropy of a barely trained model
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
            assert not hasattr(p, attr), attr


def test_accuracy_after_dp_training_lies_in_a_band_under_and_without_noise() -> None:
    x_val, y_val = cohort(4000, seed=999)

    def mean_accuracy(noise_multiplier: float) -> float:
        accuracies = []
        for seed in range(5):
            x, y = cohort(500, seed=seed)
            model = build_tabular_model("logistic", 16)
            dp(model, x, y, noise_multiplier=noise_multiplier, max_grad_norm=1.0, sample_rate=0.05, steps=20,
               learning_rate=0.5, seed=seed)
            accuracies.append(evaluate(model, x_val, y_val).accuracy)
        return sum(accuracies) / len(accuracies)

    # Noise this strong for a batch of 25 costs accuracy: a result near the noiseless
    # one would mean the noise went missing; one near 0.5 that training is broken.
    assert 0.58 < mean_accuracy(8.0) < 0.82
    assert mean_accuracy(1e-9) > 0.86


def test_train_dp_refuses_a_layer_that_mixes_patients() -> None:
    model = nn.Sequential(nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 1), nn.Flatten(0))
    x, y = cohort(50)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        dp(model, x, y)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier, max_grad_norm and learning_rate must be > 0"),
        ({"max_grad_norm": -1.0}, "noise_multiplier, max_grad_norm and learning_rate must be > 0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]; found 1.5"),
        ({"steps": 0}, "steps must be >= 1; found 0"),
    ],
)
def test_train_dp_refuses_bad_arguments(overrides: dict[str, float], message: str) -> None:
    x, y = cohort(20)
    with pytest.raises(ValueError, match=message):
        dp(build_tabular_model("logistic", 16), x, y, **overrides)


def test_train_dp_refuses_mismatched_shapes() -> None:
    x, y = cohort(20)
    with pytest.raises(ValueError, match=r"expected x of shape \(n, \.\.\.\) and y of shape \(n,\); found \(20, 16\) and \(19,\)"):
        dp(build_tabular_model("logistic", 16), x, y[:-1])


# ---------------------------------------------------------------- the flat path against Opacus's reference


def opacus_private_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip: float, noise: float,
                            expected_batch_size: int) -> torch.Tensor:
    """Opacus's reference DP gradient: GradSampleModule hooks and a DPOptimizer per parameter."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=noise, max_grad_norm=clip,
                            expected_batch_size=expected_batch_size, loss_reduction="mean")
    try:
        F.binary_cross_entropy_with_logits(gsm(x), y, reduction="sum").backward()
        optimizer.pre_step()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    finally:
        gsm._close()


def flat_private_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip: float, noise: float,
                          expected_batch_size: int) -> torch.Tensor:
    """train_dp's DP gradient of one step on the flat path (before the SGD update)."""
    private = _flat_chain_step(model.linear_chain(), learning_rate=0.1, noise_multiplier=noise, max_grad_norm=clip,
                               expected_batch_size=expected_batch_size)
    private.optimizer.zero_grad(set_to_none=True)
    private.backward(x, y)
    private.optimizer.pre_step()
    (flat_param,) = private.params
    gradient = flat_param.grad.clone()
    private.close()
    return gradient


MODELS = {"logistic": None, "mlp": (32, 16), "deep-mlp": (8, 8, 4)}


def chain_model(kind: str, *, seed: int = 0) -> nn.Module:
    hidden = MODELS[kind]
    model = build_tabular_model("logistic", 16, seed=seed) if hidden is None else build_tabular_model(
        "mlp", 16, hidden=hidden, seed=seed)
    return model.double()


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_clipped_gradient_before_noise_equals_opacus_per_parameter_reference(kind: str) -> None:
    # Inputs this large push most per-sample gradients over the clip norm, so the flat
    # vector must be clipped by each patient's norm over all parameters jointly.
    x, y = cohort(80, seed=2, scale=20.0)
    x, y = x.double(), y.double()
    reference = opacus_private_gradient(chain_model(kind), x, y, clip=0.7, noise=0.0, expected_batch_size=100)
    private = flat_private_gradient(chain_model(kind), x, y, clip=0.7, noise=0.0, expected_batch_size=100)
    norms = FlatLinearChain(chain_model(kind).linear_chain()).per_sample_gradients(x, y)[1].norm(dim=1)
    assert int((norms > 0.7).sum()) > 40
    torch.testing.assert_close(private, reference, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(list(MODELS)),
    scale=st.floats(min_value=0.01, max_value=100.0),
    clip=st.floats(min_value=0.01, max_value=10.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_each_patients_flat_gradient_is_clipped_to_the_bound_and_keeps_its_direction(
    kind: str, scale: float, clip: float, seed: int
) -> None:
    model = chain_model(kind, seed=seed % 7)
    x, y = cohort(6, seed=seed, scale=scale)
    x, y = x.double(), y.double()
    _, rows = FlatLinearChain(model.linear_chain()).per_sample_gradients(x, y)
    rows = rows.clone()
    for i in range(len(x)):
        # One patient per batch: what is released before noise is that patient's clipped gradient.
        clipped = flat_private_gradient(model, x[i : i + 1], y[i : i + 1], clip=clip, noise=0.0, expected_batch_size=1)
        norm = float(rows[i].norm())
        assert float(clipped.norm()) <= clip * (1 + 1e-9)
        # Opacus's factor min(1, C / (norm + 1e-6)).
        assert float(clipped.norm()) == pytest.approx(norm * min(1.0, clip / (norm + 1e-6)), rel=1e-9, abs=1e-15)
        if norm > 0:
            assert float(torch.dot(clipped, rows[i])) == pytest.approx(float(clipped.norm()) * norm, rel=1e-9)


def test_each_step_adds_gaussian_noise_of_sigma_times_clip_over_the_expected_batch_size() -> None:
    model = build_tabular_model("mlp", 16)
    before = flat(model)
    x, y = cohort(1000)
    # Expected batch 50; noise std per coordinate 400 * 0.5 / 50 = 4. The clipped signal
    # adds at most 0.5 * (batch / 50) to the step's norm, spread over 1089 coordinates.
    dp(model, x, y, noise_multiplier=400.0, max_grad_norm=0.5, sample_rate=0.05, steps=1, learning_rate=1.0, seed=3)
    step = flat(model) - before
    std = 400.0 * 0.5 / 50
    assert float(step.std()) == pytest.approx(std, rel=0.08)
    assert abs(float(step.mean())) < 4 * std / math.sqrt(len(step))
    assert float((step.abs() < std).double().mean()) == pytest.approx(0.6827, abs=0.05)  # Gaussian, not uniform


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_every_step_is_one_noisy_release_so_the_ledger_charges_the_steps_it_ran(steps: int) -> None:
    model = build_tabular_model("mlp", 16)
    before = flat(model)
    x, y = cohort(50)
    # No patient is drawn (expected batch 1): the model moves by pure noise, `steps`
    # independent draws of std sigma * C each, which the accountant composes.
    stats = dp(model, x, y, noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=1e-9, steps=steps, learning_rate=0.1,
               seed=steps)
    assert stats.steps == steps
    assert float(((flat(model) - before) / 0.1).std()) == pytest.approx(2.0 * 0.5 * math.sqrt(steps), rel=0.1)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_train_dp_updates_the_models_own_parameters_and_keeps_what_leaves_the_node(kind: str) -> None:
    model = build_tabular_model(kind, 16)
    params = list(model.parameters())
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    before = flat(model)
    x, y = cohort(200)
    dp(model, x, y)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert not torch.equal(flat(model), before)
    assert ModuleValidator.validate(model, strict=True) == []


# ---------------------------------------------------------------- evaluation


def test_evaluate_matches_hand_computed_metrics() -> None:
    model = LogisticRegression(2)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.linear.bias.zero_()
    logits = [-2.0, -0.5, 0.5, 1.0, 3.0]
    labels = [0.0, 1.0, 0.0, 1.0, 1.0]
    x = torch.tensor([[v, 7.0] for v in logits])
    probs = [1 / (1 + math.exp(-v)) for v in logits]

    metrics = evaluate(model, x, torch.tensor(labels))

    assert metrics.n == 5
    # Positives (0.38, 0.73, 0.95) outrank negatives (0.12, 0.62) in 5 of 6 pairs.
    assert metrics.auc == pytest.approx(5 / 6)
    assert metrics.accuracy == pytest.approx(3 / 5)  # predictions 0, 0, 1, 1, 1
    assert metrics.brier == pytest.approx(sum((p - t) ** 2 for p, t in zip(probs, labels)) / 5, rel=1e-6)
    loss = -sum(t * math.log(p) + (1 - t) * math.log(1 - p) for p, t in zip(probs, labels)) / 5
    assert metrics.loss == pytest.approx(loss, rel=1e-6)
    assert metrics.as_dict()["eval-auc"] == metrics.auc
    assert metrics.as_dict(prefix="val-")["val-num-examples"] == 5.0


def test_evaluate_refuses_an_empty_split() -> None:
    with pytest.raises(ValueError, match="cannot evaluate on an empty split"):
        evaluate(LogisticRegression(3), torch.zeros(0, 3), torch.zeros(0))


def test_auc_gives_tied_pairs_half_credit() -> None:
    # Pairs (positive, negative): (0.4, 0.1) 1, (0.4, 0.4) 1/2, (0.8, 0.1) 1, (0.8, 0.4) 1.
    assert auc_score([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    assert auc_score([0.3] * 6, [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)


def test_auc_of_perfect_and_reversed_rankings() -> None:
    assert auc_score([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc_score([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auc_is_undefined_with_one_class(labels: list[int]) -> None:
    assert math.isnan(auc_score([0.2, 0.5, 0.9], labels))


def test_the_expected_batch_size_comes_from_the_size_given_not_the_exact_n() -> None:
    # A node passes its released (noisy) training size: the update's scale then depends on
    # no exact count. One step from the same weights, sampling and noise: twice the size,
    # half the step.
    x, y = cohort(200)
    steps = {}
    for size in (200.0, 400.0):
        torch.manual_seed(3)
        model = LogisticRegression(16)
        before = flat(model)
        torch.manual_seed(5)
        train_dp(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1, learning_rate=0.1,
                 generator=torch.Generator().manual_seed(5), expected_size=size)
        steps[size] = flat(model) - before
    torch.testing.assert_close(steps[400.0], steps[200.0] / 2, rtol=1e-5, atol=1e-7)


def test_train_dp_refuses_an_expected_size_below_one() -> None:
    x, y = cohort(50)
    with pytest.raises(ValueError, match="expected_size must be >= 1"):
        train_dp(LogisticRegression(16), x, y, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=1,
                 learning_rate=0.1, expected_size=0.0)
