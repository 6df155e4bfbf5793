"""The learning-rate schedule: the paper's steps (x0.1 at 60 % and 80 % of the epochs), optional warm-up, and the
linear scaling rule for several processes."""

from __future__ import annotations

from .config import TrainConfig


def learning_rate(config: TrainConfig, epoch: float, world_size: int = 1) -> float:
    """The learning rate of ``epoch`` (0-based) for a run of ``world_size`` processes.

    The linear scaling rule of Goyal et al. (2017): ``config.lr`` is the rate for a global batch of
    ``config.lr_batch`` images (default: ``batch_size``, one process's batch); a run whose global batch is
    ``world_size * batch_size`` uses ``lr * global_batch / lr_batch``, so the step per image stays the same on
    any number of GPUs. ``scale_lr=False`` uses ``lr`` as given.
    """
    base = config.lr
    if config.scale_lr:
        base *= world_size * config.batch_size / (config.lr_batch or config.batch_size)
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    drops = sum(epoch >= m * config.epochs for m in config.lr_milestones)
    return base * config.lr_gamma**drops


def lr_schedule(config: TrainConfig, world_size: int = 1) -> list[float]:
    """The learning rate of every epoch, for plotting."""
    return [learning_rate(config, e, world_size) for e in range(config.epochs)]


def milestone_epochs(config: TrainConfig) -> list[int]:
    """The first epoch (0-based) at which each lr drop applies."""
    return [next(e for e in range(config.epochs + 1) if e >= m * config.epochs) for m in config.lr_milestones]
