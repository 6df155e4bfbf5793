"""ColourBatchAugment against torchvision: its draws follow torchvision's distributions, each op equals torchvision's
functional op for the same parameters, and CIFAR-10 held on the device trains through it."""

from __future__ import annotations

import math

import pytest
import torch
from test_host_sync import host_reads  # noqa: F401 (the fixture that counts host reads)
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from instdisc_lite import ConfigError, load_config, train
from instdisc_lite.batch_augment import (
    ColourBatchAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    colour_jitter,
    resized_crop,
    rgb_to_gray,
    sample_crops,
)
from instdisc_lite.data import CIFAR10_MEAN, CIFAR10_STD, TensorBatchLoader, augments_on_device, build_data

DRAWS = 3000
# two-sample Kolmogorov-Smirnov critical value at alpha = 0.001 for two samples of DRAWS: 1.95 sqrt(2 / DRAWS)
KS_LIMIT = 1.95 * math.sqrt(2 / DRAWS)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the empirical CDFs of samples ``a`` and ``b`` (1-d)."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def torchvision_crops(height: int, width: int, scale, n: int = DRAWS) -> torch.Tensor:
    """``(n, 4)`` crops (top, left, h, w) from ``T.RandomResizedCrop.get_params`` on a ``height x width`` image."""
    torch.manual_seed(1)
    image = torch.zeros(3, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, scale, (3 / 4, 4 / 3)) for _ in range(n)])


def crop_stats(top, left, h, w, height, width) -> dict[str, torch.Tensor]:
    h, w = h.double(), w.double()
    return {"area": h * w / (height * width), "log_ratio": torch.log(w / h), "top": top.double()}


@pytest.mark.parametrize("height, width", [(32, 32), (20, 64)])  # 20 x 64: most tries miss, the fallback is common
def test_crop_distributions_match_torchvision(height, width):
    ref = crop_stats(*torchvision_crops(height, width, (0.2, 1.0)).unbind(1), height, width)
    ours = crop_stats(*sample_crops(DRAWS, height, width, generator=torch.Generator().manual_seed(0)), height, width)
    for name in ref:
        assert ks_statistic(ours[name], ref[name]) < KS_LIMIT, name
    # the test can fail: a range of 0.3-1 instead of 0.2-1 is told apart
    shifted = sample_crops(DRAWS, height, width, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(0))
    assert ks_statistic(crop_stats(*shifted, height, width)["area"], ref["area"]) > KS_LIMIT


def test_crops_fit_and_the_fallback_is_torchvisions_centre_crop():
    top, left, h, w = sample_crops(DRAWS, 20, 64, generator=torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 20).all() and (left + w <= 64).all()
    # no try can fit (every candidate is larger than the short side): torchvision's centred fallback, its aspect
    # ratio clamped into the allowed range
    for height, width in [(20, 64), (64, 20)]:
        top, left, h, w = sample_crops(50, height, width, scale=(0.9, 1.0), ratio=(1.0, 1.0))
        assert (h == 20).all() and (w == 20).all()
        assert (top == (height - 20) // 2).all() and (left == (width - 20) // 2).all()


def test_jitter_grayscale_and_flip_draws_match_torchvision_ranges_and_rates():
    augment = ColourBatchAugment(32, CIFAR10_MEAN, CIFAR10_STD)
    params = augment.sample(DRAWS, 32, 32, generator=torch.Generator().manual_seed(0))
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.4)
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    assert ranges[3] == (-0.4, 0.4)  # hue 0.4 -> shifts in [-0.4, 0.4] turns
    for column, (low, high) in zip(params.factors.T, ranges, strict=True):
        assert low <= column.min() < low + 0.01 and high - 0.01 < column.max() <= high  # the whole range, no more
        assert ks_statistic(column, torch.empty(DRAWS).uniform_(low, high)) < KS_LIMIT
    assert abs(params.gray.float().mean().item() - 0.2) < 0.035  # 4.8 sigma at 3000 draws
    assert abs(params.flip.float().mean().item() - 0.5) < 0.045
    # the order: a permutation of the four ops per image, every op equally likely first, all 24 orders drawn
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()
    first = torch.bincount(params.order[:, 0], minlength=4) / DRAWS
    assert (first - 0.25).abs().max() < 0.04
    assert len({tuple(row) for row in params.order.tolist()}) == 24
    no_flip = ColourBatchAugment(32, CIFAR10_MEAN, CIFAR10_STD, flip=False, colour=False).sample(100, 32, 32)
    assert not no_flip.flip.any() and no_flip.order is None


def images(n: int = 6, height: int = 12, width: int = 10) -> torch.Tensor:
    """Float RGB images in [0, 1] from uint8 values (ties between channels and grey pixels included)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255
    x[:, :, 0, :] = x[:, :1, 0, :]  # a grey row: hue undefined, saturation 0
    x[:, 1, 1, :] = x[:, 0, 1, :]  # red = green ties
    return x


@pytest.mark.parametrize(
    "ours, theirs, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
        (adjust_saturation, TF.adjust_saturation, [0.6, 0.9, 1.0, 1.2, 1.4, 0.7]),
        (adjust_hue, TF.adjust_hue, [-0.4, -0.1, 0.0, 0.05, 0.25, 0.4]),
    ],
)
def test_each_jitter_op_equals_torchvisions(ours, theirs, factors):
    x = images()
    expected = torch.stack([theirs(image, f) for image, f in zip(x, factors, strict=True)])
    torch.testing.assert_close(ours(x, torch.tensor(factors)), expected, atol=2e-6, rtol=0)


def test_grayscale_equals_torchvisions():
    x = images()
    torch.testing.assert_close(rgb_to_gray(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [10, 16, 5])  # enlarged, enlarged more, shrunk (antialiased)
def test_resized_crop_and_flip_equal_torchvisions(size):
    x = images(4, 12, 10)
    top, left = torch.tensor([0, 2, 5, 1]), torch.tensor([0, 3, 1, 0])
    h, w = torch.tensor([12, 7, 6, 9]), torch.tensor([10, 5, 9, 7])
    flip = torch.tensor([False, True, False, True])
    out = resized_crop(x, top, left, h, w, size, flip)
    for b in range(4):
        ref = TF.resized_crop(x[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size], antialias=True)
        torch.testing.assert_close(out[b], TF.hflip(ref) if flip[b] else ref, atol=2e-6, rtol=0)


def test_jitter_applies_the_ops_in_each_images_order():
    x = images(4)
    factors = torch.tensor([[1.3, 0.7, 1.4, 0.2]] * 4)  # brightness, contrast, saturation, hue shift
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for image, order in zip(x, orders.tolist(), strict=True):
        for op in order:
            image = ops[op](image, float(factors[0, op]))
        expected.append(image)
    out = colour_jitter(x, orders, factors)
    torch.testing.assert_close(out, torch.stack(expected), atol=5e-6, rtol=0)
    assert (out[0] - out[1]).abs().max() > 0.01  # the order matters for these factors


def test_whole_augmentation_equals_torchvisions_functional_chain():
    augment = ColourBatchAugment(16, CIFAR10_MEAN, CIFAR10_STD)
    raw = (images(8, 12, 10) * 255).round().to(torch.uint8)
    params = augment.sample(8, 12, 10, generator=torch.Generator().manual_seed(5))
    params.gray[:2] = torch.tensor([True, False])  # both branches, whatever the draw
    out = augment.apply(raw, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(8):
        p = [int(v[b]) for v in (params.top, params.left, params.height, params.width)]
        image = TF.resized_crop(raw[b].float() / 255, *p, [16, 16], antialias=True)
        for op in params.order[b].tolist():
            image = ops[op](image, float(params.factors[b, op]))
        image = TF.rgb_to_grayscale(image, 3) if params.gray[b] else image
        image = TF.hflip(image) if params.flip[b] else image
        torch.testing.assert_close(out[b], TF.normalize(image, CIFAR10_MEAN, CIFAR10_STD), atol=3e-5, rtol=0)


def test_output_shape_dtype_range_and_seeding():
    augment = ColourBatchAugment(32, CIFAR10_MEAN, CIFAR10_STD)
    raw = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(raw, generator=torch.Generator().manual_seed(7))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    pixels = out * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(out, augment(raw, generator=torch.Generator().manual_seed(7)))  # a function of the seed
    assert not torch.equal(out, augment(raw, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        augment(raw[:, :1])


# ----------------------------------------------------------------------------------------------
# CIFAR-10 held on the device
# ----------------------------------------------------------------------------------------------


def test_augment_on_device_config_key():
    assert load_config("cifar10_resnet18").augment_on_device == "auto"
    assert load_config("cifar10_resnet18", ["augment_on_device=false"]).augment_on_device is False
    with pytest.raises(ConfigError, match="one of auto, true, false"):
        load_config("cifar10_resnet18", ["augment_on_device=gpu"])
    with pytest.raises(ConfigError, match="imagenet"):
        load_config("imagenet_resnet18", ["augment_on_device=true"])
    with pytest.raises(ConfigError, match="always held in memory"):
        load_config("fashion_mnist_quick", ["augment_on_device=false"])
    config = load_config("cifar10_resnet18")
    assert augments_on_device(config, "cuda") and not augments_on_device(config, "cpu")  # auto = CUDA only


def test_cifar10_on_device_bundle_views_and_evaluation(tiny_cifar10_config, tiny_cifar10):
    assert not isinstance(build_data(tiny_cifar10_config()).train_loader, TensorBatchLoader)  # CPU auto: per image
    bundle = build_data(tiny_cifar10_config(augment_on_device=True), "cpu", num_views=2)
    assert isinstance(bundle.train_loader, TensorBatchLoader) and isinstance(bundle.train_augment, ColourBatchAugment)
    assert (bundle.num_train, bundle.num_test, bundle.in_channels) == (20, 10, 3)
    images, labels, indices = next(iter(bundle.train_loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    first = torch.from_numpy(tiny_cifar10["train_data"][indices.numpy()]).view(4, 3, 32, 32)
    assert torch.equal(images, first) and labels.tolist() == [tiny_cifar10["train_labels"][i] for i in indices]
    views = bundle.views(images, 2)
    assert len(views) == 2 and views[0].shape == (4, 3, 32, 32) and not torch.equal(views[0], views[1])
    # evaluation: the un-augmented images, normalised as ToTensor + Normalize would
    eval_images, _, _ = next(iter(bundle.test_loader))
    expected = TF.normalize(torch.from_numpy(tiny_cifar10["test_data"]).view(-1, 3, 32, 32) / 255.0, CIFAR10_MEAN,
                            CIFAR10_STD)  # fmt: skip
    torch.testing.assert_close(bundle.eval_transform(eval_images), expected)
    # crop_flip (CMC's) keeps crops and flips only: no colour draws
    crop_flip = build_data(tiny_cifar10_config(augment_on_device=True, augment="crop_flip"))
    assert crop_flip.train_augment.sample(4, 32, 32).order is None
    assert not build_data(tiny_cifar10_config(augment_on_device=True, flip=False)).train_augment.flip
    plain = build_data(tiny_cifar10_config(augment_on_device=True, augment="none"))  # normalised only
    torch.testing.assert_close(plain.train_augment(images), plain.eval_transform(images))


@pytest.mark.parametrize("method", ["instdisc", "simclr"])  # one view and two views
def test_short_cifar10_run_with_augment_on_device(tiny_cifar10_config, tmp_path, method):
    config = tiny_cifar10_config(
        augment_on_device=True,
        method=method,
        out_dir=str(tmp_path),
        epochs=1,
        max_steps_per_epoch=2,
        knn_k=5,
        progress=False,
    )
    run = train(config, final_eval=False)
    assert isinstance(run.data.train_augment, ColourBatchAugment)
    assert math.isfinite(run.metrics[-1]["loss"])


def test_no_host_read_while_augmenting(host_reads):  # noqa: F811 (the fixture imported from test_host_sync)
    # a GPU would wait on any read of a tensor on the host, or on an op whose output size depends on the data
    augment = ColourBatchAugment(32, CIFAR10_MEAN, CIFAR10_STD)
    augment(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    assert not host_reads, dict(host_reads)


def test_cifar10_on_device_resumes_exactly(tiny_cifar10_config, tmp_path):
    def config(name: str):
        return tiny_cifar10_config(
            augment_on_device=True, out_dir=str(tmp_path), name=name, epochs=2, knn_k=5, progress=False
        )

    straight = train(config("straight"), final_eval=False)
    assert train(config("split"), final_eval=False, stop_after=1).epoch == 1
    resumed = train(config("split"), resume=True, final_eval=False)  # the augmentation draws continue where they were
    assert resumed.epoch == 2 and torch.equal(straight.bank.memory, resumed.bank.memory)
    assert not torch.equal(straight.bank.memory, train(config("other"), {"seed": 1}, final_eval=False).bank.memory)
