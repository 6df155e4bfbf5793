"""Helpers that make one code path serve CPU, one GPU and several GPUs (torchrun / DDP).

Everything here is a no-op when ``torch.distributed`` is not initialised, so single-process code
never has to branch on it.
"""

from __future__ import annotations

import os

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

    Used for the memory-bank update: every rank keeps a full replica of the bank, so each must apply
    the features that *all* ranks computed this step, in the same order, to stay identical.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (in place on a copy); identity when not distributed."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def cleanup() -> None:
    """Destroy the process group at the end of a distributed run."""
    if is_distributed():
        dist.destroy_process_group()
