"""Chapter 1 — from classes to instances: the parametric softmax baseline (paper eq. 1).

Every training image is its own class, with its own weight vector w_j:
``P(i | v) = exp(w_i^T v) / sum_j exp(w_j^T v)``. The classifier is an ``n x d`` matrix, so its cost
grows with the dataset, and its weights say nothing about images it has not seen: the reasons the
paper replaces it with the non-parametric softmax over a memory bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ParametricSoftmax(nn.Module):
    """n-way instance classifier: ``forward(features (B, d), indices (B,)) -> scalar`` cross-entropy.

    Args:
        dim: d, the feature dimension.
        num_items: n, one class per training image.
        temperature: logits are ``W v / temperature``; 1.0 is the paper's eq. 1.
        normalize: unit-length rows ``w_j / ||w_j||`` (a *cosine* classifier). With the bank's temperature this
            is the fair parametric arm: eq. 2 with learned weights in place of stored features, so that a gap to
            the non-parametric softmax is not only the missing temperature and norm constraint.
    """

    def __init__(self, dim: int, num_items: int, temperature: float = 1.0, normalize: bool = False) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, num_items, bias=False)
        self.temperature = temperature
        self.normalize = normalize

    def forward(self, features: torch.Tensor, indices: torch.Tensor, **kwargs) -> torch.Tensor:
        weight = self.classifier.weight.float()
        if self.normalize:
            weight = F.normalize(weight, dim=1)
        logits = features.float() @ weight.T / self.temperature  # (B, n)
        return F.cross_entropy(logits, indices)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}"
