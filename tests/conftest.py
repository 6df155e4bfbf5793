"""Shared fixtures: tiny on-disk datasets in the exact formats the real ones use.

* ``tiny_cifar10``: ``cifar-10-batches-py/`` of 20 training and 10 test images, pickled the way torchvision's
  ``CIFAR10`` reads them (written by ``fake_cifar10.write_cifar10``, which the book's smoke run uses too).
* ``tiny_imagenet``: an ImageFolder tree ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` of small JPEGs.
* ``tiny_cifar10_config``: a factory of ``cifar10_resnet18`` configs (small CNN) over ``tiny_cifar10``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cifar10 import write_cifar10
from PIL import Image

CIFAR_PER_TRAIN_BATCH = 4  # 5 batches -> 20 training images
CIFAR_TEST = 10
IMAGENET_CLASSES = ("n01440764", "n01443537")
IMAGENET_TRAIN_PER_CLASS = 4
IMAGENET_VAL_PER_CLASS = 2

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> dict:
    """Root of a generated CIFAR-10 (``root/cifar-10-batches-py``) plus the arrays written, for checks."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"), CIFAR_PER_TRAIN_BATCH, CIFAR_TEST)


@pytest.fixture
def tiny_cifar10_config(tiny_cifar10):
    """``make(**overrides)`` -> the ``cifar10_resnet18`` config on ``tiny_cifar10`` with a small CNN, batch 4."""
    from instdisc_lite import load_config

    def make(**overrides):
        values = {"data_root": str(tiny_cifar10["root"]), "arch": "small_cnn", "batch_size": 4, "num_workers": 0}
        return load_config("cifar10_resnet18", {**values, **overrides})

    return make


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
