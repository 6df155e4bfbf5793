"""Training configs: plain dataclasses loaded from YAML, with ``key=value`` overrides.

A shipped config is named by its file stem in ``instdisc_lite/configs/`` (``fashion_mnist_quick``,
``cifar10_resnet18``, ``imagenet_resnet50``, ``imagenet_resnet18``); any other argument is a path
to a YAML file. Unknown keys fail and list the valid ones.

Your own images: ``dataset: npz`` (``data_path`` names a ``.npz`` file of ``images`` and optional ``labels``) or
``dataset: folder`` (``data_path`` names an image folder, resized to ``image_size``), each with an optional test set
in ``test_path``; see :mod:`instdisc_lite.data`.

Every key is checked (type, range, choices) when a config is built by :func:`config_from_dict` or
:func:`load_config`, before any data is read; :func:`validate_config` (or :meth:`TrainConfig.validate`) runs the
same checks on a config built another way, e.g. with ``dataclasses.replace``. A bad value raises
:class:`ConfigError` with one line naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

# Choices that live nowhere else (the datasets, augmentations and bank initialisations are plain strings in
# data.py / train.py). The architectures, objectives and Z modes are read from their modules (see _RULES).
DATASETS = ("fashion_mnist", "cifar10", "imagenet", "npz", "folder")
OWN_DATASETS = ("npz", "folder")  # your own images, read from data_path (and test_path)
AUGMENTS = ("paper", "crop_flip", "none")
BANK_INITS = ("random", "features")
AUGMENT_ON_DEVICE = ("auto", True, False)
MAX_NAME_LENGTH = 100
# The seed feeds torch.Generator().manual_seed(seed * 100003 + epoch) and numpy-style seeding: keep it in 32 bits.
MAX_SEED = 2**32 - 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one path component: no '/', '\\', '..', leading dot, spaces
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")
_DIGITS = re.compile(r"\s*[+-]?[0-9]+\s*")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's (CIFAR-10 / ResNet18 / NCE m=4096)."""

    name: str = "run"  # the run directory <out_dir>/<name>: one path component
    # the method (instdisc_lite.methods): where the negatives come from and which loss scores them
    method: str = "instdisc"  # instdisc | the family's methods registered in instdisc_lite.methods
    # data
    dataset: str = "cifar10"  # fashion_mnist | cifar10 | imagenet | npz | folder (your own images)
    data_root: str = "data"  # where fashion_mnist, cifar10 and imagenet are looked for
    # npz / folder only: the training images (a .npz file / an image folder) and an optional test set of the same kind
    data_path: str | None = None
    test_path: str | None = None
    # npz / folder: the side the images are resized (shorter side) and centre-cropped to; null keeps an npz file's
    # size (a folder needs one: its images may be of any size)
    image_size: int | None = None
    train_subset: int | None = None  # train on the first N images (a quick setting); None = all
    augment: str = "paper"  # paper | crop_flip (no colour or intensity changes: CMC's colour views) | none
    crop_scale: float = 0.2  # smallest RandomResizedCrop area fraction (paper: 0.2)
    flip: bool = True  # random horizontal flips (the paper's); false where a mirror is another thing (digits, text)
    num_workers: int = 2  # loader processes, at most the CPUs available
    # cifar10: hold the images on the training device as one uint8 tensor and augment a batch at a time there
    # (instdisc_lite.batch_augment) rather than per image in loader processes; auto = on when the device is CUDA
    augment_on_device: bool | str = "auto"  # auto | true | false
    # encoder
    arch: str = "resnet18_cifar"  # small_cnn | small_cnn_fast | resnet18_cifar | resnet18 | resnet50
    low_dim: int = 128
    # objective
    objective: str = "nce"  # nce | softmax (non-parametric) | parametric | cosine (parametric, normalised weights, tau)
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
    # the family's own knobs (each used only by the methods that name it)
    head_hidden_dim: int | None = None  # SimCLR's projection MLP: hidden width (None: the backbone's width)
    queue_size: int = 4096  # MoCo's K keys in the FIFO queue (the paper's ImageNet setting: 65536)
    key_momentum: float = 0.999  # MoCo's momentum encoder: theta_k <- m theta_k + (1 - m) theta_q
    patch_size: int = 8  # CPC: side of the square patches of the grid
    patch_stride: int = 4  # CPC: step between patches (half the size: overlapping, as in the paper)
    prediction_steps: int = 2  # CPC: predict the rows 1..k below the context
    # optimisation: SGD with steps x lr_gamma at lr_milestones (fractions of the epochs: 120/200, 160/200)
    epochs: int = 200
    # a budget in image passes instead of epochs: the run trains round(image_passes / training images) epochs (at
    # least 1), so a small data set gets as much training as a large one (None: train ``epochs`` epochs). Setting
    # epochs in a config that derives from one with image_passes, or in overrides, clears it (the later one wins).
    image_passes: int | None = None
    batch_size: int = 128  # per process; W processes train with a global batch of W x batch_size
    lr: float = 0.03
    # the linear scaling rule (Goyal et al. 2017): the run uses lr x (global batch) / lr_batch, where the global
    # batch is W x batch_size for W processes and lr_batch is the global batch lr was tuned for (None: batch_size,
    # so one process uses lr as given and W processes lr x W). false: lr as given, whatever the batch.
    scale_lr: bool = True
    lr_batch: int | None = None
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
    # multi-process runs: BatchNorm -> SyncBatchNorm, so BN statistics cover the global batch rather than each
    # process's share (slower: one all-reduce per BN layer). No effect in one process.
    sync_bn: bool = False
    compile: bool = False
    out_dir: str = "runs"
    checkpoint_every: int = 1
    progress: bool = True
    # also record every step's loss in the epoch's metrics row (`step_loss`): the proximal study's oscillation plot
    log_step_loss: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def validate(self) -> TrainConfig:
        """:func:`validate_config` of this config."""
        return validate_config(self)


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


# ------------------------------------------------------------------------------------------------
# Checks of single keys: each takes (key, value) and returns the normalised value or raises ConfigError
# ------------------------------------------------------------------------------------------------

Check = Callable[[str, Any], Any]


def _show(value: Any) -> str:
    """``repr`` of a bad value, cut short: messages stay one readable line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(key: str, expected: str, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"config key {key!r} must be {expected}, got {_show(value)}{hint}")


def _as_float(value: Any) -> float | None:
    """A number, or a string that parses as one (YAML 1.1 reads ``1e-3`` as a string); None otherwise."""
    if isinstance(value, bool):  # bool is an int, but lr=true is a mistake
        return None
    try:
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except (ValueError, OverflowError):
        return None
    return None


def _as_int(value: Any) -> int | None:
    """An integer (numpy's too) or a string of digits; floats are refused, even integral ones (exact counts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    return None


def _integer(minimum: int, maximum: int | None = None, optional: bool = False) -> Check:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if optional:
        expected = f"null or {expected}"

    def check(key: str, value: Any) -> int | None:
        if value is None:
            if optional:
                return None
            raise ConfigError(f"config key {key!r} cannot be null: it must be {expected}")
        number = _as_int(value)
        if number is None or number < minimum or (maximum is not None and number > maximum):
            as_float = _as_float(value) if number is None else None
            hint = " (write it as an integer literal)" if as_float is not None and as_float.is_integer() else ""
            raise _fail(key, expected, value, hint)
        return number

    return check


def _real(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite float in the interval from ``low`` (to ``high``); NaN and inf are always refused."""
    if high is None:
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def inside(number: float) -> bool:
        above = number > low if low_open else number >= low
        below = high is None or (number < high if high_open else number <= high)
        return math.isfinite(number) and above and below

    def check(key: str, value: Any) -> float:
        if value is None:
            raise ConfigError(f"config key {key!r} cannot be null: it must be {expected}")
        number = _as_float(value)
        if number is None or not inside(number):
            raise _fail(key, expected, value)
        return number

    return check


def _boolean(key: str, value: Any) -> bool:
    if value is None:
        raise ConfigError(f"config key {key!r} cannot be null: it must be true/false")
    if not isinstance(value, bool):
        raise _fail(key, "true/false", value)
    return value


def _string(key: str, value: Any, expected: str = "a string") -> str:
    if value is None:
        raise ConfigError(f"config key {key!r} cannot be null: it must be {expected}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # name: 2024 in YAML is an int
        return str(value)
    if not isinstance(value, str):
        raise _fail(key, expected, value)
    return value


def _choice(choices: Callable[[], Iterable[str]]) -> Check:
    """One of ``choices()``: a callable, so lists that live in other modules are imported only when checked."""

    def check(key: str, value: Any) -> str:
        valid = list(choices())
        text = _string(key, value)
        if text not in valid:
            raise _fail(key, f"one of {', '.join(valid)}", value)
        return text

    return check


_NAME_RULE = "a single directory name (letters, digits, '.', '_', '-', not starting with '.')"


def _name(key: str, value: Any) -> str:
    text = _string(key, value, _NAME_RULE)
    if len(text) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"config key {key!r} must be a directory name of at most {MAX_NAME_LENGTH} characters, "
            f"got {len(text)}: {_show(text)}"
        )
    if not _NAME.fullmatch(text):  # the run directory is <out_dir>/<name>: a name must not climb out of out_dir
        raise _fail(key, _NAME_RULE, value)
    return text


def _path(key: str, value: Any) -> str:
    expected = "a non-empty path (without NUL characters)"
    text = _string(key, value, expected)
    if not text.strip() or "\0" in text:
        raise _fail(key, expected, value)
    return text


def _optional_path(key: str, value: Any) -> str | None:
    return None if value is None else _path(key, value)


def _device(key: str, value: Any) -> str:
    text = _string(key, value)
    if not _DEVICE.fullmatch(text):  # only the form: whether the device exists is checked when a run starts
        raise _fail(key, "auto, cpu, cuda, cuda:N or mps", value)
    return text


def _auto_or_bool(key: str, value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise _fail(key, "one of auto, true, false", value)


def _milestones(key: str, value: Any) -> list[float]:
    expected = "a list of strictly ascending numbers in (0, 1] (fractions of the epochs)"
    if value is None:
        raise ConfigError(f"config key {key!r} cannot be null: it must be {expected} ([] for no lr drops)")
    if not isinstance(value, list | tuple):
        raise _fail(key, expected, value)
    fractions = [_as_float(v) for v in value]
    if any(f is None or not (math.isfinite(f) and 0 < f <= 1) for f in fractions):
        raise _fail(key, expected, value)
    if any(a >= b for a, b in zip(fractions, fractions[1:], strict=False)):  # repeats would drop twice at once
        raise _fail(key, expected, value)
    return fractions


def _architectures() -> list[str]:
    from .models import ARCHITECTURES

    return list(ARCHITECTURES)


def _methods() -> list[str]:
    from .methods import METHODS  # lazily: the methods import this module

    return list(METHODS)


def _objectives() -> tuple[str, ...]:
    from .methods.instdisc import OBJECTIVES  # lazily: the methods import this module

    return OBJECTIVES


def _z_modes() -> tuple[str, ...]:
    from .nce import Z_MODES

    return Z_MODES


_POSITIVE_INT = _integer(1)
_COUNT = _integer(0)
_OPTIONAL_POSITIVE_INT = _integer(1, optional=True)  # None = all images / no cut
_POSITIVE = _real(0, low_open=True)
_NON_NEGATIVE = _real(0)
_MOMENTUM = _real(0, 1, high_open=True)  # 1 would freeze the average

# One rule per field (a test checks that none is missing).
_RULES: dict[str, Check] = {
    "name": _name,
    "method": _choice(_methods),
    "dataset": _choice(lambda: DATASETS),
    "data_root": _path,
    "data_path": _optional_path,
    "test_path": _optional_path,
    "image_size": _integer(1, optional=True),
    "train_subset": _OPTIONAL_POSITIVE_INT,
    "image_passes": _OPTIONAL_POSITIVE_INT,
    "augment": _choice(lambda: AUGMENTS),
    "crop_scale": _real(0, 1, low_open=True),
    "flip": _boolean,
    "num_workers": _COUNT,
    "augment_on_device": _auto_or_bool,
    "arch": _choice(_architectures),
    "low_dim": _POSITIVE_INT,
    "objective": _choice(_objectives),
    "temperature": _POSITIVE,
    "num_negatives": _POSITIVE_INT,
    "shared_negatives": _boolean,
    "z_mode": _choice(_z_modes),
    "z_momentum": _MOMENTUM,
    "proximal": _NON_NEGATIVE,
    "bank_momentum": _MOMENTUM,
    "bank_init": _choice(lambda: BANK_INITS),
    "head_hidden_dim": _OPTIONAL_POSITIVE_INT,
    "queue_size": _POSITIVE_INT,
    "key_momentum": _MOMENTUM,
    "patch_size": _POSITIVE_INT,
    "patch_stride": _POSITIVE_INT,
    "prediction_steps": _POSITIVE_INT,
    "epochs": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "lr": _POSITIVE,
    "scale_lr": _boolean,
    "lr_batch": _OPTIONAL_POSITIVE_INT,
    "lr_milestones": _milestones,
    "lr_gamma": _POSITIVE,
    "warmup_epochs": _COUNT,
    "sgd_momentum": _MOMENTUM,
    "weight_decay": _NON_NEGATIVE,
    "max_steps_per_epoch": _OPTIONAL_POSITIVE_INT,
    "knn_k": _POSITIVE_INT,
    "knn_temperature": _POSITIVE,
    "eval_every": _POSITIVE_INT,
    "eval_subset": _OPTIONAL_POSITIVE_INT,
    "seed": _integer(0, MAX_SEED),
    "device": _device,
    "amp": _boolean,
    "channels_last": _boolean,
    "sync_bn": _boolean,
    "compile": _boolean,
    "out_dir": _path,
    "checkpoint_every": _POSITIVE_INT,
    "progress": _boolean,
    "log_step_loss": _boolean,
}


def validate_config(config: TrainConfig) -> TrainConfig:
    """Check every key of ``config``; return it with values normalised (ints -> floats, numeric strings parsed).

    Raises :class:`ConfigError` (one line naming the key, the value and what is valid) on the first bad key.
    """
    values = {f.name: _RULES[f.name](f.name, getattr(config, f.name)) for f in dataclasses.fields(config)}
    # Batches are drop_last: a subset smaller than one batch would give epochs without a single step.
    subset, batch = values["train_subset"], values["batch_size"]
    if subset is not None and subset < batch:
        raise ConfigError(
            f"config key 'train_subset' ({subset}) is smaller than 'batch_size' ({batch}): an epoch would have no "
            "step (incomplete batches are dropped); lower batch_size or raise train_subset"
        )
    _check_own_data(values)
    _check_augment_on_device(values)
    return dataclasses.replace(config, **values)


def _check_augment_on_device(values: dict[str, Any]) -> None:
    """``augment_on_device`` chooses between two paths for CIFAR-10 only: ImageNet cannot be held in memory, and
    Fashion-MNIST and your own images always are (and are always augmented a batch at a time)."""
    dataset, choice = values["dataset"], values["augment_on_device"]
    if dataset == "imagenet" and choice is True:
        raise ConfigError(
            "config key 'augment_on_device' is true, but dataset 'imagenet' is too large to hold on the device: "
            "set it to auto or false (ImageNet is augmented per image in loader processes)"
        )
    if dataset in ("fashion_mnist", *OWN_DATASETS) and choice is False:
        raise ConfigError(
            f"config key 'augment_on_device' is false, but dataset {dataset!r} is always held in memory and augmented "
            "a batch at a time on the device: set it to auto (the key chooses the path of cifar10 only)"
        )


def _check_own_data(values: dict[str, Any]) -> None:
    """The keys of ``dataset: npz | folder`` go together: ``data_path`` is required (and a ``.npz`` file for npz, as is
    ``test_path``), a folder needs ``image_size``; other datasets take none of the three (a key that would be silently
    ignored is refused)."""
    dataset, data_path, test_path = values["dataset"], values["data_path"], values["test_path"]
    if dataset not in OWN_DATASETS:
        for key in ("data_path", "test_path", "image_size"):
            if values[key] is not None:
                raise ConfigError(
                    f"config key {key!r} is used only by dataset npz or folder, but dataset is {dataset!r}: "
                    f"remove it (set it to null), or set dataset to npz or folder"
                )
        return
    what = "a .npz file of images (and labels)" if dataset == "npz" else "a folder of images (root/<class>/*.png)"
    if data_path is None:
        raise ConfigError(f"config key 'data_path' must be set for dataset {dataset!r}: {what} to train on")
    if dataset == "npz":
        for key, path in (("data_path", data_path), ("test_path", test_path)):
            if path is not None and not path.endswith(".npz"):
                raise _fail(key, "a .npz file for dataset 'npz' (for a folder of images use dataset: folder)", path)
    elif values["image_size"] is None:
        raise ConfigError(
            "config key 'image_size' must be set for dataset 'folder': the side its images are resized and "
            "centre-cropped to (e.g. 32 or 64)"
        )


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a checked :class:`TrainConfig`; unknown keys raise :class:`ConfigError` listing the valid ones."""
    valid = TrainConfig.field_names()
    unknown = sorted(set(values) - set(valid), key=str)  # key=str: YAML keys may be ints
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} in {_one_line(source)}. "
            f"Valid keys: {', '.join(valid)}"
        )
    return validate_config(TrainConfig(**values))


# ------------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    """Whitespace runs (newlines too) -> one space: every ConfigError message is a single line."""
    return " ".join(str(text).split())


def _yaml_load(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"{what} is not valid YAML: {_one_line(getattr(err, 'problem', None) or err)}{where}"
        ) from None


def _float_fields() -> tuple[set[str], set[str]]:
    """Names of the float fields and of the list-of-float fields."""
    hints = typing.get_type_hints(TrainConfig)
    return {k for k, h in hints.items() if h is float}, {k for k, h in hints.items() if h == list[float]}


def _number_or_string(value: Any) -> Any:
    number = _as_float(value) if isinstance(value, str) else None
    return value if number is None else number


def _parse_numbers(key: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: make it the number it means, only where a float is expected
    (``name=1e3`` stays as typed; a string that is no number is left for validation to report with its key)."""
    floats, float_lists = _float_fields()
    if key in floats:
        return _number_or_string(value)
    if key in float_lists and isinstance(value, list):
        return [_number_or_string(v) for v in value]
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["lr=0.1", "epochs=5"]`` -> ``{"lr": 0.1, "epochs": 5}``: values parsed as YAML, ``lr=1e-3`` as a float."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set epochs=5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        out[key] = _parse_numbers(key, _yaml_load(raw, f"override {item!r}")) if raw.strip() else None
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


def read_config_values(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys a YAML config sets. ``base: NAME_OR_PATH`` starts from another config's keys (a shipped name, or a
    path relative to this file) and this file's keys override them, e.g. ``instdisc_cifar10`` is ``cifar10_resnet18``
    with ``method: instdisc`` spelled out."""
    values = _yaml_load(path.read_text(), str(path)) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' must name a shipped config or a YAML path, got {base!r}")
    relative = path.parent / base
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.exists() else resolve_config_path(base)
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        chain = " -> ".join(str(p) for p in (*seen, path.resolve(), base_path.resolve()))
        raise ConfigError(f"config 'base' chain loops: {chain}")
    return with_overrides(read_config_values(base_path, (*seen, path.resolve())), values)


def with_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``values`` updated by ``overrides``, where ``epochs`` and ``image_passes`` are two ways of saying how long
    to train and the later one wins: overriding ``epochs`` alone drops an ``image_passes`` budget."""
    merged = {**values, **overrides}
    if "epochs" in overrides and "image_passes" not in overrides:
        merged["image_passes"] = None
    return merged


def resolve_epochs(config: TrainConfig, num_train: int) -> TrainConfig:
    """``config`` with ``epochs`` set from its ``image_passes`` budget for ``num_train`` training images
    (unchanged when it has none): ``round(image_passes / num_train)``, at least 1."""
    if config.image_passes is None:
        return config
    return dataclasses.replace(config, epochs=max(1, round(config.image_passes / num_train)))


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Load a shipped config by name, or a YAML file by path, then apply overrides; every key is checked."""
    path = resolve_config_path(name_or_path)
    values = read_config_values(path)
    values.setdefault("name", path.stem)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    values = with_overrides(values, extra)
    return config_from_dict(values, source=str(path) + (" + overrides" if extra else ""))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
