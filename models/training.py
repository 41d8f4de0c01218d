"""Training and evaluation loops over in-memory tensors.

`train_dp` is DP-SGD as Opacus defines it: Poisson sampling (each patient joins each
step independently with probability ``sample_rate``), per-sample gradients clipped to
``max_grad_norm`` over all parameters jointly, Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` added to the sum, divided by the expected batch
size ``round(sample_rate * size)``, where ``size`` is the ``expected_size`` the caller
gives (a node gives its released, noisy training size, so that the update's scale is no
function of the exact count) or, by default, ``n``. An empty batch still takes a pure-noise step. Opacus's
``DPOptimizer`` clips and noises (on the ghost-clipping path Opacus also computes the
per-sample gradient norms); this module decides how to drive it cheaply:

- **Tensors, not a DataLoader.** Poisson masks for many steps are drawn in one call on
  the tensors already in memory; Opacus's Poisson DataLoader collates patient by
  patient, which dominates a tabular epoch.
- **One intra-op thread for small steps.** A tabular step is a few microseconds of
  arithmetic per operation; OpenMP fork/join (and, on a busy host, waiting for a
  descheduled worker) costs more than the work. Measured on a shared 2-core host: two
  threads were never faster (0.84-1.1x the time of one while it was quiet) and up to
  40x slower while it was busy. The caller's setting is restored afterwards.
- **One flat parameter for small linear chains** (the tabular models, which declare
  their layers with ``linear_chain()``): the layers' weights are copied into one vector,
  per-sample gradients of the whole chain are computed in closed form (a few batched
  operations per layer, no autograd graph and no module hooks) into one reused
  ``batch x parameters`` matrix, and Opacus's ``DPOptimizer`` clips, noises and scales
  that single tensor, as it would the model's own parameters flattened and
  concatenated. The trained vector is copied back into the model's parameters, whose
  names and shapes are what leaves the node.
- **Ghost clipping for everything else** (``grad_sample_mode="ghost"``): per-sample
  gradient *norms* from activations and backprops, then a second backward pass with
  the clipping coefficients, never materialising ``batch x parameters`` floats. It
  costs two backward passes, so it only wins once per-sample gradients are large.

Measured with ``python benchmarks/dp_epoch.py --repeats 25 --warmup 3`` (16 features,
``sample_rate=0.05``, 20 steps; shared 2-core x86 CPU at load 1.1-1.5, torch 2.13,
Opacus 1.6; all on one thread), median milliseconds per epoch over four runs and the
range of the ratio to `train_plain` across them:

==================  ===========  ================  =================  ==================
model, patients     train_plain  train_dp          expanded weights   PrivacyEngine with
                                                   (the previous      DataLoader
                                                   loop)
==================  ===========  ================  =================  ==================
logistic, 1000      3.6          4.3 (1.16-1.21x)  11.5 (3.20-3.26x)  18.0 (4.99-5.08x)
logistic, 2500      3.7          4.4 (1.17-1.20x)  11.5 (3.06-3.11x)  22.8 (6.05-6.16x)
MLP (32, 16), 1000  5.5          6.5 (1.16-1.21x)  20.8 (3.75-3.85x)  32.0 (5.71-5.81x)
MLP (32, 16), 2500  6.4          9.3 (1.44-1.48x)  23.3 (3.43-3.75x)  40.7 (5.92-6.49x)
==================  ===========  ================  =================  ==================

For the MLP at 2500 patients (expected batch 125), an epoch's closed-form per-sample
gradients take about 3.0 ms against 4.0 ms of forward and backward in `train_plain`;
what is left above plain is ``DPOptimizer``'s clipping, noise and scaling of the
``125 x 1089`` per-sample matrix (about 3.2 ms). Per round in a fresh process, as a
Flower ClientApp runs, the epoch is minor: imports and the first epoch take about
1.8 s with `train_plain` and 2.4 s with `train_dp` (importing Opacus: ~1.2 s).

Privacy accounting is *not* done here: the caller charges its ledger with
``(noise_multiplier, sample_rate, steps)`` for exactly the steps this function ran.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # Opacus is imported on first use: a ClientApp module imports lightly.
    from opacus.optimizers import DPOptimizer

__all__ = ["EvalMetrics", "TrainStats", "auc_score", "evaluate", "predict", "train_dp", "train_plain"]

# Per-sample gradient entries per step (trainable parameters x expected batch size) up
# to which a step counts as small: one intra-op thread, and the flat linear chain where
# the model allows. Around here ghost clipping's second backward pass starts to cost less
# than materialising per-sample gradients (MLP (128, 64), batch 100: ~1.0M entries,
# both ~45 ms/epoch; (256, 128): 3.7M, ghost 71 vs 120 ms).
_SMALL_STEP_ENTRIES = 1 << 20
# Uniform draws per call when sampling the Poisson masks of many steps at once.
_MAX_MASK_DRAWS = 1 << 22


@dataclass(frozen=True)
class TrainStats:
    """What one call of a training loop did (no per-patient information)."""

    steps: int
    mean_loss: float


@dataclass(frozen=True)
class EvalMetrics:
    """Binary-classification metrics of a model on one split."""

    n: int
    loss: float
    auc: float
    accuracy: float
    brier: float

    def as_dict(self, prefix: str = "eval-") -> dict[str, float]:
        return {
            f"{prefix}num-examples": float(self.n),
            f"{prefix}loss": self.loss,
            f"{prefix}auc": self.auc,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}brier": self.brier,
        }


def _check_common(x: torch.Tensor, y: torch.Tensor, sample_rate: float, steps: int) -> None:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"expected x of shape (n, ...) and y of shape (n,); found {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1]; found {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; found {steps}")


def _poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    """Yield the row indices of `steps` Poisson-sampled batches (each possibly empty).

    Every row joins every step independently with probability `sample_rate`. The masks
    of many steps are drawn in one call because, per step, sampling costs as much as a
    tabular model's forward pass.
    """
    chunk = max(1, _MAX_MASK_DRAWS // n)
    for start in range(0, steps, chunk):
        mask = torch.rand(min(chunk, steps - start), n, generator=generator) < sample_rate
        yield from torch.split(mask.nonzero()[:, 1], mask.sum(dim=1).tolist())


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: leave the setting alone).

    The setting is process-wide; a node trains one model at a time, and it is restored.
    """
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _is_small_step(model: nn.Module, expected_batch_size: int) -> bool:
    entries = sum(p.numel() for p in _trainable(model)) * expected_batch_size
    return entries <= _SMALL_STEP_ENTRIES


def _linear_chain(model: nn.Module) -> tuple[nn.Module, ...] | None:
    """The model's layers if it declares them as a chain of ``nn.Linear`` and ``nn.ReLU``.

    A model qualifies when it has a ``linear_chain()`` method (its ``forward`` applies
    those layers in turn and squeezes out one logit), the chain ends in a linear layer
    of one output, and the chain holds every trainable parameter of the model.
    """
    declared = getattr(model, "linear_chain", None)
    if not callable(declared):
        return None
    layers = tuple(declared())
    if not layers or not all(type(m) in (nn.Linear, nn.ReLU) for m in layers):
        return None
    last = layers[-1]
    if not isinstance(last, nn.Linear) or last.out_features != 1:
        return None
    in_chain = [p for m in layers for p in m.parameters(recurse=False)]
    trainable = _trainable(model)
    if not all(p.requires_grad for p in in_chain) or {id(p) for p in in_chain} != {id(p) for p in trainable}:
        return None
    return layers


@dataclass(frozen=True)
class _PrivateStep:
    """Opacus objects of one `train_dp` call, for one way of getting per-sample gradients.

    ``backward(x, y)`` leaves in ``params`` what ``optimizer.pre_step()`` needs to clip,
    noise and scale; ``optimizer`` wraps the SGD that updates ``params``.
    ``summed_loss()`` is the loss summed over every patient of every batch so far, each
    at the weights of its step. ``close()`` leaves the trained weights in the model and
    no Opacus state on it.
    """

    optimizer: DPOptimizer
    params: list[torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], None]
    summed_loss: Callable[[], float]
    close: Callable[[], None]


def _flat_chain_step(
    layers: Sequence[nn.Module],
    *,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
) -> _PrivateStep:
    """Closed-form per-sample gradients of a linear chain; Opacus's flat clipping and noise."""
    from models.flat_chain import FlatDPOptimizer, FlatLinearChain

    chain = FlatLinearChain(layers)
    flat = chain.flat
    optimizer = FlatDPOptimizer(
        torch.optim.SGD([flat], lr=learning_rate),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    # The loss is reported, never differentiated: it is computed once, at the end.
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def backward(xb: torch.Tensor, yb: torch.Tensor) -> None:
        batch_logits, flat.grad_sample = chain.per_sample_gradients(xb, yb)
        logits.append(batch_logits)
        labels.append(yb)

    def summed_loss() -> float:
        if not logits:
            return 0.0
        return float(F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels), reduction="sum"))

    def close() -> None:
        chain.write_back()
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(flat, attr):
                delattr(flat, attr)

    return _PrivateStep(optimizer, [flat], backward, summed_loss, close)


def _ghost_clipping_step(
    model: nn.Module,
    *,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
) -> _PrivateStep:
    """Opacus ghost clipping: per-sample norms, then a backward pass of clipped losses."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
    )
    params = _trainable(model)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(params, lr=learning_rate),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(
        gsm, optimizer, nn.BCEWithLogitsLoss(reduction="mean"), loss_reduction="mean"
    )

    losses: list[torch.Tensor] = []

    def backward(xb: torch.Tensor, yb: torch.Tensor) -> None:
        loss = criterion(gsm(xb), yb)
        with warnings.catch_warnings():
            # The first layer's input is data, which needs no gradient; torch warns that
            # the module's full backward hook then sees only its outputs, which is all
            # Opacus reads.
            warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
            loss.backward()
        losses.append(loss.loss_per_sample.detach().sum())

    def summed_loss() -> float:
        return float(torch.stack(losses).sum()) if losses else 0.0

    def close() -> None:
        gsm._close()
        for param in params:
            if hasattr(param, "summed_grad"):
                del param.summed_grad

    return _PrivateStep(optimizer, params, backward, summed_loss, close)


def train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
    expected_size: float | None = None,
) -> TrainStats:
    """Run `steps` DP-SGD steps on `model` in place.

    Parameters
    ----------
    expected_size
        The size the expected batch ``round(sample_rate * expected_size)`` is computed
        from; ``len(x)`` when None. Dividing by a constant derived from the exact n makes
        the update's scale a function of n; a DP release of n (post-processing) does not.
    proximal_mu
        FedProx's proximal weight. Its gradient ``mu * (w - w_global)`` depends only on
        the weights the node received, never on patient data, so it is added after the
        private gradient has been clipped and noised (post-processing).
    generator
        Source of the Poisson sampling; leave ``None`` in production so batches are not
        predictable. Opacus draws the noise from torch's default generator.
    """
    from opacus.validators import ModuleValidator

    _check_common(x, y, sample_rate, steps)
    if noise_multiplier <= 0 or max_grad_norm <= 0 or learning_rate <= 0:
        raise ValueError("noise_multiplier, max_grad_norm and learning_rate must be > 0")
    n = len(x)
    if expected_size is not None and not (math.isfinite(expected_size) and expected_size >= 1):
        raise ValueError(f"expected_size must be >= 1; found {expected_size!r}")
    expected_batch_size = max(1, round(sample_rate * (n if expected_size is None else expected_size)))
    model.train()
    # What PrivacyEngine.make_private checks: no layer that mixes patients (BatchNorm).
    ModuleValidator.validate(model, strict=True)
    small = _is_small_step(model, expected_batch_size)
    layers = _linear_chain(model) if small else None

    build = partial(_ghost_clipping_step, model) if layers is None else partial(_flat_chain_step, layers)
    seen = 0
    with _intra_op_threads(1 if small else None):
        private = build(
            learning_rate=learning_rate,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
        )
        params, sgd = private.params, private.optimizer.original_optimizer
        reference = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        try:
            for batch in _poisson_batches(n, sample_rate, steps, generator):
                private.optimizer.zero_grad(set_to_none=True)
                private.backward(x[batch], y[batch])
                # Clip per sample, add noise to the sum, divide by the expected batch size.
                # An empty batch still releases a pure-noise step, as the accountant assumes.
                private.optimizer.pre_step()
                if reference is not None:
                    for param, ref in zip(params, reference, strict=True):
                        param.grad.add_(param.detach() - ref, alpha=proximal_mu)
                sgd.step()
                seen += len(batch)
        finally:
            # Leaves the trained weights in the model and no Opacus state on it.
            private.close()
        summed_loss = private.summed_loss()
    return TrainStats(steps=steps, mean_loss=summed_loss / max(seen, 1))


def train_plain(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sample_rate: float,
    steps: int,
    learning_rate: float,
    generator: torch.Generator | None = None,
) -> TrainStats:
    """The same schedule as `train_dp` without clipping or noise (a non-private baseline).

    Runs on one intra-op thread under the same rule as `train_dp`, so that the two
    differ only by privacy.
    """
    _check_common(x, y, sample_rate, steps)
    n = len(x)
    expected_batch_size = max(1, round(sample_rate * n))
    params = _trainable(model)
    sgd = torch.optim.SGD(params, lr=learning_rate)
    losses: list[torch.Tensor] = []
    seen = 0
    model.train()
    with _intra_op_threads(1 if _is_small_step(model, expected_batch_size) else None):
        for batch in _poisson_batches(n, sample_rate, steps, generator):
            sgd.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(x[batch]), y[batch], reduction="sum")
            (loss / expected_batch_size).backward()
            sgd.step()
            losses.append(loss.detach())
            seen += len(batch)
    return TrainStats(steps=steps, mean_loss=float(torch.stack(losses).sum()) / max(seen, 1))


def auc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Returns NaN when only one class is present, where AUC is undefined.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(scores)]))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The model's predicted probabilities for the rows of `x`, shape ``(n,)``."""
    model.eval()
    return torch.sigmoid(model(x)).reshape(-1).double().numpy()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> EvalMetrics:
    """Loss (binary cross-entropy), AUC, accuracy at 0.5 and Brier score of `model`."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    logits = model(x)
    probs = torch.sigmoid(logits)
    loss = float(F.binary_cross_entropy_with_logits(logits, y))
    accuracy = float(((probs >= 0.5).float() == y).float().mean())
    brier = float(((probs - y) ** 2).mean())
    return EvalMetrics(
        n=len(x),
        loss=loss,
        auc=auc_score(probs.numpy(), y.numpy()),
        accuracy=accuracy,
        brier=brier,
    )
