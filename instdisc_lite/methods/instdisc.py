"""InstDisc (Wu et al. 2018): negatives from a memory bank, scored by NCE or the non-parametric softmax.

The step the paper describes, in four lines (the middle two are the trainer's)::

    features = encoder(view)                    # (B, d), unit norm                      -> forward
    loss = objective(features, indices)         # NCE / softmax over the bank (+ proximal)
    loss.backward(); optimizer.step()           #                                         (the trainer)
    bank.update(indices, features.detach())     # v_i <- normalise(mu v_i + (1 - mu) f_i)  -> after_step

``objective: parametric`` swaps the bank for the n-way classifier of eq. 1, the baseline the paper argues against
(the bank is still kept, for the kNN monitor); ``objective: cosine`` is the same classifier with unit-length
weights at the config's temperature, eq. 2 with learned weights in place of stored features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..memory_bank import MemoryBank
from ..models import build_encoder
from ..nce import NCE
from ..nonparametric import NonParametricSoftmax
from ..parametric import ParametricSoftmax
from .base import Method, full_precision

OBJECTIVES = ("nce", "softmax", "parametric", "cosine")


def build_objective(config: TrainConfig, bank: MemoryBank) -> nn.Module:
    """The loss named by ``config.objective``, reading ``bank`` where it needs one."""
    if config.objective == "nce":
        return NCE(
            bank,
            num_negatives=config.num_negatives,
            temperature=config.temperature,
            z_mode=config.z_mode,
            z_momentum=config.z_momentum,
            shared_negatives=config.shared_negatives,
            proximal=config.proximal,
        )
    if config.objective == "softmax":
        return NonParametricSoftmax(bank, temperature=config.temperature, proximal=config.proximal)
    if config.objective == "parametric":
        return ParametricSoftmax(config.low_dim, bank.num_items)  # eq. 1: raw weights, no temperature
    if config.objective == "cosine":  # the fair parametric arm: unit weights at the bank's temperature
        return ParametricSoftmax(config.low_dim, bank.num_items, temperature=config.temperature, normalize=True)
    raise ConfigError(f"unknown objective {config.objective!r}; choose one of: {', '.join(OBJECTIVES)}")


class InstDisc(Method):
    """Non-parametric instance discrimination: one encoder, one bank row per image, NCE (eqs. 3-7) or the exact
    softmax (eq. 2) over the bank."""

    name = "instdisc"
    negatives = "memory bank"
    loss = "NCE / non-parametric softmax"
    num_views = 1

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__(config, num_items, in_channels)
        self.encoder = build_encoder(config.arch, config.low_dim, in_channels)
        self.bank = MemoryBank(num_items, config.low_dim, config.bank_momentum)
        self.objective = build_objective(config, self.bank)
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        features = self.encoder(views[0])  # (B, d), unit norm
        self._step = (indices, features.detach())
        with full_precision(features):
            # NCE / softmax over the bank (+ proximal term)
            return self.objective(features.float(), indices)

    @torch.no_grad()
    def after_step(self) -> None:
        indices, features = self._step
        self.bank.update(indices, features.float())  # the explicit bank step
        self._step = None

    def epoch_stats(self) -> dict[str, Any]:
        return {"z": self.objective.z.item()} if isinstance(self.objective, NCE) else {}

    def initialise(self, features_of: Any) -> None:
        if self.config.bank_init == "features":  # the first epoch's positives are then not random vectors
            self.bank.fill(features_of(self.encoder))
