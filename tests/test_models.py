"""Encoders: (B, low_dim) unit-norm features for each architecture."""

from __future__ import annotations

import pytest
import torch

from instdisc_lite import build_encoder


@pytest.mark.parametrize(
    ("arch", "in_channels", "size", "batch", "low_dim"),
    [
        ("small_cnn", 1, 28, 4, 128),
        ("small_cnn", 3, 32, 3, 32),
        ("resnet18_cifar", 3, 32, 2, 128),
        ("resnet18", 3, 64, 2, 64),
        ("resnet50", 3, 64, 2, 128),
    ],
)
def test_encoder_returns_unit_norm_low_dim_features(arch, in_channels, size, batch, low_dim):
    torch.manual_seed(0)
    model = build_encoder(arch, low_dim=low_dim, in_channels=in_channels)
    model.eval()
    x = torch.randn(batch, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, low_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(batch))
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # depends on the input


def test_resnet18_cifar_has_cifar_stem():
    model = build_encoder("resnet18_cifar")
    conv1 = model.backbone.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert model.backbone.fc.out_features == 128


def test_encoder_gradients_flow():
    model = build_encoder("small_cnn", low_dim=16, in_channels=1)
    out = model(torch.randn(4, 1, 28, 28))
    out[:, 0].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet18_cifar"):
        build_encoder("vgg")
