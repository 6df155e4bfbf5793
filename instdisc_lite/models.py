"""Encoders f_theta: image -> L2-normalised ``low_dim`` feature (the paper uses 128-d).

* ``resnet18_cifar``: ResNet18 with a 3x3 stride-1 stem and no max-pool, the paper's CIFAR network.
* ``resnet18`` / ``resnet50``: torchvision ResNets with the final fc replaced by ``fc -> low_dim``.
* ``small_cnn``: a four-layer CNN for 28x28 / 32x32 images that trains in minutes on a CPU.
* ``small_cnn_fast``: the same with a stride-2 stem, about twice as fast (the CPU quick config).

:func:`build_backbone` gives the same networks without their final Linear: the representation h that methods with a
projection head (SimCLR) train through the head and evaluate directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class Encoder(nn.Module):
    """Wraps a backbone ending in ``low_dim`` outputs and L2-normalises them: ``(B, C, H, W) -> (B, low_dim)``."""

    def __init__(self, backbone: nn.Module, low_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.low_dim = low_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images), dim=1)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn(low_dim: int = 128, in_channels: int = 1, width: int = 32, stem_stride: int = 1) -> Encoder:
    """Four conv-BN-ReLU layers (widths w, 2w, 4w, 8w; three stride-2), global average pool, fc.

    ``stem_stride=2`` downsamples in the first layer instead of the last (strides 2, 2, 2, 1): the same
    weights on a quarter of the positions in the first three layers, about 2x faster on a CPU.
    """
    w = width
    strides = (1, 2, 2, 2) if stem_stride == 1 else (stem_stride, 2, 2, 1)
    backbone = nn.Sequential(
        _conv_bn(in_channels, w, strides[0]),
        _conv_bn(w, 2 * w, strides[1]),
        _conv_bn(2 * w, 4 * w, strides[2]),
        _conv_bn(4 * w, 8 * w, strides[3]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, low_dim),
    )
    return Encoder(backbone, low_dim)


def _torchvision_resnet(name: str, low_dim: int, in_channels: int) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None, num_classes=low_dim)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return net


def resnet18(low_dim: int = 128, in_channels: int = 3) -> Encoder:
    """torchvision ResNet18 (ImageNet stem), fc -> ``low_dim``."""
    return Encoder(_torchvision_resnet("resnet18", low_dim, in_channels), low_dim)


def resnet50(low_dim: int = 128, in_channels: int = 3) -> Encoder:
    """torchvision ResNet50 (ImageNet stem), fc -> ``low_dim``."""
    return Encoder(_torchvision_resnet("resnet50", low_dim, in_channels), low_dim)


def resnet18_cifar(low_dim: int = 128, in_channels: int = 3) -> Encoder:
    """ResNet18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (the paper's CIFAR-10 network)."""
    net = torchvision.models.resnet18(weights=None, num_classes=low_dim)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return Encoder(net, low_dim)


def small_cnn_fast(low_dim: int = 128, in_channels: int = 1) -> Encoder:
    """``small_cnn`` with a stride-2 stem (strides 2, 2, 2, 1): the CPU quick config's encoder."""
    return small_cnn(low_dim, in_channels, stem_stride=2)


ARCHITECTURES: dict[str, Callable[..., Encoder]] = {
    "small_cnn": small_cnn,
    "small_cnn_fast": small_cnn_fast,
    "resnet18_cifar": resnet18_cifar,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def build_encoder(arch: str, low_dim: int = 128, in_channels: int = 3) -> Encoder:
    """Encoder by name; an unknown name lists the valid ones."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](low_dim=low_dim, in_channels=in_channels)


def build_backbone(arch: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """The representation network of ``arch``: the Encoder's backbone without its final Linear (and unnormalised).

    Returns ``(module, feature_dim)``, the module mapping ``(B, C, H, W) -> (B, feature_dim)``: the pooled features
    the Linear to ``low_dim`` would read (256 for ``small_cnn``, 512 for the ResNet18s, 2048 for ResNet50).
    """
    # low_dim is irrelevant: the fc goes
    return without_head(build_encoder(arch, low_dim=1, in_channels=in_channels).backbone)


def without_head(net: nn.Module) -> tuple[nn.Module, int]:
    """``net`` (an Encoder's backbone) with its final Linear replaced by Identity, in place; returns it and the
    dimension of the representation that Linear read. A trained backbone keeps its weights (fine-tuning uses it)."""
    if isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear):  # small_cnn*: [..., pool, flatten, fc]
        dim = net[-1].in_features
        net[-1] = nn.Identity()  # (not sliced off: parameter names stay those of the Encoder's backbone)
    elif isinstance(getattr(net, "fc", None), nn.Linear):  # torchvision ResNets: ... avgpool, flatten, fc
        dim = net.fc.in_features
        net.fc = nn.Identity()
    else:  # a new architecture must say where its representation ends
        raise TypeError(f"without_head does not know where the final Linear of {type(net).__name__} is")
    return net, dim
