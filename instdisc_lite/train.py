"""Chapter 5 — training for real: the InstDisc loop.

One step, as the paper describes it::

    features = model(augment(images))            # (B, d), unit norm
    loss = objective(features, indices)          # NCE / softmax over the bank (+ proximal term)
    loss.backward(); optimizer.step()
    bank.update(indices, features.detach())      # v_i <- normalise(m v_i + (1 - m) f_i)

Everything else here is bookkeeping: building the pieces from a config, the learning-rate schedule,
kNN monitoring on the bank, metrics, atomic checkpoints and exact resumption.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm  # plain text bars: no ipywidgets needed, no warning on the book pages

from . import distributed
from .checkpoint import atomic_save, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig, load_config, save_config
from .data import DataBundle, build_data, set_epoch
from .evaluate import extract_features, weighted_knn
from .memory_bank import MemoryBank
from .models import build_encoder
from .nce import NCE
from .nonparametric import NonParametricSoftmax
from .parametric import ParametricSoftmax

OBJECTIVES = ("nce", "softmax", "parametric")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message lists the usual causes and fixes."""


class RunExistsError(FileExistsError):
    """A run directory with a checkpoint already exists and neither resume nor overwrite was asked for."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; distributed runs use their local GPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_objective(config: TrainConfig, bank: MemoryBank) -> nn.Module:
    """The loss named by ``config.objective``, reading ``bank`` where it needs one."""
    if config.objective == "nce":
        return NCE(
            bank,
            num_negatives=config.num_negatives,
            temperature=config.temperature,
            z_mode=config.z_mode,
            z_momentum=config.z_momentum,
            shared_negatives=config.shared_negatives,
            proximal=config.proximal,
        )
    if config.objective == "softmax":
        return NonParametricSoftmax(bank, temperature=config.temperature, proximal=config.proximal)
    if config.objective == "parametric":
        return ParametricSoftmax(config.low_dim, bank.num_items)
    raise ValueError(f"unknown objective {config.objective!r}; choose one of: {', '.join(OBJECTIVES)}")


def learning_rate(config: TrainConfig, epoch: float) -> float:
    """The paper's step schedule scaled to ``config.epochs`` (x0.1 at 60 % and 80 %), after optional warm-up."""
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / (config.warmup_epochs + 1)
    drops = sum(epoch >= m * config.epochs for m in config.lr_milestones)
    return config.lr * config.lr_gamma**drops


@dataclass
class Run:
    """The pieces of a run, built from a config (used by :func:`train` and by the book)."""

    config: TrainConfig
    device: torch.device
    data: DataBundle
    model: nn.Module
    bank: MemoryBank
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run_dir: Path
    epoch: int = 0  # epochs completed
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"

    @property
    def encoder(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return self.model.module if hasattr(self.model, "module") else self.model


def build_run(config: TrainConfig, device: torch.device | None = None, init_bank: bool = True) -> Run:
    """Seed, then build data, encoder, bank, objective and optimiser for ``config``.

    ``init_bank=False`` skips ``bank_init: features`` (a pass over the whole training set) when a
    checkpoint's bank is about to replace it anyway, as on resume.
    """
    device = device or distributed.init_from_env() or select_device(config.device)
    torch.manual_seed(config.seed)
    data = build_data(config, device)
    model = build_encoder(config.arch, config.low_dim, data.in_channels).to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bank = MemoryBank(data.num_train, config.low_dim, config.bank_momentum).to(device)
    objective = build_objective(config, bank).to(device)
    data.train_augment.to(device)
    data.eval_transform.to(device)
    params = list(model.parameters()) + list(objective.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay)
    if distributed.is_distributed():
        torch.manual_seed(config.seed + distributed.rank())  # own noise/augmentation per rank; DDP syncs weights
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    run_dir = Path(config.out_dir) / config.name
    run = Run(config, device, data, model, bank, objective, optimizer, scaler, run_dir)
    if config.bank_init not in ("random", "features"):
        raise ValueError(f"unknown bank_init {config.bank_init!r}; choose random or features")
    if config.bank_init == "features" and init_bank:  # skipped on resume: the checkpoint's bank replaces it
        bank.fill(initial_features(run))
    return run


@torch.no_grad()
def initial_features(run: Run) -> torch.Tensor:
    """Features of every un-augmented training image, in train mode (batch-statistics BN, as the training steps
    see them); the BN running statistics are restored afterwards, so the run's state is as before."""
    saved = {k: v.clone() for k, v in run.encoder.state_dict().items()}
    was_training = run.encoder.training
    run.encoder.train()
    feats = [
        run.encoder(run.data.eval_transform(images.to(run.device))).float() for images, *_ in run.data.train_eval_loader
    ]
    run.encoder.load_state_dict(saved)
    run.encoder.train(was_training)
    return torch.cat(feats)


def _objective_state(objective: nn.Module) -> dict[str, Any]:
    # the bank is saved once, on its own; don't store a second copy through the objective
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("bank.")}


def save_run_checkpoint(run: Run, path: Path | None = None) -> Path:
    path = path or run.run_dir / "checkpoint.pt"
    state = {
        "epoch": run.epoch,
        "config": run.config.to_dict(),
        "model": run.encoder.state_dict(),
        "bank": run.bank.state_dict(),
        "objective": _objective_state(run.objective),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "metrics": run.metrics,
    }
    atomic_save(state, path)
    return path


def load_run_checkpoint(run: Run, path: Path | None = None) -> None:
    state = load_checkpoint(path or run.run_dir / "checkpoint.pt", map_location=run.device)
    run.encoder.load_state_dict(state["model"])
    run.bank.load_state_dict(state["bank"])
    missing, unexpected = run.objective.load_state_dict(state["objective"], strict=False)
    if unexpected or any(not k.startswith("bank.") for k in missing):
        raise RuntimeError(
            f"checkpoint objective does not match the config: missing {missing}, unexpected {unexpected}"
        )
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.epoch = state["epoch"]
    run.metrics = list(state["metrics"])


def _check_finite(loss: torch.Tensor, config: TrainConfig, epoch: int, step: int) -> None:
    if torch.isfinite(loss).item():
        return
    hint = [
        f"lower the learning rate (lr={config.lr})",
        "clip or warm up (warmup_epochs)",
    ]
    if config.objective == "nce" and config.z_mode == "fixed":
        hint.insert(0, "use z_mode=running: a Z fixed from the first batch goes stale as features concentrate")
    if config.temperature < 0.05:
        hint.append(f"raise the temperature (tau={config.temperature})")
    raise NonFiniteLossError(
        f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} of run {config.name!r}. "
        f"Try: {'; '.join(hint)}. The last good checkpoint is untouched."
    )


def train_one_epoch(run: Run) -> dict[str, float]:
    """One pass over the training set; returns the mean loss, the lr and the wall time."""
    cfg, model, opt = run.config, run.model, run.optimizer
    lr = learning_rate(cfg, run.epoch)
    for group in opt.param_groups:
        group["lr"] = lr
    set_epoch(run.data.train_loader, run.epoch, cfg.seed)
    model.train()
    run.objective.train()
    steps = len(run.data.train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    total, count, start = torch.zeros((), device=run.device), 0, time.perf_counter()
    bar = tqdm(
        total=steps,
        desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
        disable=not (cfg.progress and distributed.is_main_process()),
        leave=False,
        mininterval=1.0,
    )
    for step, (images, _, indices) in enumerate(run.data.train_loader):
        if step >= steps:
            break
        images = images.to(run.device, non_blocking=True)
        indices = indices.to(run.device, non_blocking=True)
        with torch.no_grad():
            images = run.data.train_augment(images)
        if run.device.type == "cuda" and cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.amp):
            features = model(images)
        loss = run.objective(features, indices)
        _check_finite(loss, cfg, run.epoch, step)
        opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(opt)
        run.scaler.update()
        run.bank.update(indices, features.detach().float())  # the explicit bank step
        total += loss.detach()
        count += 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    return {"loss": (total / max(count, 1)).item(), "lr": lr, "time": time.perf_counter() - start}


def evaluate_bank(run: Run) -> dict[str, float]:
    """Weighted kNN of freshly computed test features against the bank (the official monitor)."""
    test_f, test_l = extract_features(run.encoder, run.data.test_loader, run.device, run.data.eval_transform)
    res = weighted_knn(
        run.bank.memory, run.data.train_labels, test_f.to(run.device), test_l,
        k=run.config.knn_k, temperature=run.config.knn_temperature, num_classes=run.data.num_classes,
    )  # fmt: skip
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


def evaluate_final(run: Run) -> dict[str, float]:
    """Weighted kNN with *recomputed* training features (no augmentation), as reported in the paper."""
    train_f, train_l = extract_features(run.encoder, run.data.train_eval_loader, run.device, run.data.eval_transform)
    test_f, test_l = extract_features(run.encoder, run.data.test_loader, run.device, run.data.eval_transform)
    res = weighted_knn(
        train_f.to(run.device), train_l, test_f.to(run.device), test_l,
        k=run.config.knn_k, temperature=run.config.knn_temperature, num_classes=run.data.num_classes,
    )  # fmt: skip
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


def _write_metrics(run: Run) -> None:
    text = "".join(json.dumps(m) + "\n" for m in run.metrics)
    atomic_write_text(text, run.run_dir / "metrics.jsonl")


def train(
    config: TrainConfig | str,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    final_eval: bool = True,
    stop_after: int | None = None,
    on_epoch_end: Callable[[Run], dict[str, Any] | None] | None = None,
) -> Run:
    """Train a run end to end and return it (model, bank, metrics; ``run.metrics[-1]`` is the last epoch).

    Writes ``<out_dir>/<name>/``: ``config.yaml``, ``metrics.jsonl`` (one line per epoch),
    ``checkpoint.pt`` (atomic, after every ``checkpoint_every`` epochs and at the end) and
    ``results.json`` (final kNN with recomputed features). ``resume=True`` continues from the
    checkpoint exactly; a run directory that already has a checkpoint is refused unless
    ``resume`` or ``overwrite`` is given, so no finished run is lost by accident.
    ``stop_after=k`` stops once k epochs are done, right after their checkpoint, as an interruption
    would (no final evaluation then); ``resume=True`` later continues as if nothing had happened.
    ``on_epoch_end(run)`` is called after every epoch (after its kNN monitor); the dict it returns, if any, is
    added to that epoch's metrics row (the book uses it to probe the bank and the objective as training goes).
    """
    if isinstance(config, str):
        config = load_config(config, overrides)
    elif overrides:
        from .config import config_from_dict, parse_overrides

        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        config = config_from_dict({**config.to_dict(), **extra})
    run = build_run(config, init_bank=not resume)
    ckpt = run.run_dir / "checkpoint.pt"
    if resume:
        load_run_checkpoint(run)
    elif ckpt.exists() and not overwrite:
        raise RunExistsError(
            f"{run.run_dir} already holds a checkpoint. Pass --resume to continue it, --overwrite to start over, "
            "or choose another name (--set name=...)."
        )
    main = distributed.is_main_process()
    if main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run.run_dir / "config.yaml")
    start = time.perf_counter() - (run.metrics[-1]["elapsed"] if run.metrics else 0.0)
    while run.epoch < config.epochs and (stop_after is None or run.epoch < stop_after):
        stats = train_one_epoch(run)
        run.epoch += 1
        row: dict[str, Any] = {"epoch": run.epoch, **stats}
        if isinstance(run.objective, NCE):
            row["z"] = run.objective.z.item()
        if run.epoch % config.eval_every == 0 or run.epoch == config.epochs:
            row.update(evaluate_bank(run))
        if on_epoch_end is not None:
            row.update(on_epoch_end(run) or {})
        row["elapsed"] = time.perf_counter() - start
        run.metrics.append(row)
        if main:
            _write_metrics(run)
            if run.epoch % config.checkpoint_every == 0 or run.epoch in (config.epochs, stop_after):
                save_run_checkpoint(run)
            knn = f", kNN top-1 {row['knn_top1']:.2f}%" if "knn_top1" in row else ""
            if config.progress:
                msg = f"epoch {run.epoch}/{config.epochs}: loss {row['loss']:.4f}, lr {row['lr']:.4g}"
                tqdm.write(f"{msg}{knn} ({row['time']:.1f}s)")
    if final_eval and run.epoch == config.epochs:
        final = evaluate_final(run)
        if main:
            last = run.metrics[-1] if run.metrics else {}
            result = {"name": config.name, "epochs": run.epoch, "elapsed": last.get("elapsed", 0.0),
                      "final_knn_top1": final["knn_top1"], "final_knn_top5": final["knn_top5"],
                      "bank_knn_top1": last.get("knn_top1"),
                      "device": str(run.device), "torch": torch.__version__}  # fmt: skip
            atomic_write_text(json.dumps(result, indent=2) + "\n", run.run_dir / "results.json")
        run.final = final  # type: ignore[attr-defined]
    return run


def lr_schedule(config: TrainConfig) -> list[float]:
    """The learning rate of every epoch, for plotting."""
    return [learning_rate(config, e) for e in range(config.epochs)]


__all__ = [
    "NonFiniteLossError", "Run", "RunExistsError", "build_objective", "build_run", "evaluate_bank",
    "evaluate_final", "initial_features", "learning_rate", "load_run_checkpoint", "lr_schedule", "save_run_checkpoint",
    "select_device", "train", "train_one_epoch",
]  # fmt: skip
