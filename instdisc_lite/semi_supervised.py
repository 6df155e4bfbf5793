"""Semi-supervised learning from an InstDisc encoder (the paper's semi-supervised study, its Fig. 6).

The features are learned without labels on all training images; then only a fraction of those images keep their
label. Three ways to use the labelled part, each scored by top-1 on the whole test set:

* **fine-tune**: the learned backbone (the encoder without its final Linear) plus a new linear classifier, every
  weight trained with cross-entropy on the labelled images;
* **probe**: a linear classifier on the frozen 128-d features of the labelled images;
* **from scratch**: the same network, randomly initialised, trained exactly like the fine-tuned one.

Fine-tuning and training from scratch share one recipe so that the only difference is the initialisation: as many
SGD steps as the pre-training took (``epochs x steps per epoch`` of the run's config, whatever the number of
labels), its lr and weight decay with a cosine decay, its augmentation, and batches of ``min(batch_size, labels)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import labelled_loader, set_epoch, stratified_subset
from .evaluate import linear_probe
from .models import Encoder, build_encoder, without_head

PROBE_BATCH = 1024


def labelled_positions(labels: torch.Tensor, fraction: float, num_classes: int) -> list[int]:
    """The positions that keep their label: ``round(fraction * n)`` of them (at least one per class), taken
    class by class in dataset order (:func:`~instdisc_lite.data.stratified_subset`), so a larger fraction keeps
    every label of a smaller one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    n = len(labels)
    return stratified_subset(labels, min(n, max(num_classes, round(fraction * n))))


def classifier(encoder: Encoder, num_classes: int) -> nn.Sequential:
    """A copy of ``encoder``'s backbone, its final Linear replaced by a new ``feature_dim -> num_classes`` one:
    ``(B, C, H, W) -> (B, num_classes)`` logits. ``encoder`` itself is left untouched."""
    backbone, dim = without_head(copy.deepcopy(encoder.backbone))
    return nn.Sequential(backbone, nn.Linear(dim, num_classes))


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def train_classifier(
    net: nn.Module,
    loader: Any,
    augment: nn.Module,
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    seed: int = 0,
) -> nn.Module:
    """``steps`` SGD steps (momentum 0.9, cosine-decayed lr) of cross-entropy on ``loader``'s batches, each
    passed through ``augment`` on ``device``; the epochs follow from the loader's length. Returns ``net``."""
    net.to(device).train()
    augment.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    step, epoch = 0, 0
    with torch.random.fork_rng(devices=_rng_devices(device)):  # the caller's RNG streams are left alone
        torch.manual_seed(seed)
        while step < steps:
            set_epoch(loader, epoch, seed)
            for images, labels, _ in loader:
                loss = F.cross_entropy(net(augment(images.to(device))), labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step == steps:
                    break
            epoch += 1
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the classifier's loss is {loss.item()} after {steps} steps; lower the lr")
    return net


@torch.no_grad()
def accuracy(net: nn.Module, loader: Any, transform: nn.Module, device: torch.device) -> float:
    """Top-1 (%) of ``net``'s logits over ``loader`` (items ``(image, label, index)``), images through
    ``transform``."""
    net.eval()
    transform.to(device)
    correct = total = 0
    for images, labels, _ in loader:
        correct += (net(transform(images.to(device))).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def semi_supervised(
    run: Any,
    fraction: float,
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    probe_epochs: int,
) -> dict[str, Any]:
    """Fine-tune, probe and train-from-scratch top-1 (%) of a finished run (:class:`~instdisc_lite.train.Run`)
    when only ``fraction`` of its training images keep their label.

    ``train_features`` ``(n, d)`` are the run's features of all its training images (bank order) and
    ``test_features`` ``(n_test, d)`` of the test set; the probe on the labelled rows takes as many steps as one
    of ``probe_epochs`` epochs on every row would.
    """
    config, data, device = run.config, run.data, run.device
    positions = labelled_positions(data.train_labels, fraction, data.num_classes)
    batch = min(config.batch_size, len(positions))
    steps = config.epochs * (data.num_train // config.batch_size)  # as many steps as pre-training took
    recipe = {"steps": steps, "lr": config.lr, "weight_decay": config.weight_decay, "device": device,
              "seed": config.seed}  # fmt: skip

    def top1(net: nn.Module) -> float:
        loader = labelled_loader(data.train_loader, positions, batch, config.seed)
        train_classifier(net, loader, data.train_augment, **recipe)
        return accuracy(net, data.test_loader, data.eval_transform, device)

    finetune = top1(classifier(run.encoder, data.num_classes))
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)  # the untrained network: the same seed as the pre-trained one started from
        fresh = build_encoder(config.arch, config.low_dim, data.in_channels)
    scratch = top1(classifier(fresh, data.num_classes))
    keep = torch.as_tensor(positions)
    per_epoch = math.ceil(len(train_features) / PROBE_BATCH), math.ceil(len(keep) / PROBE_BATCH)
    probe = linear_probe(train_features[keep], data.train_labels[keep], test_features, test_labels,
                         epochs=math.ceil(probe_epochs * per_epoch[0] / per_epoch[1]), batch_size=PROBE_BATCH,
                         device=device)  # fmt: skip
    return {
        "label_fraction": fraction, "num_labels": len(positions), "steps": steps, "batch_size": batch,
        "finetune_top1": finetune, "probe_top1": probe["top1"], "scratch_top1": scratch,
    }  # fmt: skip
