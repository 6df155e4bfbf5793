"""SimCLR (Chen et al. 2020): InvaSpread's end-to-end recipe with a projection head and NT-Xent.

Two augmented views of each of the B images give 2B representations h = f(x) (the backbone, no final Linear) and
projections z = g(h) / |g(h)| through a two-layer MLP head g. With cosine similarity sim and temperature tau, every
view i has one positive (the other view j of its image) and 2B - 2 negatives (every other view in the batch)::

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
    L = 1 / 2B * sum over the B pairs (i, j) of [ l(i, j) + l(j, i) ]

That is InfoNCE (``instdisc_lite.infonce``) with the positive in column 0 and per-query negatives: here the
``(2B, 1 + 2B - 2)`` logits are cut out of one ``(2B, 2B)`` similarity matrix rather than gathered as
``(2B, 2B - 2, d)`` negative vectors (the same numbers, without the copies).

The head is used for the loss only: ``encoder`` is the backbone, whose h the paper evaluates (the linear probe on h
beats the one on g(h) by over 10 points in its Fig. 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..infonce import info_nce
from ..models import build_backbone
from .base import Method, full_precision


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(2B, 1 + 2B - 2)`` InfoNCE logits of the 2B views ``cat(z1, z2)`` (unit rows, ``(B, d)`` each).

    Row i is view i: column 0 holds sim(z_i, z_partner) / tau, the rest sim(z_i, z_k) / tau for the 2B - 2 views k
    that are neither i nor its partner, in their batch order. Row i and row i + B are the two orders of pair i.
    """
    z = torch.cat([z1, z2])  # (2B, d)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # float16 under autocast -> float32; float64 stays
    n, b = z.shape[0], z1.shape[0]
    sim = z @ z.T / temperature  # (2B, 2B): cosine, since the rows are unit vectors
    partner = torch.arange(n, device=z.device).roll(b)  # view i's positive: i + B for the first half, i - B after
    positive = sim.gather(1, partner[:, None])  # (2B, 1)
    # Row i's negatives are the columns other than i (k = i is not in the denominator) and its partner (column 0),
    # in order: the k-th is k, shifted past the smaller excluded column, then past the larger. An index gather, not
    # a boolean mask, whose data-dependent size would make a GPU wait for the host every step.
    rows = torch.arange(n, device=z.device)
    low, high = torch.minimum(rows, partner)[:, None], torch.maximum(rows, partner)[:, None]
    cols = torch.arange(n - 2, device=z.device).expand(n, n - 2)
    cols = cols + (cols >= low)
    cols = cols + (cols >= high)
    return torch.cat([positive, sim.gather(1, cols)], dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the module doc: the mean of l(i, j) over all 2B anchors (both orders of every pair)."""
    return info_nce(nt_xent_logits(z1, z2, temperature))


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """g: Linear(in_dim, hidden_dim) -> ReLU -> Linear(hidden_dim, out_dim), the paper's two-layer MLP head."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SimCLR(Method):
    """A simple framework for contrastive learning: backbone f, MLP head g, NT-Xent over the 2B views.

    ``encoder`` outputs h, ``(B, feature_dim)`` (256 for ``small_cnn``, 512 for the ResNet18s, 2048 for ResNet50),
    *not* L2-normalised: the paper's linear probe reads raw h, the package's probe standardises its inputs, and the
    kNN evaluation normalises features itself, so normalising here would only hide h's scale from the probe. The
    head's hidden width is ``head_hidden_dim`` (None: feature_dim, as the paper's) and its output ``low_dim``
    (the paper's 128). Both views go through the backbone in one pass of 2B images, so BatchNorm normalises over
    every view of the batch.

    Under DDP each process scores its own share: the 2B - 2 negatives of a view are that process's views, not the
    global batch's (the paper gathers them across its TPU cores; here the loss is per process, DDP averages the
    gradients). The paper's global BatchNorm, which keeps a process from finding its positives through batch
    statistics, is ``sync_bn: true``.
    """

    name = "simclr"
    negatives = "the batch itself (end to end)"
    loss = "InfoNCE (NT-Xent)"
    num_views = 2

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__(config, num_items, in_channels)
        self.encoder, self.feature_dim = build_backbone(config.arch, in_channels)  # h = f(x)
        self.head = projection_head(self.feature_dim, config.head_hidden_dim or self.feature_dim, config.low_dim)
        self.temperature = config.temperature

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """z = g(f(x)) / |g(f(x))|: ``(B, C, H, W) -> (B, low_dim)``, unit rows."""
        return F.normalize(self.head(self.encoder(images)).float(), dim=1)

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.project(torch.cat(views[:2])).chunk(2)  # (B, low_dim) each
        with full_precision(z1):
            return nt_xent(z1.float(), z2.float(), self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, temperature={self.temperature}"
