"""Support for the book's notebooks: one switch between quick (CPU) and full (GPU) mode.

``INSTDISC_BOOK_MODE`` chooses: ``quick`` (real Fashion-MNIST, small subsets, a few minutes per
chapter on a CPU), ``full`` (paper-scale data and epochs) or ``auto`` (the default: full when a GPU
is present, quick otherwise). Every chapter calls :func:`book_mode` once and prints what it chose, so
the reader always knows which mode produced the figures on the page.

``INSTDISC_BOOK_SMOKE=1`` (with full mode) is CI's check of the full-mode code path on a CPU: every chapter
runs its full-mode cells (CIFAR-10 configs, ResNet18, the full-mode branches) on a small generated CIFAR-10,
with each training run capped by :meth:`BookMode.capped` to :data:`SMOKE_CAP` and the claims about learning
skipped, since two epochs on random images prove nothing. Readers never set it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from . import reproduce
from .config import TrainConfig, load_config
from .train import select_device

T = TypeVar("T")
MODES = ("quick", "full", "auto")
# A smoke run's cap on every training run's config overrides: two epochs of one batch of the paper's 128 (two, so
# that per-epoch quantities such as the bank's change between epochs exist).
SMOKE_CAP: dict[str, Any] = {"epochs": 2, "train_subset": 128, "eval_subset": 100}


@dataclass(frozen=True)
class BookMode:
    name: str  # "quick" or "full"
    device: torch.device
    on_colab: bool
    smoke: bool = False  # CI's capped run of full mode on a CPU (INSTDISC_BOOK_SMOKE=1)

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def pick(self, quick: T, full: T) -> T:
        """The value for this mode: ``MODE.pick(quick=2, full=200)``."""
        return quick if self.quick else full

    def capped(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``overrides`` for a training run, unchanged except in a smoke run, where :data:`SMOKE_CAP` bounds them."""
        if not self.smoke:
            return overrides
        capped = dict(overrides)
        for key, limit in SMOKE_CAP.items():
            value = capped.get(key)  # absent or None (all the data) -> the cap
            capped[key] = limit if value is None else min(value, limit)
        return capped

    def __str__(self) -> str:
        where = "Colab" if self.on_colab else "local"
        smoke = ", smoke run: training capped, claims skipped" if self.smoke else ""
        return f"{self.name} mode on {self.device} ({where}{smoke})"


# Training images of each dataset (the default of a config without train_subset).
TRAIN_IMAGES = {"fashion_mnist": 60_000, "cifar10": 50_000, "imagenet": 1_281_167}


def shortened(base: TrainConfig, images: int, **sizes: Any) -> dict[str, Any]:
    """Overrides that train ``base`` on its first ``images`` images, plus ``sizes``.

    NCE's noise samples are cut in proportion, so the ratio m/n of noise samples to bank
    entries stays that of ``base``: the posterior h = P(i|v) / (P(i|v) + m/n) of eq. (5)
    weighs model against noise through m/n. (Printed in the book: lines kept short.)
    """
    n_all = base.train_subset or TRAIN_IMAGES[base.dataset]
    n = min(n_all, images)
    m = max(1, round(base.num_negatives * n / n_all))
    return {"train_subset": n, "num_negatives": m, **sizes}


def training_run_config(mode: BookMode, out_dir: str | Path) -> TrainConfig:
    """The run chapter 5 trains and chapter 6 evaluates (the same config, so chapter 6 can reuse its checkpoint).

    Quick mode: ``fashion_mnist_quick`` on 8,000 images for 6 epochs (about a minute on two cores). Full mode:
    ``cifar10_resnet18`` as shipped, the paper's 200 epochs.
    """
    name = mode.pick(quick="fashion_mnist_quick", full="cifar10_resnet18")
    base = load_config(name)
    sizes = shortened(base, 8000, epochs=min(base.epochs, 6), eval_subset=2000) if mode.quick else {}
    overrides = {**mode.capped(sizes), "name": f"ch5_{base.dataset}", "out_dir": str(out_dir), "progress": False}
    return load_config(name, overrides)


def results_dir() -> Path:
    """The repository's ``results/``: chapters run from the repository root or from ``book/``, so it is looked for
    in both places. An installed package (on Colab) has none: then ``results`` (absent) is returned."""
    return next((d for d in (Path("results"), Path("../results")) if d.is_dir()), Path("results"))


def results_files(pattern: str) -> list[Path]:
    """The repository's benchmark results matching ``pattern`` (e.g. ``"quality.json"``), sorted; an empty list
    where there is no ``results/`` (see :func:`results_dir`)."""
    return sorted(results_dir().glob(pattern))


@dataclass(frozen=True)
class StudyResults:
    """One study's stored results at one scale, as a chapter reads them (made by :func:`study_results`)."""

    study: str
    scale: str
    arms: tuple[str, ...]  # the arms of the study's grid, in grid order
    results: dict[str, dict[str, Any]]  # arm -> the content of its result file, for the arms that have one
    stale: tuple[str, ...]  # arms whose file is not what the grid produces today (another config, or unfinished)

    @property
    def complete(self) -> bool:
        """Whether every arm of the grid has a result file."""
        return all(arm in self.results for arm in self.arms)

    @property
    def command(self) -> str:
        """The command that produces (or refreshes) the study's result files."""
        return f"python -m instdisc_lite reproduce {self.study} --scale {self.scale}"


def study_results(study: str, scale: str = "quick", results: str | Path | None = None) -> StudyResults:
    """The result files of ``study`` at ``scale`` (written by ``python -m instdisc_lite reproduce``), each checked
    against its grid.

    ``results`` defaults to :func:`results_dir`; where it does not exist (an installed package on Colab) the
    answer has no results and is not :attr:`~StudyResults.complete`, so a chapter can show
    :attr:`~StudyResults.command` instead. An arm is listed in :attr:`~StudyResults.stale` when its file does not
    hold a finished run of exactly the config that :func:`instdisc_lite.reproduce.arm_config` produces today; a
    chapter asserts that none is before it reads a figure. An unknown study or scale is a ``ConfigError``.
    """
    arms = tuple(reproduce.study_arms(study, scale))
    root = results_dir() if results is None else Path(results)
    found = reproduce.load_results(study, scale, root)
    stale = tuple(
        arm
        for arm in found
        if not reproduce.is_done(
            reproduce.result_path(root, study, scale, arm), reproduce.arm_config(study, arm, scale), study
        )
    )
    return StudyResults(study=study, scale=scale, arms=arms, results=found, stale=stale)


def on_colab() -> bool:
    return "google.colab" in sys.modules


def book_mode(mode: str | None = None, smoke: bool | None = None) -> BookMode:
    """Resolve the mode from ``mode`` or ``$INSTDISC_BOOK_MODE`` (quick | full | auto).

    ``smoke`` (default: ``$INSTDISC_BOOK_SMOKE`` is ``1``) asks for CI's capped run of full mode.
    """
    name = (mode or os.environ.get("INSTDISC_BOOK_MODE", "auto")).lower()
    if name not in MODES:
        raise ValueError(f"INSTDISC_BOOK_MODE must be one of {', '.join(MODES)}, got {name!r}")
    if smoke is None:
        flag = os.environ.get("INSTDISC_BOOK_SMOKE", "0")
        if flag not in ("0", "1", ""):
            raise ValueError(f"INSTDISC_BOOK_SMOKE must be 0 or 1, got {flag!r}")
        smoke = flag == "1"
    device = select_device("auto")
    if name == "auto":
        name = "full" if device.type == "cuda" else "quick"
    if smoke and name != "full":
        raise ValueError("INSTDISC_BOOK_SMOKE=1 checks full mode's code path; set INSTDISC_BOOK_MODE=full with it")
    return BookMode(name=name, device=device, on_colab=on_colab(), smoke=smoke)


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
