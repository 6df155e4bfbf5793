"""The grid of overlapping square patches CPC cuts an image into (van den Oord et al. 2018, section 3.3).

An ``H x W`` image, patches of side ``size`` taken every ``stride`` pixels, gives an ``R x C`` grid with::

    R = (H - size) // stride + 1,    C = (W - size) // stride + 1
    patch (r, c) = image[:, r * stride : r * stride + size, c * stride : c * stride + size]

With ``size = 2 * stride`` neighbouring patches overlap by half, as in the paper (64x64 patches every 32 pixels of a
256x256 image: 7x7). Here 8x8 patches every 4 pixels: 6x6 on 28x28 Fashion-MNIST, 7x7 on 32x32 CIFAR-10. Pixels
past the last full patch (when ``H - size`` is not a multiple of ``stride``) are left out.
"""

from __future__ import annotations

import torch


def grid_shape(height: int, width: int, size: int, stride: int) -> tuple[int, int]:
    """``(R, C)``: rows and columns of the grid of ``size``-pixel patches every ``stride`` pixels."""
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be >= 1, got size={size}, stride={stride}")
    if size > height or size > width:
        raise ValueError(f"patch size {size} does not fit in a {height}x{width} image")
    return (height - size) // stride + 1, (width - size) // stride + 1


def patch_grid(images: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """``(B, ch, H, W) -> (B, R, C, ch, size, size)``: patch ``(r, c)`` is the crop at ``(r * stride, c * stride)``.

    ``Tensor.unfold`` makes strided views (no copy) of the windows along H then W: ``(B, ch, R, C, size, size)``;
    moving the channels behind the grid axes puts each patch in the layout a CNN takes.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    grid_shape(images.shape[2], images.shape[3], size, stride)  # validates
    windows = images.unfold(2, size, stride).unfold(3, size, stride)  # (B, ch, R, C, size, size)
    return windows.permute(0, 2, 3, 1, 4, 5)


__all__ = ["grid_shape", "patch_grid"]
