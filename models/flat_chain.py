"""DP-SGD of a chain of linear and ReLU layers on one flat parameter.

Opacus's ``DPOptimizer`` clips, noises and scales per parameter tensor, each with a few
small tensor operations and Python-level bookkeeping; over the six parameter tensors
of the tabular MLP that work took longer than a whole plain epoch. Here the chain's parameters become one
vector, :class:`FlatLinearChain` computes each patient's gradient of it in closed form,
and :class:`FlatDPOptimizer` (Opacus's optimizer, unchanged in what it computes) clips
that one tensor per patient to ``max_grad_norm``, which is clipping over all of the
model's parameters jointly, as Opacus does for the model's own parameters.

Opacus is imported here at module level: import this module only where DP-SGD runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

__all__ = ["FlatDPOptimizer", "FlatLinearChain"]


class FlatLinearChain:
    """Per-sample gradients of a chain of linear and ReLU layers, in one flat tensor.

    The chain's parameters are copied into a single vector ``flat`` (in the order of
    ``parameters()``, each weight then its bias) and the layers run on views into it.
    For the summed binary cross-entropy, the gradient at the logit of patient ``i`` is
    ``sigmoid(z_i) - y_i``; it is carried back layer by layer (through a ReLU: zero where
    the unit was off, as autograd does; through a linear layer: times its weight), and
    each linear layer's per-sample gradient is the outer product of that patient's
    gradient at its output and its input (its bias: the gradient at its output), which
    is Opacus's own rule for ``nn.Linear``. All patients of a batch go through each
    operation at once, so a step costs a few small tensor operations per layer whatever
    the batch size, and ``DPOptimizer`` clips, noises and scales one tensor instead of
    one per parameter.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = tuple(layers)
        self.targets = [p for m in self.layers for p in m.parameters(recurse=False)]
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.targets]))
        data = self.flat.detach()
        # Forwards, per layer: a linear layer's (transposed weight, bias) as views into
        # `flat`, or None for a ReLU. Backwards, per linear layer from the last: (layer
        # index, weight, the columns of its weight and of its bias in a gradient row).
        self._forward: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        self._backward: list[tuple[int, torch.Tensor, slice, slice | None]] = []
        offset = 0
        for index, module in enumerate(self.layers):
            if not isinstance(module, nn.Linear):
                self._forward.append(None)
                continue
            weight_cols = slice(offset, offset + module.weight.numel())
            weight = data[weight_cols].view_as(module.weight)
            offset = weight_cols.stop
            bias, bias_cols = None, None
            if module.bias is not None:
                bias_cols = slice(offset, offset + module.bias.numel())
                bias = data[bias_cols]
                offset = bias_cols.stop
            self._forward.append((weight.t(), bias))
            self._backward.append((index, weight, weight_cols, bias_cols))
        self._backward.reverse()
        self.size = offset
        # The per-sample gradients of every step go to one buffer (fresh memory of this
        # size every step costs more than the arithmetic that fills it), seen through
        # per-layer views of its weight and bias columns.
        self._capacity = 0
        self._rows = data.new_empty((0, self.size))
        self._layer_rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def _reserve(self, batch: int) -> None:
        self._capacity = max(batch, 2 * self._capacity)
        self._rows = self._rows.new_empty((self._capacity, self.size))
        self._layer_rows = [
            (
                self._rows[:, weight_cols].view(self._capacity, *weight.shape),
                None if bias_cols is None else self._rows[:, bias_cols],
            )
            for _, weight, weight_cols, bias_cols in self._backward
        ]

    @torch.no_grad()
    def per_sample_gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of a batch and each patient's gradient of the summed loss.

        The gradients, ``(len(x), size)``, live in a buffer that the next call overwrites.
        """
        inputs: list[torch.Tensor] = []  # of each layer
        a = x
        for linear in self._forward:
            inputs.append(a)
            if linear is None:
                a = torch.relu(a)
            elif linear[1] is None:
                a = torch.mm(a, linear[0])
            else:
                a = torch.addmm(linear[1], a, linear[0])
        grad = torch.sigmoid(a).sub_(y.unsqueeze(-1))  # (batch, 1): at the logit
        batch = x.shape[0]
        if batch > self._capacity:
            self._reserve(batch)
        for (index, weight, _, _), (weight_rows, bias_rows) in zip(self._backward, self._layer_rows):
            torch.mul(grad.unsqueeze(2), inputs[index].unsqueeze(1), out=weight_rows[:batch])
            if bias_rows is not None:
                bias_rows[:batch].copy_(grad)
            if index == 0:
                break
            grad = torch.mm(grad, weight)
            # Back through the ReLUs before this layer: zero where a unit was off.
            while index > 0 and self._forward[index - 1] is None:
                index -= 1
                grad = torch.ops.aten.threshold_backward(grad, inputs[index + 1], 0)
        return a.squeeze(-1), self._rows[:batch]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained flat vector into the chain's own parameters."""
        offset = 0
        for p in self.targets:
            p.copy_(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class FlatDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` over a parameter list that does not change.

    ``DPOptimizer`` rebuilds its parameter list from the wrapped optimizer's groups on
    every use, about ten times per step; for a one-tensor model that bookkeeping is a
    measurable share of a step (1.5-3 % of a tabular epoch). This keeps the list from
    the first use. Clipping, noise, scaling and the step hook are Opacus's own.
    """

    _fixed_params: list[nn.Parameter] | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        if self._fixed_params is None:
            self._fixed_params = DPOptimizer.params.fget(self)  # type: ignore[attr-defined]
        return self._fixed_params
