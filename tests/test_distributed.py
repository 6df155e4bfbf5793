"""Several processes (gloo on CPU) must keep identical bank replicas: the multi-GPU code path, tested without GPUs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instdisc_lite import MemoryBank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bank = MemoryBank(10, 4, momentum=0.5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.tensor([rank, 5, 7]) if rank == 0 else torch.tensor([rank, 5, 9])
    feats = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    bank.update(idx, feats)
    torch.save({"memory": bank.memory, "idx": idx, "feats": feats}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_bank_update_gathers_across_ranks(tmp_path):
    mp.spawn(_bank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["memory"], r1["memory"]), "bank replicas diverged across ranks"
    # the same update done in one process with every rank's batch concatenated
    ref = MemoryBank(10, 4, momentum=0.5, generator=torch.Generator().manual_seed(0))
    ref.update(torch.cat([r0["idx"], r1["idx"]]), torch.cat([r0["feats"], r1["feats"]]))
    assert torch.allclose(r0["memory"], ref.memory, atol=1e-6)
    untouched = [2, 3, 4, 6, 8]
    fresh = MemoryBank(10, 4, momentum=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r0["memory"][untouched], fresh.memory[untouched])


def test_torchrun_training_keeps_replicas_identical(tmp_path):
    """Two ranks train the quick config briefly through the real CLI under torchrun."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "from instdisc_lite.train import train\n"
        "from instdisc_lite import distributed\n"
        "run = train('fashion_mnist_quick', overrides=dict(train_subset=512, eval_subset=200, epochs=1,\n"
        "    batch_size=64, out_dir=sys.argv[1], progress=False, num_negatives=256, objective='nce'),\n"
        "    overwrite=True, final_eval=False)\n"
        "torch.save({'bank': run.bank.memory, 'w': next(run.encoder.parameters()).detach(), 'z': run.objective.z},\n"
        "           f'{sys.argv[1]}/rank{distributed.rank()}.pt')\n"
        "distributed.cleanup()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["bank"], r1["bank"])
    assert torch.equal(r0["w"], r1["w"])
    assert torch.equal(r0["z"], r1["z"])
    assert (tmp_path / "fashion_mnist_quick" / "metrics.jsonl").exists()
