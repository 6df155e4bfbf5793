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
from importlib import resources
from typing import Any, TypeVar

import torch
import yaml

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


def paper_results() -> dict[str, Any]:
    """The figures reported for InstDisc, parsed from the package's ``paper_results.yaml``.

    Chapters quote reported numbers from here rather than typing them. The result maps a group name
    (``cifar10_resnet18``, ``imagenet_released_models``, ...) to a dict with ``description``, ``source``
    (where the figures were reported), ``source_kind`` (``paper``, ``README`` or ``issue``), ``unchecked``
    (True when the figures could not be checked against the paper itself, which the chapter must then say),
    ``unit`` and ``figures`` (the numbers, keyed by setting and metric). For example
    ``paper_results()["cifar10_resnet18"]["figures"]["nce_m4096"]["knn"]`` is the paper's kNN top-1 for NCE
    with 4096 negatives. A fresh dict is returned on every call, so callers may modify it.
    """
    text = resources.files(__package__).joinpath("paper_results.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)
