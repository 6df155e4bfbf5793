"""Support for the book's notebooks: one switch between quick (CPU), full (one Colab GPU session) and paper mode.

``INSTDISC_BOOK_MODE`` chooses: ``quick`` (real Fashion-MNIST, small subsets, a few minutes per chapter on a
CPU), ``full`` (CIFAR-10 and ResNet18, with fewer epochs than the paper so that every chapter fits a free Colab
T4 session; the learning-rate steps sit at fractions of the epochs, so the schedule shrinks with them), ``paper``
(the paper's 200-epoch schedules, hours per chapter) or ``auto`` (the default: full when a CUDA GPU is present,
quick otherwise). Every chapter calls :func:`book_mode` once and prints what it chose, so the reader always knows
which mode produced the figures on the page, and shows :func:`expected_times`, its measured (quick) and estimated
(full, paper) run time per mode.

On Colab the install cell's form fields choose the mode and whether runs are kept on Google Drive
(:func:`colab_settings`); ``INSTDISC_RUNS_DIR`` moves every chapter's runs (:func:`runs_dir`), so that a later
chapter finds an earlier chapter's run in a new session. :func:`glue` is myst-nb's glue where myst-nb is installed
(the book build) and a printed ``name = value`` elsewhere (Colab installs no Jupyter Book).

``INSTDISC_BOOK_SMOKE=1`` (with full mode) is CI's check of the full-mode code path on a CPU: every chapter
runs its full-mode cells (CIFAR-10 configs, ResNet18, the full-mode branches) on a small generated CIFAR-10,
with each training run capped by :meth:`BookMode.capped` to :data:`SMOKE_CAP` and the claims about learning
skipped, since two epochs on random images prove nothing. Readers never set it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, MutableMapping
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
MODES = ("quick", "full", "paper", "auto")
CONCRETE_MODES = ("quick", "full", "paper")  # what ``auto`` resolves to, and the choices of the Colab form
_UNSET: Any = object()
# A smoke run's cap on every training run's config overrides: two epochs of one batch of the paper's 128 (two, so
# that per-epoch quantities such as the bank's change between epochs exist).
SMOKE_CAP: dict[str, Any] = {"epochs": 2, "train_subset": 128, "eval_subset": 100}


@dataclass(frozen=True)
class BookMode:
    name: str  # "quick", "full" or "paper"
    device: torch.device
    on_colab: bool
    smoke: bool = False  # CI's capped run of full mode on a CPU (INSTDISC_BOOK_SMOKE=1)

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def pick(self, quick: T, full: T, paper: T = _UNSET) -> T:
        """The value for this mode: ``MODE.pick(quick=2, full=30, paper=200)``; ``paper`` defaults to ``full``.

        ``full`` is sized for one free Colab T4 session per chapter; ``paper`` (where it differs) is the paper's
        scale. A size that already fits the session needs no ``paper``.
        """
        if self.quick:
            return quick
        if self.name == "paper" and paper is not _UNSET:
            return paper
        return full

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


# Full mode's epochs for the run of chapters 5 and 6: 35 epochs of 50,000 images, each with a kNN pass over the
# 10,000 test images, ~ 38 ResNet18 epochs' worth of work, ~ 16 min on a T4 at ~25 s per epoch.
FULL_TRAINING_EPOCHS = 35


def training_run_config(mode: BookMode, out_dir: str | Path) -> TrainConfig:
    """The run chapter 5 trains and chapter 6 evaluates (the same config, so chapter 6 can reuse its checkpoint).

    Quick mode: ``fashion_mnist_quick`` on its first 20,000 images for 15 epochs with the exact softmax (a few
    minutes on two cores), long enough that chapter 6's learned features beat the raw pixels under kNN, which it
    checks, and the PCA of the pixels, which it reports (6 epochs over 8,000 images were not). Full mode:
    ``cifar10_resnet18`` for :data:`FULL_TRAINING_EPOCHS` epochs (its lr steps at 60 % and 80 % of them).
    Paper mode: ``cifar10_resnet18`` as shipped, the paper's 200 epochs.
    """
    name = mode.pick(quick="fashion_mnist_quick", full="cifar10_resnet18")
    base = load_config(name)
    if mode.quick:
        # the exact softmax: over this short run (15 epochs of 20,000 images) it learned faster than the recipe's
        # NCE (kNN on 2,000 test images: 83.3 % against 80.65 %, one run each)
        sizes = shortened(base, 20000, epochs=min(base.epochs, 15), eval_subset=2000, objective="softmax")
    else:
        sizes = mode.pick(quick={}, full={"epochs": min(base.epochs, FULL_TRAINING_EPOCHS)}, paper={})
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
    """Resolve the mode from ``mode`` or ``$INSTDISC_BOOK_MODE`` (quick | full | paper | auto).

    ``smoke`` (default: ``$INSTDISC_BOOK_SMOKE`` is ``1``) asks for CI's capped run of full (or paper) mode.
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
    if smoke and name == "quick":
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


# ---------------------------------------------------------------------------------------------------------------------
# Where runs go, glue without Jupyter Book, and the Colab form.

RUNS_DIR_ENV = "INSTDISC_RUNS_DIR"
COLAB_DRIVE_MOUNT = "/content/drive"
COLAB_DRIVE_RUNS = f"{COLAB_DRIVE_MOUNT}/MyDrive/instdisc_lite/runs"


def runs_dir(mode: BookMode) -> Path:
    """The directory under which the chapters of ``mode`` write their runs: ``<root>/book/<mode>``.

    ``<root>`` is ``$INSTDISC_RUNS_DIR`` or ``runs`` (relative to the notebook's directory). One directory per
    mode, so a full-mode run and a paper-mode run of the same name never meet (chapter 6 reuses, and resumes,
    chapter 5's run by its name). On Colab with Google Drive, :func:`colab_settings` points the root at
    :data:`COLAB_DRIVE_RUNS`, which outlives the session.
    """
    root = os.environ.get(RUNS_DIR_ENV) or "runs"
    return Path(root).expanduser() / "book" / mode.name


@functools.cache
def _myst_glue() -> Callable[..., None] | None:
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab: the chapters need the package, not Jupyter Book
        return None
    return myst_glue


def glue(name: str, value: Any, display: bool = False) -> None:
    """myst-nb's ``glue(name, value, display=display)`` when myst-nb is installed; otherwise the value is shown.

    The book build quotes glued values in the prose (``{glue:text}`name```). Without myst-nb (Colab), the prose
    shows its glue roles unrendered, so the value is printed as ``name = value`` (or displayed, for
    ``display=True``) where the reader can still read it.
    """
    myst_glue = _myst_glue()
    if myst_glue is not None:
        myst_glue(name, value, display=display)
    elif display:
        from IPython.display import display as show

        show(value)
    else:
        print(f"{name} = {value}")


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], digits: int = 2) -> str:
    """``rows`` (one dict per row, its keys the columns) as a pipe table; floats get ``digits`` decimals."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(_cell(row.get(c, ""), digits) for c in columns) + " |" for row in rows),
    ]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], digits: int = 2, caption: str | None = None) -> Any:
    """Show ``rows`` (one dict per row, its keys the columns) as a table: a long printout would wrap or run off
    the page. Floats get ``digits`` decimals. Returns an ``IPython.display.Markdown``, which the book renders as a
    table and Colab shows as one; outside a notebook its ``.data`` is the pipe table as text.
    """
    from IPython.display import Markdown

    if not rows:
        return Markdown(f"*{caption}: no rows*" if caption else "*no rows*")
    return Markdown((f"**{caption}**\n\n" if caption else "") + markdown_table(rows, digits))


def colab_settings(
    mode_choice: str,
    use_drive: bool,
    environ: MutableMapping[str, str] | None = None,
    mount: Callable[[str], Any] | None = None,
) -> dict[str, str]:
    """Apply the Colab form of a chapter's install cell: the mode, and whether runs are kept on Google Drive.

    Sets ``INSTDISC_BOOK_MODE`` to ``mode_choice`` (quick | full | paper) in ``environ`` (default: ``os.environ``),
    so :func:`book_mode` in the next cell resolves it. With ``use_drive``, Google Drive is mounted at
    :data:`COLAB_DRIVE_MOUNT` (``mount``, default: ``google.colab.drive.mount``) and ``INSTDISC_RUNS_DIR`` set to
    :data:`COLAB_DRIVE_RUNS`, so the runs of one chapter are there for the next one in a later session; without it,
    a runs directory set earlier by this function is dropped again. The install cell calls this only on Colab;
    returns the settings made (for the printed summary).
    """
    environ = os.environ if environ is None else environ
    choice = str(mode_choice).strip().lower()
    if choice not in CONCRETE_MODES:
        raise ValueError(
            f"MODE_CHOICE must be one of {', '.join(CONCRETE_MODES)}, got {mode_choice!r}; "
            "choose it in the form of the first code cell"
        )
    settings = {"INSTDISC_BOOK_MODE": choice}
    if use_drive:
        if mount is None:
            from google.colab import drive  # only on Colab

            mount = drive.mount
        mount(COLAB_DRIVE_MOUNT)  # asks the reader's permission; the run directories are made by train()
        settings[RUNS_DIR_ENV] = COLAB_DRIVE_RUNS
    elif environ.get(RUNS_DIR_ENV) == COLAB_DRIVE_RUNS:
        del environ[RUNS_DIR_ENV]
    environ.update(settings)
    where = f"runs kept on Google Drive in {COLAB_DRIVE_RUNS}" if use_drive else "runs kept in this session only"
    print(f"Colab: {choice} mode, {where}")
    if choice != "quick" and not torch.cuda.is_available():
        print(
            f"This runtime has no GPU, which {choice} mode needs: choose Runtime > Change runtime type > T4 GPU "
            "(then run this cell again), or choose quick mode."
        )
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# How long a chapter takes in each mode: measured (quick) and estimated (full, paper), read from results/.

CHAPTER_TIMES = "chapter_times.json"  # tools/time_chapters.py: quick mode, measured on a CPU
RUNTIME_ESTIMATES = "runtime_estimates.json"  # full and paper mode on a T4: estimates, not measurements


@dataclass(frozen=True)
class ExpectedTimes:
    """A chapter's expected run time per mode (seconds; None where not measured yet), made by
    :func:`expected_times`. Displayed in a notebook it is a small markdown table."""

    chapter: str
    seconds: dict[str, float | None]  # mode -> seconds, for quick, full and paper
    hardware: dict[str, str]  # mode -> where the time applies ("a 2-core CPU", "a T4 GPU")
    kind: dict[str, str]  # mode -> "measured" or "estimate"
    mode: str | None = None  # the mode of this run, marked in the table

    def rows(self) -> list[tuple[str, str]]:
        """(mode, expected run time in words) for quick, full and paper."""
        out = []
        for name in CONCRETE_MODES:
            s = self.seconds.get(name)
            text = "not measured yet" if s is None else f"{_duration(s)} on {self.hardware[name]} ({self.kind[name]})"
            out.append((name, text))
        return out

    def _repr_markdown_(self) -> str:
        return markdown_table([
            {"mode": f"**{name}** (this run)" if name == self.mode else name, "expected run time of this chapter": text}
            for name, text in self.rows()
        ])  # fmt: skip

    def __str__(self) -> str:
        return "\n".join(f"{name:6s} {text}{' <- this run' if name == self.mode else ''}" for name, text in self.rows())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def _read_json(path: Path) -> dict[str, Any] | None:
    """The content of ``path``; None if it does not exist. A file that is not a JSON object is an error."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); regenerate it or delete it") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object; regenerate it or delete it")
    return content


def _seconds(entry: Any, key: str) -> float | None:
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def expected_times(
    chapter: str, mode: BookMode | str | None = None, results: str | Path | None = None
) -> ExpectedTimes:
    """How long ``chapter`` (a notebook's stem, e.g. ``"01_classes_to_instances"``) takes in each mode.

    Quick mode: the wall seconds measured by ``tools/time_chapters.py`` (``results/chapter_times.json``,
    ``chapters.<stem>.wall_s``, on the CPU its provenance names). Full and paper mode: the estimates for a T4 in
    ``results/runtime_estimates.json`` (``chapters.<stem>.full_t4_s_estimate`` / ``paper_t4_s_estimate``). A
    missing file or chapter gives None ("not measured yet"), so the chapters run where there is no ``results/``
    (Colab). ``mode`` (optional) is marked in the table. ``results`` defaults to :func:`results_dir`.
    """
    root = results_dir() if results is None else Path(results)
    times = _read_json(root / CHAPTER_TIMES) or {}
    estimates = _read_json(root / RUNTIME_ESTIMATES) or {}
    measured = (times.get("chapters") or {}).get(chapter)
    estimated = (estimates.get("chapters") or {}).get(chapter)
    cores = (measured or {}).get("cpu_cores") if isinstance(measured, dict) else None
    cores = cores or ((times.get("provenance") or {}).get("cpu") or {}).get("cores")  # the chapter's, else the run's
    cpu = f"a {cores}-core CPU" if isinstance(cores, int) else "a CPU"
    seconds = {
        "quick": _seconds(measured, "wall_s"),
        "full": _seconds(estimated, "full_t4_s_estimate"),
        "paper": _seconds(estimated, "paper_t4_s_estimate"),
    }
    hardware = {"quick": cpu, "full": "a T4 GPU", "paper": "a T4 GPU"}
    kind = {"quick": "measured", "full": "estimate", "paper": "estimate"}
    name = mode.name if isinstance(mode, BookMode) else mode
    return ExpectedTimes(chapter=chapter, seconds=seconds, hardware=hardware, kind=kind, mode=name)
