"""CPC on images (van den Oord, Li, Vinyals 2018, section 3.3): predict the patches below from the rows above.

One step, for a batch of B images cut into an R x C grid of overlapping patches (:mod:`instdisc_lite.patches`)::

    z_{b,r,c} = g_enc(patch_{b,r,c})                    # (B, R, C, d), unit norm: the config's arch on every patch
    c_{b,r,c} = g_ar(z_{b,<=r,*})                        # (B, R, C, h): a context that sees rows <= r only
    p^k_{b,r,c} = normalise(W_k c_{b,r,c})               # k = 1..K: the prediction of z_{b,r+k,c}, unit norm
    L = mean over (b, r, c, k), r + k < R, of
        -log exp(p^k_{b,r,c} . z_{b,r+k,c} / tau) / sum_{n in all B*R*C patches} exp(p^k_{b,r,c} . z_n / tau)

the InfoNCE of eq. 4 of the paper, with :func:`~instdisc_lite.infonce.info_nce_logits` / ``info_nce``. The
negatives of each prediction are exactly **all the other B*R*C - 1 patch embeddings of the batch**: every other
position of the same image (its other rows and columns, the rows around the target included) and every position
of the other B - 1 images. They are the same (B*R*C, d) matrix for every prediction, so the logits are one matrix
product; the positive's own column among them is masked to -inf (it is column 0 already), so each softmax runs over
exactly 1 + (B*R*C - 1) candidates. Under DDP the negatives are this process's batch only (no gather): CPC has no
replicated buffer, and each rank's loss is the one of its own B images.

Normalisation and temperature: z is unit norm (g_enc is an :class:`~instdisc_lite.models.Encoder`, which
L2-normalises) and so is the prediction p, so the scores are cosines divided by ``config.temperature``, as in the
rest of the family. The paper scores a plain dot product ``exp(z^T W_k c)`` (no normalisation, no tau); on short CPU
runs the free-norm form trained worse (Fashion-MNIST, 2,000 images, 5 epochs: kNN fell below the untrained
network's with raw p and tau = 1, and rose above it with unit p and tau = 0.1), so CPC here is the cosine form;
both CPC configs use tau = 0.1.

The representation (``method.encoder``) is the mean of the R*C patch embeddings, ``(B, d)``, not re-normalised
(the kNN monitor normalises features itself); there is no bank (``method.bank = None``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..infonce import info_nce, info_nce_logits
from ..models import build_encoder
from ..patches import patch_grid
from .base import Method, full_precision


class PatchEncoder(nn.Module):
    """g_enc on every patch of the grid; ``forward`` pools them into the image's representation.

    ``patch_embeddings: (B, ch, H, W) -> (B, R, C, d)``, unit-norm z of each patch;
    ``forward: (B, ch, H, W) -> (B, d)``, their mean over the grid.
    """

    def __init__(self, arch: str, low_dim: int, in_channels: int, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.g_enc = build_encoder(arch, low_dim, in_channels)  # the config's CNN, on patch-sized inputs
        self.patch_size = patch_size
        self.patch_stride = patch_stride

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        patches = patch_grid(images, self.patch_size, self.patch_stride)  # (B, R, C, ch, s, s)
        b, r, c = patches.shape[:3]
        z = self.g_enc(patches.reshape(b * r * c, *patches.shape[3:]))  # one batch of B*R*C patches
        return z.view(b, r, c, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(images).mean(dim=(1, 2))

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, patch_stride={self.patch_stride}"


class RowCausalConv(nn.Conv2d):
    """A ``(kh, kw)`` convolution whose output at row r sees input rows ``r - kh + 1 .. r`` only.

    The masked convolution of PixelCNN, for a mask that keeps whole rows: padding ``kh - 1`` rows on top and none
    below leaves the kernel nothing under the current row to read, so no weights need masking.
    ``(B, h, R, C) -> (B, h, R, C)``.
    """

    def __init__(self, channels: int, kernel: tuple[int, int] = (2, 3)) -> None:
        super().__init__(channels, channels, kernel)
        kh, kw = kernel
        self.causal_pad = (kw // 2, kw // 2, kh - 1, 0)  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_pad))


class RowContext(nn.Module):
    """g_ar: ``(B, R, C, d) -> (B, R, C, h)``, c_{r,c} a function of the rows ``<= r`` of z (all columns in reach).

    Why a masked convolution and not a GRU down each column: the paper's image model is PixelCNN-style (the GRU
    is its audio model). A GRU per column would give c_{r,c} only the patches above in column c; the row-causal
    convolutions here see the rows above across neighbouring columns too (``layers`` x (kh - 1) rows up and
    ``layers`` x (kw // 2) columns either side: with 3 layers of (2, 3) the 3 rows above and the whole width of a
    6 or 7 wide grid), run over all rows at once instead of a loop of R steps, and are cheap on a CPU.
    Residual blocks ``x <- x + relu(conv(x))`` after a 1x1 input projection.
    """

    def __init__(self, in_dim: int, hidden: int, layers: int = 3, kernel: tuple[int, int] = (2, 3)) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, hidden, 1)
        self.blocks = nn.ModuleList(RowCausalConv(hidden, kernel) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.proj(z.permute(0, 3, 1, 2))  # (B, h, R, C)
        for conv in self.blocks:
            x = x + F.relu(conv(x))
        return x.permute(0, 2, 3, 1)  # (B, R, C, h)


def cpc_logits(z: torch.Tensor, context: torch.Tensor, predictors: nn.ModuleList,
               temperature: float) -> torch.Tensor:  # fmt: skip
    """``(Q, 1 + B*R*C)`` InfoNCE logits of every prediction, ``cos(W_k c_{b,r,c}, z_n) / tau``; column 0 the
    positive, then all B*R*C patches with the positive's own column at -inf.

    ``z`` is ``(B, R, C, d)``, ``context`` ``(B, R, C, h)``; ``predictors[k - 1]`` is W_k. The rows of the result are
    the predictions of k = 1, then k = 2, ..., each in (b, r, c) order over ``r < R - k``:
    ``Q = B * C * sum_k (R - k)``.
    """
    b, r, c, d = z.shape
    if len(predictors) >= r:
        raise ValueError(f"prediction_steps={len(predictors)} needs a grid of more than {len(predictors)} rows, "
                         f"got {r} rows: lower prediction_steps or the patch size/stride")  # fmt: skip
    candidates = z.reshape(b * r * c, d)  # patch (b, r, c) is row (b * R + r) * C + c
    position = torch.arange(b * r * c, device=z.device).view(b, r, c)
    queries = [w(context[:, : r - k]).reshape(-1, d) for k, w in enumerate(predictors, 1)]  # W_k c_{b,r,c}
    query = F.normalize(torch.cat(queries), dim=1)  # cosine scores (see the module docstring)
    targets = torch.cat([position[:, k:].reshape(-1) for k in range(1, len(predictors) + 1)])  # z_{b,r+k,c}
    logits = info_nce_logits(query, candidates[targets], candidates, temperature)  # (Q, 1 + B*R*C)
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(len(targets), device=z.device), 1 + targets] = True  # the positive, again, among the negatives
    return logits.masked_fill(own, float("-inf"))


class CPC(Method):
    """Contrastive predictive coding on a patch grid: predict z of the rows below from a row-causal context,
    InfoNCE against every other patch of the batch."""

    name = "cpc"
    negatives = "other positions of the same and other images (all B*R*C - 1 patches of the batch)"
    loss = "InfoNCE"
    num_views = 1

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__(config, num_items, in_channels)
        d = config.low_dim
        self.encoder = PatchEncoder(config.arch, d, in_channels, config.patch_size, config.patch_stride)
        self.context = RowContext(d, d)
        self.predictors = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(config.prediction_steps))
        self.temperature = config.temperature
        self.bank = None

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        z = self.encoder.patch_embeddings(views[0])  # (B, R, C, d)
        context = self.context(z)
        with full_precision(z):  # predictions and logits in fp32 even under autocast
            return info_nce(cpc_logits(z.float(), context.float(), self.predictors, self.temperature))


__all__ = ["CPC", "PatchEncoder", "RowCausalConv", "RowContext", "cpc_logits"]
