"""The one interface every method implements, so the trainer stays one loop.

A training step of any method in the family is::

    views = data.views(images, method.num_views)   # augmented views of the batch, on the training device
    loss = method(views, indices)                   # the method's loss (the module DDP wraps)
    loss.backward(); optimizer.step()
    method.after_step()                             # what is updated outside the gradient

What differs between methods is only *where the negatives come from* (a memory bank, the batch itself, a queue
filled by a momentum encoder, other positions of the same image) and *which loss scores them* (NCE, the
non-parametric softmax, InfoNCE, InvaSpread's instance loss). Each method says both in ``negatives`` and ``loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TrainConfig
from ..memory_bank import MemoryBank


@contextlib.contextmanager
def full_precision(like: torch.Tensor) -> Iterator[None]:
    """Leave mixed precision for the block: losses over a bank or a queue are computed in fp32 (logits divided by
    a temperature of 0.07 lose too much in fp16). The trainer runs a method's forward under autocast on CUDA."""
    with torch.autocast(like.device.type, enabled=False):
        yield


class Method(nn.Module):
    """Base class of a self-supervised method.

    Subclasses set ``name``, ``negatives``, ``loss`` and ``num_views``, build their modules in ``__init__`` and
    implement :meth:`forward`. The trainer reads:

    * ``encoder``: the network whose features are evaluated (kNN, linear probe): ``(B, C, H, W) -> (B, d)``.
      For methods with a projection head it is the representation *before* the head, as their papers evaluate.
    * ``bank``: the memory bank the kNN monitor can score against during training, or ``None`` (the monitor then
      recomputes the training features).
    * :meth:`after_step`, :meth:`epoch_stats`, :meth:`initialise`.

    A method's whole state (encoders, heads, banks, queues, Z) is its ``state_dict``; checkpoints store it.
    """

    name: ClassVar[str]
    negatives: ClassVar[str]  # where the negatives come from
    loss: ClassVar[str]  # which loss scores them
    num_views: ClassVar[int] = 1  # augmented views of each image a step needs
    # True for a method whose views undo the pipeline's per-channel normalisation (CMC's Lab): its constructor then
    # takes ``normalisation=(mean, std)`` from build_method
    uses_normalisation: ClassVar[bool] = False

    def __init__(self, config: TrainConfig, num_items: int, in_channels: int) -> None:
        super().__init__()
        self.config = config
        self.num_items = num_items
        self.in_channels = in_channels
        self.bank: MemoryBank | None = None  # subclasses with a bank assign it (a registered submodule then)

    encoder: nn.Module  # subclasses assign it in __init__

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        """Scalar loss of a batch: ``views`` is ``num_views`` tensors ``(B, C, H, W)``, ``indices`` ``(B,)``."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Updates outside the gradient, after the optimiser step (a bank row, a momentum encoder, a queue)."""

    def epoch_stats(self) -> dict[str, Any]:
        """Per-epoch figures for ``metrics.jsonl`` (e.g. NCE's Z)."""
        return {}

    def initialise(self, features_of: Any) -> None:
        """Called once before the first step of a new run (not on resume). ``features_of(encoder)`` returns the
        ``(num_items, d)`` features of every un-augmented training image, in train mode; InstDisc uses it to fill
        its bank when ``bank_init: features``."""

    def extra_repr(self) -> str:
        return f"negatives={self.negatives!r}, loss={self.loss!r}, num_views={self.num_views}"
