"""CMC: the Lab and band views, the cross-view NCE against a loop transcription, each bank's own update, a real step
of the CIFAR-10 config, and a short Fashion-MNIST run that beats the untrained encoders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import load_config, train
from instdisc_lite.config import ConfigError, TrainConfig
from instdisc_lite.data import CIFAR10_MEAN, CIFAR10_STD
from instdisc_lite.methods import METHODS, build_method
from instdisc_lite.methods.cmc import CMC
from instdisc_lite.nce import NCE
from instdisc_lite.train import build_run, evaluate_final
from instdisc_lite.views import BandSplit, LabSplit, gaussian_kernel, rgb_to_lab


def small_cmc(dataset: str = "cifar10", in_channels: int = 3, n: int = 12, **overrides) -> CMC:
    values = dict(method="cmc", dataset=dataset, arch="small_cnn", low_dim=8, num_negatives=5, z_mode="fixed")
    values.update(overrides)
    return build_method(TrainConfig(**values), n, in_channels)


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


def lab_of_pixel(r: float, g: float, b: float) -> tuple[float, float, float]:
    """sRGB -> CIE Lab (D65) of one pixel, the textbook formula written out with scalars."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = (0.412453 * rl + 0.357580 * gl + 0.180423 * bl) / 0.950456
    y = 0.212671 * rl + 0.715160 * gl + 0.072169 * bl
    z = (0.019334 * rl + 0.119193 * gl + 0.950227 * bl) / 1.088754

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t * (29 / 6) ** 2 / 3 + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_rgb_to_lab_matches_the_per_pixel_formula_and_known_colours():
    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 3, 4)
    rgb[0, :, 0, 0] = 0.01  # a dark pixel: the linear branches of both the gamma and the cube root
    lab = rgb_to_lab(rgb)
    for bi in range(2):
        for h in range(3):
            for w in range(4):
                expected = torch.tensor(lab_of_pixel(*rgb[bi, :, h, w].tolist()))
                torch.testing.assert_close(lab[bi, :, h, w], expected, atol=1e-3, rtol=0)
    anchors = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 4, 1)
    known = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [53.39, 0.0, 0.0]])
    torch.testing.assert_close(rgb_to_lab(anchors)[0, :, :, 0].T, known, atol=0.02, rtol=0)


def test_lab_split_undoes_the_pipelines_normalisation():
    torch.manual_seed(1)
    rgb = torch.rand(2, 3, 5, 5)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    light, colour = LabSplit(CIFAR10_MEAN, CIFAR10_STD)((rgb - mean) / std)
    assert light.shape == (2, 1, 5, 5) and colour.shape == (2, 2, 5, 5)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(light, (lab[:, :1] - 50) / 50, atol=1e-4, rtol=0)
    torch.testing.assert_close(colour, lab[:, 1:] / 100, atol=1e-4, rtol=0)
    gray = rgb.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # a grayscale image has no colour: ab = 0
    assert LabSplit(CIFAR10_MEAN, CIFAR10_STD)((gray - mean) / std)[1].abs().max() < 1e-3


def test_band_split_is_a_blur_and_its_residual():
    split = BandSplit(sigma=1.0)
    torch.manual_seed(2)
    x = torch.randn(3, 1, 12, 12)
    low, high = split(x)
    torch.testing.assert_close(low + high, x)  # the two views together are the image
    k = gaussian_kernel(1.0)
    assert k.numel() == 7 and torch.isclose(k.sum(), torch.tensor(1.0))
    impulse = torch.zeros(1, 1, 12, 12)
    impulse[0, 0, 6, 6] = 1.0
    blurred, _ = split(impulse)  # away from the border the blur of an impulse is the 2-D Gaussian outer(k, k)
    torch.testing.assert_close(blurred[0, 0, 3:10, 3:10], torch.outer(k, k))
    flat_low, flat_high = split(torch.full((1, 1, 12, 12), 0.7))  # reflect padding: a flat image has no edges
    torch.testing.assert_close(flat_low, torch.full_like(flat_low, 0.7))
    assert flat_high.abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


def test_registered_with_one_view_two_encoders_two_banks():
    assert METHODS["cmc"] is CMC and CMC.num_views == 1
    colour, gray = small_cmc(), small_cmc("fashion_mnist", 1)
    assert [e.backbone[0][0].in_channels for e in (colour.encoder.view_1, colour.encoder.view_2)] == [1, 2]
    assert [e.backbone[0][0].in_channels for e in (gray.encoder.view_1, gray.encoder.view_2)] == [1, 1]
    assert colour.nce_1.bank is colour.bank_2 and colour.nce_2.bank is colour.bank_1  # across views
    assert colour.bank_1.memory.data_ptr() != colour.bank_2.memory.data_ptr()
    with pytest.raises(ConfigError, match="cmc"):
        small_cmc(objective="parametric")


def nce_by_loop(features, bank, indices, noise, temperature):
    """Eqs. 4-7 of InstDisc written out per image and per noise sample; Z from this batch (fixed Z's first batch)."""
    n, (b, m) = bank.shape[0], noise.shape
    exp_noise = [[math.exp(float(bank[noise[i, k]] @ features[i]) / temperature) for k in range(m)] for i in range(b)]
    z = n * sum(map(sum, exp_noise)) / (b * m)  # eq. 7
    total = 0.0
    for i in range(b):
        p_pos = math.exp(float(bank[indices[i]] @ features[i]) / temperature) / z  # eq. 4
        total -= math.log(p_pos / (p_pos + m / n))  # eq. 5, data term of eq. 6
        for k in range(m):
            p = exp_noise[i][k] / z
            total -= math.log(1 - p / (p + m / n))  # noise terms of eq. 6
    return total / b, z


def test_cross_view_loss_is_the_sum_of_two_nce_losses_by_hand():
    torch.manual_seed(3)
    method = small_cmc(n=12, num_negatives=5, temperature=0.5)
    images, indices = torch.randn(4, 3, 16, 16), torch.tensor([3, 0, 7, 11])
    noise_1, noise_2 = torch.randint(12, (4, 5)), torch.randint(12, (4, 5))
    bank_1, bank_2 = method.bank_1.memory.double().clone(), method.bank_2.memory.double().clone()
    loss = method([images], indices, noise_indices=(noise_1, noise_2))
    _, z1, z2 = method._step  # the features the loss used
    loss_1, big_z1 = nce_by_loop(z1.double(), bank_2, indices, noise_1, 0.5)  # view 1 against view 2's bank
    loss_2, big_z2 = nce_by_loop(z2.double(), bank_1, indices, noise_2, 0.5)
    assert loss.item() == pytest.approx(loss_1 + loss_2, rel=1e-5)
    assert method.epoch_stats() == pytest.approx({"z_L": big_z1, "z_ab": big_z2}, rel=1e-5)
    # the same view's bank would give another loss: the test can tell the views apart
    assert nce_by_loop(z1.double(), bank_1, indices, noise_1, 0.5)[0] != pytest.approx(loss_1, rel=1e-3)
    loss.backward()  # both encoders are trained
    assert all(p.grad is not None for p in method.encoder.parameters())


def test_after_step_updates_each_bank_with_its_own_views_features():
    torch.manual_seed(4)
    method = small_cmc(n=10, bank_momentum=0.5)
    before_1, before_2 = method.bank_1.memory.clone(), method.bank_2.memory.clone()
    indices = torch.tensor([2, 5, 9])
    method([torch.randn(3, 3, 16, 16)], indices)
    _, z1, z2 = method._step
    method.after_step()
    torch.testing.assert_close(method.bank_1.memory[indices], F.normalize(0.5 * before_1[indices] + 0.5 * z1, dim=1))
    torch.testing.assert_close(method.bank_2.memory[indices], F.normalize(0.5 * before_2[indices] + 0.5 * z2, dim=1))
    wrong = F.normalize(0.5 * before_1[indices] + 0.5 * z2, dim=1)  # bank 1 with view 2's features
    assert not torch.allclose(method.bank_1.memory[indices], wrong, atol=1e-3)
    rest = torch.ones(10, dtype=torch.bool)
    rest[indices] = False
    assert torch.equal(method.bank_1.memory[rest], before_1[rest])
    assert torch.equal(method.bank_2.memory[rest], before_2[rest])


def test_encoder_and_bank_are_the_normalised_concatenations():
    torch.manual_seed(5)
    method = small_cmc("fashion_mnist", 1, n=6).eval()
    x = torch.randn(6, 1, 16, 16)
    z1, z2 = method.encoder.encode_views(x)
    features = method.encoder(x)
    assert features.shape == (6, 16)
    torch.testing.assert_close(features, torch.cat((z1, z2), dim=1) / math.sqrt(2))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(6))
    memory = method.bank.memory
    assert memory.shape == (6, 16) and len(method.bank) == 6
    torch.testing.assert_close(memory, torch.cat((method.bank_1.memory, method.bank_2.memory), dim=1) / math.sqrt(2))
    method.config.bank_init = "features"
    method.initialise(lambda encoder: encoder(x))  # fills each bank with its own half
    torch.testing.assert_close(method.bank_1.memory, z1)
    torch.testing.assert_close(method.bank_2.memory, z2)
    assert not any(k.startswith("bank.") for k in method.state_dict())  # the concatenation is no second copy


def test_state_dict_restores_the_loss_exactly():
    torch.manual_seed(6)
    a = small_cmc(n=12)
    a([torch.randn(4, 3, 16, 16)], torch.arange(4))  # sets both Z
    a.after_step()
    b = small_cmc(n=12)
    b.load_state_dict(a.state_dict())
    x, idx = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    noise = (torch.randint(12, (4, 5)), torch.randint(12, (4, 5)))
    assert torch.equal(a([x], idx, noise_indices=noise), b([x], idx, noise_indices=noise))
    assert isinstance(a.nce_1, NCE) and a.nce_1.z.item() > 0 and a.nce_2.z.item() > 0


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_one_step_of_the_cifar10_config(tiny_cifar10, tmp_path):
    overrides = dict(data_root=str(tiny_cifar10["root"]), out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1,
                     batch_size=4, num_workers=0, progress=False, device="cpu", arch="small_cnn")  # fmt: skip
    config = load_config("cmc_cifar10", overrides)
    assert (config.method, config.num_negatives, config.temperature, config.bank_momentum) == ("cmc", 4096, 0.07, 0.5)
    run = train("cmc_cifar10", overrides)
    state = torch.load(run.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]
    n = run.data.num_train
    assert state["bank_1.memory"].shape == state["bank_2.memory"].shape == (n, 128)
    row = run.metrics[-1]
    assert math.isfinite(row["loss"]) and row["z_L"] > 0 and row["z_ab"] > 0 and "knn_top1" in row
    assert run.bank.memory.shape == (n, 256) and 0 <= run.final["knn_top1"] <= 100


@pytest.mark.slow
def test_short_fashion_mnist_run_beats_the_untrained_encoders(tmp_path, fashion_mnist_available):
    # the shipped quick recipe (exact softmax across views, feature-filled banks, lr 0.1), on 2,000 images
    overrides = dict(data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"), train_subset=2000,
                     eval_subset=1000, epochs=10, batch_size=64, eval_every=10, progress=False,
                     device="cpu")  # fmt: skip
    config = load_config("cmc_fashion_mnist_quick", overrides)
    untrained = evaluate_final(build_run(config))["knn_top1"]
    run = train(config)
    assert run.final["knn_top1"] > untrained + 3.0, (untrained, run.final["knn_top1"])


def test_cifar10_config_keeps_colour_out_of_the_augmentation(tiny_cifar10):
    """L and ab are the views: a grayscale crop (ab = 0) or a hue jitter would damage the ab view alone."""
    from torchvision import transforms as T

    from instdisc_lite.data import build_data

    def ops(config_name: str, **overrides) -> set[type]:
        config = load_config(config_name, {"data_root": str(tiny_cifar10["root"]), "batch_size": 4, **overrides})
        dataset = build_data(config, num_views=1).train_loader.dataset
        while not hasattr(dataset, "transform"):  # unwrap SeededItems / PositionSubset down to the CIFAR-10 set
            dataset = dataset.dataset
        return {type(op) for op in dataset.transform.transforms}

    assert load_config("cmc_cifar10").augment == "crop_flip"
    cmc = ops("cmc_cifar10")
    assert T.RandomResizedCrop in cmc and T.RandomHorizontalFlip in cmc
    assert not cmc & {T.ColorJitter, T.RandomGrayscale}, f"CMC's colour views got colour augmentation: {cmc}"
    assert {T.ColorJitter, T.RandomGrayscale} <= ops("cmc_cifar10", augment="paper")  # the knob, not the method
    assert {T.ColorJitter, T.RandomGrayscale} <= ops("cifar10_resnet18")
