"""Shared fixtures: tiny on-disk datasets in the exact formats the real ones use.

* ``tiny_cifar10``: ``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and ``batches.meta``,
  pickled the way torchvision's ``CIFAR10`` reads them (``pickle.load(f, encoding="latin1")`` of a dict
  with ``"data"`` (N x 3072 uint8, channel-major rows) and ``"labels"``; the meta dict holds ``"label_names"``).
* ``tiny_imagenet``: an ImageFolder tree ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` of small JPEGs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR_PER_TRAIN_BATCH = 4  # 5 batches -> 20 training images
CIFAR_TEST = 10
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENET_CLASSES = ("n01440764", "n01443537")
IMAGENET_TRAIN_PER_CLASS = 4
IMAGENET_VAL_PER_CLASS = 2

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _cifar_batch(rng: np.random.Generator, n: int, label_offset: int, name: str) -> dict:
    labels = [int((label_offset + i) % 10) for i in range(n)]
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    # the real pickles are Python 2 dicts; loaded with encoding="latin1" their keys are str
    return {
        "batch_label": name,
        "labels": labels,
        "data": data,
        "filenames": [f"img_{label_offset}_{i}.png" for i in range(n)],
    }


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> dict:
    """Root of a generated CIFAR-10 (``root/cifar-10-batches-py``) plus the arrays written, for checks."""
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    train_batches = []
    for b in range(1, 6):
        batch = _cifar_batch(rng, CIFAR_PER_TRAIN_BATCH, label_offset=b, name=f"training batch {b} of 5")
        train_batches.append(batch)
        with open(base / f"data_batch_{b}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    test = _cifar_batch(rng, CIFAR_TEST, label_offset=0, name="testing batch 1 of 1")
    with open(base / "test_batch", "wb") as f:
        pickle.dump(test, f, protocol=2)
    meta = {"num_cases_per_batch": CIFAR_PER_TRAIN_BATCH, "label_names": CIFAR_LABEL_NAMES, "num_vis": 3072}
    with open(base / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {
        "root": root,
        "train_data": np.concatenate([b["data"] for b in train_batches]),
        "train_labels": [y for b in train_batches for y in b["labels"]],
        "test_data": test["data"],
        "test_labels": test["labels"],
    }


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> dict:
    """Root of a generated ImageFolder tree with ``train/`` and ``val/``, two classes of 40x48 JPEGs."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(1)
    counts = {"train": IMAGENET_TRAIN_PER_CLASS, "val": IMAGENET_VAL_PER_CLASS}
    for split, per_class in counts.items():
        for c, wnid in enumerate(IMAGENET_CLASSES):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                # class 0 darkish, class 1 brightish, plus noise: any valid RGB JPEG would do
                pixels = rng.integers(0, 128, size=(40, 48, 3)) + 100 * c
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(d / f"{wnid}_{i}.JPEG", quality=90)
    return {"root": root, "classes": IMAGENET_CLASSES, "counts": counts}


@pytest.fixture(scope="session")
def fashion_mnist_available() -> Path:
    if not all((FASHION_MNIST_DIR / n).exists() for n in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")):
        pytest.skip("real Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR


@pytest.fixture
def seeded() -> None:
    """Seed the global RNG for tests that draw from it."""
    torch.manual_seed(0)
