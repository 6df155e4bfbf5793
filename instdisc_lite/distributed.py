"""Helpers that make one code path serve CPU, one GPU and several GPUs (torchrun / DDP).

Everything here is a no-op when ``torch.distributed`` is not initialised, so single-process code
never has to branch on it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env() -> torch.device | None:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns the device of this rank, or ``None`` when the run is single-process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0; identity otherwise.

    :func:`all_gather_varlen` also takes a different dim-0 size per rank, for one more small collective.

    Used for the memory-bank update: every rank keeps a full replica of the bank, so each must apply
    the features that *all* ranks computed this step, in the same order, to stay identical.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def collective_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL (it only takes CUDA tensors), else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_EQUAL_SIZES = False  # inside an active equal_sizes(): every rank gathers the same dim-0 size


class equal_sizes:  # noqa: N801 (used like a function: ``with equal_sizes(): ...``)
    """Declare that inside the block every rank passes tensors of the same dim-0 size to :func:`all_gather_varlen`.

    Its exchange of sizes then is skipped: reading the other ranks' sizes on the host (``.item()``) would make a GPU
    wait for the host at every step. The trainer enters it around each training step when its loader gives every
    rank ``batch_size`` images a step (:func:`instdisc_lite.data.equal_rank_batches`). ``active=False`` changes
    nothing. Reusable, and nests.
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self._previous: list[bool] = []

    def __enter__(self) -> None:
        global _EQUAL_SIZES
        self._previous.append(_EQUAL_SIZES)
        _EQUAL_SIZES = _EQUAL_SIZES or self.active

    def __exit__(self, *exc: object) -> None:
        global _EQUAL_SIZES
        _EQUAL_SIZES = self._previous.pop()


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0, in rank order, tensors whose dim-0 size differs per rank; identity otherwise.

    ``tensor`` is ``(B_r, *rest)`` on rank r (``rest`` and dtype the same on every rank); the result is
    ``(sum_r B_r, *rest)`` on every rank, on ``tensor``'s device. ``dist.all_gather`` needs equal shapes,
    so the sizes are gathered first, every part is zero-padded to the largest and trimmed after.
    Needed wherever the last batch of an epoch or a shard of a dataset is uneven across ranks. Gathering the sizes
    reads them on the host; inside :func:`equal_sizes` (a training step) that read is skipped.
    """
    if not is_distributed():
        return tensor
    comm = collective_device()
    local = tensor.detach().contiguous().to(comm)
    if _EQUAL_SIZES:  # equal sizes declared (equal_sizes): one collective, nothing read on the host
        return all_gather_cat(local).to(tensor.device)
    size = torch.tensor([local.shape[0]], dtype=torch.long, device=comm)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)]).to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (an all-reduce MAX); ``flag`` itself in one process.

    A rank that stops alone (say on a NaN loss) leaves the others waiting in their next collective for
    ever; deciding together makes every rank stop at the same step.
    """
    if not is_distributed():
        return bool(flag)
    t = torch.tensor(int(bool(flag)), dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable ``obj`` per rank, in rank order, on every rank; ``[obj]`` in one process.

    E.g. every rank's RNG state, so a checkpoint can restore each rank's own noise and augmentation.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (what other ranks pass is ignored); ``obj`` in one process.

    For decisions that must be the same everywhere, taken on one rank (e.g. "resume from this checkpoint").
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here; no-op in one process."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy, on ``tensor``'s device); identity when not distributed."""
    if not is_distributed():
        return tensor
    out = tensor.to(collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (in place on a copy); identity when not distributed."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s BatchNorm running statistics in ``module`` to every rank; no-op in one process.

    DDP broadcasts buffers at the start of each forward, so after an epoch's last step every rank holds
    statistics updated by its own last batch; evaluation and checkpoints need one set, the one rank 0 saves.
    """
    if not is_distributed():
        return
    for layer in module.modules():
        if not isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            continue  # banks and queues are kept equal by their gathered updates: don't send them again
        for buf in layer.buffers(recurse=False):
            comm = buf.to(collective_device())
            dist.broadcast(comm, src=src)
            buf.copy_(comm)


def cleanup() -> None:
    """Destroy the process group at the end of a distributed run."""
    if is_distributed():
        dist.destroy_process_group()
