"""Dirac canaries: a DP-SGD training with audit canaries, each alone on a coordinate of its own.

This is the training half of one-run auditing (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846) in its white-box
form with *Dirac canaries*: canaries whose gradient is zero everywhere but on one
coordinate of the model, so that nothing else in the training moves that coordinate
except the Gaussian noise. It is the strongest of the paper's settings: what the auditor
sees of a canary is the mechanism itself (the clipped gradient, when sampled, plus noise),
so the bound it gives is about the DP-SGD mechanism (noise multiplier, sampling rate,
steps, clipping norm), not about how much a particular model happens to memorise.

How the canaries are made out of the node's own model and training loop:

- The audit model is ``models.tabular``'s logistic regression on the dataset's ``f``
  features plus ``m`` more inputs, one per canary. A patient's row is its features and
  ``m`` zeros; canary ``i`` is a row of zeros but ``s`` at input ``f + i``, with a fixed
  label. A linear model's per-sample gradient is ``(sigmoid(z) - y) * [x, 1]``: a patient
  never touches weight ``f + i``; canary ``i`` touches it and the bias only. The noise
  DP-SGD adds to weight ``f + i`` is the same as to every other coordinate.
- Canary ``i`` joins the training set when ``included[i]`` (the auditor's coin, 1/2
  each). Training is :func:`models.training.train_dp` itself, one step per call (each
  call takes one Poisson sample of all rows, clips every row's gradient to
  ``max_grad_norm`` jointly, adds Gaussian noise of ``noise_multiplier * max_grad_norm``
  and steps), so that the auditor sees every iterate, as the accountant's composition
  over all steps assumes an adversary may.
- The *score* of canary ``i`` is the log-likelihood ratio of "in" against "out" from the
  moves of its weight: at step ``t`` the move, in gradient units, is
  ``u = b_t g_t + noise_multiplier * max_grad_norm * N(0, 1)`` where ``b_t`` is whether
  the canary was sampled (probability ``sample_rate`` if in, never if out) and ``g_t``
  its clipped gradient on its coordinate at the current weights (known to a white-box
  auditor). The ratio of the mixture ``(1 - q) N(0, sc^2) + q N(g_t, sc^2)`` to
  ``N(0, sc^2)`` is summed over steps: the Neyman-Pearson test of one step, and the
  paper's gradient-alignment score when the noise is large. Without DP (no clipping, no
  noise: :func:`models.training.train_plain`), the score is the weight's total move
  towards the canary's label, which is exactly zero for a canary that was out.

The scale ``s`` trades two things: the canary's gradient must reach the clipping norm
(``|sigmoid(z) - y| * s >= max_grad_norm``, the worst case DP-SGD allows), and its logit
``z = s * w + bias`` must not drift into saturation (where the gradient vanishes) under
the noise. :func:`canary_scale` aims the drift of the logit over the whole training at
about 1. A canary whose gradient is below the norm only makes the audit weaker (its
score is still an exact likelihood ratio for the gradient it had), never invalid.

Nothing here reads or writes files; the caller brings the data and keeps the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.tabular import build_tabular_model
from models.training import train_dp, train_plain

__all__ = ["TrainingPhase", "canary_scale", "dirac_canary_scores"]

# Opacus's clipping: factor = max_grad_norm / (norm + 1e-6), at most 1.
_OPACUS_CLIP_EPS = 1e-6
# The range of s / max_grad_norm (see canary_scale).
_MIN_SCALE, _MAX_SCALE = 3.0, 30.0


@dataclass(frozen=True)
class TrainingPhase:
    """``steps`` steps of DP-SGD at one noise multiplier and sampling rate (one charge of the ledger).

    ``noise_multiplier=None`` is training without DP (no clipping, no noise): the
    baseline an audit of a private mechanism is compared with.
    """

    noise_multiplier: float | None
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        problems = []
        if self.noise_multiplier is not None and not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            problems.append(f"noise_multiplier must be > 0 (or None: no DP); found {self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1]; found {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps must be an integer >= 1; found {self.steps!r}")
        if problems:
            raise ValueError("; ".join(problems))


def _expected_batch(sample_rate: float, expected_size: float) -> int:
    return max(1, round(sample_rate * expected_size))  # as train_dp divides the noisy sum


def canary_scale(
    phases: Sequence[TrainingPhase], *, max_grad_norm: float, learning_rate: float, expected_size: float
) -> float:
    """The canaries' input value ``s``: its logit's noise drift over the training about 1, within [3, 30] x the norm.

    A weight's noise over the steps has standard deviation ``learning_rate *
    noise_multiplier * max_grad_norm * sqrt(steps) / expected_batch``; the logit moves by
    ``s`` times that. At least 3 x the norm, so that the gradient reaches the norm while
    ``|sigmoid(z) - y| >= 1/3``; at most 30 x.
    """
    variance = sum(
        (learning_rate * (p.noise_multiplier or 1.0) * max_grad_norm / _expected_batch(p.sample_rate, expected_size)) ** 2
        * p.steps
        for p in phases
    )
    ratio = 1.0 / (max_grad_norm * math.sqrt(variance))
    return max_grad_norm * min(max(ratio, _MIN_SCALE), _MAX_SCALE)


def dirac_canary_scores(
    x: torch.Tensor,
    y: torch.Tensor,
    included: np.ndarray,
    *,
    phases: Sequence[TrainingPhase],
    max_grad_norm: float,
    learning_rate: float,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Train on `x`, `y` and the included canaries with `phases`; each canary's score (higher: more likely in).

    Parameters
    ----------
    x, y
        The dataset's training rows (features as the model sees them) and 0/1 labels.
    included
        One flag per canary: whether it is in the training set (the auditor's secret).
    phases
        The mechanism, phase after phase: all private, or all without DP.
    generator
        Source of the Poisson sampling (DP-SGD's noise comes from torch's default
        generator, as in the node's training).
    """
    included = np.asarray(included, dtype=bool)
    if included.ndim != 1 or len(included) == 0:
        raise ValueError("included must be a non-empty vector of flags, one per canary")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"expected x of shape (n, f) and y of shape (n,), n >= 1; found {tuple(x.shape)} and {tuple(y.shape)}")
    if not phases:
        raise ValueError("phases must name at least one phase of training")
    private = {p.noise_multiplier is not None for p in phases}
    if len(private) != 1:
        raise ValueError("phases must be all private or all without DP")
    dp = private.pop()
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0 and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError("max_grad_norm and learning_rate must be > 0")

    n, f = x.shape
    m = len(included)
    # The expected training size, a constant (never a function of which canaries are in).
    expected_size = n + m / 2.0
    # The label the patients' bias is furthest from, so the canary starts with a large gradient.
    label = 1.0 if float(y.float().mean()) < 0.5 else 0.0
    scale = canary_scale(phases, max_grad_norm=max_grad_norm, learning_rate=learning_rate, expected_size=expected_size)
    inside = np.flatnonzero(included)
    rows = torch.zeros((n + len(inside), f + m), dtype=torch.float32)
    rows[:n, :f] = x.float()
    rows[torch.arange(n, n + len(inside)), torch.from_numpy(f + inside)] = scale
    labels = torch.cat([y.float(), torch.full((len(inside),), label)])

    model = build_tabular_model("logistic", f + m)
    weight, bias = model.linear.weight, model.linear.bias
    norm_factor = math.sqrt(scale * scale + 1.0)  # |gradient| / |sigmoid(z) - y| of a canary (its weight and the bias)
    scores = np.zeros(m, dtype=np.float64)
    for phase in phases:
        q = phase.sample_rate
        batch = _expected_batch(q, expected_size)
        for _ in range(phase.steps):
            before = weight.detach()[0, f:].double().numpy().copy()
            residual = _sigmoid(scale * before + float(bias.detach()[0])) - label
            # Each canary's clipped gradient on its own coordinate at these weights, as Opacus clips it.
            clip = np.minimum(1.0, max_grad_norm / (np.abs(residual) * norm_factor + _OPACUS_CLIP_EPS))
            gradient = residual * scale * clip
            if dp:
                assert phase.noise_multiplier is not None
                train_dp(
                    model, rows, labels,
                    noise_multiplier=phase.noise_multiplier, max_grad_norm=max_grad_norm, sample_rate=q, steps=1,
                    learning_rate=learning_rate, generator=generator, expected_size=expected_size,
                )
                # The step's noisy sum on each canary's coordinate, in gradient units.
                moved = (before - weight.detach()[0, f:].double().numpy()) * batch / learning_rate
                sd = phase.noise_multiplier * max_grad_norm
                # log[(1 - q) + q exp((u g - g^2 / 2) / sd^2)]: in against out, for this step.
                scores += np.logaddexp(math.log1p(-q) if q < 1 else -math.inf, math.log(q) + (moved * gradient - gradient**2 / 2) / sd**2)
            else:
                train_plain(model, rows, labels, sample_rate=q, steps=1, learning_rate=learning_rate, generator=generator)
                moved = before - weight.detach()[0, f:].double().numpy()
                scores += moved * np.sign(gradient)
    return scores


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large |z|."""
    return np.exp(-np.logaddexp(0.0, -z))
