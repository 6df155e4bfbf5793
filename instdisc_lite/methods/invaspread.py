"""InvaSpread (Ye et al., CVPR 2019): end to end, negatives from the batch itself, scored by its own instance loss.

No memory bank: the "class weights" of the instances are the batch's own features, computed by the current encoder
in the same step (the paper's point against InstDisc's stale bank rows). For a batch of B images with unit features
f_i (view 0) and f̂_i (view 1, an augmented copy) and temperature tau::

    P(i | x̂_i) = exp(f_i . f̂_i / tau) / sum_k exp(f_k . f̂_i / tau)           the copy is recognised as instance i
    P(i | x_j) = exp(f_i . f_j / tau) / sum_k exp(f_k . f_j / tau),  j != i    x_j is taken for instance i
    J = - sum_i log P(i | x̂_i) - sum_i sum_{j != i} log(1 - P(i | x_j))

with k running over the B view-0 features. The first term makes features invariant to augmentation, the second
spreads the instances apart. ``forward`` returns J / B: the sum over the batch divided by B, so the loss (and the
learning rate it needs) does not grow with the batch; one image contributes one positive term and B - 1 negative ones.

It is not NT-Xent: the negative term is a sum of binary "x_j is not instance i" log-likelihoods, not a softmax over
negatives, and only view 1 is scored against view 0 (no symmetric second order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..models import build_encoder
from .base import Method, full_precision

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Mächler 2012): ``log(-expm1(x))`` near 0, where
    ``1 - exp(x)`` would cancel, and ``log1p(-exp(x))`` below ``-ln 2``, where ``exp(x)`` is small.

    Each branch sees only the inputs it is used for, so neither produces an inf whose zero-weighted gradient would
    turn into NaN.
    """
    near = x > -_LN2
    close = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -_LN2))))
    far = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -_LN2), x)))
    return torch.where(near, close, far)


def invaspread_loss(features: torch.Tensor, augmented: torch.Tensor, temperature: float) -> torch.Tensor:
    """J / B of the module doc for ``features`` f (B, d) and ``augmented`` f̂ (B, d), both unit rows.

    log P is a log-softmax over the B view-0 features and log(1 - P) is taken from it with :func:`log1mexp`: no
    probability is formed and subtracted from 1. (With unit features P(i | x_j) <= 1/2 for j != i, because the
    k = j term exp(f_j . f_j / tau) is the largest in its own denominator, so 1 - P never underflows.)
    """
    dtype = torch.promote_types(features.dtype, torch.float32)  # float16 under autocast -> float32; float64 stays
    f, f_hat = features.to(dtype), augmented.to(dtype)
    b = f.shape[0]
    # row i: the copy x̂_i scored against every instance k; its own instance sits on the diagonal
    positive = F.cross_entropy(f_hat @ f.T / temperature, torch.arange(b, device=f.device), reduction="sum")
    # log_p[j, i] = log P(i | x_j): row j is x_j scored against every instance (the matrix is symmetric in (i, j))
    log_p = torch.log_softmax(f @ f.T / temperature, dim=1)
    # the off-diagonal entries, row by row: row j's k-th is column k + (k >= j). An index gather rather than a boolean
    # mask, whose data-dependent size would make a GPU wait for the host every step
    cols = torch.arange(b - 1, device=f.device).expand(b, b - 1)
    cols = cols + (cols >= torch.arange(b, device=f.device)[:, None])
    negative = -log1mexp(log_p.gather(1, cols)).sum()
    return (positive + negative) / b


class InvaSpread(Method):
    """Invariant and spreading instance features: one encoder, two views, the in-batch loss J / B.

    View 0 is the paper's x_i, view 1 its augmentation x̂_i. The paper writes x_i as the image and x̂_i as its
    augmented copy; its released code (``CIFAR10Instance``) passes *both* through the same random training
    transform. Here both views are independent draws of the training augmentation, as ``data.views`` makes them
    and as that code does: an un-augmented x_i would give the instance "weight" f_i the same centre crop every
    epoch, and the positive term an easier, always-identical target. Both views go through the encoder in one
    pass of 2B images (one set of BatchNorm statistics, as the released code's concatenated batch).

    Under DDP each process scores its own share of the batch: the negatives are that process's B images, not the
    global batch (the loss is per process; gradients are averaged by DDP as usual).
    """

    name = "invaspread"
    negatives = "the batch itself (end to end)"
    loss = "InvaSpread instance loss"
    num_views = 2

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__(config, num_items, in_channels)
        self.encoder = build_encoder(config.arch, config.low_dim, in_channels)
        self.temperature = config.temperature

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        features, augmented = self.encoder(torch.cat(views[:2])).chunk(2)  # (B, low_dim) each, unit norm
        with full_precision(features):
            return invaspread_loss(features.float(), augmented.float(), self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
