"""A run's directory ``<out_dir>/<name>/``: one owner at a time, nothing lost by accident.

* **A lock.** ``<out_dir>/.<name>.lock`` is held with ``flock`` for the life of the run, so a second process
  with the same name is refused at once; the OS drops the lock when its holder dies, even by ``kill -9``.
* **Existing runs are kept.** Any non-empty run directory counts as an earlier run: without ``resume`` or
  ``overwrite`` it is refused. ``overwrite`` moves the old directory aside and deletes it before the new run
  writes anything, so a kill never leaves new files mixed with old ones.
* **Resume checks the stored config.** :func:`resume_changes` compares the checkpoint's config with the new
  one: changes that only affect how the run is executed or evaluated are allowed (and listed), anything that
  changes what is trained is refused with one line saying what differs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

from .config import ConfigError, TrainConfig
from .schedule import learning_rate, milestone_epochs

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against a concurrent twin
    fcntl = None  # type: ignore[assignment]

# Keys a resumed run may change: how it runs (device, loaders, compilation, logging, where the data lies, where CIFAR-10
# is augmented: the same transforms either way) and how it is evaluated (test_path: the test set). ``epochs`` is
# allowed too, when the lr schedule of the epochs already trained stays the same.
RESUMABLE_CHANGES = frozenset({
    "device", "num_workers", "progress", "compile", "amp", "channels_last", "data_root", "data_path", "test_path",
    "out_dir", "augment_on_device",
    "eval_every", "eval_subset", "knn_k", "knn_temperature", "checkpoint_every", "sync_bn", "log_step_loss",
})  # fmt: skip


class RunExistsError(FileExistsError):
    """The run directory holds an earlier run and neither resume nor overwrite was asked for."""


class RunInUseError(RuntimeError):
    """Another process holds the run's lock."""


class ResumeMismatchError(ConfigError):
    """The config given on resume changes what the checkpoint's run trains."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<out_dir>/.<name>.lock`` (a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self._file: IO | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the run
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RunInUseError(
                    f"run {self.run_dir} is in use by {holder}; wait for it to finish, or choose another name "
                    "(--set name=...)"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this machine'}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (removing it would race a new owner)
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _aside_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f".{run_dir.name}.replaced-*"))


def remove_replaced(run_dir: Path) -> None:
    """Delete old runs that an ``overwrite`` moved aside (left behind only if it was killed mid-delete)."""
    for old in _aside_dirs(run_dir):
        shutil.rmtree(old, ignore_errors=True)


def clear_for_overwrite(run_dir: Path) -> None:
    """Move ``run_dir`` aside (one atomic rename), then delete it: the new run starts in an empty directory."""
    if run_dir.exists():
        aside = run_dir.parent / f".{run_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(run_dir, aside)
        shutil.rmtree(aside, ignore_errors=True)


def refuse_existing(run_dir: Path) -> None:
    """Raise :class:`RunExistsError` for a non-empty ``run_dir`` (the caller asked for neither resume nor overwrite)."""
    files = sorted(p.name for p in run_dir.iterdir())
    shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
    if "checkpoint.pt" in files:
        what = "already holds a checkpoint"
        fix = "Pass --resume to continue it, --overwrite to start over, or choose another name (--set name=...)."
    else:
        what = f"already holds files of an earlier run ({shown}) but no checkpoint"
        fix = "Pass --overwrite to delete them and start over, or choose another name (--set name=...)."
    raise RunExistsError(f"{run_dir} {what}. {fix}")


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def keep_resolved_epochs(config: TrainConfig, stored: dict[str, Any]) -> TrainConfig:
    """``config`` with the checkpoint's epochs when both carry the same ``image_passes`` budget: the run resolved it
    to epochs of its data once, when it started, and a resume must not re-resolve it against other data."""
    if config.image_passes is not None and config.image_passes == stored.get("image_passes"):
        return dataclasses.replace(config, epochs=stored.get("epochs", config.epochs))
    return config


def resume_changes(stored: dict[str, Any], config: TrainConfig, epochs_done: int) -> list[str]:
    """Compare a checkpoint's config with the config of the resumed run.

    Returns the allowed changes as ``"key: old -> new"`` strings; raises :class:`ResumeMismatchError` (one line,
    every refused key) when a change would alter what the run trains. ``epochs`` may change only when the
    learning rate of every epoch already trained stays the same, and never below ``epochs_done``.
    """
    config = keep_resolved_epochs(config, stored)  # the same budget: the epochs the run resolved it to
    new = config.to_dict()
    defaults = TrainConfig().to_dict()
    allowed, refused = [], []
    for key in new:
        old = stored.get(key, defaults[key])  # keys added since the checkpoint was written take their defaults
        if old == new[key] or key == "name":
            continue
        change = f"{key}: {_fmt(old)} -> {_fmt(new[key])}"
        # epochs may change (checked below); so may an image_passes budget give way to epochs set explicitly
        extend = key == "epochs" or (key == "image_passes" and new[key] is None)
        (allowed if key in RESUMABLE_CHANGES or extend else refused).append(change)
    if refused:
        raise ResumeMismatchError(
            f"cannot resume: the config changes what the checkpoint's run trains ({'; '.join(refused)}). "
            "Resume with the stored config (see config.yaml), or start a new run (--set name=... or --overwrite)."
        )
    if new["epochs"] != stored.get("epochs", new["epochs"]):
        _check_epochs_change(stored, config, epochs_done)
    return allowed


def _check_epochs_change(stored: dict[str, Any], config: TrainConfig, epochs_done: int) -> None:
    old = TrainConfig(**{**config.to_dict(), **{k: v for k, v in stored.items() if k in config.to_dict()}})
    if config.epochs < epochs_done:
        raise ResumeMismatchError(
            f"cannot resume with epochs={config.epochs}: the run has already trained {epochs_done} epochs "
            f"(use epochs >= {epochs_done})"
        )
    moved = [e for e in range(epochs_done) if learning_rate(old, e) != learning_rate(config, e)]
    if moved:
        e = epochs_done - 1
        raise ResumeMismatchError(
            f"cannot resume with epochs {old.epochs} -> {config.epochs}: the lr milestones (fractions "
            f"{config.lr_milestones} of the epochs) move from epochs {milestone_epochs(old)} to "
            f"{milestone_epochs(config)}, so the lr of the {epochs_done} epochs already trained would change "
            f"(epoch {e + 1}: {learning_rate(old, e):.4g} -> {learning_rate(config, e):.4g}). Keep "
            f"epochs={old.epochs}, or start a new run"
        )
