"""The memory bank V: one unit-norm feature per training image (paper Sec. 3.1).

The bank is *not* a parameter. Objectives read it; the trainer writes it with an explicit
:meth:`MemoryBank.update` after each optimiser step, so the update is a visible step of the loop,
never a side effect hidden in a custom backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed


class MemoryBank(nn.Module):
    """An ``(num_items, dim)`` buffer of L2-normalised rows, random-unit initialised.

    Args:
        num_items: n, the number of training images (one row each).
        dim: d, the feature dimension (128 in the paper).
        momentum: mu in ``v_i <- normalise(mu * v_i + (1 - mu) * f_i)``; 0.5 in the official code.
            ``momentum=0`` replaces rows with the newest features.
        generator: optional RNG for the random initialisation (reproducible banks).

    The bank is a registered buffer: it moves with ``.to(device)`` and is saved in ``state_dict``. So is its
    bookkeeping of *staleness*: ``updates`` counts the calls to :meth:`update` (training steps) and
    ``written_at[i]`` is the value it had when row i was last written (0 for the initial rows), so
    :meth:`age` says how many steps old each stored feature is (MoCo's argument against banks, chapter 8).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_items <= 0 or dim <= 0:
            raise ValueError(f"MemoryBank needs num_items > 0 and dim > 0, got {num_items} x {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        self.num_items = num_items
        self.dim = dim
        self.momentum = momentum
        init = torch.randn(num_items, dim, generator=generator)
        self.register_buffer("memory", F.normalize(init, dim=1))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # steps that wrote the bank
        self.register_buffer("written_at", torch.zeros(num_items, dtype=torch.long))  # `updates` at each row's write

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, idx: torch.Tensor | int | slice) -> torch.Tensor:
        return self.memory[idx]

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of the bank, shape ``idx.shape + (dim,)``; no gradient flows into the bank."""
        # index_select copies whole rows; advanced indexing (memory[idx]) is several times slower on the CPU
        rows = self.memory.index_select(0, idx.reshape(-1))
        return rows.view(*idx.shape, self.dim).detach()

    @torch.no_grad()
    def update(self, idx: torch.Tensor, features: torch.Tensor) -> None:
        """Momentum update ``v_i <- normalise(mu * v_i + (1 - mu) * f_i)`` for the rows ``idx``.

        Args:
            idx: ``(B,)`` long tensor of dataset indices.
            features: ``(B, dim)`` current features of those images (detached here).

        When an index repeats within a batch (two crops of one image, or a sampler with
        replacement) the repeated features are averaged first and the row is updated once, so the
        result does not depend on the order of the batch.

        In a distributed run, indices and features of all ranks are gathered first (in rank order), so
        every replica of the bank applies the same update. Ranks may hold different batch sizes B_r
        (an uneven last batch): the update is then that of the ``(sum_r B_r,)`` concatenation.
        """
        if features.shape != (idx.shape[0], self.dim):  # checked before gathering: the error names this rank's batch
            raise ValueError(
                f"bank.update expects features of shape ({idx.shape[0]}, {self.dim}), got {tuple(features.shape)}"
            )
        idx = distributed.all_gather_varlen(idx.to(self.memory.device))
        features = distributed.all_gather_varlen(features.detach().to(self.memory))
        # Average repeated indices without torch.unique, whose data-dependent size would make a GPU wait for the
        # host every step: sort (stably, so repeats are summed in batch order), number the runs of equal indices,
        # sum each run into its slot of a (B, d) buffer, and give every member of a run its run's mean. Repeats
        # then write the same row with the same value; a batch without repeats gets its own features back exactly.
        idx, order = torch.sort(idx, stable=True)
        features = features[order]
        starts = torch.ones_like(idx, dtype=torch.bool)
        starts[1:] = idx[1:] != idx[:-1]
        run = torch.cumsum(starts, 0) - 1  # (B,) the run of equal indices each position belongs to
        summed = torch.zeros_like(features).index_add_(0, run, features)
        counts = torch.zeros(idx.shape[0], dtype=features.dtype, device=features.device)
        counts.index_add_(0, run, torch.ones_like(counts))
        features = summed[run] / counts[run, None]
        mixed = self.memory[idx] * self.momentum + features * (1.0 - self.momentum)
        self.memory[idx] = F.normalize(mixed, dim=1)
        self.updates += 1
        self.written_at[idx] = self.updates

    def age(self) -> torch.Tensor:
        """``(num_items,)`` steps since each row was last written: 0 for the rows of the last update; a row
        never written since the start (or the last :meth:`fill`) has the age of the bank."""
        return self.updates - self.written_at

    @torch.no_grad()
    def fill(self, features: torch.Tensor) -> None:
        """Overwrite the whole bank with ``(num_items, dim)`` features (normalised)."""
        if features.shape != self.memory.shape:
            raise ValueError(f"fill expects shape {tuple(self.memory.shape)}, got {tuple(features.shape)}")
        self.memory.copy_(F.normalize(features.to(self.memory), dim=1))
        self.written_at.fill_(int(self.updates))  # every row is fresh

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, dim={self.dim}, momentum={self.momentum}"
