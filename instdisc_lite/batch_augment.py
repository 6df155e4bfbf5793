"""The paper's augmentation for colour images, drawn and applied a whole batch at a time on the training device.

InstDisc (Wu et al. 2018) and its official code train on random resized crops (area 0.2-1 of the image, aspect
ratio 3/4-4/3), colour jitter (brightness, contrast, saturation and hue, strength 0.4), random grayscale (p = 0.2)
and horizontal flips: the torchvision transforms of :func:`instdisc_lite.data.paper_train_transform`. Applied per
image with PIL in DataLoader workers they make a GPU wait on a machine with two CPU cores (Colab).
:class:`ColourBatchAugment` draws the same parameters, by torchvision's sampling rules, for a batch ``(B, 3, H, W)``
and applies them with a handful of tensor operations on whatever device the batch is on:

* crop + resize (+ flip): two per-image interpolation matrices, ``rows (B, S, H)`` and ``cols (B, S, W)``, so the
  crop of every image is ``rows @ image @ cols^T``: torchvision's bilinear resize of the cropped tensor, antialiased
  when a crop is shrunk (its ``antialias=True``), exactly; a flip is the column matrix read backwards;
* colour jitter: the four ops in a random order per image, each op at position ``k`` a blend whose factor is 1 (an
  exact identity) for the images that apply another op there, hue through RGB -> HSV -> RGB;
* grayscale, then ``(x - mean) / std``.

Every op equals torchvision's functional op on float tensors; the PIL path rounds to uint8 after each op and
converts hue through uint8 HSV, so for the same draws its values differ from these (on smooth random 32x32 images:
by 1.6 levels of 255 on average, 99 % of them by at most 7).

Parameters are drawn by :meth:`ColourBatchAugment.sample` (from a ``torch.Generator`` when one is given, else from
the device's global generator, which the trainer seeds and checkpoints) and applied by
:meth:`ColourBatchAugment.apply`, so each part can be checked against torchvision on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # op ids 0..3 of AugmentParams.order


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) floats of ``shape`` on ``device``: drawn from ``generator`` on its own device, or from the
    global generator of ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(shape: tuple[int, ...], low: float, high: float, device, generator) -> torch.Tensor:
    return low + (high - low) * _rand(shape, device, generator)


def _below(n: torch.Tensor, device, generator) -> torch.Tensor:
    """An integer uniform in ``0..n-1`` for each entry of ``n`` ``(B,)`` (int64, >= 1): ``torch.randint(0, n)``."""
    draw = (_rand(tuple(n.shape), device, generator) * n).floor().long()
    return torch.minimum(draw, n - 1)  # u * n may round up to n in float32


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop
# ----------------------------------------------------------------------------------------------


def sample_crops(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(top, left, h, w)``, each ``(batch,)`` int64: crops of a ``height x width`` image drawn the way
    ``torchvision.transforms.RandomResizedCrop.get_params`` draws one, for a whole batch at once.

    Each image gets ``tries`` candidates (area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``, sides rounded); the first that fits is kept, at a uniform position. An image none of whose
    candidates fits gets torchvision's fallback, the largest centred crop with its ratio clamped into ``ratio``.
    """
    device = torch.device(device)
    area = _uniform((batch, tries), scale[0], scale[1], device, generator) * (height * width)
    log_r = _uniform((batch, tries), math.log(ratio[0]), math.log(ratio[1]), device, generator)
    w = torch.round(torch.sqrt(area * torch.exp(log_r))).long()  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / torch.exp(log_r))).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, its aspect ratio clamped into [ratio[0], ratio[1]]
    fallback_w, fallback_h = width, height
    if width / height < min(ratio):
        fallback_h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w = int(round(height * max(ratio)))
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.where(found, _below(height - h + 1, device, generator), (height - h) // 2)
    left = torch.where(found, _below(width - w + 1, device, generator), (width - w) // 2)
    return top, left, h, w


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Interpolation matrices ``(B, out_size, in_size)``: row ``o`` of image ``b`` holds the weights with which
    output pixel ``o`` averages the input pixels of the segment ``[start[b], start[b] + length[b])``.

    The weights are PyTorch's antialiased bilinear resize of that segment (``F.interpolate(..., mode="bilinear",
    antialias=True)``, what torchvision's ``resize`` of a tensor uses): a triangle around the output pixel's centre,
    widened by the shrink factor when the segment is longer than ``out_size``, cut to the segment and renormalised.
    When the segment is enlarged (CIFAR-10's crops of 32x32 images back to 32x32) it is plain bilinear interpolation
    with edge clamping.
    """
    shrink = (length.float() / out_size).unsqueeze(1)  # (B, 1): input pixels per output pixel
    centre = start.float().unsqueeze(1) + shrink * (torch.arange(out_size, device=start.device) + 0.5)  # (B, out)
    support = shrink.clamp(min=1.0)  # the triangle's half-width in input pixels
    pixel = torch.arange(in_size, device=start.device, dtype=torch.float32) + 0.5  # input pixel centres
    weights = (1 - (pixel.view(1, 1, -1) - centre.unsqueeze(2)).abs() / support.unsqueeze(2)).clamp(min=0)
    inside = (pixel.view(1, -1) >= start.unsqueeze(1)) & (pixel.view(1, -1) < (start + length).unsqueeze(1))  # (B, in)
    weights = weights * inside.unsqueeze(1)
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crop(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop ``[top, top + height) x [left, left + width)`` of every image of ``images`` ``(B, C, H, W)`` (float) and
    resize it to ``size x size``; mirror it left-right where ``flip`` ``(B,)`` bool is True.

    ``top, left, height, width``: ``(B,)`` integers. Returns ``(B, C, size, size)``, equal (to float rounding) to
    torchvision's ``F.hflip(F.resized_crop(image, top, left, height, width, [size, size]))`` per image.
    """
    b, c, in_h, in_w = images.shape
    rows = resize_weights(top, height, in_h, size).to(images.dtype)  # (B, size, H)
    cols = resize_weights(left, width, in_w, size).to(images.dtype)  # (B, size, W)
    if flip is not None:
        cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)  # output column o reads from column size-1-o
    # two batched products, the channels folded into the matrices' free side: (B, size, H) @ (B, H, C*W), then
    # (B, size*C, W) @ (B, W, size)
    x = torch.bmm(rows, images.permute(0, 2, 1, 3).reshape(b, in_h, c * in_w))  # (B, size, C*W)
    x = torch.bmm(x.reshape(b, size * c, in_w), cols.transpose(1, 2))  # (B, size*C, size)
    return x.reshape(b, size, c, size).permute(0, 2, 1, 3).contiguous()  # (B, C, size, size)


# ----------------------------------------------------------------------------------------------
# ColorJitter and RandomGrayscale, on float images in [0, 1]
# ----------------------------------------------------------------------------------------------


def rgb_to_gray(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` of RGB ``images`` ``(B, 3, H, W)`` (weights :data:`GRAY_WEIGHTS`)."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_image(factor: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(factor, dtype=images.dtype, device=images.device).reshape(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other``, clamped to [0, 1]; exactly ``images`` where ``factor`` is 1."""
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale ``images`` ``(B, 3, H, W)`` towards black by ``factor`` (``(B,)`` or a number; 1 keeps them)."""
    return _blend(images, torch.zeros_like(images), _per_image(factor, images))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its mean luma (a flat grey) by ``factor``: below 1 less contrast, above 1 more."""
    mean = rgb_to_gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, _per_image(factor, images))


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its own grayscale version by ``factor``: 0 gray, 1 unchanged, above 1 more vivid."""
    return _blend(images, rgb_to_gray(images), _per_image(factor, images))


def adjust_hue(images: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (``(B,)`` or a number, in turns: 0.5 is half the colour wheel).

    RGB -> HSV -> RGB, with what a rotation keeps left in place: each pixel's largest channel ``v`` (value) and its
    chroma ``c = v - min`` (saturation ``c / v``) stay, and only the hue ``h`` (in sixths of a turn: its sextant of
    the hexcone, red first on ties, then green, as torchvision) moves. The channels come back as
    ``v - c clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h + 6 shift) mod 6`` and ``n`` = 5, 3, 1 for red, green,
    blue: the hexcone's piecewise-linear ramps without a case per sextant. Grey pixels (``c = 0``) stay grey.
    """
    r, g, b = images.unbind(1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey: any divisor (the numerators are 0)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = offsets + (hue + 6 * _per_image(shift, images).view(-1, 1, 1)).unsqueeze(1)
    k = k - 6 * torch.floor(k / 6)  # mod 6 (cheaper than torch.remainder on a CPU)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * ramp


def colour_jitter(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with per-image parameters: images ``(B, 3, H, W)`` in [0, 1].

    ``order`` ``(B, 4)``: each image's permutation of the op ids 0..3 (:data:`JITTER_OPS`), applied left to right;
    ``factors`` ``(B, 4)``: brightness, contrast and saturation factors and the hue shift, by op id. At each of the
    four positions every image either blends (brightness, contrast or saturation: the others' factor is 1) or
    shifts its hue, so a batch costs four blends and four hue rotations whatever the orders are.
    """
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=images.dtype, device=images.device)
    for k in range(4):
        op = order[:, k]
        chosen = torch.where(torch.arange(4, device=op.device) == op.unsqueeze(1), factors.to(images.dtype), identity)
        gray = rgb_to_gray(images)
        # what the image is blended with: black (brightness), its mean luma (contrast) or its grayscale (saturation)
        is_contrast, is_saturation = ((op == j).to(images.dtype).view(-1, 1, 1, 1) for j in (1, 2))
        target = is_contrast * gray.mean(dim=(1, 2, 3), keepdim=True) + is_saturation * gray
        factor = (chosen[:, 0] * chosen[:, 1] * chosen[:, 2]).view(-1, 1, 1, 1)  # two of the three are 1
        images = _blend(images, target, factor)
        images = torch.where((op == 3).view(-1, 1, 1, 1), adjust_hue(images, chosen[:, 3]), images)
    return images


# ----------------------------------------------------------------------------------------------
# The whole augmentation
# ----------------------------------------------------------------------------------------------


@dataclass
class AugmentParams:
    """The random choices for a batch of ``B`` images; every field is ``(B,)`` unless said otherwise.

    ``top, left, height, width``: the crop (int64); ``flip``: mirror (bool); ``order`` ``(B, 4)``: jitter op ids in
    the order applied; ``factors`` ``(B, 4)``: brightness, contrast, saturation factors and hue shift; ``gray``:
    convert to grayscale (bool). Without colour ops ``order``, ``factors`` and ``gray`` are None.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    order: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    gray: torch.Tensor | None = None


class ColourBatchAugment(nn.Module):
    """The paper's augmentation of RGB images for a whole batch on its device (see the module docstring).

    ``forward(images)``: uint8 ``(B, 3, H, W)`` (or float in [0, 1]) -> normalised float32 ``(B, 3, size, size)``:
    RandomResizedCrop(``size``, ``scale``, ``ratio``), ColorJitter(``jitter`` x4; hue shifts in
    ``[-jitter, jitter]``), RandomGrayscale(``gray_p``), RandomHorizontalFlip (when ``flip``), Normalize(``mean``,
    ``std``), each image with its own draws. ``colour=False`` keeps the crop and the flip only (``augment:
    crop_flip``). Pass ``generator`` for draws that depend on its seed alone.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: float = 0.4,
        gray_p: float = 0.2,
        flip: bool = True,
        colour: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= jitter <= 0.5:  # hue shifts are bounded by half a turn (torchvision's rule too)
            raise ValueError(f"jitter must be in [0, 0.5] (the hue shift is at most half a turn), got {jitter}")
        self.size, self.scale, self.ratio = size, scale, ratio
        self.jitter, self.gray_p, self.flip, self.colour = jitter, gray_p, flip, colour
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def sample(
        self, batch: int, height: int, width: int, device: torch.device | str = "cpu", generator=None
    ) -> AugmentParams:
        """Draw the parameters of ``batch`` images of ``height x width``, as torchvision's transforms would."""
        device = torch.device(device)
        top, left, h, w = sample_crops(batch, height, width, self.scale, self.ratio, device=device, generator=generator)
        flip = _rand((batch,), device, generator) < (0.5 if self.flip else 0.0)
        params = AugmentParams(top, left, h, w, flip)
        if self.colour:
            params.order = _rand((batch, 4), device, generator).argsort(dim=1)  # a uniform random permutation
            low, high = max(0.0, 1 - self.jitter), 1 + self.jitter
            factors = _uniform((batch, 4), low, high, device, generator)
            factors[:, 3] = _uniform((batch,), -self.jitter, self.jitter, device, generator)
            params.factors = factors
            params.gray = _rand((batch,), device, generator) < self.gray_p
        return params

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment ``images`` ``(B, 3, H, W)`` (uint8, or float in [0, 1]) with ``params``; normalised float32
        ``(B, 3, size, size)``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = resized_crop(x, params.top, params.left, params.height, params.width, self.size, params.flip).clamp(0, 1)
        if params.order is not None:
            x = colour_jitter(x, params.order, params.factors)
            x = torch.where(params.gray.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        params = self.sample(len(images), images.shape[2], images.shape[3], images.device, generator)
        return self.apply(images, params)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, jitter={self.jitter if self.colour else 0}, "
            f"gray_p={self.gray_p if self.colour else 0}, flip={self.flip}"
        )
