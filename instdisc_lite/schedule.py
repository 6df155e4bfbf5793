"""The learning-rate schedule: the paper's steps (x0.1 at 60 % and 80 % of the epochs), optional warm-up, and the
linear scaling rule for several processes."""

from __future__ import annotations

from .config import TrainConfig


def learning_rate(config: TrainConfig, epoch: float, world_size: int = 1) -> float:
    """The learning rate of ``epoch`` (0-based).

    ``config.lr`` is the rate for one process's batch of ``config.batch_size``. With ``W`` processes the global
    batch is ``W * batch_size``; with ``scale_lr`` (the default) the rate is scaled linearly to ``W * lr``, the
    linear scaling rule of Goyal et al. (2017), so a run keeps its per-image step size on any number of GPUs.
    """
    base = config.lr * (world_size if config.scale_lr else 1)
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
