"""Run every chapter's full-mode code path on this CPU: CI's stand-in for the GPU/Colab run it cannot do.

Full mode trains ResNet18 on CIFAR-10 for hundreds of epochs, which needs a GPU and the real dataset. This script
checks everything else about it: each notebook is copied to ``_build/smoke/book/``, a small CIFAR-10 is generated
beside it in the exact on-disk format (``data/cifar-10-batches-py``, noise images), and nbval executes the chapters
with ``INSTDISC_BOOK_MODE=full INSTDISC_BOOK_SMOKE=1``: the full configs, models and branches run, each training run
capped by ``instdisc_lite.book.SMOKE_CAP`` and the claims about learning skipped. The runs the chapters write
(``runs/book/full/<name>/``: metrics, checkpoints, results) stay in ``_build/smoke/book/`` for inspection.

    python tools/book_smoke.py [chapter.ipynb ...]      # default: every chapter, book/NN_*.ipynb
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fake_cifar10 import write_cifar10  # noqa: E402

from instdisc_lite.book import SMOKE_CAP  # noqa: E402

OUT = ROOT / "_build" / "smoke" / "book"


def default_chapters() -> list[Path]:
    """Every numbered chapter, ``book/NN_name.ipynb`` (the preface too: it reports the mode)."""
    return sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def main(argv: list[str]) -> int:
    chapters = [Path(a).resolve() for a in argv] or default_chapters()
    missing = [str(c) for c in chapters if not c.is_file()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    OUT.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT.parent.parent / ".smoke.lock", "w") as lock:  # a second smoke run waits: both use OUT
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _run(chapters)


def _run(chapters: list[Path]) -> int:
    shutil.rmtree(OUT.parent, ignore_errors=True)
    OUT.mkdir(parents=True)
    for chapter in chapters:
        shutil.copy2(chapter, OUT / chapter.name)
    # every capped run takes train_subset images from the 5 training batches and eval_subset test images
    per_batch = -(-SMOKE_CAP["train_subset"] // 5)
    write_cifar10(OUT / "data", per_train_batch=per_batch, num_test=SMOKE_CAP["eval_subset"])
    env = {**os.environ, "INSTDISC_BOOK_MODE": "full", "INSTDISC_BOOK_SMOKE": "1", "MPLBACKEND": "Agg"}
    nbval = ["--nbval-lax", "--nbval-cell-timeout=600", "--durations=5", "-p", "no:cacheprovider"]
    command = [sys.executable, "-m", "pytest", "-q", *nbval, *(str(OUT / c.name) for c in chapters)]
    print(f"smoke run of full mode: {len(chapters)} chapters in {OUT}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=OUT, env=env)
    print(f"smoke run of full mode: {'passed' if code == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
