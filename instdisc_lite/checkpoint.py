"""Safe checkpoints: written atomically, loaded without running code.

* **Atomic.** The state is written to a temporary file in the same directory, flushed to disk, then moved over
  the old checkpoint with ``os.replace`` (atomic on POSIX and Windows): a crash mid-write never leaves a
  half-written file. A kill during a save can leave the temporary file; :func:`remove_stale_temp_files` clears
  them at the next start.
* **No code on load.** Every state is stored as tensors and plain Python data (RNG states included), so
  :func:`load_checkpoint` uses ``torch.load(weights_only=True)``: a file with a planted object is refused, not run.
* **One-line errors.** A missing, truncated or foreign file raises :class:`CheckpointError` naming the file and
  what to do.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, unsafe or from another config); one line says why."""


def _atomic_write(path: str | Path, mode: str, write: Callable[[IO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (configs, metrics, results)."""
    _atomic_write(path, "w", lambda f: f.write(text))


def atomic_save_npy(array: np.ndarray, path: str | Path) -> None:
    """``numpy.save(path, array)``, atomically (written to exactly ``path``: no ``.npy`` is appended)."""
    _atomic_write(path, "wb", lambda f: np.save(f, array, allow_pickle=False))


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files a kill during :func:`_atomic_write` left in ``directory``; returns them.

    Call it only while holding the run's lock: a live writer's temporary file looks the same.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain data (what weights_only=True loads)
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, NumPy, torch CPU and (if present) all CUDA devices.

    Python's state is a tuple of ints; NumPy's key array becomes an int64 tensor; torch's are byte tensors.
    """
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "keys": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any failure is one :class:`CheckpointError` (or
    ``FileNotFoundError`` when there is no file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; start the run without --resume first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object: loading it could run code
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, so it was not loaded (loading it could run "
            f"code: {first[:160]}). Use a checkpoint written by instdisc_lite, or start over with --overwrite."
        ) from err
    except Exception as err:  # anything else a damaged file makes the unpickler raise (IndexError, KeyError, ...)
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(err).__name__}); delete it or start over with --overwrite "
            "(an interrupted save never leaves a partial checkpoint.pt, so this file was damaged afterwards)"
        ) from err
    if not isinstance(state, dict) or not {"epoch", "config", "method"} <= state.keys():
        raise CheckpointError(f"{path} is not an instdisc_lite checkpoint (no epoch/config/method entries)")
    return state


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of a module's state dict without the prefixes that wrappers add.

    ``torch.compile`` adds ``_orig_mod.``, ``DistributedDataParallel`` adds ``module.``; stripping both lets
    compiled, uncompiled, single- and multi-process runs resume one another.
    """
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("_orig_mod.", "module."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out
