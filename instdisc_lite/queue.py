"""MoCo's dictionary: a FIFO queue of the K most recent keys (He et al. 2020, Sec. 3.2).

The queue is *not* a parameter. The loss reads it as K negatives shared by every query; after the optimiser step
the batch's keys are written over the oldest K entries' slots (``enqueue``), so the dictionary is always the keys of
the last ``K / B`` batches, all encoded by a slowly moving key encoder. Compare :class:`~.memory_bank.MemoryBank`:
one row per *image*, refreshed when that image comes round again (an epoch later); here one row per *recent key*,
whatever image it came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed


class KeyQueue(nn.Module):
    """A ``(K, dim)`` buffer of unit rows (random-unit initialised, like the official code) and a write pointer.

    Args:
        size: K, the number of keys kept (65536 in the paper on ImageNet, 4096 in CIFAR follow-ups).
        dim: d, the key dimension (128).
        generator: optional RNG for the random initialisation.

    The buffers are in ``state_dict``: a resumed run continues with the same keys *and* the same next slot. Beside
    the keys the queue records whose they are: ``owners[j]`` is the dataset index of the image key j was computed
    from (-1 for the random initial keys) and ``written_at[j]`` the ``updates`` count (enqueues so far) when it was
    written, so :meth:`age` gives each key's age in steps (chapter 8 measures how consistent old keys are).
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"KeyQueue needs size > 0 and dim > 0, got {size} x {dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # the slot the next key goes to (the oldest)
        self.register_buffer("owners", torch.full((size,), -1, dtype=torch.long))  # image index of each key
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # enqueues so far (training steps)
        self.register_buffer("written_at", torch.zeros(size, dtype=torch.long))  # `updates` when each key came in

    def __len__(self) -> int:
        return self.size

    def get(self) -> torch.Tensor:
        """The ``(K, dim)`` keys as negatives; no gradient flows into the queue."""
        return self.keys.detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, owners: torch.Tensor | None = None) -> None:
        """Write ``keys`` ``(B, dim)`` into the B oldest slots, in order, and advance the pointer by B (mod K).
        ``owners`` ``(B,)``: the dataset indices of the keys' images (bookkeeping only; -1 when not given).

        The slots are ``ptr, ptr + 1, ..., ptr + B - 1`` modulo K, so a batch that runs past the end of the buffer
        continues at row 0: any B <= K works (the official code asserts ``K % B == 0`` instead, which rules out an
        uneven last batch or a K that is not a multiple of the batch). B > K is an error: the batch would overwrite
        its own keys.

        In a distributed run the keys of all ranks are gathered first (in rank order, ranks may hold different B_r),
        so every rank enqueues the same ``(sum_r B_r, dim)`` keys and its queue stays identical to the others'.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"enqueue expects keys of shape (B, {self.dim}), got {tuple(keys.shape)}")
        if owners is None:
            owners = torch.full((keys.shape[0],), -1, dtype=torch.long)
        if owners.shape != keys.shape[:1]:
            raise ValueError(f"enqueue expects owners of shape ({keys.shape[0]},), got {tuple(owners.shape)}")
        keys = distributed.all_gather_varlen(keys.detach().to(self.keys))
        owners = distributed.all_gather_varlen(owners.to(self.owners))
        b = keys.shape[0]
        if b > self.size:
            raise ValueError(
                f"cannot enqueue {b} keys into a queue of {self.size}: the batch (gathered over "
                f"{distributed.world_size()} process(es)) must not exceed queue_size"
            )
        slots = (self.ptr + torch.arange(b, device=self.keys.device)) % self.size  # wraps past the end
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + b) % self.size)
        self.updates += 1
        self.owners[slots] = owners
        self.written_at[slots] = self.updates

    def age(self) -> torch.Tensor:
        """``(K,)`` enqueues since each key was written: 0 for the last batch's keys."""
        return self.updates - self.written_at

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
