"""Datasets: (image, label, index) items, clear errors for missing or corrupt data, loaders and augmentation.

The loaders' contract: the training order and every augmentation are functions of (seed, epoch, index) alone
(so resuming, worker counts and world sizes do not change them), the ranks of a W-process run together see the
one-process batches of size B*W, and the evaluation shards of all ranks partition the positions 0..N-1.
"""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms as T

import instdisc_lite
from instdisc_lite import BatchAugment, ConfigError, DatasetNotFoundError, FashionMNIST
from instdisc_lite.data import (
    CIFAR10Instance,
    DatasetCorruptError,
    DatasetError,
    PositionSubset,
    TensorBatchLoader,
    build_data,
    eval_loader,
    imagenet_split,
    paper_train_transform,
    read_idx,
    set_epoch,
    shard_positions,
    stratified_subset,
    train_loader,
)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# ------------------------------------------------------------------------------------------------
# Missing datasets
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_system_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(instdisc_lite.data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, no_system_fashion_mnist):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        FashionMNIST(root, train=True, download=False)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(root / "fashion-mnist") in message  # where to put the files
    assert "train-images-idx3-ubyte.gz" in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DatasetError)


def test_missing_fashion_mnist_when_download_fails(tmp_path, no_system_fashion_mnist, monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path, train=False, download=True)
    assert calls and calls[0]["download"] is True


def test_missing_cifar10_says_where_to_put_it(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        CIFAR10Instance(root, train=True)
    message = str(err.value)
    assert str(root / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message


def test_incomplete_cifar10_is_missing(tiny_cifar10, tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "data_batch_1").write_bytes((tiny_cifar10["root"] / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    with pytest.raises(DatasetNotFoundError):
        CIFAR10Instance(tmp_path, train=True)


@pytest.mark.parametrize("train", [True, False])
def test_missing_imagenet_says_expected_layout(tmp_path, train):
    root = tmp_path / "imagenet"
    with pytest.raises(DatasetNotFoundError) as err:
        imagenet_split(root, train=train)
    split = root / ("train" if train else "val")
    assert str(split) in str(err.value) and "<wnid>" in str(err.value)
    split.mkdir(parents=True)  # an empty split folder is missing too
    with pytest.raises(DatasetNotFoundError):
        imagenet_split(root, train=train)


def test_train_reports_missing_dataset_before_building_anything(tmp_path):
    with pytest.raises(DatasetNotFoundError):
        instdisc_lite.train("cifar10_resnet18", {"data_root": str(tmp_path), "out_dir": str(tmp_path / "runs")})
    # nothing of the run was written (out_dir holds only the hidden lock file that guarded the attempt)
    assert not (tmp_path / "runs" / "cifar10_resnet18").exists()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".cifar10_resnet18.lock"]


def test_cli_reports_missing_dataset(tmp_path, capsys):
    from instdisc_lite.__main__ import main

    code = main(["train", "--config", "imagenet_resnet18", "--set", f"data_root={tmp_path}", f"out_dir={tmp_path}"])
    assert code != 0
    assert "ImageNet train split not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Generated CIFAR-10 and ImageNet
# ------------------------------------------------------------------------------------------------


def test_cifar10_instance_returns_image_label_index(tiny_cifar10):
    train = CIFAR10Instance(tiny_cifar10["root"], train=True, transform=T.ToTensor())
    test = CIFAR10Instance(tiny_cifar10["root"], train=False, transform=T.ToTensor())
    assert len(train) == len(tiny_cifar10["train_labels"]) and len(test) == len(tiny_cifar10["test_labels"])
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    for i in (0, 7, len(train) - 1):
        image, label, index = train[i]
        assert index == i and label == tiny_cifar10["train_labels"][i]
        expected = torch.from_numpy(tiny_cifar10["train_data"][i].reshape(3, 32, 32)).float() / 255
        torch.testing.assert_close(image, expected)
    image, label, index = test[3]
    assert (index, label) == (3, tiny_cifar10["test_labels"][3]) and image.shape == (3, 32, 32)


def test_loader_workers_capped_at_available_cpus(tiny_cifar10, monkeypatch):
    monkeypatch.setattr("instdisc_lite.data.available_cpus", lambda: 2)
    root = str(tiny_cifar10["root"])
    config = instdisc_lite.TrainConfig(dataset="cifar10", data_root=root, num_workers=8, batch_size=4)
    bundle = build_data(config)
    assert {bundle.train_loader.num_workers, bundle.test_loader.num_workers} == {2}
    config = instdisc_lite.TrainConfig(dataset="cifar10", data_root=root, num_workers=0, batch_size=4)
    assert build_data(config).train_loader.num_workers == 0


def test_imagenet_split_returns_image_label_index(tiny_imagenet):
    root, classes = tiny_imagenet["root"], tiny_imagenet["classes"]
    for train, split in ((True, "train"), (False, "val")):
        ds = imagenet_split(root, train=train, transform=T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor()]))
        assert ds.classes == sorted(classes)
        assert len(ds) == len(classes) * tiny_imagenet["counts"][split]
        for i in range(len(ds)):
            image, label, index = ds[i]
            assert index == i and image.shape == (3, 24, 24)
            assert ds.samples[i][0].split("/")[-2] == classes[label]
    # the two generated classes differ in brightness, so labels really follow the folders
    ds = imagenet_split(root, train=True, transform=T.ToTensor())
    means = [ds[i][0].mean().item() for i in range(len(ds))]
    labels = [ds[i][1] for i in range(len(ds))]
    dark = max(m for m, y in zip(means, labels, strict=True) if y == 0)
    bright = min(m for m, y in zip(means, labels, strict=True) if y == 1)
    assert dark < bright


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files, real data, in-memory loader
# ------------------------------------------------------------------------------------------------


def test_fashion_mnist_reads_idx_files_from_root(tmp_path, no_system_fashion_mnist):
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    images = {True: rng.integers(0, 256, (6, 28, 28)), False: rng.integers(0, 256, (3, 28, 28))}
    labels = {True: np.array([0, 9, 3, 3, 1, 2]), False: np.array([5, 6, 7])}
    for train, (img_name, lbl_name) in instdisc_lite.data.FASHION_MNIST_FILES.items():
        write_idx(d / img_name, images[train])
        write_idx(d / lbl_name, labels[train])
    assert np.array_equal(read_idx(d / "train-images-idx3-ubyte.gz"), images[True])
    for train in (True, False):
        ds = FashionMNIST(tmp_path, train=train, download=False)
        assert len(ds) == len(labels[train])
        assert torch.equal(ds.data, torch.from_numpy(images[train].astype(np.uint8)))
        image, label, index = ds[1]
        assert (label, index) == (int(labels[train][1]), 1)
        torch.testing.assert_close(image, torch.from_numpy(images[train][1]).float().unsqueeze(0) / 255)


def test_real_fashion_mnist(fashion_mnist_available, tmp_path):
    train = FashionMNIST(tmp_path, train=True, download=False)
    test = FashionMNIST(tmp_path, train=False, download=False)
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.data.shape == (60_000, 28, 28) and train.data.dtype == torch.uint8
    assert torch.equal(torch.bincount(train.targets), torch.full((10,), 6000))
    image, label, index = test[123]
    assert image.shape == (1, 28, 28) and 0 <= image.min() and image.max() <= 1 and index == 123


def test_tensor_batch_loader_order_is_a_function_of_seed_and_epoch():
    data = torch.arange(50, dtype=torch.uint8).view(50, 1, 1).expand(50, 2, 2).contiguous()
    targets = torch.arange(50) % 10

    def epoch_indices(seed, epoch, drop_last=False):
        loader = TensorBatchLoader(data, targets, 8, shuffle=True, drop_last=drop_last, seed=seed)
        loader.set_epoch(epoch)
        out = []
        for images, labels, idx in loader:
            assert images.shape == (len(idx), 1, 2, 2)
            assert torch.equal(images[:, 0, 0, 0].long(), idx) and torch.equal(labels, targets[idx])
            out.append(idx)
        return torch.cat(out)

    first = epoch_indices(0, 0)
    assert torch.equal(torch.sort(first).values, torch.arange(50))  # every image once
    assert torch.equal(first, epoch_indices(0, 0))  # same seed and epoch: same order
    assert not torch.equal(first, epoch_indices(0, 1))
    assert not torch.equal(first, epoch_indices(1, 0))
    assert len(epoch_indices(0, 0, drop_last=True)) == 48


def test_batch_augment_identity_crop_is_just_normalisation():
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    aug = BatchAugment((0.5,), (0.25,), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0.0)
    torch.testing.assert_close(aug(x), (x.float() / 255 - 0.5) / 0.25, atol=1e-4, rtol=1e-4)


def test_batch_augment_random_crops_differ_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).expand(6, 3, 32, 32)
    out = BatchAugment((0.0,) * 3, (1.0,) * 3)(x)
    assert out.shape == x.shape
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 6))


# ------------------------------------------------------------------------------------------------
# Corrupt files: one line naming the file and the fix
# ------------------------------------------------------------------------------------------------


def _fashion_mnist_dir(tmp_path, num_train: int = 6) -> dict:
    """Valid IDX files in ``tmp_path/fashion-mnist``: {(train, kind): path}."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    paths = {}
    for train, (img_name, lbl_name) in instdisc_lite.data.FASHION_MNIST_FILES.items():
        n = num_train if train else 3
        write_idx(d / img_name, rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / lbl_name, rng.integers(0, 10, n))
        paths[train, "images"], paths[train, "labels"] = d / img_name, d / lbl_name
    return paths


def _gzip_bytes(path, data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(data)


def _truncate(path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # a gzip stream cut in half: EOF before its end marker


def _not_gzip(path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")  # what a failed download leaves behind


def _wrong_magic(path) -> None:
    _gzip_bytes(path, struct.pack(">BBBB", 0, 0, 0x0D, 3) + struct.pack(">III", 6, 28, 28) + bytes(6 * 784))


def _short_data(path) -> None:
    _gzip_bytes(path, struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">III", 6, 28, 28) + bytes(5 * 784))


def _cut_header(path) -> None:
    _gzip_bytes(path, struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">I", 6))


@pytest.mark.parametrize("damage", [_truncate, _not_gzip, _wrong_magic, _short_data, _cut_header])
def test_corrupt_idx_file_is_named_with_the_fix(tmp_path, no_system_fashion_mnist, damage):
    paths = _fashion_mnist_dir(tmp_path)
    bad = paths[True, "images"]
    damage(bad)
    with pytest.raises(DatasetCorruptError) as err:
        FashionMNIST(tmp_path, train=True, download=False)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message and "Fashion-MNIST release" in message
    assert isinstance(err.value, DatasetError) and isinstance(err.value, ValueError)
    FashionMNIST(tmp_path, train=False, download=False)  # the other split's files are fine


def test_images_and_labels_of_different_counts_are_corrupt(tmp_path, no_system_fashion_mnist):
    paths = _fashion_mnist_dir(tmp_path)
    write_idx(paths[True, "labels"], np.zeros(5))
    with pytest.raises(DatasetCorruptError, match="6 images but train-labels-idx1-ubyte.gz holds 5 labels") as err:
        FashionMNIST(tmp_path, train=True, download=False)
    assert str(paths[True, "images"]) in str(err.value)


@pytest.fixture
def cifar10_copy(tiny_cifar10, tmp_path):
    """A writable copy of ``tiny_cifar10``: its ``cifar-10-batches-py`` folder."""
    base = tmp_path / "cifar-10-batches-py"
    shutil.copytree(tiny_cifar10["root"] / "cifar-10-batches-py", base)
    return base


@pytest.mark.parametrize("name", ["data_batch_3", "batches.meta"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cifar10_pickle_is_named(cifar10_copy, name, damage):
    path = cifar10_copy / name
    raw = path.read_bytes()
    path.write_bytes(b"\x00garbage, not a pickle" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DatasetCorruptError) as err:
        CIFAR10Instance(cifar10_copy.parent, train=True)
    assert str(path) in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    assert "\n" not in str(err.value)
    if name == "data_batch_3":
        CIFAR10Instance(cifar10_copy.parent, train=False)  # the test split does not read it


# ------------------------------------------------------------------------------------------------
# Config checks that need the data: batch too large, crop_scale
# ------------------------------------------------------------------------------------------------


def test_batch_larger_than_the_training_set_is_a_config_error(tiny_cifar10_config, monkeypatch):
    with pytest.raises(ConfigError) as err:
        build_data(tiny_cifar10_config(batch_size=32))
    message = str(err.value)
    assert "batch_size=32" in message and "world size 1" in message and "20 training images" in message
    assert "lower batch_size or raise train_subset" in message and "\n" not in message
    monkeypatch.setattr(instdisc_lite.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="batch_size=4 x world size 2 = 8 .* only 6 training images"):
        build_data(tiny_cifar10_config(train_subset=6))
    assert len(build_data(tiny_cifar10_config(batch_size=3, train_subset=6)).train_loader) == 1  # 2 x 3 = 6 fits


def test_batch_too_large_for_fashion_mnist_subset(fashion_mnist_available, tmp_path, monkeypatch):
    overrides = {"data_root": str(tmp_path), "train_subset": 300, "batch_size": 200}
    config = instdisc_lite.load_config("fashion_mnist_quick", overrides)
    assert len(build_data(config).train_loader) == 1
    monkeypatch.setattr(instdisc_lite.distributed, "world_size", lambda: 2)  # 2 x 200 > 300: no step at all
    with pytest.raises(ConfigError, match="batch_size=200 x world size 2 = 400 .* only 300 training images"):
        build_data(config)


def _find_crop(transform) -> T.RandomResizedCrop:
    return next(t for t in transform.transforms if isinstance(t, T.RandomResizedCrop))


def test_crop_scale_reaches_the_per_image_transform(tiny_cifar10_config, tiny_imagenet):
    assert _find_crop(paper_train_transform(32, (0.5,), (0.5,))).scale == (0.2, 1.0)  # the paper's default
    bundle = build_data(tiny_cifar10_config(crop_scale=0.6))
    cifar = bundle.train_loader.dataset.dataset.dataset  # SeededItems(PositionSubset(CIFAR10Instance))
    assert isinstance(cifar, CIFAR10Instance) and _find_crop(cifar.transform).scale == (0.6, 1.0)
    config = instdisc_lite.load_config(
        "imagenet_resnet18", {"data_root": str(tiny_imagenet["root"]), "batch_size": 2, "crop_scale": 0.35}
    )
    folder = build_data(config).train_loader.dataset.dataset.dataset
    assert _find_crop(folder.transform).scale == (0.35, 1.0)


def test_flip_false_leaves_out_the_flip(tiny_cifar10_config):
    def flips(transform) -> bool:
        return any(isinstance(t, T.RandomHorizontalFlip) for t in transform.transforms)

    assert flips(paper_train_transform(32, (0.5,), (0.5,)))
    assert not flips(paper_train_transform(32, (0.5,), (0.5,), flip=False))
    cifar = build_data(tiny_cifar10_config(flip=False)).train_loader.dataset.dataset.dataset
    assert not flips(cifar.transform)


# ------------------------------------------------------------------------------------------------
# Subsets: index = position = bank row; ImageNet's are stratified
# ------------------------------------------------------------------------------------------------


def test_stratified_subset_is_round_robin_over_classes():
    labels = [0, 0, 0, 1, 1, 2, 0]
    assert stratified_subset(labels, 7) == [0, 3, 5, 1, 4, 2, 6]  # classes drop out as they run dry
    assert stratified_subset(labels, 4) == [0, 3, 5, 1]  # a prefix of the larger subset
    assert stratified_subset(np.array([2, 1, 2, 1]), 2) == [1, 0]  # class order, not dataset order


def test_position_subset_returns_positions(tiny_cifar10):
    cifar = CIFAR10Instance(tiny_cifar10["root"], train=True, transform=T.ToTensor())
    keep = [17, 2, 9]
    subset = PositionSubset(cifar, keep)
    for position, original in enumerate(keep):
        image, label, index = subset[position]
        assert index == position and label == tiny_cifar10["train_labels"][original]
        assert torch.equal(image, cifar[original][0])


def test_imagenet_subset_is_stratified_with_positions_as_indices(tiny_imagenet):
    overrides = {"data_root": str(tiny_imagenet["root"]), "batch_size": 2, "num_workers": 0}
    config = instdisc_lite.load_config("imagenet_resnet18", {**overrides, "train_subset": 4, "eval_subset": 2})
    bundle = build_data(config)
    assert bundle.num_train == 4 and bundle.num_test == 2
    assert torch.bincount(bundle.train_labels).tolist() == [2, 2]  # not the first 4 images: all of class 0
    for loader, n in ((bundle.train_eval_loader, 4), (bundle.test_loader, 2)):
        batches = list(loader)
        labels, indices = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
        assert torch.equal(indices, torch.arange(n))
        assert torch.bincount(labels).tolist() == [n // 2, n // 2]
        if loader is bundle.train_eval_loader:
            assert torch.equal(labels, bundle.train_labels)  # bank row i is labelled by train_labels[i]
    set_epoch(bundle.train_loader, 0, config.seed)
    for _, labels, indices in bundle.train_loader:
        assert torch.equal(labels, bundle.train_labels[indices])


def test_cifar10_subset_is_the_first_images(tiny_cifar10_config, tiny_cifar10):
    bundle = build_data(tiny_cifar10_config(train_subset=8, eval_subset=5))
    assert bundle.train_labels.tolist() == tiny_cifar10["train_labels"][:8] and bundle.num_test == 5
    _, labels, indices = next(iter(bundle.train_eval_loader))
    assert indices.tolist() == list(range(8)) and labels.tolist() == tiny_cifar10["train_labels"][:8]


# ------------------------------------------------------------------------------------------------
# Exact resume with DataLoader workers: augmentations are a function of (seed, epoch, index)
# ------------------------------------------------------------------------------------------------


def _epoch(loader, epoch: int, seed: int = 0, steps: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, indices)`` of each batch of ``epoch`` (the first ``steps`` only, as max_steps_per_epoch does)."""
    set_epoch(loader, epoch, seed)
    out = []
    for step, (images, _, indices) in enumerate(loader):
        if steps is not None and step >= steps:
            break
        out.append((images, indices))
    return out


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, idx_a), (images_b, idx_b) in zip(a, b, strict=True):
        assert torch.equal(idx_a, idx_b) and torch.equal(images_a, images_b)


def test_cifar10_epoch_is_the_same_after_resume_for_any_worker_count(tiny_cifar10_config):
    reference = None
    for workers in (0, 2):
        continued = build_data(tiny_cifar10_config(num_workers=workers)).train_loader
        assert continued.num_workers == min(workers, instdisc_lite.data.available_cpus())
        first = _epoch(continued, 0, steps=2)  # an epoch cut short leaves prefetched batches behind
        second = _epoch(continued, 1)  # ... in the persistent workers, and their RNG has moved on
        fresh = _epoch(build_data(tiny_cifar10_config(num_workers=workers)).train_loader, 1)  # resumed at epoch 1
        _assert_same_batches(second, fresh)
        reference = reference or second
        _assert_same_batches(second, reference)  # and the worker count does not matter either
        assert len(second) == 5 and torch.equal(torch.sort(torch.cat([i for _, i in second])).values, torch.arange(20))
    # epochs differ in order and, image by image, in augmentation
    assert not torch.equal(first[0][1], second[0][1])
    by_index = {int(i): image for images, idx in second for i, image in zip(idx, images, strict=True)}
    assert all(not torch.equal(image, by_index[int(i)]) for i, image in zip(first[0][1], first[0][0], strict=True))


def test_in_process_loading_leaves_the_global_rng_alone(tiny_cifar10_config):
    loader = build_data(tiny_cifar10_config(num_workers=0)).train_loader
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _epoch(loader, 0)
    _epoch(loader, 1)
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's stream (negatives, noise) is untouched


# ------------------------------------------------------------------------------------------------
# One order for every world size; evaluation shards
# ------------------------------------------------------------------------------------------------


def _tensor_loaders(n: int, batch_size: int, world: int, seed: int = 0):
    data = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 2, 2).contiguous()
    targets = torch.arange(n) % 10
    return [TensorBatchLoader(data, targets, batch_size, True, drop_last=True, seed=seed, rank=r, world=world)
            for r in range(world)]  # fmt: skip


def _cifar_loaders(root, batch_size: int, world: int, seed: int = 0):
    cifar = CIFAR10Instance(root, train=True, transform=paper_train_transform(32, (0.5,) * 3, (0.25,) * 3))
    return [train_loader(cifar, batch_size, 0, seed, rank=r, world=world) for r in range(world)]


def _check_world_sizes_agree(make, n: int, batch_size: int) -> None:
    """For each step, ranks 0 and 1 of W=2 (batch B) together are the W=1 batch (size 2B), images included."""
    (single,) = make(2 * batch_size, 1)
    ranks = make(batch_size, 2)
    orders = []
    for epoch in (0, 1):
        expected = _epoch(single, epoch)
        parts = [_epoch(loader, epoch) for loader in ranks]
        assert len(expected) == len(parts[0]) == len(parts[1]) == n // (2 * batch_size)
        for step, (images, idx) in enumerate(expected):
            assert all(len(p[step][1]) == batch_size for p in parts)
            assert torch.equal(torch.cat([p[step][1] for p in parts]), idx)
            assert torch.equal(torch.cat([p[step][0] for p in parts]), images)
        seen = torch.cat([i for p in parts for _, i in p])
        if n % (2 * batch_size) == 0:
            assert torch.equal(torch.sort(seen).values, torch.arange(n))  # every item once, over the ranks
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1])  # a new permutation every epoch


@pytest.mark.parametrize("n", [48, 51])
def test_tensor_loader_world_sizes_see_the_same_batches(n):
    _check_world_sizes_agree(lambda b, w: _tensor_loaders(n, b, w), n, batch_size=4)


def test_tensor_loader_trains_on_every_image_over_epochs():
    """The last n mod W images are not excluded for good (as a fixed strided shard would)."""
    loaders = _tensor_loaders(51, 5, 2)
    seen = torch.cat([idx for epoch in range(6) for loader in loaders for _, idx in _epoch(loader, epoch)])
    assert set(seen.tolist()) == set(range(51))


def test_dataloader_world_sizes_see_the_same_batches(tiny_cifar10):
    _check_world_sizes_agree(lambda b, w: _cifar_loaders(tiny_cifar10["root"], b, w), 20, batch_size=2)


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_shard_positions_partition(n, world):
    shards = [shard_positions(n, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shards), torch.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _indices(loader) -> torch.Tensor:
    return torch.cat([b[2] for b in loader])


@pytest.mark.parametrize("n", [10, 11])
def test_tensor_eval_loader_shards_partition_positions(n):
    data, targets = torch.zeros(n, 2, 2, dtype=torch.uint8), torch.arange(n)
    parts = [_indices(TensorBatchLoader(data, targets, 3, shuffle=False, rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), torch.arange(n)) and abs(len(parts[0]) - len(parts[1])) <= 1
    assert torch.equal(_indices(TensorBatchLoader(data, targets, 3, shuffle=False)), torch.arange(n))


def test_dataloader_eval_shards_partition_positions(tiny_cifar10):
    cifar = CIFAR10Instance(tiny_cifar10["root"], train=True, transform=T.ToTensor())
    subset = PositionSubset(cifar, list(range(3, 14)))  # 11 positions, not 3..13
    parts = [_indices(eval_loader(subset, 4, rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), torch.arange(11)) and {len(p) for p in parts} == {5, 6}


def test_build_data_shards_by_rank(tiny_cifar10_config, monkeypatch):
    """build_data's loaders follow distributed.rank() / world_size(): eval shards partition, train steps agree."""
    monkeypatch.setattr(instdisc_lite.distributed, "world_size", lambda: 2)
    bundles = []
    for r in range(2):
        monkeypatch.setattr(instdisc_lite.distributed, "rank", lambda r=r: r)
        bundles.append(build_data(tiny_cifar10_config(batch_size=2, eval_subset=7)))
    for name, n in (("train_eval_loader", 20), ("test_loader", 7)):
        assert torch.equal(torch.cat([_indices(getattr(b, name)) for b in bundles]), torch.arange(n)), name
    assert {b.num_test for b in bundles} == {7} and all(len(b.train_loader) == 5 for b in bundles)
    monkeypatch.setattr(instdisc_lite.distributed, "world_size", lambda: 1)
    monkeypatch.setattr(instdisc_lite.distributed, "rank", lambda: 0)
    single = build_data(tiny_cifar10_config(batch_size=4, eval_subset=7))
    _, idx0 = zip(*_epoch(bundles[0].train_loader, 1), strict=True)
    _, idx1 = zip(*_epoch(bundles[1].train_loader, 1), strict=True)
    expected = [i for _, i in _epoch(single.train_loader, 1)]
    assert all(torch.equal(torch.cat([a, b]), e) for a, b, e in zip(idx0, idx1, expected, strict=True))


def test_fashion_mnist_bundle_shards_by_rank(fashion_mnist_available, tmp_path, monkeypatch):
    overrides = {"data_root": str(tmp_path), "train_subset": 301, "eval_subset": 99, "batch_size": 50}
    monkeypatch.setattr(instdisc_lite.distributed, "world_size", lambda: 2)
    bundles = []
    for r in range(2):
        monkeypatch.setattr(instdisc_lite.distributed, "rank", lambda r=r: r)
        bundles.append(build_data(instdisc_lite.load_config("fashion_mnist_quick", overrides)))
    assert torch.equal(torch.cat([_indices(b.train_eval_loader) for b in bundles]), torch.arange(301))
    assert torch.equal(torch.cat([_indices(b.test_loader) for b in bundles]), torch.arange(99))
    assert all(len(b.train_loader) == 3 and b.num_train == 301 and b.num_test == 99 for b in bundles)
