"""CMC's views: one augmented image split into two groups of channels that each see part of it.

CMC (Tian, Krishnan, Isola 2019) contrasts *views* of one scene; on colour images the views are the L (lightness)
and ab (colour) channels of the Lab colour space, so that neither view holds what the other does and what they
share is the scene. Both views come from the same augmented crop: the split is a function of the image, not a
second augmentation.

* :func:`rgb_to_lab`: sRGB in [0, 1] ``(B, 3, H, W)`` -> CIE Lab (D65) ``(B, 3, H, W)``, L in [0, 100].
* :class:`LabSplit`: a *normalised* RGB batch (the data pipeline's mean/std) -> ``L (B, 1, H, W)``,
  ``ab (B, 2, H, W)``, both rescaled to about [-1, 1].
* :class:`BandSplit`: a grayscale batch ``(B, 1, H, W)`` -> low-pass band and high-pass band, each ``(B, 1, H, W)``
  (Fashion-MNIST has no colour to split; see the class for why these two views).

Every split is an ``nn.Module`` whose constants are non-persistent buffers (they move with the method, they are
not state) and which says its views' ``names`` and ``channels``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

# Linear sRGB -> CIE XYZ under the D65 white point (IEC 61966-2-1), and that white point's XYZ.
RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65_WHITE = (0.950456, 1.0, 1.088754)
_DELTA = 6.0 / 29.0  # the knee of Lab's cube root: linear below delta^3, so f is smooth and finite at 0

# The normalisation each colour dataset's pipeline applies (undone before the conversion to Lab).
COLOUR_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB gamma: ``c / 12.92`` for ``c <= 0.04045``, else ``((c + 0.055) / 1.055) ** 2.4``."""
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """``t ** (1/3)`` above ``delta^3``, the tangent line ``t / (3 delta^2) + 4/29`` below it."""
    return torch.where(t > _DELTA**3, t.clamp_min(_DELTA**3) ** (1.0 / 3.0), t / (3 * _DELTA**2) + 4.0 / 29.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab of sRGB images: ``(B, 3, H, W)`` in [0, 1] (clamped) -> ``(B, 3, H, W)`` = (L, a, b).

    ``XYZ = M * linear(rgb)``; with ``f`` the cube root of :func:`_lab_f`,
    ``L = 116 f(Y/Yn) - 16``, ``a = 500 (f(X/Xn) - f(Y/Yn))``, ``b = 200 (f(Y/Yn) - f(Z/Zn))``.
    L is in [0, 100]; over the sRGB gamut a is in about [-86, 98] and b in about [-108, 94].
    """
    linear = srgb_to_linear(rgb.float().clamp(0.0, 1.0))
    matrix = torch.tensor(RGB_TO_XYZ, dtype=linear.dtype, device=linear.device)
    white = torch.tensor(D65_WHITE, dtype=linear.dtype, device=linear.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    fx, fy, fz = _lab_f(xyz).unbind(1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


class LabSplit(nn.Module):
    """Normalised RGB ``(B, 3, H, W)`` -> ``(L (B, 1, H, W), ab (B, 2, H, W))``, CMC's two colour views.

    The pipeline hands over ``(rgb - mean) / std``; that is undone first, then :func:`rgb_to_lab`. The network
    inputs are rescaled to about [-1, 1]: ``(L - 50) / 50`` and ``ab / 100`` (any fixed affine map would do, a
    BatchNorm follows the first convolution; this one keeps the inputs of the order the RGB encoders see).
    """

    names = ("L", "ab")
    channels = (1, 2)

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"LabSplit needs a 3-channel mean and std, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab = rgb_to_lab(images.float() * self.std + self.mean)
        return (lab[:, :1] - 50.0) / 50.0, lab[:, 1:] / 100.0

    def extra_repr(self) -> str:
        return f"views={self.names}, channels={self.channels}"


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius ``ceil(3 sigma)``: ``(2r + 1,)``."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class BandSplit(nn.Module):
    """Grayscale ``(B, 1, H, W)`` -> ``(low (B, 1, H, W), high (B, 1, H, W))``, a low- and a high-pass band.

    A departure from the paper, which has no grayscale views: Fashion-MNIST has one channel, so there is no L/ab.
    The two bands are this module's stand-in, chosen because they play the role L and ab play for colour: a
    decomposition of the image into two complementary parts (``low + high`` is the image, exactly, as L and ab
    together are the image), neither of which is a function of the other — the silhouette and the texture/edges of
    one garment. The image and its gradient magnitude would not do: the edge map is a function of the image, so
    one view would contain the other. Two spatial halves would, but they change the input size and on
    left-right-symmetric garments one half nearly *is* the other.

    ``low = G_sigma * x`` (separable Gaussian blur, reflect padding so the border is not an edge),
    ``high = x - low``. Works on the normalised image directly: the split is linear, so normalising before or after
    only shifts ``low`` by a constant.
    """

    names = ("low", "high")
    channels = (1, 1)

    def __init__(self, sigma: float = 1.5) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"BandSplit needs sigma > 0, got {sigma}")
        self.sigma = sigma
        self.register_buffer("kernel", gaussian_kernel(sigma), persistent=False)

    def blur(self, images: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of ``(B, 1, H, W)`` (rows, then columns), same size."""
        r = self.kernel.numel() // 2
        x = F.pad(images.float(), (r, r, r, r), mode="reflect")
        x = F.conv2d(x, self.kernel.view(1, 1, 1, -1))
        return F.conv2d(x, self.kernel.view(1, 1, -1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] != 1:
            raise ValueError(f"BandSplit expects one channel, got {images.shape[1]}")
        low = self.blur(images)
        return low, images.float() - low

    def extra_repr(self) -> str:
        return f"views={self.names}, channels={self.channels}, sigma={self.sigma}"


def build_view_split(
    dataset: str,
    in_channels: int,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> LabSplit | BandSplit:
    """The two-view split of a dataset: Lab for colour, bands for grayscale.

    Lab undoes the pipeline's ``(rgb - mean) / std`` first: ``normalisation`` is that ``(mean, std)`` (the data
    bundle's, which for your own images are their own statistics); without it a built-in colour dataset names its own.
    """
    if in_channels == 1:
        return BandSplit()
    if in_channels == 3:
        if normalisation is None:
            if dataset not in COLOUR_NORMALISATION:
                known = ", ".join(COLOUR_NORMALISATION)
                raise ValueError(f"no RGB normalisation known for dataset {dataset!r} (known: {known}); pass the "
                                 "data's (mean, std) as normalisation")  # fmt: skip
            normalisation = COLOUR_NORMALISATION[dataset]
        return LabSplit(*normalisation)
    raise ValueError(f"CMC's views need 1 (grayscale) or 3 (RGB) input channels, got {in_channels}")
