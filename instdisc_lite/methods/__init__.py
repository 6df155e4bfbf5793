"""The family of methods, one small module each, behind one interface (:class:`~.base.Method`).

Every module of this package that defines a :class:`Method` subclass with a ``name`` is a method a config can
name (``method: ...``); :func:`taxonomy` lists them with where their negatives come from and which loss scores them:

* negatives from a memory bank: InstDisc (NCE or the non-parametric softmax), CMC (NCE across views);
* from the batch itself (end to end): InvaSpread (its instance loss), SimCLR (InfoNCE as NT-Xent);
* from a queue filled by a momentum encoder: MoCo (InfoNCE);
* from other positions of the same and other images: CPC (InfoNCE).
"""

from __future__ import annotations

import importlib
import pkgutil

from ..config import ConfigError, TrainConfig
from .base import Method

ORDER = ("instdisc", "invaspread", "simclr", "moco", "cmc", "cpc")  # the book's order: bank, batch, queue, views


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__:
                found[obj.name] = obj
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])))


METHODS: dict[str, type[Method]] = _discover()


def build_method(
    config: TrainConfig,
    num_items: int,
    in_channels: int,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> Method:
    """The :class:`Method` named by ``config.method`` for a dataset of ``num_items`` images.

    ``normalisation``: the per-channel ``(mean, std)`` the images arrive normalised with (``DataBundle.mean/std``),
    for a method whose views undo it (``Method.uses_normalisation``: CMC's Lab conversion); the others ignore it.
    """
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[config.method]
    if cls.uses_normalisation:
        return cls(config, num_items, in_channels, normalisation=normalisation)
    return cls(config, num_items, in_channels)


def taxonomy() -> list[dict[str, str]]:
    """One row per method: its name, where its negatives come from, which loss scores them, how many views."""
    return [{"method": m.name, "negatives": m.negatives, "loss": m.loss, "views": str(m.num_views)} for m in
            METHODS.values()]  # fmt: skip


__all__ = ["METHODS", "ORDER", "Method", "build_method", "taxonomy"]
