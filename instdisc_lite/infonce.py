"""InfoNCE: a (K+1)-way softmax that picks the positive among K negatives (van den Oord et al. 2018).

For a query q, its positive key k+ and negatives k_1..k_K (all unit vectors), with temperature tau::

    L = -log( exp(q . k+ / tau) / (exp(q . k+ / tau) + sum_i exp(q . k_i / tau)) )

Put the positive in column 0 of the ``(N, 1 + K)`` logits and this is cross-entropy with every label 0 — the
form MoCo's code uses (labels of zeros are not a bug: column 0 *is* the right answer for every row). MoCo (negatives
from a queue), SimCLR (negatives from the batch: NT-Xent) and CPC (negatives from other patches) all use it. Where
InstDisc's NCE asks m binary "data or noise?" questions with an estimated Z, InfoNCE normalises over the K + 1
candidates it actually scores, so it needs no Z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def info_nce_logits(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                    temperature: float) -> torch.Tensor:  # fmt: skip
    """``(N, 1 + K)`` logits: column 0 is ``q . k+ / tau``, then ``q . k_i / tau``.

    ``query`` and ``positive`` are ``(N, d)``; ``negatives`` is ``(K, d)`` (shared by every query, as MoCo's
    queue) or ``(N, K, d)`` (each query its own, as CPC's).
    """
    pos = (query * positive).sum(dim=1, keepdim=True)  # (N, 1)
    if negatives.dim() == 2:
        neg = query @ negatives.T  # (N, K)
    else:
        neg = torch.bmm(negatives, query.unsqueeze(2)).squeeze(2)  # (N, K)
    return torch.cat([pos, neg], dim=1) / temperature


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Mean InfoNCE of ``(N, 1 + K)`` logits whose column 0 holds the positive."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


class InfoNCE(nn.Module):
    """``forward(query (N, d), positive (N, d), negatives (K, d) or (N, K, d)) -> scalar``: eq. of the module doc."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return info_nce(info_nce_logits(query, positive, negatives, self.temperature))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
