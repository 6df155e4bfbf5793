"""Semi-supervised learning from a learned encoder (instdisc_lite.semi_supervised): which labels are kept, that the
fine-tuned network starts from the learned weights and the one from scratch does not, that the labelled loader
serves only the labelled images, and that the whole comparison runs on a finished run (Fashion-MNIST and CIFAR-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instdisc_lite import semi_supervised as semi
from instdisc_lite.data import TensorBatchLoader, build_data, labelled_loader, set_epoch
from instdisc_lite.models import ARCHITECTURES, build_backbone, build_encoder, without_head
from instdisc_lite.train import build_run


def test_labelled_positions_keep_the_fraction_balanced_and_nested():
    labels = torch.arange(1000) % 10
    small, large = semi.labelled_positions(labels, 0.02, 10), semi.labelled_positions(labels, 0.1, 10)
    assert len(small) == 20 and len(large) == 100
    assert torch.bincount(labels[small], minlength=10).tolist() == [2] * 10, "stratified over the classes"
    assert set(small) <= set(large), "a larger fraction keeps every label of a smaller one"
    assert len(set(large)) == len(large)
    assert sorted(semi.labelled_positions(labels, 1.0, 10)) == list(range(1000))
    assert len(semi.labelled_positions(labels, 0.001, 10)) == 10, "at least one label per class"


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="labelled fraction must be in"):
        semi.labelled_positions(torch.arange(10), fraction, 2)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_classifier_starts_from_the_learned_backbone_and_leaves_the_encoder_alone(arch):
    torch.manual_seed(0)
    encoder = build_encoder(arch, 16, in_channels=1 if "small" in arch else 3)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    net = semi.classifier(encoder, 7)
    _, dim = build_backbone(arch)
    assert isinstance(net[1], nn.Linear) and (net[1].in_features, net[1].out_features) == (dim, 7)
    learned = {k: v for k, v in encoder.backbone.state_dict().items() if k in net[0].state_dict()}
    assert learned and all(torch.equal(net[0].state_dict()[k], v) for k, v in learned.items())
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # training the copy must not move the encoder
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_without_head_refuses_a_network_it_cannot_read():
    with pytest.raises(TypeError, match="final Linear"):
        without_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_labelled_loader_serves_only_the_labelled_images():
    data, targets = torch.arange(100, dtype=torch.uint8).view(100, 1, 1).expand(100, 2, 2), torch.arange(100) % 10
    full = TensorBatchLoader(data, targets, 10, shuffle=True, drop_last=True)
    positions = [3, 17, 42, 58, 99, 64]
    loader = labelled_loader(full, positions, batch_size=2, seed=1)
    seen = []
    for epoch in range(2):
        set_epoch(loader, epoch, 1)
        for images, labels, _ in loader:
            seen.append(images[:, 0, 0, 0].tolist())
            assert (labels == targets[images[:, 0, 0, 0].long()]).all()
    assert sorted(sum(seen[:3], [])) == sorted(positions) and len(seen) == 6


def test_labelled_loader_over_cifar10_files(tiny_cifar10_config):
    bundle = build_data(tiny_cifar10_config(crop_scale=0.5))
    positions = [0, 5, 11, 19]
    loader = labelled_loader(bundle.train_loader, positions, batch_size=2, seed=0)
    set_epoch(loader, 0, 0)
    labels = torch.cat([y for _, y, _ in loader])
    assert sorted(labels.tolist()) == sorted(bundle.train_labels[positions].tolist())


def test_train_classifier_fits_a_separable_problem_deterministically():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    loader = TensorBatchLoader(x[:, 0], y, 16, shuffle=True, drop_last=True)

    def fit() -> nn.Module:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        return semi.train_classifier(net, loader, nn.Identity(), steps=60, lr=0.5, weight_decay=0.0,
                                     device=torch.device("cpu"), seed=3)  # fmt: skip

    net = fit()
    assert semi.accuracy(net, loader, nn.Identity(), torch.device("cpu")) > 90
    again = fit()
    same = all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(), strict=True))
    assert same, "seeded: the same weights"
    with torch.no_grad():
        assert F.cross_entropy(net(x), y) < 0.5


def test_semi_supervised_on_a_finished_cifar10_run(tiny_cifar10_config, tmp_path):
    run = build_run(tiny_cifar10_config(out_dir=str(tmp_path), epochs=1, crop_scale=0.5))
    train_f, test_f = torch.randn(run.data.num_train, 128), torch.randn(run.data.num_test, 128)
    test_y = torch.arange(run.data.num_test) % 10
    out = semi.semi_supervised(run, 0.5, F.normalize(train_f, dim=1), F.normalize(test_f, dim=1), test_y, 2)
    assert out["num_labels"] == 10 and out["batch_size"] == min(run.config.batch_size, 10)
    assert out["steps"] == run.config.epochs * (run.data.num_train // run.config.batch_size)
    for key in ("finetune_top1", "probe_top1", "scratch_top1"):
        assert 0 <= out[key] <= 100
