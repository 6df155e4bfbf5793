"""instdisc_lite: Non-Parametric Instance Discrimination (Wu et al., CVPR 2018), small and readable.

The modules follow the book: ``parametric`` (ch. 1), ``memory_bank`` and ``nonparametric`` (ch. 2),
``nce`` (ch. 3), ``proximal`` (ch. 4), ``train`` / ``config`` / ``checkpoint`` (ch. 5),
``evaluate`` (ch. 6); ``models`` and ``data`` are the encoders and datasets they all use.
"""

from .config import ConfigError, TrainConfig, load_config, shipped_configs
from .data import BatchAugment, DatasetNotFoundError, FashionMNIST
from .evaluate import extract_features, linear_probe, weighted_knn
from .memory_bank import MemoryBank
from .models import build_encoder, resnet18, resnet18_cifar, resnet50, small_cnn
from .nce import NCE
from .nonparametric import NonParametricSoftmax, partition_function
from .parametric import ParametricSoftmax
from .proximal import BankObjective, proximal_term
from .train import NonFiniteLossError, RunExistsError, build_run, train

__version__ = "0.1.0"

__all__ = [
    "NCE", "BankObjective", "BatchAugment", "ConfigError", "DatasetNotFoundError", "FashionMNIST", "MemoryBank",
    "NonFiniteLossError", "NonParametricSoftmax", "ParametricSoftmax", "RunExistsError", "TrainConfig",
    "build_encoder", "build_run", "extract_features", "linear_probe", "load_config", "partition_function",
    "proximal_term", "resnet18", "resnet18_cifar", "resnet50", "shipped_configs", "small_cnn", "train",
    "weighted_knn",
]  # fmt: skip
