"""Several processes (gloo on CPU) must compute what one process computes: the multi-GPU code path, tested without GPUs.

One ``mp.spawn`` of two ranks (the ``ranks`` fixture) runs every multi-process check and saves what each rank
saw; the tests compare that with the same computation done here in one process. Spawning is the slow part
(each process imports torch), so it happens once for the module.

``nn.SyncBatchNorm`` cannot be part of this: it only runs on GPUs (DDP refuses to wrap it on CPU with
"SyncBatchNorm layers only work with GPU modules"), so the step model has no BatchNorm.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from instdisc_lite import NCE, MemoryBank, distributed, extract_features, weighted_knn

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# The problems: built the same way in every rank and in the one-process reference
# ------------------------------------------------------------------------------------------------

N_ITEMS, DIM, NUM_NEG, BATCH = 40, 8, 16, 8


def _step_problem() -> tuple[nn.Module, MemoryBank, NCE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm-free conv encoder, bank, NCE, a global batch ``(B, 1, 6, 6)`` with its ``(B,)`` dataset
    indices, and per-image noise ``(B, m)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, DIM))
    bank = MemoryBank(N_ITEMS, DIM, momentum=0.5, generator=torch.Generator().manual_seed(1))
    nce = NCE(bank, num_negatives=NUM_NEG, temperature=0.1)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 1, 6, 6, generator=g)
    indices = torch.randperm(N_ITEMS, generator=g)[:BATCH]
    noise = torch.randint(N_ITEMS, (BATCH, NUM_NEG), generator=g)
    return model, bank, nce, images, indices, noise


def _step(model: nn.Module, bank: MemoryBank, nce: NCE, images, indices, noise) -> torch.Tensor:
    """One training step as the trainer takes it, without the optimiser: loss, backward, bank update."""
    features = F.normalize(model(images), dim=1)
    loss = nce(features, indices, noise_indices=noise)
    loss.backward()
    bank.update(indices, features.detach())
    return loss.detach()


def _update_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-rank ``(idx, features)`` for bank updates: equal sizes (row 5 on both ranks), then uneven 3 + 2."""
    g = torch.Generator().manual_seed(3)
    even = [torch.tensor([0, 5, 7]), torch.tensor([1, 5, 9])]
    uneven = [torch.tensor([0, 5, 7]), torch.tensor([5, 11])]
    return [(idx, F.normalize(torch.randn(len(idx), 4, generator=g), dim=1)) for idx in even + uneven]


def _eval_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """An encoder with dropout (so eval mode matters), 13 images ``(13, 5)``, labels, and two uneven shuffled
    shards of the positions 0..12 (7 and 6 of them; 3 and 2 batches of 3)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(13, 5, generator=g), torch.randint(4, (13,), generator=g)
    perm = torch.randperm(13, generator=g)
    return model, images, labels, [perm[:7], perm[7:]]


def _shard_loader(images, labels, shard: torch.Tensor, batch: int = 3) -> list:
    return [(images[b], labels[b], b) for b in shard.split(batch)]


def _knn_problem() -> tuple[torch.Tensor, ...]:
    """Train ``(60, 6)`` with 5 classes, 37 queries (an odd count: the two slices differ)."""
    g = torch.Generator().manual_seed(6)
    centres = torch.randn(5, 6, generator=g)
    train_labels, test_labels = torch.randint(5, (60,), generator=g), torch.randint(5, (37,), generator=g)
    train = centres[train_labels] + 1.2 * torch.randn(60, 6, generator=g)
    test = centres[test_labels] + 1.2 * torch.randn(37, 6, generator=g)
    return train, train_labels, test, test_labels


KNN_KWARGS = dict(k=10, temperature=0.1, query_chunk=5)


# ------------------------------------------------------------------------------------------------
# The two ranks
# ------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    # a rank that fails leaves the other in a collective: time out instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    out = {}

    # one step of DDP: rank r takes its half of the global batch and of the noise
    model, bank, nce, images, indices, noise = _step_problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out["loss"] = _step(ddp, bank, nce, images[half], indices[half], noise[half])
    out["grads"] = [p.grad.clone() for p in model.parameters()]
    out["bank"], out["z"] = bank.memory.clone(), nce.z.clone()

    # bank updates: equal batch sizes, then an uneven last batch (3 items on rank 0, 2 on rank 1)
    batches = _update_batches()
    for name, (b0, b1) in {"even": batches[:2], "uneven": batches[2:]}.items():
        upd = MemoryBank(12, 4, momentum=0.5, generator=torch.Generator().manual_seed(7))
        upd.update(*(b0, b1)[rank])
        out[f"bank_{name}"] = upd.memory.clone()

    # inside equal_sizes (a training step) the gathers read nothing on the host; outside, each reads the sizes
    reads: list[int] = []
    item = torch.Tensor.item
    torch.Tensor.item = lambda self: reads.append(1) or item(self)
    try:
        upd = MemoryBank(12, 4, momentum=0.5, generator=torch.Generator().manual_seed(7))
        with distributed.equal_sizes():
            upd.update(*batches[:2][rank])
            out["varlen_equal"] = distributed.all_gather_varlen(torch.full((2, 1), float(rank)))
        out["reads_equal"] = len(reads)
        distributed.all_gather_varlen(torch.zeros(1, 1))
        out["reads_varlen"] = len(reads) - out["reads_equal"]
    finally:
        torch.Tensor.item = item
    out["bank_even_equal"] = upd.memory.clone()

    # sharded feature extraction, then a loader whose shards overlap (a padding sampler)
    enc, x, y, shards = _eval_problem()
    enc.train()
    out["features"], out["labels"] = extract_features(enc, _shard_loader(x, y, shards[rank]), device="cpu")
    out["still_training"] = enc.training
    out["local_features"], _ = extract_features(enc, _shard_loader(x, y, shards[rank]), device="cpu", gather=False)
    padded = torch.cat([shards[rank], shards[rank][:1]]) if rank == 1 else shards[rank]
    try:
        extract_features(enc, _shard_loader(x, y, padded), device="cpu")
    except ValueError as e:
        out["padded_error"] = str(e)

    # sharded kNN (the default when distributed), and unsharded for comparison
    train, train_labels, test, test_labels = _knn_problem()
    out["knn"] = weighted_knn(train, train_labels, test, test_labels, **KNN_KWARGS)
    out["knn_unsharded"] = weighted_knn(train, train_labels, test, test_labels, shard=False, **KNN_KWARGS)

    # small collectives
    out["any"] = [distributed.any_rank(rank == 1), distributed.any_rank(False), distributed.any_rank(True)]
    torch.manual_seed(100 + rank)
    out["rng"] = torch.get_rng_state()
    out["objects"] = distributed.all_gather_object({"rank": rank, "rng": torch.get_rng_state()})
    out["from0"] = distributed.broadcast_object({"resume": rank == 0, "rank": rank})
    out["from1"] = distributed.broadcast_object(f"rank {rank}", src=1)
    distributed.barrier()
    out["varlen"] = distributed.all_gather_varlen(torch.arange(3 - rank).float()[:, None] + 10 * rank)
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1, 10]))

    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------
# Two ranks against one process
# ------------------------------------------------------------------------------------------------


def test_two_rank_step_equals_one_rank_step(ranks):
    """Loss, DDP gradients, bank and Z of a 2-rank step equal those of one step over the whole batch."""
    r0, r1 = ranks
    model, bank, nce, images, indices, noise = _step_problem()
    fresh_bank = bank.memory.clone()
    loss = _step(model, bank, nce, images, indices, noise)
    grads = [p.grad for p in model.parameters()]

    # each rank's loss is the mean over its half; equal halves, so their mean is the global mean
    assert abs(r0["loss"] - r1["loss"]) > 1e-3  # the halves differ: averaging is really tested
    torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, loss, rtol=1e-6, atol=1e-6)
    for g0, g1, g in zip(r0["grads"], r1["grads"], grads, strict=True):
        assert torch.equal(g0, g1)  # DDP leaves the same averaged gradient on every rank
        assert g.abs().max() > 1e-3
        torch.testing.assert_close(g0, g, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["bank"], r1["bank"])  # bit-identical replicas
    torch.testing.assert_close(r0["bank"], bank.memory, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(bank.memory[indices], fresh_bank[indices])  # the step did move the rows
    # Z from the first batch: each rank's estimate, averaged over ranks, is the estimate of the whole batch
    assert torch.equal(r0["z"], r1["z"]) and r0["z"].dtype == torch.float64
    torch.testing.assert_close(r0["z"], nce.z, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", ["even", "uneven"])
def test_bank_update_gathers_across_ranks(ranks, case):
    """Both ranks apply every rank's batch, also when the last batch is uneven (3 items vs 2)."""
    r0, r1 = ranks
    (i0, f0), (i1, f1) = _update_batches()[:2] if case == "even" else _update_batches()[2:]
    assert torch.equal(r0[f"bank_{case}"], r1[f"bank_{case}"]), "bank replicas diverged across ranks"
    ref = MemoryBank(12, 4, momentum=0.5, generator=torch.Generator().manual_seed(7))
    fresh = ref.memory.clone()
    ref.update(torch.cat([i0, i1]), torch.cat([f0, f1]))  # one process, the concatenation
    torch.testing.assert_close(r0[f"bank_{case}"], ref.memory, rtol=1e-6, atol=1e-6)
    untouched = sorted(set(range(12)) - set(torch.cat([i0, i1]).tolist()))
    assert torch.equal(r0[f"bank_{case}"][untouched], fresh[untouched])


def test_equal_sizes_gathers_without_host_reads(ranks):
    """Declared equal sizes (a training step): the same bank, one collective, no size read on the host."""
    for r in ranks:
        assert r["reads_equal"] == 0
        assert r["reads_varlen"] == WORLD  # the uneven path reads every rank's size: the count can fail
        assert torch.equal(r["bank_even_equal"], r["bank_even"])
        assert torch.equal(r["varlen_equal"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))


def test_training_steps_declare_equal_sizes(tmp_path, monkeypatch, fashion_mnist_available):
    """The trainer's loaders give every rank batch_size images a step, so its steps skip the size exchange; the
    evaluation after the epoch (uneven shards) does not."""
    from instdisc_lite import build_run, load_config
    from instdisc_lite.data import equal_rank_batches
    from instdisc_lite.train import train_one_epoch

    flags: list[bool] = []
    gather = distributed.all_gather_varlen

    def recording(tensor):
        flags.append(distributed._EQUAL_SIZES)
        return gather(tensor)

    monkeypatch.setattr(distributed, "all_gather_varlen", recording)
    config = load_config("fashion_mnist_quick", {
        "data_root": str(tmp_path / "data"), "out_dir": str(tmp_path / "runs"), "train_subset": 64,
        "eval_subset": 32, "batch_size": 16, "device": "cpu", "progress": False, "bank_init": "random",
    })  # fmt: skip
    run = build_run(config)
    assert equal_rank_batches(run.data.train_loader)
    assert not equal_rank_batches(run.data.test_loader)
    train_one_epoch(run)
    assert flags and all(flags), "bank updates in a training step must run under equal_sizes"
    flags.clear()
    with distributed.equal_sizes(False):
        assert not distributed._EQUAL_SIZES
    extract_features(run.encoder, run.data.test_loader, run.device, run.data.eval_transform, gather=True)
    assert flags and not any(flags), "outside a training step the gathers exchange sizes"


def test_sharded_extract_features_equals_one_process(ranks):
    r0, r1 = ranks
    enc, x, y, shards = _eval_problem()
    loader = [(x[i : i + 4], y[i : i + 4], None) for i in range(0, 13, 4)]  # one process: the whole set in order
    ref_features, ref_labels = extract_features(enc, loader, device="cpu")
    for r in ranks:
        assert r["features"].shape == (13, 3)
        torch.testing.assert_close(r["features"], ref_features, rtol=1e-6, atol=1e-7)
        assert torch.equal(r["labels"], ref_labels) and r["still_training"]
    assert torch.equal(r0["features"], r1["features"])
    assert [len(r["local_features"]) for r in ranks] == [len(s) for s in shards]  # gather=False: own shard
    for r in ranks:  # an overlapping shard is refused on every rank (none is left waiting)
        assert "partition" in r["padded_error"]


def test_sharded_weighted_knn_equals_one_process(ranks):
    ref = weighted_knn(*_knn_problem(), **KNN_KWARGS)
    assert 0 < ref["top1"] < 100 and ref["top1"] < ref["top5"]
    for r in ranks:
        assert r["knn"] == ref and r["knn_unsharded"] == ref


def test_small_collectives(ranks):
    for r in ranks:
        assert r["any"] == [True, False, True]
        assert [o["rank"] for o in r["objects"]] == [0, 1]
        for other, o in zip(ranks, r["objects"], strict=True):
            assert torch.equal(o["rng"], other["rng"])  # every rank's RNG state, in rank order
        assert r["from0"] == {"resume": True, "rank": 0} and r["from1"] == "rank 1"
        assert torch.equal(r["varlen"], torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]]))
        assert torch.equal(r["sum"], torch.tensor([3, 20]))
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])


def test_helpers_are_identities_in_one_process():
    assert not distributed.is_distributed()
    t = torch.randn(3, 2)
    assert distributed.all_gather_varlen(t) is t and distributed.all_reduce_sum(t) is t
    assert distributed.any_rank(True) is True and distributed.any_rank(False) is False
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x", src=0) == "x"
    distributed.barrier()
    problem = _knn_problem()
    assert weighted_knn(*problem, shard=True, **KNN_KWARGS) == weighted_knn(*problem, shard=False, **KNN_KWARGS)


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
