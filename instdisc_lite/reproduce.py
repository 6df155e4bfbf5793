"""The paper's experiments as grids of runs: ``python -m instdisc_lite reproduce STUDY [--scale quick|full]``.

Each study is a base config and a list of arms, every arm a few overrides of it (Table 1: the objectives; the
temperature, embedding-size, proximal, Z and training-set-size studies: one knob each; the semi-supervised study:
one pre-training, and the fraction of labels kept, per arm, for its fine-tune / probe / from-scratch comparison,
:mod:`instdisc_lite.semi_supervised`). Running a study trains
every arm and writes one JSON file per arm, ``results/<study>/<scale>/<arm>.json``: the resolved config, the
metrics of every epoch, the final weighted kNN (recomputed training features) and a linear probe on the frozen
features, the wall time, the device, the torch version and the git commit. An arm whose file already holds the same
config is skipped, so an interrupted study continues where it stopped; a file whose config differs from what the
grid now produces is run again and replaced (written atomically).

Scales. ``quick``: real Fashion-MNIST with the CPU encoder of ``fashion_mnist_quick``, fewer images and epochs
than the paper (each study is sized for about half an hour on two cores). ``full``: the CIFAR-10 ResNet18 setting
of ``cifar10_resnet18`` as shipped (200 epochs), for a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text
from .config import ConfigError, TrainConfig, load_config
from .run_dir import RESUMABLE_CHANGES

SCALES = ("quick", "full")
BASES = {"quick": "fashion_mnist_quick", "full": "cifar10_resnet18"}
# quick scale: the first 10,000 Fashion-MNIST images for 10 epochs (about 100k image passes, 1-3 minutes an arm on
# two cores), kNN and probe on the whole test set. The paper trains CIFAR-10 for 200 epochs: full scale does that.
# The studies flip their images, as the paper does: the committed results were made so, before the quick recipe
# dropped flips (which Fashion-MNIST does not need and digits or letters cannot take; see fashion_mnist_quick.yaml).
QUICK = {
    "train_subset": 10_000,
    "epochs": 10,
    "eval_every": 10,
    "checkpoint_every": 10,
    "eval_subset": None,
    "flip": True,
    # the studies' base objective (Table 1 and the Z study set their own): the exact softmax, as the quick recipe
    # had when the committed results were made (it trains with NCE since; see fashion_mnist_quick.yaml)
    "objective": "softmax",
}
PROBE_EPOCHS = {"quick": 30, "full": 100}
# keys that say how a run executes, not what it computes: they do not make two results different
# (log_step_loss counts: it decides whether a result holds the loss of every step)
EXECUTION_KEYS = RESUMABLE_CHANGES - {"eval_subset", "knn_k", "knn_temperature", "log_step_loss"}


@dataclasses.dataclass(frozen=True)
class Study:
    """One experiment of the paper: ``arms(scale)`` maps each arm's name to its overrides of the scale's base."""

    name: str
    title: str
    arms: Callable[[str], dict[str, dict[str, Any]]]
    # more figures of an arm, from its finished run: measure(run, arm, scale, train_f, test_f, test_y) -> dict,
    # stored under the study's name in the arm's result file
    measure: Callable[..., dict[str, Any]] | None = None


def _nce(m: int, **more: Any) -> dict[str, Any]:
    return {"objective": "nce", "num_negatives": m, **more}


def _table1(scale: str) -> dict[str, dict[str, Any]]:
    return {
        "parametric": {"objective": "parametric"},  # eq. 1 as the paper states it: raw weights, no temperature
        "cosine": {"objective": "cosine"},  # the fair parametric arm: unit weights at the same temperature
        "softmax": {"objective": "softmax"},  # eq. 2, exact, over the bank
        **{f"nce_m{m}": _nce(m) for m in (1, 10, 512, 4096)},  # eqs. 3-7, with the base's Z mode
    }


def _proximal(scale: str) -> dict[str, dict[str, Any]]:
    # The paper's bank: each row replaced by the newest feature (momentum 0), with eq. 8's term at four weights;
    # beside them lambda = 0 with the official code's bank momentum, which damps the same lag (chapter 4).
    arms = {f"lambda{p:g}": {"proximal": float(p), "bank_momentum": 0.0} for p in (0, 10, 30, 50)}
    arms["lambda0_momentum0.5"] = {"proximal": 0.0, "bank_momentum": 0.5}
    return {arm: {**overrides, "log_step_loss": True} for arm, overrides in arms.items()}


def _all_training_images(run: Any, arm: str, scale: str, train_f, test_f, test_y) -> dict[str, Any]:
    """kNN and probe with every training image of the dataset as the labelled reference, whatever number of
    images the arm learned from: the arms then differ in their features alone (their own kNN also has fewer
    neighbours to choose from when they learned from fewer images)."""
    from .data import build_data
    from .evaluate import extract_features, linear_probe, weighted_knn

    config = dataclasses.replace(run.config, train_subset=None)
    data = build_data(config, run.device)
    ref_f, ref_y = extract_features(run.encoder, data.train_eval_loader, run.device, data.eval_transform)
    knn = weighted_knn(ref_f, ref_y, test_f, test_y, k=config.knn_k, temperature=config.knn_temperature,
                       num_classes=data.num_classes, device=run.device)  # fmt: skip
    probe = linear_probe(ref_f, ref_y, test_f, test_y, epochs=PROBE_EPOCHS[scale], device=run.device)
    return {"reference_images": len(ref_y), "knn_top1": knn["top1"], "knn_top5": knn["top5"],
            "probe_top1": probe["top1"]}  # fmt: skip


LABEL_PERCENTS = (1, 2, 5, 10, 20, 100)  # the paper's Fig. 6 spans about 1-20 % of ImageNet's labels; 100 % too


def _semi_supervised(run: Any, arm: str, scale: str, train_f, test_f, test_y) -> dict[str, Any]:
    from .semi_supervised import semi_supervised

    fraction = float(arm.removeprefix("labels")) / 100
    return semi_supervised(run, fraction, train_f, test_f, test_y, probe_epochs=PROBE_EPOCHS[scale])


STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study("table1", "Table 1: parametric vs non-parametric softmax vs NCE with m noise samples", _table1),
        Study(
            "temperature",
            "The temperature tau of the non-parametric softmax",
            lambda scale: {f"tau{t:g}": {"temperature": t} for t in (0.03, 0.05, 0.07, 0.1, 0.2, 0.5)},
        ),
        Study(
            "embedding",
            "The embedding size d",
            lambda scale: {f"d{d}": {"low_dim": d} for d in (32, 64, 128, 256)},
        ),
        Study(
            "proximal",
            "Proximal regularisation lambda, with the loss of every step logged",
            _proximal,
        ),
        Study(
            "z",
            "NCE's normaliser Z: fixed after the first batch (the paper) or a running mean, at two temperatures",
            lambda scale: {
                f"{mode}_tau{t:g}": _nce(4096, z_mode=mode, temperature=t)
                for t in (0.07, 0.1)
                for mode in ("fixed", "running")
            },
        ),
        Study(
            "train_size",
            "The number of unlabelled training images (the same epochs for each)",
            lambda scale: {
                f"n{n}": {"train_subset": n}
                for n in ((2500, 5000, 10_000, 20_000, 60_000) if scale == "quick" else (5000, 10_000, 25_000, 50_000))
            },
            measure=_all_training_images,
        ),
        Study(
            "semi_supervised",
            "Semi-supervised: fine-tuned, linear probe and from scratch against the fraction of labels kept",
            lambda scale: {f"labels{p}": {} for p in LABEL_PERCENTS},  # one pre-training; the arm is the fraction
            measure=_semi_supervised,
        ),
    ]
}


def study_arms(study: str, scale: str) -> dict[str, dict[str, Any]]:
    """The arms of ``study`` at ``scale``; an unknown study or scale is a :class:`ConfigError` naming the valid ones."""
    if study not in STUDIES:
        raise ConfigError(f"unknown study {study!r}; choose one of: {', '.join(STUDIES)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    return STUDIES[study].arms(scale)


def arm_config(
    study: str, arm: str, scale: str, out_dir: str | Path = "runs/reproduce", extra: dict[str, Any] | None = None
) -> TrainConfig:
    """The resolved config of one arm (the name and run directory follow from study, scale and arm); ``extra``
    overrides are applied last (the tests shrink an arm with them; such a result is not the grid's)."""
    arms = study_arms(study, scale)
    if arm not in arms:
        raise ConfigError(f"study {study!r} has no arm {arm!r}; its arms: {', '.join(arms)}")
    sizes = dict(QUICK) if scale == "quick" else {}
    if scale == "quick" and arms[arm].get("train_subset"):  # the training-set study sets n itself
        sizes.pop("train_subset")
    overrides = {**sizes, **arms[arm], "name": f"{study}_{scale}_{arm}", "out_dir": str(out_dir), "progress": False}
    overrides.update(extra or {})
    return load_config(BASES[scale], overrides)


def _defaults() -> dict[str, Any]:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config as stored in a result, without the keys that only say how it was executed and without the keys at
    their default value: a config key added after a result was written, at a default that keeps the old behaviour,
    does not make the result stale; a default that changes does (the result holds the old value explicitly)."""
    defaults = _defaults()
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS and not (k in defaults and defaults[k] == v)}


def result_path(results: str | Path, study: str, scale: str, arm: str) -> Path:
    return Path(results) / study / scale / f"{arm}.json"


def is_done(path: Path, config: TrainConfig, study: str | None = None) -> bool:
    """Whether ``path`` holds a finished result of exactly ``config`` (any unreadable file counts as not done),
    with the figures of ``study``'s ``measure`` where it has one."""
    try:
        stored = json.loads(path.read_text())
        measured = study is None or STUDIES[study].measure is None or study in stored
        return comparable(stored["config"]) == comparable(config.to_dict()) and "knn_top1" in stored and measured
    except (OSError, ValueError, KeyError, TypeError):
        return False


def git_commit() -> str | None:
    """The commit of the package's checkout, with ``-dirty`` when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_arm(
    study: str,
    arm: str,
    scale: str,
    results: str | Path = "results",
    threads: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Train one arm, evaluate it (kNN + linear probe) and write its result file; returns the file's path."""
    from .evaluate import extract_features, linear_probe
    from .train import train

    if threads:
        torch.set_num_threads(threads)
    config = arm_config(study, arm, scale, extra=extra)
    start = time.perf_counter()
    run = train(config, overwrite=True)
    train_f, train_y = extract_features(run.encoder, run.data.train_eval_loader, run.device, run.data.eval_transform)
    test_f, test_y = extract_features(run.encoder, run.data.test_loader, run.device, run.data.eval_transform)
    probe = linear_probe(train_f, train_y, test_f, test_y, epochs=PROBE_EPOCHS[scale], device=run.device)
    measure = STUDIES[study].measure
    more = {study: measure(run, arm, scale, train_f, test_f, test_y)} if measure else {}
    result = {
        "study": study, "arm": arm, "scale": scale, "overrides": STUDIES[study].arms(scale)[arm],
        "knn_top1": run.final["knn_top1"], "knn_top5": run.final["knn_top5"], "probe_top1": probe["top1"],
        "wall_s": time.perf_counter() - start, "device": str(run.device), "torch": torch.__version__,
        "git_commit": git_commit(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **more, "config": config.to_dict(), "metrics": run.metrics,
    }  # fmt: skip
    path = result_path(results, study, scale, arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=1) + "\n", path)
    return path


def die_with_parent() -> None:
    """Pool initializer: the worker gets SIGTERM when the process that started it dies (Linux), so killing a
    study with ``kill`` or ``kill -9`` does not leave its arms training on; elsewhere a no-op (Ctrl-C still reaches
    every process of the terminal's process group)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def reproduce(study: str, scale: str = "quick", jobs: int = 1, results: str | Path = "results",
              log: Callable[[str], None] = print) -> list[Path]:  # fmt: skip
    """Run every arm of ``study`` that has no up-to-date result, ``jobs`` at a time; returns all its result files."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    arms = list(study_arms(study, scale))
    todo = [a for a in arms if not is_done(result_path(results, study, scale, a), arm_config(study, a, scale), study)]
    log(f"{study} ({scale}): {len(arms)} arms, {len(arms) - len(todo)} already done, {len(todo)} to run")
    if jobs == 1 or len(todo) <= 1:
        for arm in todo:
            log(f"  {arm}: written {run_arm(study, arm, scale, results)}")
    else:  # one process per arm, the CPU's threads split between them
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=die_with_parent) as pool:
            futures = {arm: pool.submit(run_arm, study, arm, scale, results, threads) for arm in todo}
            for arm, future in futures.items():
                log(f"  {arm}: written {future.result()}")
    return [result_path(results, study, scale, a) for a in arms]


def load_results(study: str, scale: str = "quick", results: str | Path = "results") -> dict[str, dict[str, Any]]:
    """The stored results of a study, by arm (arms without a result are left out)."""
    out = {}
    for arm in STUDIES[study].arms(scale):
        path = result_path(results, study, scale, arm)
        if path.is_file():
            out[arm] = json.loads(path.read_text())
    return out
