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
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

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


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message says where to put it or how to install it."""


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    zero, dtype_code, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


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
        images, labels = find_fashion_mnist(root, train, download)
        self.data = torch.from_numpy(read_idx(images).copy())
        self.targets = torch.from_numpy(read_idx(labels).astype(np.int64))
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


class CIFAR10Instance(torchvision.datasets.CIFAR10):
    """torchvision CIFAR-10 returning ``(image, label, index)``.

    torchvision checks the md5 of the pickles it downloaded; here the files may come from anywhere
    (a shared drive, a generated test set), so integrity is the presence of every batch file.
    """

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        return all((base / name).exists() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        # torchvision's version also checks batches.meta against its md5; presence is enough here too
        import pickle

        path = Path(self.root) / self.base_folder / self.meta["filename"]
        if not path.exists():
            raise RuntimeError(f"CIFAR-10 metadata file {path} not found")
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        try:
            super().__init__(str(root), train=train, transform=transform, download=download)
        except RuntimeError as err:
            raise DatasetNotFoundError(
                f"CIFAR-10 was not found in {Path(root) / self.base_folder}. Download the python version "
                "(cifar-10-python.tar.gz) and extract it there, or run with download allowed "
                "(`instdisc_lite.data.CIFAR10Instance(root, download=True)`) on a machine with network access."
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
# Augmentation
# ----------------------------------------------------------------------------------------------


def paper_train_transform(size: int, mean, std) -> T.Compose:
    """The paper's augmentation: RandomResizedCrop(0.2-1), ColorJitter(0.4 x4), Grayscale(0.2), flip."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomGrayscale(p=0.2),
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


class TensorBatchLoader:
    """Batches of ``(uint8 images (B, 1, H, W), labels, indices)`` straight from in-memory tensors.

    The per-image DataLoader path costs tens of microseconds per image in Python; for a dataset that
    fits in memory, slicing a tensor is all a batch needs. ``set_epoch`` makes the order a function of
    (seed, epoch) alone, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        indices: torch.Tensor | None = None,
    ) -> None:
        self.data, self.targets = data, targets
        self.indices = indices if indices is not None else torch.arange(len(targets))
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch = 0
        self.dataset = self  # so len(loader.dataset) works like a DataLoader's

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.data[idx].unsqueeze(1), self.targets[idx], idx


# ----------------------------------------------------------------------------------------------
# One entry point for the trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """Everything a run needs from its data.

    ``train_loader`` yields ``(images, labels, indices)`` of training batches; ``train_augment`` is
    applied to those images on the device (identity when the loader already augmented them);
    ``eval_transform`` likewise for ``test_loader`` and ``train_eval_loader`` (un-augmented
    training images, for extracting final features). ``train_labels`` ``(num_train,)`` label every bank row.
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


def set_epoch(loader, epoch: int, seed: int) -> None:
    """Make a training loader's order (and its workers' seeds) a function of (seed, epoch) alone.

    That is what lets a run resumed at epoch k see exactly the batches an uninterrupted run sees.
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    if isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed * 100003 + epoch)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _loader(dataset, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int, seed: int, pin: bool):
    from . import distributed

    sampler = None
    if distributed.is_distributed() and shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin,
        generator=g,
        persistent_workers=num_workers > 0,
    )


def build_data(config, device: torch.device | str = "cpu") -> DataBundle:
    """Datasets, loaders and augmentation for ``config`` (a :class:`~instdisc_lite.config.TrainConfig`)."""
    from . import distributed

    pin = torch.device(device).type == "cuda"
    # more loader processes than CPUs only compete with the training step (Colab has 2 cores, configs ask for 4)
    nw, bs, seed = min(config.num_workers, available_cpus()), config.batch_size, config.seed
    if config.dataset == "fashion_mnist":
        train = FashionMNIST(config.data_root, train=True)
        test = FashionMNIST(config.data_root, train=False)
        n = len(train) if config.train_subset is None else min(config.train_subset, len(train))
        data, targets = train.data[:n], train.targets[:n]
        n_test = len(test) if config.eval_subset is None else min(config.eval_subset, len(test))
        if distributed.is_distributed():  # each rank takes a strided shard of the per-epoch order
            # every rank gets the same number of items, so all ranks take the same number of steps
            world = distributed.world_size()
            shard = torch.arange(distributed.rank(), (n // world) * world, world)
            train_loader = TensorBatchLoader(data, targets, bs, True, drop_last=True, seed=seed, indices=shard)
        else:
            train_loader = TensorBatchLoader(data, targets, bs, shuffle=True, drop_last=True, seed=seed)
        if config.augment == "none":
            augment: nn.Module = Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        else:
            augment = BatchAugment(FASHION_MNIST_MEAN, FASHION_MNIST_STD, scale=(config.crop_scale, 1.0))
        return DataBundle(
            train_loader=train_loader,
            train_eval_loader=TensorBatchLoader(data, targets, 1024, shuffle=False),
            test_loader=TensorBatchLoader(test.data[:n_test], test.targets[:n_test], 1024, shuffle=False),
            train_augment=augment,
            eval_transform=Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
            num_train=n,
            train_labels=targets.clone(),
            in_channels=1,
            num_classes=10,
        )
    if config.dataset == "cifar10":
        mean, std, size = CIFAR10_MEAN, CIFAR10_STD, 32
        eval_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        train_tf = paper_train_transform(size, mean, std) if config.augment != "none" else eval_tf
        train = CIFAR10Instance(config.data_root, train=True, transform=train_tf)
        train_eval = CIFAR10Instance(config.data_root, train=True, transform=eval_tf)
        test = CIFAR10Instance(config.data_root, train=False, transform=eval_tf)
        labels = torch.tensor(train.targets)
        num_classes = 10
    elif config.dataset == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
        train_tf = paper_train_transform(224, mean, std) if config.augment != "none" else eval_tf
        train = imagenet_split(config.data_root, True, train_tf)
        train_eval = imagenet_split(config.data_root, True, eval_tf)
        test = imagenet_split(config.data_root, False, eval_tf)
        labels = torch.tensor(train.targets)
        num_classes = len(train.classes)
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of: fashion_mnist, cifar10, imagenet")
    if config.train_subset is not None:
        keep = list(range(min(config.train_subset, len(train))))
        train, train_eval, labels = Subset(train, keep), Subset(train_eval, keep), labels[: len(keep)]
    if config.eval_subset is not None:
        test = Subset(test, list(range(min(config.eval_subset, len(test)))))
    return DataBundle(
        train_loader=_loader(train, bs, True, True, nw, seed, pin),
        train_eval_loader=_loader(train_eval, 2 * bs, False, False, nw, seed, pin),
        test_loader=_loader(test, 2 * bs, False, False, nw, seed, pin),
        train_augment=nn.Identity(),
        eval_transform=nn.Identity(),
        num_train=len(labels),
        train_labels=labels,
        in_channels=3,
        num_classes=num_classes,
    )
