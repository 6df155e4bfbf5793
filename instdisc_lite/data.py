"""Datasets that return ``(image, label, index)`` — the index is the image's "class" and its bank row.

* Fashion-MNIST: read from its four IDX ``.gz`` files in ``data/`` or in
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``), or downloaded by
  torchvision where the network allows.
* CIFAR-10: torchvision's loader over the ``cifar-10-batches-py`` pickles.
* ImageNet: torchvision's ``ImageFolder`` over ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/``.

Augmentation is the paper's (RandomResizedCrop scale 0.2-1, ColorJitter 0.4, RandomGrayscale 0.2,
flip) for CIFAR/ImageNet, applied per image in DataLoader workers. Fashion-MNIST is small enough to
live in one tensor; it is augmented a whole batch at a time on the training device
(:class:`BatchAugment`), which is what makes a CPU run of a few minutes possible.

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
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision import transforms as T

from . import distributed
from .config import ConfigError

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
    size: int, mean, std, scale: tuple[float, float] = (0.2, 1.0), colour: bool = True
) -> T.Compose:
    """The paper's augmentation: RandomResizedCrop(``scale``; the paper's 0.2-1), ColorJitter(0.4 x4),
    RandomGrayscale(0.2), horizontal flip. ``colour=False`` (``augment: crop_flip``) keeps the crop and the flip
    only: for CMC, whose views *are* colour channels, a grayscale crop would leave the ab view empty and hue or
    saturation jitter would change mostly that view."""
    colour_ops = [T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomGrayscale(p=0.2)] if colour else []
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        *colour_ops,
        T.RandomHorizontalFlip(),
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
    """Batches of ``(uint8 images (B, 1, H, W), labels (B,), indices (B,))`` straight from in-memory tensors.

    The per-image DataLoader path costs tens of microseconds per image in Python; for a dataset that
    fits in memory, slicing a tensor is all a batch needs. ``indices`` are positions in ``data``.

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
            yield self.data[idx].unsqueeze(1), self.targets[idx], idx


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
    """

    train_loader: object
    train_eval_loader: object
    test_loader: object
    train_augment: nn.Module
    eval_transform: nn.Module
    num_train: int
    train_labels: torch.Tensor
    in_channels: int
    num_classes: int
    num_test: int
    mean: tuple[float, ...] = ()  # the per-channel normalisation every image arrives with (to undo it: CMC's Lab)
    std: tuple[float, ...] = ()

    def views(self, images: torch.Tensor, num_views: int = 1) -> list[torch.Tensor]:
        """``num_views`` independently augmented views ``(B, C, H, W)`` of a training batch, on its device.

        In-memory data (Fashion-MNIST) arrives raw, ``(B, C, H, W)``, and is augmented here once per view; loader
        data (CIFAR-10, ImageNet) arrives augmented, ``(B, C, H, W)`` for one view or ``(B, V, C, H, W)`` from
        :class:`MultiView`, and is split into its views.
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
    if config.dataset == "fashion_mnist":
        train = FashionMNIST(config.data_root, train=True)
        test = FashionMNIST(config.data_root, train=False)
        n, n_test = _first(config.train_subset, len(train)), _first(config.eval_subset, len(test))
        check_batch_fits(bs, world, n)
        data, targets = train.data[:n], train.targets[:n]  # the first N: the benchmarks rely on that
        if config.augment == "none":
            augment: nn.Module = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        else:
            jitter = 0.0 if config.augment == "crop_flip" else 0.4  # crop_flip: no brightness/contrast jitter
            augment = BatchAugment(FASHION_MNIST_MEAN, FASHION_MNIST_STD, scale=(config.crop_scale, 1.0), jitter=jitter)
        return DataBundle(
            train_loader=TensorBatchLoader(data, targets, bs, shuffle=True, drop_last=True, seed=seed),
            train_eval_loader=TensorBatchLoader(data, targets, EVAL_BATCH_TENSOR, shuffle=False),
            test_loader=TensorBatchLoader(test.data[:n_test], test.targets[:n_test], EVAL_BATCH_TENSOR, shuffle=False),
            train_augment=augment,
            eval_transform=Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
            num_train=n,
            train_labels=targets.clone(),
            in_channels=1,
            num_classes=10,
            num_test=n_test,
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
        )
    if config.dataset == "cifar10":
        mean, std, size = CIFAR10_MEAN, CIFAR10_STD, 32
        eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        train_tf = (
            paper_train_transform(size, mean, std, (config.crop_scale, 1.0), colour=config.augment == "paper")
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
            paper_train_transform(224, mean, std, (config.crop_scale, 1.0), colour=config.augment == "paper")
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
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of: fashion_mnist, cifar10, imagenet")
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
