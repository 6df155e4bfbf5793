"""Datasets: (image, label, index) items, clear errors for missing data, loaders and augmentation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms as T

import instdisc_lite
from instdisc_lite import BatchAugment, DatasetNotFoundError, FashionMNIST
from instdisc_lite.data import CIFAR10Instance, TensorBatchLoader, build_data, imagenet_split, read_idx


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
    assert isinstance(err.value, FileNotFoundError)


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
    assert not (tmp_path / "runs").exists()


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
    config = instdisc_lite.TrainConfig(dataset="cifar10", data_root=str(tiny_cifar10["root"]), num_workers=8)
    bundle = build_data(config)
    assert {bundle.train_loader.num_workers, bundle.test_loader.num_workers} == {2}
    config = instdisc_lite.TrainConfig(dataset="cifar10", data_root=str(tiny_cifar10["root"]), num_workers=0)
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
