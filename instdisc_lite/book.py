"""Support for the book's notebooks: one switch between quick (CPU) and full (GPU) mode.

``INSTDISC_BOOK_MODE`` chooses: ``quick`` (real Fashion-MNIST, small subsets, a few minutes per
chapter on a CPU), ``full`` (paper-scale data and epochs) or ``auto`` (the default: full when a GPU
is present, quick otherwise). Every chapter calls :func:`book_mode` once and prints what it chose, so
the reader always knows which mode produced the figures on the page.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TypeVar

import torch

from .train import select_device

T = TypeVar("T")
MODES = ("quick", "full", "auto")


@dataclass(frozen=True)
class BookMode:
    name: str  # "quick" or "full"
    device: torch.device
    on_colab: bool

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def pick(self, quick: T, full: T) -> T:
        """The value for this mode: ``MODE.pick(quick=2, full=200)``."""
        return quick if self.quick else full

    def __str__(self) -> str:
        where = "Colab" if self.on_colab else "local"
        return f"{self.name} mode on {self.device} ({where})"


def on_colab() -> bool:
    return "google.colab" in sys.modules


def book_mode(mode: str | None = None) -> BookMode:
    """Resolve the mode from ``mode`` or ``$INSTDISC_BOOK_MODE`` (quick | full | auto)."""
    name = (mode or os.environ.get("INSTDISC_BOOK_MODE", "auto")).lower()
    if name not in MODES:
        raise ValueError(f"INSTDISC_BOOK_MODE must be one of {', '.join(MODES)}, got {name!r}")
    device = select_device("auto")
    if name == "auto":
        name = "full" if device.type == "cuda" else "quick"
    return BookMode(name=name, device=device, on_colab=on_colab())
