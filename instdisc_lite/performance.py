"""What a training run costs: FLOPs counted by torch, and run times estimated from an assumed GPU throughput.

Nothing here times a GPU. :func:`flops_per_image` counts the floating-point operations of one forward (and
backward) pass with :class:`torch.utils.flop_counter.FlopCounterMode`, which adds up the matrix products and
convolutions torch dispatches (2 FLOPs per multiply-add; element-wise ops, normalisation and the optimiser step are
not counted). :func:`estimate_seconds` divides a FLOP count by a sustained throughput, an *assumption* that
:class:`Throughput` carries with its source, so every estimate says what it rests on::

    from instdisc_lite.models import build_encoder
    f = flops_per_image(build_encoder("resnet18_cifar"), (3, 32, 32))   # forward + backward, ~3.3e9
    estimate_seconds(f * 50_000, T4_ASSUMED)                             # one CIFAR-10 epoch, seconds (ESTIMATE)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# NVIDIA T4 datasheet: 65 TFLOPS fp16 (tensor cores, dense), 8.1 TFLOPS fp32
T4_PEAK_FP16 = 65e12
T4_PEAK_FP32 = 8.1e12


@dataclass(frozen=True)
class Throughput:
    """An assumed sustained throughput (FLOP/s) and where the assumption comes from."""

    name: str
    flops_per_s: float
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


# The central assumption of the book's GPU estimates: a tenth of the T4's fp16 tensor-core peak, for training under
# autocast (the trainer's default on CUDA). Why a tenth: the forward pass of ResNet-50 at batch 256 with mixed
# precision runs at 1,198 images/s on a T4 (NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, inference
# table, pytorch-21.03 container), about 15 % of the fp16 peak at ResNet-50's ~8.2 GFLOPs per 224x224 image; training
# adds a backward pass that runs less efficiently, and CIFAR's 32x32 maps are small for tensor cores.
T4_ASSUMED = Throughput(
    "T4, mixed precision, 10 % of the 65 TFLOPS fp16 peak (assumed)",
    0.10 * T4_PEAK_FP16,
    "NVIDIA T4 datasheet (65 TFLOPS fp16, 8.1 TFLOPS fp32); fraction assumed from NVIDIA DeepLearningExamples "
    "ResNet50 v1.5 (PyTorch) T4 mixed-precision inference, 1,198 img/s at batch 256",
)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch dispatches while ``fn()`` runs (matrix products and convolutions, 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_image(
    model: nn.Module,
    input_shape: Sequence[int],
    backward: bool = True,
    batch_size: int = 2,
    device: str | torch.device = "meta",
) -> float:
    """FLOPs per image of ``model`` on inputs ``(batch_size, *input_shape)``: the forward pass, plus the backward of
    the sum of the outputs when ``backward`` (the backward of a convolution or matrix product costs about twice its
    forward: gradients of the input and of the weights).

    The model is copied, so its weights and BatchNorm statistics are left alone; on the ``meta`` device (the default)
    no arithmetic is done at all, only the shapes are propagated. Per image = total / ``batch_size``; for layers that
    act on each image alone (convolutions, linear layers) the batch size does not change it.
    """
    if len(input_shape) < 1 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be the positive shape of one image, e.g. (3, 32, 32); got {input_shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).train(model.training)
    x = torch.randn(batch_size, *input_shape, device=device)
    if not backward:
        with torch.no_grad():
            return count_flops(lambda: net(x)) / batch_size

    def step() -> None:
        out = net(x)
        (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()

    return count_flops(step) / batch_size


def estimate_seconds(flops: float, throughput: Throughput | float) -> float:
    """Seconds ``flops`` take at a sustained ``throughput`` (a :class:`Throughput` or FLOP/s). An ESTIMATE: it
    assumes the device never waits for data, the host or memory-bound kernels beyond what the throughput absorbs."""
    rate = throughput.flops_per_s if isinstance(throughput, Throughput) else float(throughput)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"throughput must be a positive number of FLOP/s, got {rate}")
    if not (math.isfinite(flops) and flops >= 0):
        raise ValueError(f"flops must be a non-negative number, got {flops}")
    return flops / rate


def conv2d_flops(cin: int, cout: int, kernel: int, out_h: int, out_w: int, groups: int = 1) -> int:
    """Analytic forward FLOPs of a bias-free 2-D convolution on one image: 2 per multiply-add."""
    return 2 * (cin // groups) * kernel * kernel * cout * out_h * out_w


def linear_flops(fan_in: int, fan_out: int) -> int:
    """Analytic forward FLOPs of a linear layer on one input vector (bias not counted): 2 per multiply-add."""
    return 2 * fan_in * fan_out


__all__ = [
    "T4_ASSUMED",
    "T4_PEAK_FP16",
    "T4_PEAK_FP32",
    "Throughput",
    "conv2d_flops",
    "count_flops",
    "estimate_seconds",
    "flops_per_image",
    "linear_flops",
]
