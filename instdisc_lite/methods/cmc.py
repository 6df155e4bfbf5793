"""CMC (Tian, Krishnan, Isola 2019): two views of one image, one encoder and one memory bank per view, InstDisc's
NCE across views.

Each augmented image x_i is split into two views (:mod:`instdisc_lite.views`): L and ab of Lab on colour data, a
low- and a high-pass band on grayscale data. With encoders f_1, f_2 and banks V_1, V_2 (one row per image each)::

    z1_i = f_1(view_1(x_i)),  z2_i = f_2(view_2(x_i))                     # (B, d) each, unit norm  -> forward
    L = NCE(z1_i scored against V_2; positive V_2[i], m noise rows of V_2)
      + NCE(z2_i scored against V_1; positive V_1[i], m noise rows of V_1)  # eqs. 3-7 of InstDisc, twice
    V_1[i] <- normalise(mu V_1[i] + (1 - mu) z1_i);  V_2[i] likewise with z2_i  # -> after_step

so the positive of a view-1 feature is the *other* view of the same image, and its noise the other view of random
images; each direction is its own :class:`~instdisc_lite.nce.NCE`, with its own Z (CMC's Z_l and Z_ab).
``objective: softmax`` swaps each NCE for InstDisc's exact non-parametric softmax over the other view's bank (eq. 2;
no Z; still ``nce_1`` / ``nce_2``): the CPU quick config uses it, because NCE collapsed on its small, short runs.

``encoder`` maps an image batch to the L2-normalised concatenation ``[z1, z2] / sqrt(2)`` ``(B, 2d)`` (the paper
evaluates the concatenation of both views' features); ``bank`` is a read-only view of ``[V_1, V_2] / sqrt(2)``
``(n, 2d)`` for the kNN monitor, the same geometry as ``encoder``'s output.

Under DDP the banks are replicated buffers: :meth:`MemoryBank.update` gathers every rank's rows, so each copy
stays identical; Z is averaged over ranks by NCE itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..memory_bank import MemoryBank
from ..models import build_encoder
from ..nce import NCE
from ..nonparametric import NonParametricSoftmax
from ..views import BandSplit, LabSplit, build_view_split
from .base import Method, full_precision
from .instdisc import build_objective

CROSS_VIEW_OBJECTIVES = ("nce", "softmax")


class TwoViewEncoder(nn.Module):
    """Image ``(B, C, H, W)`` -> both views' features: :meth:`encode_views` gives ``(z1, z2)``, ``(B, d)`` each,
    unit norm; ``forward`` gives their normalised concatenation ``(B, 2d)``."""

    def __init__(self, split: LabSplit | BandSplit, view_1: nn.Module, view_2: nn.Module) -> None:
        super().__init__()
        self.split = split
        self.view_1 = view_1
        self.view_2 = view_2

    def encode_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split(images)
        return self.view_1(x1), self.view_2(x2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.encode_views(images)
        # each half has unit norm, so dividing by sqrt(2) makes the concatenation unit norm: a dot product of two
        # such features is the mean of the two views' cosines
        return torch.cat((z1, z2), dim=1) / math.sqrt(2.0)


class ConcatBank:
    """Read-only ``(n, 2d)`` view of two banks, ``[V_1, V_2] / sqrt(2)``: what the kNN monitor reads as ``memory``.

    Not a module and holds no state (the two :class:`MemoryBank` s are the method's buffers); the concatenation
    is built when read, on the banks' device.
    """

    def __init__(self, bank_1: MemoryBank, bank_2: MemoryBank) -> None:
        self.bank_1, self.bank_2 = bank_1, bank_2
        self.num_items = bank_1.num_items
        self.dim = bank_1.dim + bank_2.dim

    @property
    def memory(self) -> torch.Tensor:
        return torch.cat((self.bank_1.memory, self.bank_2.memory), dim=1) / math.sqrt(2.0)

    def __len__(self) -> int:
        return self.num_items

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.bank_1.get(idx), self.bank_2.get(idx)), dim=-1) / math.sqrt(2.0)


class CMC(Method):
    """Contrastive multiview coding with two views: InstDisc's bank + NCE, once per direction across views."""

    name = "cmc"
    negatives = "one memory bank per view"
    loss = "NCE across views"
    # one augmented crop per step: CMC's views are channel groups (L / ab) or bands of that same crop
    num_views = 1
    uses_normalisation = True  # Lab needs the RGB values back: your own images come with their own mean/std

    def __init__(
        self,
        config: TrainConfig,
        num_items: int,
        in_channels: int,
        normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__(config, num_items, in_channels)
        if config.objective not in CROSS_VIEW_OBJECTIVES:
            raise ConfigError(
                f"method 'cmc' scores its views with {' or '.join(CROSS_VIEW_OBJECTIVES)}; got objective "
                f"{config.objective!r}"
            )
        split = build_view_split(config.dataset, in_channels, normalisation)
        c1, c2 = split.channels
        self.view_names = split.names
        # full width per view: build_encoder has no width knob (the paper halves each view's network)
        self.encoder = TwoViewEncoder(
            split,
            build_encoder(config.arch, config.low_dim, c1),
            build_encoder(config.arch, config.low_dim, c2),
        )
        self.bank_1 = MemoryBank(num_items, config.low_dim, config.bank_momentum)
        self.bank_2 = MemoryBank(num_items, config.low_dim, config.bank_momentum)
        self.nce_1 = self._objective(self.bank_2)  # view-1 features against view 2's bank
        self.nce_2 = self._objective(self.bank_1)  # view-2 features against view 1's bank
        self.bank = ConcatBank(self.bank_1, self.bank_2)  # a plain attribute, not a second copy in the state
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _objective(self, bank: MemoryBank) -> NCE | NonParametricSoftmax:
        return build_objective(self.config, bank)  # InstDisc's NCE or exact softmax (checked above), over ``bank``

    def forward(
        self,
        views: list[torch.Tensor],
        indices: torch.Tensor,
        noise_indices: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scalar ``L = NCE_1(z1 | V_2) + NCE_2(z2 | V_1)`` of ``views[0]`` ``(B, C, H, W)``, ``indices`` ``(B,)``.

        ``noise_indices``: optional fixed noise ``(for NCE_1 over V_2, for NCE_2 over V_1)``, each ``(B, m)`` or
        ``(m,)`` (tests); drawn uniformly otherwise.
        """
        z1, z2 = self.encoder.encode_views(views[0])  # (B, d) each, unit norm
        self._step = (indices, z1.detach(), z2.detach())
        z1, z2 = z1.float(), z2.float()
        with full_precision(z1):  # scores against the banks in fp32 even under autocast (tau = 0.07)
            if not isinstance(self.nce_1, NCE):  # the exact softmax: no noise to draw
                return self.nce_1(z1, indices) + self.nce_2(z2, indices)
            noise_1, noise_2 = noise_indices if noise_indices is not None else (None, None)
            return self.nce_1(z1, indices, noise_indices=noise_1) + self.nce_2(z2, indices, noise_indices=noise_2)

    @torch.no_grad()
    def after_step(self) -> None:
        indices, z1, z2 = self._step
        self.bank_1.update(indices, z1.float())  # each bank with its own view's features
        self.bank_2.update(indices, z2.float())
        self._step = None

    def epoch_stats(self) -> dict[str, Any]:
        """Both Z: ``z_<view>`` is the Z of the NCE that scores that view's features (against the other bank)."""
        if not isinstance(self.nce_1, NCE):
            return {}
        return {f"z_{self.view_names[0]}": self.nce_1.z.item(), f"z_{self.view_names[1]}": self.nce_2.z.item()}

    def initialise(self, features_of: Any) -> None:
        if self.config.bank_init == "features":
            features = features_of(self.encoder)  # (n, 2d): [z1, z2] / sqrt(2)
            d = self.bank_1.dim
            self.bank_1.fill(features[:, :d])  # fill re-normalises each half
            self.bank_2.fill(features[:, d:])
