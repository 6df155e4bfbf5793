"""Proximal regularisation (paper Sec. 3.3, eq. 8) and the base class it gives every bank objective.

Each image is visited once an epoch, so its bank row v_i^(t-1) lags the current feature
v_i^(t) = f_theta(x_i). The paper adds ``lambda * ||v_i^(t) - v_i^(t-1)||^2`` to the positive term to damp
the resulting oscillation; as training converges the term vanishes. The official code leaves it out
and relies on the bank momentum instead; ``proximal=0`` (the default) reproduces that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .memory_bank import MemoryBank


def loss_oscillation(step_losses: Sequence[float], window: int, tail: float = 0.5) -> float:
    """How much a training loss oscillates around its trend: the mean absolute residual of the per-step loss from
    its centred moving average over ``window`` steps, relative to that average, over the last ``tail`` of the
    steps (the paper's Fig. 3 compares such curves for several lambda). A flat or smoothly falling loss gives ~0."""
    losses = torch.as_tensor(list(step_losses), dtype=torch.float64)
    if window < 2 or len(losses) < 2 * window:
        raise ValueError(f"need at least 2 x window = {2 * window} step losses and window >= 2, got {len(losses)}")
    trend = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), window, stride=1).view(-1)  # (T - window + 1,)
    centred = losses[window // 2 : window // 2 + len(trend)]
    start = int(len(trend) * (1 - tail))
    return ((centred - trend)[start:].abs().mean() / trend[start:].abs().mean()).item()


def proximal_term(features: torch.Tensor, bank_rows: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * mean_b ||f_b - v_b||^2`` for features ``(B, d)`` and their bank rows ``(B, d)``."""
    return weight * (features - bank_rows.detach()).pow(2).sum(dim=1).mean()


class BankObjective(nn.Module):
    """Base of the objectives that read a :class:`MemoryBank` (non-parametric softmax, NCE).

    Subclasses implement :meth:`data_loss`; this class adds the proximal term, so every bank
    objective has it. ``forward`` never writes the bank: the trainer calls ``bank.update``.
    """

    def __init__(self, bank: MemoryBank, temperature: float, proximal: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if proximal < 0:
            raise ValueError(f"the proximal weight lambda must be >= 0, got {proximal}")
        self.bank = bank
        self.temperature = temperature
        self.proximal = proximal

    def data_loss(self, features: torch.Tensor, indices: torch.Tensor, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, indices: torch.Tensor, **kwargs) -> torch.Tensor:
        """Scalar loss for L2-normalised ``features`` ``(B, d)`` of dataset items ``indices`` ``(B,)``."""
        features = features.float()  # the loss is computed in fp32 even under autocast
        loss = self.data_loss(features, indices, **kwargs)
        if self.proximal > 0:
            loss = loss + proximal_term(features, self.bank.get(indices), self.proximal)
        return loss
