"""Chapter 2 — the non-parametric softmax over the memory bank (paper eq. 2).

``P(i | v) = exp(v_i^T v / tau) / Z``, ``Z = sum_j exp(v_j^T v / tau)``: the class "weights" are the
bank's features themselves, so nothing but the bank grows with n and any image can be compared
with any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory_bank import MemoryBank
from .proximal import BankObjective


def partition_function(features: torch.Tensor, bank: MemoryBank, temperature: float) -> torch.Tensor:
    """The exact ``Z_i = sum_j exp(v_j^T f_i / tau)`` over all n bank rows, shape ``(B,)``."""
    return torch.exp(features.float() @ bank.memory.T / temperature).sum(dim=1)


class NonParametricSoftmax(BankObjective):
    """Exact softmax over all n bank entries: ``J = -mean_b log P(i_b | f_b)`` (eq. 2).

    ``forward(features (B, d), indices (B,)) -> scalar``. The gradient with respect to f_b is
    ``(sum_j P(j | f_b) v_j - v_{i_b}) / (tau B)``: pull towards the own bank row, push away from the
    softmax-weighted mean of all rows.
    """

    def __init__(self, bank: MemoryBank, temperature: float = 0.07, proximal: float = 0.0) -> None:
        super().__init__(bank, temperature, proximal)

    def data_loss(self, features: torch.Tensor, indices: torch.Tensor, **kwargs) -> torch.Tensor:
        logits = features @ self.bank.memory.T / self.temperature  # (B, n)
        return F.cross_entropy(logits, indices)
