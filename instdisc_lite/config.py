"""Training configs: plain dataclasses loaded from YAML, with ``key=value`` overrides.

A shipped config is named by its file stem in ``instdisc_lite/configs/`` (``fashion_mnist_quick``,
``cifar10_resnet18``, ``imagenet_resnet50``, ``imagenet_resnet18``); any other argument is a path
to a YAML file. Unknown keys fail and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's (CIFAR-10 / ResNet18 / NCE m=4096)."""

    name: str = "run"
    # data
    dataset: str = "cifar10"  # fashion_mnist | cifar10 | imagenet
    data_root: str = "data"
    train_subset: int | None = None  # train on the first N images (a quick setting); None = all
    augment: str = "paper"  # paper | none
    crop_scale: float = 0.2  # smallest RandomResizedCrop area fraction (paper: 0.2)
    num_workers: int = 2  # loader processes, at most the CPUs available
    # encoder
    arch: str = "resnet18_cifar"  # small_cnn | small_cnn_fast | resnet18_cifar | resnet18 | resnet50
    low_dim: int = 128
    # objective
    objective: str = "nce"  # nce | softmax (non-parametric) | parametric
    temperature: float = 0.07
    num_negatives: int = 4096
    shared_negatives: bool = False
    z_mode: str = "fixed"  # fixed (paper) | running
    z_momentum: float = 0.99
    proximal: float = 0.0  # lambda of the proximal term; 0 = off (official code)
    bank_momentum: float = 0.5
    # random (official code) | features: fill the bank with the untrained encoder's features of the un-augmented
    # images before the first step, so the first epoch's positives are not random vectors (short runs)
    bank_init: str = "random"
    # optimisation: SGD with steps x lr_gamma at lr_milestones (fractions of the epochs: 120/200, 160/200)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.03
    lr_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    # evaluation during training (weighted kNN of test features against the bank)
    knn_k: int = 200
    knn_temperature: float = 0.07
    eval_every: int = 1
    eval_subset: int | None = None  # evaluate on the first N test images; None = all
    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # autocast on CUDA only
    channels_last: bool = True  # on CUDA only
    compile: bool = False
    out_dir: str = "runs"
    checkpoint_every: int = 1
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against the dataclass field's type and convert int -> float where needed."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} cannot be null (expected {annotation})")
    origin = typing.get_origin(base)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} expects a list ({annotation}), got {value!r}")
        (item,) = typing.get_args(base)
        if item is float and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key {key!r} expects a list of numbers ({annotation}), got {value!r}")
        return [float(v) if item is float else v for v in value]
    if base is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if base is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    if base is str and not isinstance(value, str):
        return str(value)
    return value


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig`; unknown keys raise :class:`ConfigError` listing the valid ones."""
    valid = TrainConfig.field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} in {source}. Valid keys: {', '.join(valid)}"
        )
    annotations = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    coerced = {k: _coerce(k, v, annotations[k]) for k, v in values.items()}
    return TrainConfig(**coerced)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["lr=0.1", "epochs=5"]`` -> ``{"lr": 0.1, "epochs": 5}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set epochs=5)")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise ConfigError(
            f"no shipped config named {str(name_or_path)!r}; shipped configs: {', '.join(shipped_configs())} "
            "(or pass a path to a YAML file)"
        )
    return candidate


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load a shipped config by name, or a YAML file by path, then apply overrides."""
    path = resolve_config_path(name_or_path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    values.setdefault("name", path.stem)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values.update(extra)
    return config_from_dict(values, source=str(path) + (" + overrides" if extra else ""))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
