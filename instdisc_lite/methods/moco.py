"""MoCo v1 (He et al., CVPR 2020): negatives from a FIFO queue of keys encoded by a momentum encoder.

A step, in the order this module runs it (the middle line is the trainer's)::

    q = f_q(view 0)                          # (B, d) queries, unit norm, with gradient        -> forward
    k = f_k(view 1)                          # (B, d) positive keys, no gradient (train-mode BN)
    L = InfoNCE(q, k, queue, tau)            # (B, 1 + K) logits, positive in column 0, labels 0
    L.backward(); optimizer.step()           # theta_q only                                     (the trainer)
    theta_k <- m theta_k + (1 - m) theta_q   # the momentum encoder                             -> after_step
    queue.enqueue(k)                         # the keys replace the K oldest ones' slots

With the positive in column 0, for one query (the paper's eq. 1, i = 0 being k+)::

    L_q = -log( exp(q . k+ / tau) / sum_{i=0..K} exp(q . k_i / tau) )

Where the momentum update happens. The official code (``moco/builder.py``) updates theta_k at the start of
``forward``, before computing the keys; our interface has no hook before the forward, so we update in
``after_step``, after the optimiser step. The two orders give the same keys at every step. Write theta_q^t for the
query weights after t optimiser steps and kappa_t for the key weights the keys of step t are computed with
(t = 1, 2, ...). Official: kappa_t = m kappa_{t-1} + (1 - m) theta_q^{t-1} with kappa_0 = theta_q^0, so kappa_1 =
theta_q^0 and kappa_{t+1} = m kappa_t + (1 - m) theta_q^t. Ours: the keys of step 1 use the initial copy, theta_q^0,
and the ``after_step`` of step t computes m kappa_t + (1 - m) theta_q^t from the weights *after* step t's optimiser
step, which is exactly the official kappa_{t+1}, used by step t + 1's keys. Same start, same recursion. Two
differences, neither in the keys: (1) the official first update, m theta + (1 - m) theta, is the identity in exact
arithmetic but may round by an ulp in float32, which we skip; (2) our checkpoint after step T holds kappa_{T+1}
(the update the official code would do at the start of step T + 1), so a resumed run continues the same sequence.
``tests/test_method_moco.py`` pins the order against a transcription of the official loop.

BN buffers of the key encoder. The official momentum update runs over ``encoder_k.parameters()`` only: the key
encoder's BN running mean/var are neither copied from the query encoder nor momentum-averaged, they are the key
encoder's own running averages over the key batches it sees (in train mode). We do the same. They are never used
by the loss (train-mode BN normalises with the batch's statistics) nor by evaluation (which uses ``encoder``, f_q).

Shuffling BN, and what this version does instead. With BN, every key in a batch is normalised with statistics
of the batch it was computed in. The positive k+ is the only key of the *current* batch among the candidates (the
K negatives come from the queue, i.e. from past batches), and the query was normalised with statistics of the same
images, so batch statistics leak which candidate is the positive: the network can lower the loss by reading that
signature instead of learning good features (this is our reading of it; the paper reports that without the shuffle
the model "cheats" the pretext task: the loss drops fast and the representation suffers).
MoCo breaks the leak with *shuffling BN*: across GPUs the key batch is shuffled before the key encoder and
unshuffled after, so a query and its positive key are normalised over different subsets of the batch. This version
does **nothing** about it: on one device (and per process under DDP) the query and key batches hold the same
images, each normalised over the whole (per-process) batch. SyncBatchNorm (``sync_bn``) should not remove it
either: it makes both statistics global, still over the same images (our reasoning, not measured). Expect the leak
to cost some accuracy relative to the paper's recipe on long runs.

Distributed (DDP): the loss is per process (each rank's queries against its own positives and the shared queue);
the queue is replicated and kept identical on every rank by gathering the keys of all ranks before enqueueing;
theta_k stays identical because theta_q is (DDP averages the gradients) and the update is deterministic.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .. import distributed
from ..config import ConfigError, TrainConfig
from ..infonce import info_nce, info_nce_logits
from ..models import build_encoder
from ..queue import KeyQueue
from .base import Method, full_precision


@torch.no_grad()
def momentum_update(key_encoder: torch.nn.Module, query_encoder: torch.nn.Module, momentum: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q over the *parameters* (buffers untouched, as the official code)."""
    for p_k, p_q in zip(key_encoder.parameters(), query_encoder.parameters(), strict=True):
        p_k.copy_(p_k * momentum + p_q.detach() * (1.0 - momentum))


class MoCo(Method):
    """Momentum Contrast: query encoder ``encoder`` (trained, evaluated), key encoder ``key_encoder`` (a frozen
    momentum copy, in the state_dict, not in the optimiser) and a :class:`~instdisc_lite.queue.KeyQueue` of
    ``config.queue_size`` negatives; InfoNCE at ``config.temperature``, momentum ``config.key_momentum``."""

    name = "moco"
    negatives = "FIFO queue of keys from a momentum encoder"
    loss = "InfoNCE"
    num_views = 2

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__(config, num_items, in_channels)
        world = distributed.world_size()
        if config.batch_size * world > config.queue_size:
            raise ConfigError(
                f"moco: the global batch ({world} x batch_size {config.batch_size}) is larger than queue_size "
                f"{config.queue_size}; each step enqueues a whole batch of keys: raise queue_size or lower batch_size"
            )
        self.encoder = build_encoder(config.arch, config.low_dim, in_channels)  # f_q
        self.key_encoder = copy.deepcopy(self.encoder)  # f_k: theta_k = theta_q at the start (buffers too)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)  # updated by momentum only, so the trainer leaves it out of the optimiser
        self.queue = KeyQueue(config.queue_size, config.low_dim)
        self.temperature = config.temperature
        self.key_momentum = config.key_momentum
        self._keys: torch.Tensor | None = None  # this step's keys, enqueued in after_step
        self._owners: torch.Tensor | None = None  # and the indices of their images

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        q = self.encoder(views[0])  # (B, d), unit norm
        with torch.no_grad():
            k = self.key_encoder(views[1])  # (B, d); BN in the module's mode (train during training), as official
        self._keys, self._owners = k.detach(), indices
        with full_precision(q):  # (B, 1 + K) logits [q.k+, q.queue] / tau, in fp32 even under autocast
            logits = info_nce_logits(q.float(), k.float(), self.queue.get().float(), self.temperature)
            return info_nce(logits)  # cross-entropy with labels 0: column 0 is the positive

    @torch.no_grad()
    def after_step(self) -> None:
        if self._keys is None:  # no forward since the last update
            return
        momentum_update(self.key_encoder, self.encoder, self.key_momentum)  # kappa_{t+1}: see the module doc
        self.queue.enqueue(self._keys, self._owners)  # after the loss read the queue: never its own negatives
        self._keys = self._owners = None

    def epoch_stats(self) -> dict[str, Any]:
        """``key_lag`` = ||theta_k - theta_q|| / ||theta_q||: how far the key encoder trails (0 = a copy)."""
        with torch.no_grad():
            diff = sum(((pk.float() - pq.float()) ** 2).sum() for pk, pq in self._pairs())
            norm = sum((pq.float() ** 2).sum() for _, pq in self._pairs())
        return {"key_lag": (diff / norm).sqrt().item()}

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.key_encoder.parameters(), self.encoder.parameters(), strict=True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, key_momentum={self.key_momentum}"
