"""A generated CIFAR-10 in the exact on-disk format torchvision reads (used by the tests and the book's smoke run).

``root/cifar-10-batches-py/`` holds ``data_batch_1..5``, ``test_batch`` and ``batches.meta``: Python-2 style pickles
(``pickle.load(f, encoding="latin1")``) of a dict with ``"data"`` (N x 3072 uint8, channel-major rows) and
``"labels"``; the meta dict holds ``"label_names"``. The pixels are uniform noise.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(rng: np.random.Generator, n: int, label_offset: int, name: str) -> dict:
    return {
        "batch_label": name,
        "labels": [int((label_offset + i) % 10) for i in range(n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "filenames": [f"img_{label_offset}_{i}.png" for i in range(n)],
    }


def write_cifar10(root: str | Path, per_train_batch: int, num_test: int, seed: int = 0) -> dict:
    """Write 5 training batches of ``per_train_batch`` images and a test batch; return the arrays written."""
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = [_batch(rng, per_train_batch, label_offset=b, name=f"training batch {b} of 5") for b in range(1, 6)]
    test = _batch(rng, num_test, label_offset=0, name="testing batch 1 of 1")
    meta = {"num_cases_per_batch": per_train_batch, "label_names": LABEL_NAMES, "num_vis": 3072}
    files = {f"data_batch_{b}": batch for b, batch in enumerate(train, start=1)}
    files.update(test_batch=test, **{"batches.meta": meta})
    for name, content in files.items():
        with open(base / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    return {
        "root": Path(root),
        "train_data": np.concatenate([b["data"] for b in train]),
        "train_labels": [y for b in train for y in b["labels"]],
        "test_data": test["data"],
        "test_labels": test["labels"],
    }
