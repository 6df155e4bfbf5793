"""Datasets that return ``(image, label, index)`` — the index is the image's "class" and its bank row.

* Fashion-MNIST: read from its four IDX ``.gz`` files in ``data/`` or in
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``), or downloaded by
  torchvision where the network allows.
* CIFAR-10: torchvision's loader over the ``cifar-10-batches-py`` pickles.
* ImageNet: torchvision's ``ImageFolder`` over ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/``.
* Your own images (``dataset: npz`` / ``folder``): a ``.npz`` file of ``images`` (N, H, W) or (N, H, W, C) uint8
  and optional ``labels`` (N,), or an image folder (``root/<class>/*.png|jpg``, or the images directly in ``root``)
  resized to ``image_size``; each with an optional test set of the same kind. Labels are optional: without them
  a run trains all the same and skips the kNN evaluation (:attr:`DataBundle.knn_unavailable`).

Augmentation is the paper's (RandomResizedCrop scale 0.2-1, ColorJitter 0.4, RandomGrayscale 0.2,
flip) for CIFAR/ImageNet, applied per image in DataLoader workers. Fashion-MNIST and your own images
are held in one uint8 tensor; they are augmented a whole batch at a time on the training device
(:class:`BatchAugment`), which is what makes a CPU run of a few minutes possible. CIFAR-10 can be held that way
too, on the training device, with the paper's augmentation drawn per image but applied a batch at a time
(:class:`~instdisc_lite.batch_augment.ColourBatchAugment`; config ``augment_on_device``, on by default on CUDA).

Order and randomness (what makes a resumed or a multi-process run see the same data):

* Training order: for epoch ``e`` one global permutation of all ``n`` items, :func:`epoch_order`
  ``(seed, e)``. Global step ``s`` uses ``order[s*B*W:(s+1)*B*W]`` (``B`` the per-process batch size,
  ``W`` the world size, ``n // (B*W)`` steps) and rank ``r`` takes ``[r*B:(r+1)*B]`` of it, so the W
  ranks' batches together are the one-process batch of size ``B*W``.
* Per-image augmentation (DataLoader path): :class:`EpochBatchSampler` yields ``(epoch_seed, index)``
  items and :class:`SeededItems` seeds torch's CPU RNG and Python's ``random`` from
  ``item_seed(epoch_seed, index)`` before the transform, so an augmentation depends on
  (seed, epoch, index) alone — not on workers, their persistence, the rank or the world size.
* Evaluation loaders: rank ``r`` reads :func:`shard_positions` of ``0..N-1``; the shards of all ranks
  partition the positions, and every batch carries its positions as ``indices``.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import random
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision import transforms as T

from . import distributed
from .batch_augment import ColourBatchAugment
from .config import DATASETS, ConfigError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
EVAL_BATCH_TENSOR = 1024  # evaluation batch of the in-memory loader (slicing costs nothing)


class DatasetError(Exception):
    """A dataset cannot be used; the message names the file or folder and says how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset is not on disk; the message says where to put it or how to install it."""


class DatasetCorruptError(DatasetError, ValueError):
    """A dataset file is on disk but unreadable (truncated, wrong format); the message names it and the fix."""


# ----------------------------------------------------------------------------------------------
# Seeds: every random choice of the data pipeline is a function of (seed, epoch, index)
# ----------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2  # distinct streams, so the order and the augmentations are unrelated draws


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained over them): the same on every platform.

    Unlike ``seed * K + epoch`` nearby inputs give unrelated seeds, and unlike ``hash()`` it is fixed by its
    definition rather than by the Python build.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1  # non-negative and below 2**63: accepted by torch, numpy's SeedSequence and random.seed


def epoch_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of one epoch; an image's is ``item_seed(epoch_seed(seed, epoch), index)``."""
    return mix_seed(seed, epoch, _AUGMENT_STREAM)


def item_seed(augment_seed: int, index: int) -> int:
    """The seed one image's augmentation is drawn with, from its epoch's ``epoch_seed`` and its index."""
    return mix_seed(augment_seed, index)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The global training order of one epoch: a permutation ``(num_items,)`` of ``0..num_items-1``."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _ORDER_STREAM))
    return torch.randperm(num_items, generator=g)


def num_train_steps(num_items: int, batch_size: int, world: int, drop_last: bool = True) -> int:
    """Global steps per epoch when every step uses ``batch_size * world`` items."""
    step = batch_size * world
    return num_items // step if drop_last else math.ceil(num_items / step)


def rank_batches(
    order: torch.Tensor, batch_size: int, rank: int, world: int, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """This rank's batches ``(<= batch_size,)`` of an epoch's ``order``: step s, slice ``[r*B:(r+1)*B]``.

    Global step ``s`` uses ``order[s*B*W:(s+1)*B*W]``. Without ``drop_last`` the last step is partial, and
    with several ranks some of them may get a short or empty slice of it: train with ``drop_last``.
    """
    step = batch_size * world
    for s in range(num_train_steps(len(order), batch_size, world, drop_last)):
        start = s * step + rank * batch_size
        yield order[start : start + batch_size]


def shard_positions(num_items: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share ``(about N / world,)`` of positions ``0..N-1``.

    The shards of ranks ``0..world-1`` partition the positions exactly (sizes differ by at most one,
    no padding), so gathering every rank's (features, labels, indices) and placing them by index
    rebuilds the full set.
    """
    return torch.tensor_split(torch.arange(num_items), world)[rank]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` for the block; outside DataLoader workers, restore both.

    torchvision's v1 transforms draw from the global CPU generator. Restoring matters when the
    DataLoader has no workers: the items are then made in the training process, whose RNG streams
    (negatives, device augmentation) must not depend on how many images were loaded. In a worker
    nothing else draws, so the restore (~0.1 ms, mostly ``random.getstate``) is skipped. Only the CPU
    generator is touched (``torch.manual_seed`` would reseed CUDA too).
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (torch.default_generator.get_state(), random.getstate())
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------


def _corrupt_idx(path: Path, reason: str) -> DatasetCorruptError:
    return DatasetCorruptError(
        f"{path} is corrupt ({reason}). Reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`, "
        f"or replace it with {path.name} from the Fashion-MNIST release."
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzipped): big-endian magic ``0 0 8 ndim``, ``ndim`` uint32 dims, data.

    Returns an array of shape ``dims``. A file that cannot be read whole, or whose bytes do not match its
    header, raises :class:`DatasetCorruptError` naming it.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise _corrupt_idx(path, f"{type(err).__name__}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise _corrupt_idx(path, f"not a uint8 IDX file: magic {raw[:4].hex() or 'missing'}, expected 000008xx")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise _corrupt_idx(path, f"header of {ndim} dims is cut off at {len(raw)} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = offset + math.prod(dims)
    if len(raw) != expected:
        raise _corrupt_idx(path, f"{len(raw)} bytes where its header {dims} says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_dirs(root: str | Path) -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order."""
    root = Path(root)
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, FASHION_MNIST_SYSTEM_DIR]


def find_fashion_mnist(root: str | Path, train: bool, download: bool = True) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files; downloads with torchvision as a last resort."""
    names = FASHION_MNIST_FILES[train]
    for d in fashion_mnist_dirs(root):
        if all((d / n).exists() for n in names):
            return d / names[0], d / names[1]
    if download:
        try:
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
            d = Path(root) / "FashionMNIST" / "raw"
            if all((d / n).exists() for n in names):
                return d / names[0], d / names[1]
        except Exception:  # no network: fall through to the message that says what to do
            pass
    searched = "\n  ".join(str(d) for d in fashion_mnist_dirs(root))
    raise DatasetNotFoundError(
        f"Fashion-MNIST ({'train' if train else 'test'} split: {', '.join(names)}) was not found in:\n  {searched}\n"
        "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX .gz "
        f"files from the Fashion-MNIST release in {Path(root) / 'fashion-mnist'}."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST as tensors: ``data`` ``(N, 28, 28)`` uint8, ``targets`` ``(N,)`` long.

    ``dataset[i]`` is ``(image, label, i)``; the image is ``transform(uint8 tensor (1, 28, 28))``,
    or that tensor as float in [0, 1] when ``transform`` is None.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path = "data", train: bool = True, transform=None, download: bool = True):
        images_path, labels_path = find_fashion_mnist(root, train, download)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise _corrupt_idx(images_path, f"images of shape {images.shape}, expected (N, rows, cols)")
        if labels.ndim != 1:
            raise _corrupt_idx(labels_path, f"labels of shape {labels.shape}, expected (N,)")
        if len(images) != len(labels):
            raise _corrupt_idx(images_path, f"{len(images)} images but {labels_path.name} holds {len(labels)} labels")
        self.data = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img = self.data[index].unsqueeze(0)
        img = self.transform(img) if self.transform is not None else img.float() / 255.0
        return img, int(self.targets[index]), index


# ----------------------------------------------------------------------------------------------
# CIFAR-10 and ImageNet: torchvision's loaders, with the index added
# ----------------------------------------------------------------------------------------------


def _unpickle_cifar(path: Path) -> dict:
    """One CIFAR-10 pickle as a dict; an unreadable or malformed one raises :class:`DatasetCorruptError`."""
    fix = "re-extract it from cifar-10-python.tar.gz (the python version of CIFAR-10)"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # unpickling garbage raises nearly anything: UnpicklingError, EOFError, ValueError ...
        raise DatasetCorruptError(f"{path} is corrupt ({type(err).__name__}: {err}); {fix}.") from err
    if not isinstance(entry, dict):
        raise DatasetCorruptError(f"{path} is corrupt (holds a {type(entry).__name__}, not a dict); {fix}.")
    if "label_names" in entry:  # batches.meta
        return entry
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None or data.size != len(labels) * 3 * 32 * 32:
        raise DatasetCorruptError(f"{path} is corrupt (no 'data' of 3072 bytes per entry of 'labels'); {fix}.")
    return entry


class CIFAR10Instance(torchvision.datasets.CIFAR10):
    """torchvision CIFAR-10 returning ``(image, label, index)``.

    torchvision checks the md5 of the pickles it downloaded; here the files may come from anywhere
    (a shared drive, a generated test set), so integrity is the presence of every batch file, and a
    file that does not unpickle raises :class:`DatasetCorruptError` naming it.
    """

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        return all((base / name).exists() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        # torchvision's version also checks batches.meta against its md5; presence is enough here too
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.exists():
            raise RuntimeError(f"CIFAR-10 metadata file {path} not found")
        entry = _unpickle_cifar(path)
        if self.meta["key"] not in entry:
            raise DatasetCorruptError(
                f"{path} is corrupt (no {self.meta['key']!r}); re-extract cifar-10-python.tar.gz."
            )
        self.classes = entry[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        try:
            super().__init__(str(root), train=train, transform=transform, download=download)
        except DatasetError:
            raise
        except RuntimeError as err:  # torchvision's "not found or corrupted" (a missing file, given presence checks)
            raise DatasetNotFoundError(
                f"CIFAR-10 was not found in {Path(root) / self.base_folder}. Download the python version "
                "(cifar-10-python.tar.gz) and extract it there, or run with download allowed "
                "(`instdisc_lite.data.CIFAR10Instance(root, download=True)`) on a machine with network access."
            ) from err
        except Exception as err:  # torchvision's loop unpickled a bad batch file: find which, to name it
            for name, _ in self.train_list if train else self.test_list:
                _unpickle_cifar(Path(root) / self.base_folder / name)
            raise DatasetCorruptError(
                f"CIFAR-10 in {Path(root) / self.base_folder} is corrupt ({type(err).__name__}: {err}); "
                "re-extract cifar-10-python.tar.gz there."
            ) from err

    def __getitem__(self, index: int):
        img, target = super().__getitem__(index)
        return img, target, index


class ImageFolderInstance(torchvision.datasets.ImageFolder):
    """torchvision ``ImageFolder`` returning ``(image, label, index)``."""

    def __getitem__(self, index: int):
        img, target = super().__getitem__(index)
        return img, target, index


def imagenet_split(root: str | Path, train: bool, transform=None) -> ImageFolderInstance:
    split = Path(root) / ("train" if train else "val")
    if not split.is_dir() or not any(split.iterdir()):
        raise DatasetNotFoundError(
            f"ImageNet {'train' if train else 'val'} split not found at {split}. Expected the ImageFolder layout "
            f"{split}/<wnid>/<image>.JPEG (the validation images sorted into one folder per class, e.g. with the "
            "usual valprep.sh); set data_root to the folder that holds train/ and val/."
        )
    return ImageFolderInstance(str(split), transform=transform)


# ----------------------------------------------------------------------------------------------
# Subsets and seeded items
# ----------------------------------------------------------------------------------------------


def stratified_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, size: int) -> list[int]:
    """``size`` dataset indices taken round-robin over the classes: the first image of every class, then the
    second of every class, ... (classes in label order, images in dataset order; exhausted classes drop out).

    Deterministic, and ``stratified_subset(y, n)`` is a prefix of ``stratified_subset(y, n + 1)``.
    """
    y = np.asarray(labels)
    by_class = np.argsort(y, kind="stable")  # indices grouped by class, dataset order within a class
    sorted_y = y[by_class]
    rank_in_class = np.arange(len(y)) - np.searchsorted(sorted_y, sorted_y, side="left")
    round_robin = np.lexsort((sorted_y, rank_in_class))  # by rank in class, then by class
    return by_class[round_robin][:size].tolist()


class PositionSubset(Dataset):
    """``dataset`` restricted to ``keep``; item ``i`` is ``(image, label, i)``, the position in the subset.

    Unlike ``torch.utils.data.Subset`` the index returned is the position, i.e. the bank row, whatever
    ``keep`` is.
    """

    def __init__(self, dataset: Dataset, keep: Sequence[int]) -> None:
        self.dataset, self.keep = dataset, list(keep)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int):
        img, label, _ = self.dataset[self.keep[index]]
        return img, label, index


class SeededItems(Dataset):
    """Wraps a dataset of ``(image, label, index)`` so item ``(epoch_seed, i)`` is augmented reproducibly.

    ``dataset[i]`` is made under :func:`seeded_rng` ``(item_seed(epoch_seed, i))``; a plain ``i`` is passed
    through unseeded. The epoch travels inside the item (from :class:`EpochBatchSampler`) rather than as an
    attribute, because persistent DataLoader workers hold their own copy of the dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]):
        if not isinstance(item, tuple):
            return self.dataset[item]
        seed, index = item
        with seeded_rng(item_seed(seed, index)):
            img, label, _ = self.dataset[index]
        return img, label, index


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def paper_train_transform(
    size: int, mean, std, scale: tuple[float, float] = (0.2, 1.0), colour: bool = True, flip: bool = True
) -> T.Compose:
    """The paper's augmentation: RandomResizedCrop(``scale``; the paper's 0.2-1), ColorJitter(0.4 x4),
    RandomGrayscale(0.2), horizontal flip. ``colour=False`` (``augment: crop_flip``) keeps the crop and the flip
    only: for CMC, whose views *are* colour channels, a grayscale crop would leave the ab view empty and hue or
    saturation jitter would change mostly that view. ``flip=False`` (config ``flip: false``) leaves out the flip."""
    colour_ops = [T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomGrayscale(p=0.2)] if colour else []
    flip_ops = [T.RandomHorizontalFlip()] if flip else []
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        *colour_ops,
        *flip_ops,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


class BatchAugment(nn.Module):
    """Random resized crop + horizontal flip (+ brightness/contrast jitter) for a whole batch at once.

    Input: ``(B, C, H, W)`` uint8 or float in [0, 1] on any device; output: normalised float, same
    size. Each image gets its own crop (area fraction in ``scale``, aspect ratio in ``ratio``), drawn
    as one affine grid, so the cost is one ``grid_sample`` per batch instead of B PIL calls.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        jitter: float = 0.4,
    ) -> None:
        super().__init__()
        self.scale, self.ratio, self.flip, self.jitter = scale, ratio, flip, jitter
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        b, dev = x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        log_r = torch.empty(b, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = log_r.exp()
        w = (area * r).sqrt().clamp(max=1.0)  # crop width / image width
        h = (area / r).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        sign = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0) if self.flip else torch.ones(b, device=dev)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.jitter > 0:
            bright = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.jitter
            contrast = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.jitter
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean * bright).clamp(0, 1)
        return (x - self.mean) / self.std


class Normalize(nn.Module):
    """uint8 or [0, 1] batch -> normalised float batch (the evaluation-time counterpart of BatchAugment)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's training batches, each a list of ``batch_size`` items ``(epoch_seed, index)``.

    The order is :func:`epoch_order` ``(seed, epoch)`` cut by :func:`rank_batches` (drop_last:
    ``num_items // (batch_size * world)`` batches), so the union over ranks of step s is the same for
    every world size. ``epoch_seed`` rides along so that :class:`SeededItems` can seed each image's
    augmentation in whichever worker makes it. Call :meth:`set_epoch` before iterating each epoch.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int = 0, rank: int | None = None, world: int | None = None
    ) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        self.seed = self.seed if seed is None else seed

    def __len__(self) -> int:
        return num_train_steps(self.num_items, self.batch_size, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_items, self.seed, self.epoch)
        augment_seed = epoch_seed(self.seed, self.epoch)
        for batch in rank_batches(order, self.batch_size, self.rank, self.world):
            yield [(augment_seed, i) for i in batch.tolist()]


class TensorBatchLoader:
    """Batches of ``(uint8 images (B, C, H, W), labels (B,), indices (B,))`` straight from in-memory tensors.

    The per-image DataLoader path costs tens of microseconds per image in Python; for a dataset that
    fits in memory, slicing a tensor is all a batch needs. ``data`` is ``(N, H, W)`` (grayscale: batches get
    ``C = 1``) or ``(N, C, H, W)``; ``targets`` ``(N,)`` (:data:`UNLABELLED` for images without a label);
    ``indices`` are positions in ``data``.

    * ``shuffle=True`` (training): this rank's :func:`rank_batches` of :func:`epoch_order` ``(seed, epoch)``;
      ``set_epoch`` picks the epoch, so a resumed run sees the same batches as an uninterrupted one and the
      ranks of a W-process run together see the one-process batches of size ``batch_size * W``.
    * ``shuffle=False`` (evaluation): this rank's :func:`shard_positions`, in order (all of them in one process).
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
    ) -> None:
        self.data, self.targets = data, targets
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.epoch = 0
        self.dataset = TensorDataset(data, targets)  # len(loader.dataset) = number of items, as for a DataLoader
        self.positions = None if shuffle else shard_positions(len(targets), self.rank, self.world)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        self.seed = self.seed if seed is None else seed

    def __len__(self) -> int:
        if self.shuffle:
            return num_train_steps(len(self.targets), self.batch_size, self.world, self.drop_last)
        n = len(self.positions)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _batches(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            order = epoch_order(len(self.targets), self.seed, self.epoch)
            yield from rank_batches(order, self.batch_size, self.rank, self.world, self.drop_last)
        else:
            for b in range(len(self)):
                yield self.positions[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in self._batches():
            images = self.data[idx]
            yield (images.unsqueeze(1) if images.dim() == 3 else images), self.targets[idx], idx


def equal_rank_batches(loader: Any) -> bool:
    """Whether ``loader`` gives every rank the same number of images at every step: the package's training
    loaders do (:class:`TensorBatchLoader` with ``shuffle`` and ``drop_last``, a DataLoader over
    :class:`EpochBatchSampler`, both cut by :func:`rank_batches` with drop_last). Any other loader: False, and
    gathers across ranks exchange their sizes first."""
    if isinstance(loader, TensorBatchLoader):
        return loader.shuffle and loader.drop_last
    return isinstance(getattr(loader, "batch_sampler", None), EpochBatchSampler)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int | None = None,
    world: int | None = None,
) -> DataLoader:
    """DataLoader over ``dataset`` (items ``(image, label, index)``) with :class:`EpochBatchSampler` batches.

    The dataset is wrapped in :class:`SeededItems`, so each image's augmentation is a function of
    (seed, epoch, index). Workers persist across epochs; that no longer matters for what they produce.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world)
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # the loader draws its workers' base seed from this generator, not from the global RNG, whose state the
        # checkpoint restores: a fresh (resumed) loader must not shift the training stream
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int | None = None,
    world: int | None = None,
) -> DataLoader:
    """DataLoader over this rank's :func:`shard_positions` of ``dataset``, in order; batches carry the positions."""
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=shard_positions(len(dataset), rank, world).tolist(),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # as in train_loader: leave the global RNG alone
    )


def labelled_loader(loader, positions: Sequence[int], batch_size: int, seed: int = 0):
    """A one-process training loader over ``positions`` of a :class:`DataBundle`'s ``train_loader`` (the labelled
    part of a semi-supervised split): same images, same augmentation path, items ``(image, label, position in the
    subset)``; the last incomplete batch of an epoch is dropped, as in training."""
    if isinstance(loader, TensorBatchLoader):
        keep = torch.as_tensor(list(positions), dtype=torch.long)
        return TensorBatchLoader(loader.data[keep], loader.targets[keep], batch_size, shuffle=True, drop_last=True,
                                 seed=seed, rank=0, world=1)  # fmt: skip
    items = loader.dataset.dataset if isinstance(loader.dataset, SeededItems) else loader.dataset
    return train_loader(PositionSubset(items, positions), batch_size, loader.num_workers, seed, rank=0, world=1)


# ----------------------------------------------------------------------------------------------
# Your own images: a .npz file or an image folder, held in memory as one uint8 tensor
# ----------------------------------------------------------------------------------------------

UNLABELLED = -1  # the label the loaders carry for an image that has none
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})  # PIL modes read as one channel
MAX_MEMORY_FRACTION = 0.5  # own images may take at most this share of the free memory (the run needs the rest)
NPZ_LAYOUT = "'images' (N, H, W) or (N, H, W, C) uint8 with C = 1 or 3, and optionally 'labels' (N,) integers"
FOLDER_LAYOUT = "root/<class>/<image> (labelled, >= 2 classes) or the images directly in root (unlabelled)"


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def read_npz(path: str | Path, key: str = "data_path") -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays of an images ``.npz`` file: ``images`` ``(N, C, H, W)`` uint8 (grayscale ``(N, H, W)`` and
    channels-last ``(N, H, W, C)`` files are turned into it) and ``labels`` ``(N,)`` integers, or None if the file has
    none. ``key`` is the config key that named the file (for the messages).

    A missing file raises :class:`DatasetNotFoundError`; a file that is no ``.npz`` archive (or needs pickle), or
    whose arrays have the wrong dtype, rank or length, raises :class:`DatasetCorruptError` naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{key}: {path} not found; dataset 'npz' expects a .npz file with {NPZ_LAYOUT} "
                                   "(numpy.savez(path, images=..., labels=...))")  # fmt: skip
    fix = f"write it with numpy.savez(path, images=..., labels=...): {NPZ_LAYOUT}"
    try:
        archive = np.load(path, allow_pickle=False)  # no pickle: a planted object is refused, not run
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetCorruptError(f"{path} holds a single .npy array, not a .npz archive; {fix}")
        with archive:
            if "images" not in archive.files:
                raise DatasetCorruptError(f"{path} holds arrays {archive.files}, no 'images'; {fix}")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetCorruptError(f"{path} is not a readable .npz file ({_one_line(err)}); {fix}") from err
    images = _channels_first(images, path)
    if labels is not None:
        if labels.shape != (len(images),):
            raise DatasetCorruptError(
                f"{path}: 'labels' of shape {labels.shape} for {len(images)} images; expected ({len(images)},), one "
                "label per image (or no 'labels' array for unlabelled images)"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetCorruptError(f"{path}: 'labels' are {labels.dtype}; expected integers (one class per image)")
    return images, labels


def _channels_first(images: np.ndarray, path: Path) -> np.ndarray:
    """``(N, H, W)`` or ``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` (a view); anything else is a DatasetCorruptError."""
    if images.dtype != np.uint8:
        convert = "(x * 255).round().astype(numpy.uint8)" if images.dtype.kind == "f" else "x.astype(numpy.uint8)"
        raise DatasetCorruptError(
            f"{path}: 'images' are {images.dtype}; expected uint8 pixels 0-255 (convert with {convert})"
        )
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim == 4 and images.shape[1] in (1, 3):
        raise DatasetCorruptError(f"{path}: 'images' of shape {images.shape} look channels-first; expected "
                                  "(N, H, W, C): numpy.transpose(images, (0, 2, 3, 1))")  # fmt: skip
    else:
        raise DatasetCorruptError(f"{path}: 'images' of shape {images.shape}; expected (N, H, W) or (N, H, W, C) "
                                  "with C = 1 (grayscale) or 3 (RGB)")  # fmt: skip
    if images.shape[0] == 0 or min(images.shape[2:]) == 0:
        raise DatasetCorruptError(f"{path}: 'images' of shape {images.shape} hold no pixels; {NPZ_LAYOUT}")
    return images


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)  # .DS_Store, .ipynb_checkpoints


def _image_files(directory: Path, root: Path, recursive: bool) -> list[Path]:
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and _visible(p, root) and p.is_file())


def scan_image_folder(root: str | Path, key: str = "data_path") -> tuple[list[Path], list[str] | None]:
    """The image files of a folder in row order, and each one's class (its class folder's name), or None.

    Layouts: ``root/<class>/**/<image>`` (class folders in name order, the files of each sorted by path) or the
    images directly in ``root`` (sorted; classes None). Hidden files and folders are skipped, as are folders without
    images. Whether the classes count as labels is the caller's rule (:func:`load_image_folder`: two or more).
    A missing folder raises :class:`DatasetNotFoundError`; one without images, or with images both directly in it
    and in sub-folders, :class:`DatasetError`.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DatasetNotFoundError(
            f"{key}: {root} {what}; dataset 'folder' expects a folder of images: {FOLDER_LAYOUT}"
        )
    loose = _image_files(root, root, recursive=False)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d, root))
    classes = {d.name: files for d in folders if (files := _image_files(d, root, recursive=True))}
    if loose and classes:
        raise DatasetError(
            f"{root} holds images both directly ({loose[0].name}, ...) and in sub-folders ({', '.join(classes)}); "
            "put every image in a class folder (labelled) or all of them directly in the folder (unlabelled)"
        )
    if loose:
        return loose, None
    if not classes:
        raise DatasetError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); expected {FOLDER_LAYOUT}")
    return [f for files in classes.values() for f in files], [c for c, files in classes.items() for _ in files]


def _open_image(path: Path):
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> DatasetCorruptError:
    return DatasetCorruptError(f"{path} is not a readable image ({_one_line(err)}); replace or delete it")


def free_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where the OS does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_in_memory(num_images: int, image_shape: Sequence[int], what: str) -> None:
    """Raise :class:`DatasetError` when ``num_images`` uint8 images of ``image_shape`` ``(C, H, W)`` would take more
    than :data:`MAX_MEMORY_FRACTION` of the free memory (the in-memory path holds them all at once)."""
    need, free = num_images * math.prod(image_shape), free_memory()
    if free is not None and need > MAX_MEMORY_FRACTION * free:
        raise DatasetError(
            f"{what}: {num_images} images of {tuple(image_shape)} need {need / 2**30:.1f} GiB, more than half of the "
            f"{free / 2**30:.1f} GiB of free memory; lower image_size or train_subset / eval_subset"
        )


def read_image_files(files: Sequence[Path], size: int, channels: int) -> torch.Tensor:
    """Decode ``files`` into one ``(N, channels, size, size)`` uint8 tensor: each image converted to grayscale
    (``channels=1``) or RGB, its shorter side resized to ``size`` and the centre cropped (aspect ratio kept)."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with _open_image(path) as img:
                img.draft(mode, (size, size))  # JPEG: decode at a reduced scale still >= size (much faster)
                fitted = ImageOps.fit(img.convert(mode), (size, size), Image.Resampling.BILINEAR)
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged after a readable header
            raise _unreadable(path, err) from err
        out[i] = np.asarray(fitted).reshape(size, size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def image_channels(files: Sequence[Path]) -> int:
    """1 if every image is grayscale (by its header: nothing is decoded), else 3."""
    for path in files:
        with _open_image(path) as img:
            if img.mode not in GRAYSCALE_MODES:
                return 3
    return 1


def resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 -> ``(N, C, size, size)`` uint8: the shorter side resized to ``size`` (antialiased
    bilinear), the centre cropped; the same tensor when it already is ``size`` x ``size``."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    check_fits_in_memory(n, (c, size, size), "resized images")
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (rh - size) // 2, (rw - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for start in range(0, n, chunk):  # one chunk of floats at a time, not the whole set
        x = F.interpolate(images[start : start + chunk].float(), size=(rh, rw), mode="bilinear", antialias=True)
        out[start : start + chunk] = x[..., top : top + size, left : left + size].round().clamp(0, 255).byte()
    return out


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images ``(N, C, H, W)``, exact, from their histograms
    (no float copy of the set). A constant channel gets std 1/255 rather than 0, so normalising never divides by 0."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        for ch in range(images.shape[1]):
            counts[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(1)
    mean = (counts * values).sum(1) / total
    std = ((counts * values**2).sum(1) / total - mean**2).clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


@dataclass
class OwnImages:
    """One split of your own data as read: ``images`` ``(N, C, H, W)`` uint8; ``labels`` ``(N,)`` raw class
    values (integers from a ``.npz``, folder names from a folder), or None."""

    images: torch.Tensor
    labels: np.ndarray | None


def _npz_split(path: str, key: str, subset: int | None, size: int | None) -> OwnImages:
    images, labels = read_npz(path, key)
    keep = _first(subset, len(images))
    tensor = torch.from_numpy(np.ascontiguousarray(images[:keep]))  # (N, C, H, W): a copy of the kept images only
    return OwnImages(tensor if size is None else resize_images(tensor, size), None if labels is None else labels[:keep])


def load_npz(config) -> tuple[OwnImages, OwnImages | None]:
    """The training split (``data_path``) and the test split (``test_path``, or None) of ``dataset: npz``: the first
    ``train_subset`` / ``eval_subset`` images of each file, resized to ``image_size`` when it is set."""
    train = _npz_split(config.data_path, "data_path", config.train_subset, config.image_size)
    if config.test_path is None:
        return train, None
    return train, _npz_split(config.test_path, "test_path", config.eval_subset, config.image_size)


def _folder_split(
    files: list[Path], classes: list[str] | None, subset: int | None, labelled: bool
) -> tuple[list[Path], np.ndarray | None]:
    labels = np.asarray(classes) if labelled and classes is not None else None
    n = _first(subset, len(files))
    # labelled: a round-robin over the classes (the folder lists them one after the other), as for ImageNet
    keep = stratified_subset(labels, n) if labels is not None and n < len(files) else list(range(n))
    return [files[i] for i in keep], None if labels is None else labels[keep]


def load_image_folder(config) -> tuple[OwnImages, OwnImages | None]:
    """The training split (``data_path``) and the test split (``test_path``, or None) of ``dataset: folder``, every
    image resized to ``image_size`` and grayscale when all of them are, RGB otherwise.

    Labels are the class folders' names when the training folder has two or more (a test folder is then labelled
    when its images are in class folders). ``train_subset`` / ``eval_subset`` take a round-robin over the classes
    (:func:`stratified_subset`) when labelled, else the first images.
    """
    files, classes = scan_image_folder(config.data_path, "data_path")
    labelled = classes is not None and len(set(classes)) >= 2  # one class folder tells nothing apart
    train_files, train_labels = _folder_split(files, classes, config.train_subset, labelled)
    test_files, test_labels = [], None
    if config.test_path is not None:
        test_scan = scan_image_folder(config.test_path, "test_path")
        test_files, test_labels = _folder_split(*test_scan, config.eval_subset, labelled)
    channels, size = image_channels([*train_files, *test_files]), config.image_size
    check_fits_in_memory(len(train_files) + len(test_files), (channels, size, size), f"{config.data_path}")
    train = OwnImages(read_image_files(train_files, size, channels), train_labels)
    if config.test_path is None:
        return train, None
    return train, OwnImages(read_image_files(test_files, size, channels), test_labels)


# dataset -> the reader of its (training, test) images: your own data, held in memory
OWN_DATA = {"npz": load_npz, "folder": load_image_folder}


def encode_labels(train: np.ndarray, test: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Raw class values (integers or names) -> class indices ``0..K-1`` in sorted order of the values of both splits
    (a test class that never occurs in training gets an index too, and simply cannot be predicted)."""
    classes = np.unique(train if test is None else np.concatenate([train, test]))

    def code(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(classes, values).astype(np.int64))

    return code(train), None if test is None else code(test), len(classes)


def _own_bundle(config, train: OwnImages, test: OwnImages | None) -> DataBundle:
    """The in-memory bundle of your own images: normalised with the training images' per-channel mean and std."""
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        raise DatasetError(
            f"the test images (test_path {config.test_path}) are {tuple(test.images.shape[1:])} (C, H, W), the "
            f"training images {tuple(train.images.shape[1:])}; they must match (set image_size to resize both)"
        )
    train_labels = test_labels = None
    num_classes = 0  # unlabelled
    if train.labels is not None:
        train_labels, test_labels, num_classes = encode_labels(train.labels, None if test is None else test.labels)
    mean, std = channel_stats(train.images)
    return _in_memory_bundle(
        config, train.images, train_labels, None if test is None else test.images, test_labels, mean, std, num_classes
    )


def _in_memory_bundle(
    config,
    train: torch.Tensor,
    train_labels: torch.Tensor | None,
    test: torch.Tensor | None,
    test_labels: torch.Tensor | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    augment: nn.Module | None = None,
) -> DataBundle:
    """The bundle of a dataset held in memory: uint8 ``train`` and ``test`` images ``(N, H, W)`` or ``(N, C, H, W)``
    with labels ``(N,)`` (None: unlabelled; ``test`` None: no test set), batches sliced from the tensors
    (:class:`TensorBatchLoader`) and augmented on the training device by ``augment`` (default :class:`BatchAugment`
    as ``config`` asks; with ``augment: none`` only normalised)."""
    check_batch_fits(config.batch_size, distributed.world_size(), len(train))
    targets = train_labels if train_labels is not None else torch.full((len(train),), UNLABELLED)
    if config.augment == "none":
        augment = Normalize(mean, std)
    elif augment is None:
        jitter = 0.0 if config.augment == "crop_flip" else 0.4  # crop_flip: no brightness/contrast jitter
        augment = BatchAugment(mean, std, scale=(config.crop_scale, 1.0), flip=config.flip, jitter=jitter)
    test_loader = None
    if test is not None:
        test_targets = test_labels if test_labels is not None else torch.full((len(test),), UNLABELLED)
        test_loader = TensorBatchLoader(test, test_targets, EVAL_BATCH_TENSOR, shuffle=False)
    return DataBundle(
        train_loader=TensorBatchLoader(train, targets, config.batch_size, True, drop_last=True, seed=config.seed),
        train_eval_loader=TensorBatchLoader(train, targets, EVAL_BATCH_TENSOR, shuffle=False),
        test_loader=test_loader,
        train_augment=augment,
        eval_transform=Normalize(mean, std),
        num_train=len(train),
        train_labels=None if train_labels is None else train_labels.clone(),
        in_channels=1 if train.dim() == 3 else train.shape[1],
        num_classes=num_classes,
        num_test=0 if test is None else len(test),
        mean=mean,
        std=std,
        test_labelled=test_labels is not None,
    )


# ----------------------------------------------------------------------------------------------
# One entry point for the trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """Everything a run needs from its data.

    ``train_loader`` yields ``(images, labels, indices)`` of training batches (this rank's share of each
    step); ``train_augment`` is applied to those images on the device (identity when the loader already
    augmented them); ``eval_transform`` likewise for ``test_loader`` and ``train_eval_loader`` (un-augmented
    training images, for extracting final features). Both evaluation loaders yield this rank's shard of
    positions ``0..N-1`` as ``indices`` (all of them in one process); for ``train_eval_loader`` the position
    is the bank row. ``train_labels`` ``(num_train,)`` label every bank row; ``num_test`` is the number of
    test images over all ranks.

    Your own data may lack labels or a test set: then ``train_labels`` is None (``num_classes`` 0), ``test_loader``
    is None (``num_test`` 0), or ``test_labelled`` is False; the loaders carry :data:`UNLABELLED` as the label of
    an image without one, and :attr:`knn_unavailable` says why no kNN can be scored.
    """

    train_loader: object
    train_eval_loader: object
    test_loader: object | None
    train_augment: nn.Module
    eval_transform: nn.Module
    num_train: int
    train_labels: torch.Tensor | None
    in_channels: int
    num_classes: int
    num_test: int
    mean: tuple[float, ...] = ()  # the per-channel normalisation every image arrives with (to undo it: CMC's Lab)
    std: tuple[float, ...] = ()
    test_labelled: bool = True

    @property
    def knn_unavailable(self) -> str | None:
        """Why no kNN evaluation can be scored on this data (a kNN needs labelled training and test images), or None
        when it can."""
        if self.train_labels is None:
            return "the training images have no labels"
        if self.test_loader is None:
            return "there is no test set (test_path)"
        if not self.test_labelled:
            return "the test images have no labels"
        return None

    def views(self, images: torch.Tensor, num_views: int = 1) -> list[torch.Tensor]:
        """``num_views`` independently augmented views ``(B, C, H, W)`` of a training batch, on its device.

        In-memory data (Fashion-MNIST, your own images, CIFAR-10 held on the device) arrives raw, ``(B, C, H, W)``,
        and is augmented here once per view; loader data (CIFAR-10 otherwise, ImageNet) arrives augmented,
        ``(B, C, H, W)`` for one view or ``(B, V, C, H, W)`` from :class:`MultiView`, and is split into its views.
        """
        if images.dim() == 5:
            if images.shape[1] != num_views:
                raise ValueError(f"the loader made {images.shape[1]} views per image, the method needs {num_views}")
            return [self.train_augment(v) for v in images.unbind(1)]
        return [self.train_augment(images) for _ in range(num_views)]


class MultiView:
    """``transform`` applied ``num_views`` times to one image: ``(V, C, H, W)`` (two crops for two-view methods).

    Under :class:`SeededItems` the views are drawn one after the other from the image's seeded RNG, so they are
    different from each other and the same on every rerun.
    """

    def __init__(self, transform, num_views: int) -> None:
        self.transform, self.num_views = transform, num_views

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.num_views)])

    def __repr__(self) -> str:
        return f"MultiView({self.transform!r}, num_views={self.num_views})"


def set_epoch(loader, epoch: int, seed: int) -> None:
    """Make a training loader's order and augmentations a function of (seed, epoch) alone.

    That is what lets a run resumed at epoch k see exactly the batches an uninterrupted run sees.
    """
    ours = loader if isinstance(loader, TensorBatchLoader) else getattr(loader, "batch_sampler", None)
    if isinstance(ours, TensorBatchLoader | EpochBatchSampler):
        ours.set_epoch(epoch, seed)
        return
    # any other loader: the usual hooks (a DistributedSampler, a DataLoader's shuffling generator)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(mix_seed(seed, epoch))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_batch_fits(batch_size: int, world: int, num_train: int) -> None:
    """Raise :class:`ConfigError` when one step (``batch_size`` per process x ``world``) needs more images than
    there are (drop_last would leave zero steps)."""
    if batch_size * world > num_train:
        raise ConfigError(
            f"batch_size={batch_size} x world size {world} = {batch_size * world} images per step, but there are "
            f"only {num_train} training images: lower batch_size or raise train_subset."
        )


def _first(n: int | None, available: int) -> int:
    return available if n is None else min(n, available)


def _imagenet_subset(targets: list[int], size: int | None) -> list[int]:
    # ImageFolder lists the images class by class, so the first N would be a handful of classes
    if size is None or size >= len(targets):
        return list(range(len(targets)))  # the whole split: bank row = ImageFolder index
    return stratified_subset(targets, size)


def augments_on_device(config, device: torch.device | str) -> bool:
    """Whether CIFAR-10 is held on ``device`` and augmented there a batch at a time: config ``augment_on_device``
    (``auto``: on a CUDA device; on a CPU the per-image loader path, which uses the other cores, stays)."""
    choice = config.augment_on_device
    return torch.device(device).type == "cuda" if choice == "auto" else bool(choice)


def _cifar10_on_device(config, device: torch.device | str) -> DataBundle:
    """CIFAR-10 as uint8 tensors ``(N, 3, 32, 32)`` on ``device`` (50,000 images: 150 MB), the first
    ``train_subset`` / ``eval_subset`` of each split, augmented by :class:`ColourBatchAugment` (the paper's
    transforms, as :func:`paper_train_transform`) and evaluated on the un-augmented normalised images."""
    train = CIFAR10Instance(config.data_root, train=True)
    test = CIFAR10Instance(config.data_root, train=False)
    n, n_test = _first(config.train_subset, len(train)), _first(config.eval_subset, len(test))

    def held(images: np.ndarray, keep: int) -> torch.Tensor:  # (N, 32, 32, 3) uint8 -> (keep, 3, 32, 32) on device
        return torch.from_numpy(images[:keep]).permute(0, 3, 1, 2).contiguous().to(device)

    scale, colour = (config.crop_scale, 1.0), config.augment == "paper"
    augment = ColourBatchAugment(32, CIFAR10_MEAN, CIFAR10_STD, scale, flip=config.flip, colour=colour)
    train_labels, test_labels = torch.as_tensor(train.targets[:n]), torch.as_tensor(test.targets[:n_test])
    return _in_memory_bundle(config, held(train.data, n), train_labels, held(test.data, n_test), test_labels,
                             CIFAR10_MEAN, CIFAR10_STD, num_classes=10, augment=augment)  # fmt: skip


def build_data(config, device: torch.device | str = "cpu", num_views: int = 1) -> DataBundle:
    """Datasets, loaders and augmentation for ``config`` (a :class:`~instdisc_lite.config.TrainConfig`).

    ``num_views``: augmented views of each training image a step takes (:meth:`DataBundle.views`).
    """
    pin = torch.device(device).type == "cuda"
    # more loader processes than CPUs only compete with the training step (Colab has 2 cores, configs ask for 4)
    nw, bs, seed, world = (
        min(config.num_workers, available_cpus()),
        config.batch_size,
        config.seed,
        distributed.world_size(),
    )
    if config.dataset in OWN_DATA:
        return _own_bundle(config, *OWN_DATA[config.dataset](config))
    if config.dataset == "fashion_mnist":
        train = FashionMNIST(config.data_root, train=True)
        test = FashionMNIST(config.data_root, train=False)
        n, n_test = _first(config.train_subset, len(train)), _first(config.eval_subset, len(test))
        # the first N: the benchmarks rely on that
        return _in_memory_bundle(config, train.data[:n], train.targets[:n], test.data[:n_test], test.targets[:n_test],
                                 FASHION_MNIST_MEAN, FASHION_MNIST_STD, num_classes=10)  # fmt: skip
    if config.dataset == "cifar10" and augments_on_device(config, device):
        return _cifar10_on_device(config, device)
    if config.dataset == "cifar10":
        mean, std, size = CIFAR10_MEAN, CIFAR10_STD, 32
        eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        train_tf = (
            paper_train_transform(size, mean, std, (config.crop_scale, 1.0), config.augment == "paper", config.flip)
            if config.augment != "none"
            else eval_tf
        )
        train = CIFAR10Instance(config.data_root, train=True, transform=train_tf)
        train_eval = CIFAR10Instance(config.data_root, train=True, transform=eval_tf)
        test = CIFAR10Instance(config.data_root, train=False, transform=eval_tf)
        # the first N (the benchmarks rely on that; CIFAR's batches are class-balanced already)
        keep = list(range(_first(config.train_subset, len(train))))
        keep_test = list(range(_first(config.eval_subset, len(test))))
        num_classes = 10
    elif config.dataset == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
        train_tf = (
            paper_train_transform(224, mean, std, (config.crop_scale, 1.0), config.augment == "paper", config.flip)
            if config.augment != "none"
            else eval_tf
        )
        train = imagenet_split(config.data_root, True, train_tf)
        train_eval = imagenet_split(config.data_root, True, eval_tf)
        test = imagenet_split(config.data_root, False, eval_tf)
        keep = _imagenet_subset(train.targets, config.train_subset)
        keep_test = _imagenet_subset(test.targets, config.eval_subset)
        num_classes = len(train.classes)
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of: {', '.join(DATASETS)}")
    check_batch_fits(bs, world, len(keep))
    if num_views > 1 and config.augment != "none":
        train.transform = MultiView(train.transform, num_views)
    labels = torch.as_tensor(train.targets)[keep]  # bank row i is subset position i
    train, train_eval, test = (
        PositionSubset(train, keep),
        PositionSubset(train_eval, keep),
        PositionSubset(test, keep_test),
    )
    return DataBundle(
        train_loader=train_loader(train, bs, nw, seed, pin),
        train_eval_loader=eval_loader(train_eval, 2 * bs, nw, pin),
        test_loader=eval_loader(test, 2 * bs, nw, pin),
        train_augment=nn.Identity(),
        eval_transform=nn.Identity(),
        num_train=len(keep),
        train_labels=labels,
        in_channels=3,
        num_classes=num_classes,
        num_test=len(keep_test),
        mean=mean,
        std=std,
    )
