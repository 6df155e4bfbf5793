"""Chapter 5 — training for real: the InstDisc loop.

One step, as the paper describes it::

    features = model(augment(images))            # (B, d), unit norm
    loss = objective(features, indices)          # NCE / softmax over the bank (+ proximal term)
    loss.backward(); optimizer.step()
    bank.update(indices, features.detach())      # v_i <- normalise(mu v_i + (1 - mu) f_i)

Everything else here is bookkeeping: building the pieces from a config, the learning-rate schedule,
kNN monitoring on the bank, metrics, atomic checkpoints and exact resumption. The run directory's rules
(lock, no accidental overwrite, what a resume may change) are in :mod:`instdisc_lite.run_dir`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars: no ipywidgets needed, no warning on the book pages

from . import distributed
from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    strip_wrapper_prefixes,
)
from .config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_epochs,
    save_config,
    with_overrides,
)
from .data import DataBundle, build_data, equal_rank_batches, set_epoch
from .evaluate import extract_features, gather_by_index, weighted_knn
from .memory_bank import MemoryBank
from .methods import METHODS, Method, build_method
from .methods.instdisc import OBJECTIVES, build_objective
from .run_dir import (
    RunExistsError,
    RunInUseError,
    RunLock,
    clear_for_overwrite,
    is_nonempty_dir,
    keep_resolved_epochs,
    refuse_existing,
    remove_replaced,
    resume_changes,
)
from .schedule import learning_rate, lr_schedule


class NonFiniteLossError(FloatingPointError):
    """The loss or the model's state became NaN or infinite; the message lists the usual causes and fixes."""


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGINT) during training; the message says which checkpoint is intact and how to continue."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; a device that is asked for but absent is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(
                f"device={name!r} but torch sees {count} CUDA GPU(s) (torch {torch.__version__}); "
                "use device=auto or device=cpu"
            )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name!r} but Apple MPS is not available here; use device=auto or device=cpu")
    return device


@dataclass
class Run:
    """The pieces of a run, built from a config (used by :func:`train` and by the book).

    ``method`` is the plain module (its ``state_dict`` is what a checkpoint stores); ``model`` is what a training
    step calls: the same module, wrapped for several processes (DDP) or ``torch.compile`` where the config asks.
    ``encoder``, ``bank`` and ``objective`` are the method's (the objective is the method itself for methods
    without a separate one).
    """

    config: TrainConfig
    device: torch.device
    data: DataBundle
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    run_dir: Path
    model: nn.Module
    epoch: int = 0  # epochs completed
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_epoch: int | None = None  # epoch of the newest checkpoint on disk (None: none written yet)
    final: dict[str, float] | None = None  # final kNN with recomputed features, once the run has finished

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder

    @property
    def bank(self) -> MemoryBank | None:
        return self.method.bank

    @property
    def objective(self) -> nn.Module:
        return getattr(self.method, "objective", self.method)

    @property
    def amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.SGD:
    """The paper's SGD with momentum. On CUDA the fused kernel: it takes the GradScaler's scale and found-inf flag
    on the device, where ``GradScaler.step`` would otherwise read the flag on the host at every step."""
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
        fused=True if device.type == "cuda" else None,
    )


def build_run(
    config: TrainConfig, device: torch.device | None = None, init_bank: bool = True, resolve_budget: bool = True
) -> Run:
    """Seed, then build data, the method (encoder, bank, objective, ...) and the optimiser for ``config``.

    ``init_bank=False`` skips :meth:`Method.initialise` (InstDisc's ``bank_init: features`` is a pass over the whole
    training set) when a checkpoint is about to replace the state anyway, as on resume. An ``image_passes`` budget
    becomes epochs of the data read here, unless ``resolve_budget=False``: a resumed or reloaded run keeps the
    epochs it resolved when it started (its ``config.yaml``), whatever data it is given now.
    """
    device = device or distributed.init_from_env() or select_device(config.device)
    if distributed.is_distributed() and config.sync_bn and device.type != "cuda":  # before any data is read
        raise ConfigError(f"sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm), this run is on {device}; "
                          "set sync_bn=false")  # fmt: skip
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
    torch.manual_seed(config.seed)
    data = build_data(config, device, num_views=METHODS[config.method].num_views)
    if resolve_budget:
        config = resolve_epochs(config, data.num_train)  # an image_passes budget becomes epochs of this data
    normalisation = (data.mean, data.std) if data.mean else None
    method = build_method(config, data.num_train, data.in_channels, normalisation)
    if distributed.is_distributed() and config.sync_bn:
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)  # same state-dict keys as BatchNorm
    method = method.to(device)
    if device.type == "cuda" and config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    data.train_augment.to(device)
    data.eval_transform.to(device)
    params = [p for p in method.parameters() if p.requires_grad]  # not MoCo's key encoder
    optimizer = make_optimizer(params, config, device)
    model: nn.Module = method
    if distributed.is_distributed():
        torch.manual_seed(config.seed + distributed.rank())  # own noise/augmentation per rank; DDP syncs weights
        # the whole method, so every trained parameter (heads, the parametric classifier) is averaged; banks and
        # queues are kept equal by their gathered updates, BN statistics are taken from rank 0 after each epoch
        ids = [device] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(method, device_ids=ids, broadcast_buffers=False)
    if config.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    run_dir = Path(config.out_dir) / config.name
    run = Run(config, device, data, method, optimizer, scaler, run_dir, model)
    if init_bank:  # skipped on resume: the checkpoint's state replaces it
        method.initialise(lambda encoder: initial_features(run, encoder))
    return run


@torch.no_grad()
def initial_features(run: Run, encoder: nn.Module | None = None) -> torch.Tensor:
    """Features ``(num_train, d)`` of every un-augmented training image by ``encoder`` (default: the run's), in
    train mode (batch-statistics BN, as the training steps see them); the BN running statistics are restored
    afterwards, so the run's state is as before."""
    encoder = encoder if encoder is not None else run.encoder
    saved = {k: v.clone() for k, v in encoder.state_dict().items()}
    was_training = encoder.training
    encoder.train()
    feats, labels, idx = [], [], []
    for images, targets, indices in run.data.train_eval_loader:
        feats.append(encoder(run.data.eval_transform(images.to(run.device))).float())
        labels.append(torch.as_tensor(targets, device=run.device))
        idx.append(torch.as_tensor(indices, device=run.device))
    encoder.load_state_dict(saved)
    encoder.train(was_training)
    features, _ = gather_by_index(torch.cat(feats), torch.cat(labels), torch.cat(idx))  # every rank's shard, in order
    return features


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _non_finite_state(run: Run) -> str | None:
    """The name of the first NaN/inf parameter or buffer of the method (None if all are finite)."""
    for key, tensor in run.method.state_dict().items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return key
    return None


def _fixes(config: TrainConfig) -> str:
    hint = [f"lower the learning rate (lr={config.lr})", "clip or warm up (warmup_epochs)"]
    if config.objective == "nce" and config.z_mode == "fixed":
        hint.insert(0, "use z_mode=running: a Z fixed from the first batch goes stale as features concentrate")
    if config.temperature < 0.05:
        hint.append(f"raise the temperature (tau={config.temperature})")
    return "; ".join(hint)


def _last_good(run: Run) -> str:
    if run.checkpoint_epoch is None:
        return "No checkpoint had been written yet."
    return f"The last good checkpoint (epoch {run.checkpoint_epoch}) is untouched."


def check_state_finite(run: Run) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank's state holds NaN/inf (checked before a save,
    so a checkpoint is never poisoned by, say, infinite BatchNorm statistics)."""
    bad = _non_finite_state(run)
    if distributed.any_rank(bad is not None):
        where = bad or "another rank's state"
        raise NonFiniteLossError(
            f"{where} became NaN or infinite by the end of epoch {run.epoch} of run {run.config.name!r}, "
            f"so it was not saved. Try: {_fixes(run.config)}. {_last_good(run)}"
        )


def save_run_checkpoint(run: Run, path: Path | None = None) -> Path:
    """Write the run's whole state atomically (rank 0 writes; every rank must call it: the RNG states of all ranks
    are gathered, so a resumed multi-process run gives each rank its own stream back)."""
    path = path or run.run_dir / "checkpoint.pt"
    rng = distributed.all_gather_object(rng_state())
    if distributed.is_main_process():
        state = {
            "epoch": run.epoch,
            "config": run.config.to_dict(),
            "world_size": distributed.world_size(),
            "method": run.method.state_dict(),  # encoder(s), heads, banks, queues, Z
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,  # one state per rank
            "metrics": run.metrics,
        }
        atomic_save(state, path)
    run.checkpoint_epoch = run.epoch
    return path


def _load_module(module: nn.Module, state: dict[str, Any], what: str, path: Path) -> None:
    try:
        module.load_state_dict(strip_wrapper_prefixes(state))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{path}: its {what} does not fit this run ({detail}); it was written with another config "
            "(method, arch, low_dim, dataset, train_subset or objective) or on data of another size — resume with "
            "that config and data, or start over"
        ) from err


def _set_rank_rng(rng: Any, config: TrainConfig, epoch: int) -> None:
    """This rank's stored RNG state; a rank that has none (the run was saved on fewer processes) is seeded from
    (seed, rank, epoch): the run continues correctly, though not bit-identically to the old number of ranks."""
    states = rng if isinstance(rng, list) else [rng]
    r = distributed.rank()
    if len(states) == distributed.world_size():
        set_rng_state(states[r])
    else:
        torch.manual_seed(config.seed * 1_000_003 + 7919 * epoch + r)


def load_run_checkpoint(run: Run, path: Path | None = None, state: dict[str, Any] | None = None) -> None:
    """Restore a built run from its checkpoint (``state``, if already loaded, else ``path``)."""
    path = path or run.run_dir / "checkpoint.pt"
    state = state if state is not None else load_checkpoint(path)  # on the CPU: float64 Z cannot map onto MPS
    if "method" not in state:
        raise CheckpointError(f"{path} was written by an older instdisc_lite (no method state); start over")
    _load_module(run.method, state["method"], "method state", path)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run ({err})") from err
    _set_rank_rng(state["rng"], run.config, state["epoch"])
    run.epoch = run.checkpoint_epoch = state["epoch"]
    run.metrics = list(state["metrics"])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


# Steps between two host reads of the loss (the NaN check and the progress bar's figure). Reading a loss makes the
# host wait until the device has finished that step; here the losses stay on the device and every CHECK_EVERY steps
# (and at the end of the epoch) those since the last read come over in one transfer, so a GPU can run ahead.
CHECK_EVERY = 50


def _check_finite(losses: list[torch.Tensor], first_step: int, run: Run, bar: tqdm) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if a loss of ``losses`` (0-dim device tensors of the steps
    ``first_step, first_step + 1, ...`` of this epoch, 0-based) is NaN/inf on any rank, naming the first such step;
    else show the newest loss on ``bar``. One host read for all of them.

    The check comes after the steps: the weights and the bank have taken the steps after the bad one too. Nothing
    is saved from them: the error is raised before the epoch's checkpoint (and ``check_state_finite`` guards it).
    """
    values = torch.stack([loss.float() for loss in losses]).tolist()  # the one host read (a GPU sync)
    bad_here = [not math.isfinite(v) for v in values]
    bad_anywhere = bad_here
    if distributed.is_distributed():  # every rank learns the bad steps of all, so all stop together, at one step
        bad_anywhere = distributed.all_reduce_sum(torch.tensor(bad_here, dtype=torch.int32)).tolist()
    if not any(bad_anywhere):
        bar.set_postfix(loss=f"{values[-1]:.3f}")
        return
    first = next(i for i, count in enumerate(bad_anywhere) if count)
    value = values[first] if bad_here[first] else "non-finite on another rank"
    raise NonFiniteLossError(
        f"loss became {value} at epoch {run.epoch + 1}, step {first_step + first + 1} of run {run.config.name!r}. "
        f"Try: {_fixes(run.config)}. {_last_good(run)}"
    )


def train_one_epoch(run: Run, check_every: int | None = None) -> dict[str, float]:
    """One pass over the training set; returns the mean loss, the lr and the wall time.

    No step reads a tensor on the host: the losses are checked for NaN/inf (and shown
    on the progress bar) every ``check_every`` steps (default: ``CHECK_EVERY``) and at
    the end of the epoch, in one read each (short lines: the book prints this function).
    """
    cfg, model, opt = run.config, run.model, run.optimizer
    check_every = check_every or CHECK_EVERY
    lr = learning_rate(cfg, run.epoch, distributed.world_size())
    for group in opt.param_groups:
        group["lr"] = lr
    set_epoch(run.data.train_loader, run.epoch, cfg.seed)
    model.train()
    steps = len(run.data.train_loader)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    total, count, start = torch.zeros((), device=run.device), 0, time.perf_counter()
    # only with log_step_loss (kept on the device: no sync per step)
    step_losses: list[torch.Tensor] = []
    unchecked: list[torch.Tensor] = []  # the losses since the last check, on the device
    bar = tqdm(
        total=steps,
        desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
        disable=not (cfg.progress and distributed.is_main_process()),
        leave=False,
        mininterval=1.0,
    )
    # every rank holds batch_size images a step: gathers need not exchange sizes (no host read)
    same_sizes = distributed.equal_sizes(equal_rank_batches(run.data.train_loader))
    for step, (images, _, indices) in enumerate(run.data.train_loader):
        if step >= steps:
            break
        images = images.to(run.device, non_blocking=True)
        indices = indices.to(run.device, non_blocking=True)
        with torch.no_grad():
            # augmented on the device, where it is cheap
            views = run.data.views(images, run.method.num_views)
        if run.device.type == "cuda" and cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with same_sizes, torch.autocast(run.device.type, dtype=torch.float16, enabled=run.amp):
            # the method's loss (InstDisc: encode, then NCE over the bank)
            loss = model(views, indices)
        opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(opt)
        run.scaler.update()
        with same_sizes:
            # the explicit no-grad step: InstDisc's bank update, MoCo's momentum + queue
            run.method.after_step()
        total += loss.detach()
        count += 1
        unchecked.append(loss.detach())
        if cfg.log_step_loss:
            step_losses.append(loss.detach())
        if len(unchecked) == check_every:
            _check_finite(unchecked, step + 1 - len(unchecked), run, bar)
            unchecked = []
        bar.update(1)
    if unchecked:  # the end of the epoch: before anything of it is evaluated or saved
        _check_finite(unchecked, count - len(unchecked), run, bar)
    bar.close()
    # the loss of the global batch
    mean = distributed.all_reduce_mean(total / max(count, 1))
    stats = {"loss": mean.item(), "lr": lr, "time": time.perf_counter() - start}
    if step_losses:  # this process's loss at every step of the epoch, in order
        stats["step_loss"] = torch.stack(step_losses).float().cpu().tolist()
    return stats


def _require_knn(run: Run) -> None:
    reason = run.data.knn_unavailable
    if reason is not None:
        raise ValueError(f"no kNN evaluation of run {run.config.name!r}: {reason}")


def evaluate_bank(run: Run) -> dict[str, float]:
    """Weighted kNN of freshly computed test features against the bank (the official monitor); a method without a
    bank is monitored with recomputed training features instead. Data without labels or a test set
    (``run.data.knn_unavailable``) raises ValueError: the trainer skips the kNN there."""
    _require_knn(run)
    if run.bank is None:
        return evaluate_final(run)
    test_f, test_l = extract_features(run.encoder, run.data.test_loader, run.device, run.data.eval_transform)
    res = weighted_knn(
        run.bank.memory, run.data.train_labels, test_f.to(run.device), test_l,
        k=run.config.knn_k, temperature=run.config.knn_temperature, num_classes=run.data.num_classes,
    )  # fmt: skip
    return {"knn_top1": res["top1"], "knn_top5": res["top5"]}


def evaluate_final(run: Run) -> dict[str, float]:
    """Weighted kNN with *recomputed* training features (no augmentation), as reported in the paper (ValueError
    where the data cannot be scored, as :func:`evaluate_bank`)."""
    _require_knn(run)
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


def _resolve_config(config: TrainConfig | str, overrides: list[str] | dict[str, Any] | None) -> TrainConfig:
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return config_from_dict(with_overrides(config.to_dict(), extra))  # validates a config built in code, too


def _on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and share its outcome: an exception there is raised on every rank."""
    result, error = None, None
    if distributed.is_main_process():
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            error = err
    error = distributed.broadcast_object(error)
    if error is not None:
        raise error
    return result


def _open_run_dir(run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run directory (rank 0, lock held) and return the checkpoint to resume, if any.

    Nothing is written until every check has passed, so a refused run leaves the directory as it was.
    """
    ckpt = run_dir / "checkpoint.pt"
    remove_stale_temp_files(run_dir)  # a kill during a save can leave one; we hold the lock
    remove_replaced(run_dir)
    if resume and (ckpt.exists() or not overwrite):
        if not ckpt.exists():
            extra = " (the directory holds an earlier run's files; --overwrite starts over)" if run_dir.exists() else ""
            raise FileNotFoundError(f"no checkpoint at {ckpt}; start the run without --resume first{extra}")
        state = load_checkpoint(ckpt, map_location="cpu")
        changes = resume_changes(state["config"], config, state["epoch"])
        if changes and config.progress:
            print(f"resuming {run_dir} at epoch {state['epoch']} with: {'; '.join(changes)}", file=sys.stderr)
        return state
    if is_nonempty_dir(run_dir) and not overwrite:
        refuse_existing(run_dir)
    return None


def _start_run_dir(run: Run, clear: bool) -> None:
    """Rank 0, once the run is built (so bad data or a bad size cannot cost the old run): clear the directory if
    overwriting, then write the resolved config (and, on resume, the metrics the checkpoint holds)."""
    if clear:
        clear_for_overwrite(run.run_dir)  # moved aside and deleted before anything new is written
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, run.run_dir / "config.yaml")
    if run.metrics:
        _write_metrics(run)  # drops any line written after the checkpoint (a kill between the two writes)


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

    Writes ``<out_dir>/<name>/``: ``config.yaml``, ``checkpoint.pt`` (atomic, after every ``checkpoint_every``
    epochs and at the end), ``metrics.jsonl`` (one line per epoch) and ``results.json`` (final kNN with
    recomputed features). A non-empty run directory is refused unless ``resume`` (continue the checkpoint
    exactly; only changes listed in :data:`~instdisc_lite.run_dir.RESUMABLE_CHANGES` are accepted) or
    ``overwrite`` (delete it first) is given, and a lock keeps a second process with the same name out.
    ``stop_after=k`` stops once k epochs are done, right after their checkpoint, as an interruption
    would (no final evaluation then); ``resume=True`` later continues as if nothing had happened.
    ``on_epoch_end(run)`` is called after every epoch (after its kNN monitor); the dict it returns, if any, is
    added to that epoch's metrics row (the book uses it to probe the bank and the objective as training goes).
    """
    config = _resolve_config(config, overrides)
    device = distributed.init_from_env() or select_device(config.device)
    run_dir = Path(config.out_dir) / config.name
    lock = RunLock(run_dir)
    try:
        _on_main(lock.acquire)
        state = _on_main(lambda: _open_run_dir(run_dir, config, resume, overwrite))  # None except on rank 0
        stored = distributed.broadcast_object(state["config"] if state else None)  # rank 0's checked checkpoint
        resuming = stored is not None
        if resuming:  # the budget was resolved once, when the run started: keep those epochs
            config = keep_resolved_epochs(config, stored)
        run = build_run(config, device, init_bank=not resuming, resolve_budget=not resuming)
        if resuming:  # the other ranks read the checkpoint that rank 0 has checked
            load_run_checkpoint(run, state=state or load_checkpoint(run_dir / "checkpoint.pt"))
        _on_main(lambda: _start_run_dir(run, clear=overwrite and not resuming))
        try:
            _train_epochs(run, stop_after, on_epoch_end)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted during epoch {run.epoch + 1} of run {run_dir}. {_last_good(run)} "
                "Continue with --resume (train(..., resume=True))."
            ) from None
        if final_eval and run.epoch == run.config.epochs:
            _finish(run)
        return run
    finally:
        lock.release()


def _train_epochs(run: Run, stop_after: int | None, on_epoch_end: Callable[[Run], dict[str, Any] | None] | None):
    config, main = run.config, distributed.is_main_process()
    start = time.perf_counter() - (run.metrics[-1]["elapsed"] if run.metrics else 0.0)
    no_knn = run.data.knn_unavailable  # e.g. your own unlabelled images: they train all the same
    if no_knn is not None and main and config.progress and run.epoch < config.epochs:
        tqdm.write(f"no kNN evaluation in this run: {no_knn}")
    while run.epoch < config.epochs and (stop_after is None or run.epoch < stop_after):
        stats = train_one_epoch(run)
        run.epoch += 1
        distributed.broadcast_buffers(run.method)  # one set of BN statistics for evaluation and the checkpoint
        row: dict[str, Any] = {"epoch": run.epoch, **stats}
        row.update(run.method.epoch_stats())  # e.g. NCE's Z
        if no_knn is None and (run.epoch % config.eval_every == 0 or run.epoch == config.epochs):
            row.update(evaluate_bank(run))
        if on_epoch_end is not None:
            row.update(on_epoch_end(run) or {})
        row["elapsed"] = time.perf_counter() - start
        check_state_finite(run)  # before anything of this epoch is written
        run.metrics.append(row)
        if run.epoch % config.checkpoint_every == 0 or run.epoch in (config.epochs, stop_after):
            save_run_checkpoint(run)  # first the checkpoint, then the metrics it includes
        if main:
            _write_metrics(run)
            knn = f", kNN top-1 {row['knn_top1']:.2f}%" if "knn_top1" in row else ""
            if config.progress:
                msg = f"epoch {run.epoch}/{config.epochs}: loss {row['loss']:.4f}, lr {row['lr']:.4g}"
                tqdm.write(f"{msg}{knn} ({row['time']:.1f}s)")


def _finish(run: Run) -> None:
    no_knn = run.data.knn_unavailable
    final = evaluate_final(run) if no_knn is None else {}
    if distributed.is_main_process():
        last = run.metrics[-1] if run.metrics else {}
        result = {"name": run.config.name, "epochs": run.epoch, "elapsed": last.get("elapsed", 0.0),
                  "final_knn_top1": final.get("knn_top1"), "final_knn_top5": final.get("knn_top5"),
                  "bank_knn_top1": last.get("knn_top1"), "method": run.config.method,
                  "world_size": distributed.world_size(),
                  "device": str(run.device), "torch": torch.__version__}  # fmt: skip
        if no_knn is not None:
            result["knn_skipped"] = no_knn  # the kNN figures above are null, and this says why
        atomic_write_text(json.dumps(result, indent=2) + "\n", run.run_dir / "results.json")
    run.final = final


# ----------------------------------------------------------------------------------------------
# A trained run's features
# ----------------------------------------------------------------------------------------------


def load_trained_run(
    run_dir: str | Path, device: str = "auto", overrides: list[str] | dict[str, Any] | None = None
) -> Run:
    """Rebuild the run in ``run_dir`` from its ``config.yaml`` (on ``device`` rather than the stored one; its data
    read again, ``overrides`` applied: e.g. ``test_path`` to embed other images) and load its newest
    ``checkpoint.pt`` (``weights_only=True``).

    A missing directory, config or checkpoint raises FileNotFoundError naming it; a checkpoint that does not fit
    the config, :class:`~instdisc_lite.checkpoint.CheckpointError`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}; pass --run runs/<name> of a trained run")
    config_path, checkpoint_path = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.yaml in {run_dir}: not a run directory written by train")
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint_path}; train the run first (a checkpoint is written "
                                "after the first epoch)")  # fmt: skip
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    config = load_config(config_path, {**extra, "device": device})
    state = load_checkpoint(checkpoint_path)  # before the data is read: a bad file costs nothing
    run = build_run(config, select_device(device), init_bank=False, resolve_budget=False)  # config.yaml's epochs
    load_run_checkpoint(run, checkpoint_path, state)
    return run


def embed(run: Run, split: str = "train") -> torch.Tensor:
    """L2-normalised features ``(N, d)`` float32 of every ``split`` image (``train``: the bank rows, in dataset order;
    ``test``: the test set) by the run's encoder, un-augmented, in eval mode. ValueError if there is no test set.

    For methods with a projection head the encoder is the representation before the head (as evaluated); it is
    normalised here too, as the kNN does.
    """
    loaders = {"train": run.data.train_eval_loader, "test": run.data.test_loader}
    if split not in loaders:
        raise ValueError(f"split must be one of {', '.join(loaders)}, got {split!r}")
    if loaders[split] is None:
        raise ValueError(f"run {run.config.name!r} has no test set (set test_path when training)")
    features, _ = extract_features(run.encoder, loaders[split], run.device, run.data.eval_transform)
    return F.normalize(features.float(), dim=1)


__all__ = [
    "OBJECTIVES", "NonFiniteLossError", "Run", "RunExistsError", "RunInUseError", "TrainingInterrupted",
    "build_objective", "build_run", "check_state_finite", "embed", "evaluate_bank", "evaluate_final",
    "initial_features", "learning_rate", "load_run_checkpoint", "load_trained_run", "lr_schedule",
    "save_run_checkpoint", "select_device", "train", "train_one_epoch",
]  # fmt: skip
