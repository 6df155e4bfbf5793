"""No host synchronisation per training step: a GPU step must never wait for the host to read a tensor.

CUDA's ``torch.cuda.set_sync_debug_mode`` needs a GPU, so on the CPU every Python-level way of reading a tensor on the
host is counted instead: ``item``, ``tolist``, ``bool``/``float``/``int``/``index`` of a tensor, ``numpy``, and the ops
whose output size depends on the data (``unique``, ``nonzero``, ``masked_select``, indexing with a boolean mask), which
make a GPU wait too. A few steps of every method are run twice, with 2 and with 6 steps: the count must not grow with
the number of steps (a step has none), and with a check every 2 steps it grows by one read per check.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from instdisc_lite import build_run, load_config
from instdisc_lite.methods import ORDER
from instdisc_lite.train import train_one_epoch

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "unique", "nonzero",
         "masked_select")  # fmt: skip
DATA_DEPENDENT = ("unique", "nonzero", "masked_select")  # torch.<name> as well as Tensor.<name>


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Counts host reads of tensors by kind while the test runs (the wrapped functions still work)."""
    counts: Counter = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in DATA_DEPENDENT:
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def masked_get(self, index):
        if _has_bool_mask(index):
            counts["boolean mask"] += 1
        return getitem(self, index)

    def masked_set(self, index, value):
        if _has_bool_mask(index):
            counts["boolean mask"] += 1
        return setitem(self, index, value)

    monkeypatch.setattr(torch.Tensor, "__getitem__", masked_get)
    monkeypatch.setattr(torch.Tensor, "__setitem__", masked_set)
    return counts


# every method with its quick config; InstDisc and CMC also with NCE (fixed and running Z, per-image and shared
# negatives), whose Z must be read on the host once at most, not every step, and InstDisc with the exact softmax
CASES = {name: {} for name in ORDER} | {
    "instdisc-softmax": {"objective": "softmax"},
    "instdisc-nce-fixed": {"objective": "nce", "z_mode": "fixed"},
    "instdisc-nce-running": {"objective": "nce", "z_mode": "running"},
    "instdisc-nce-shared": {"objective": "nce", "shared_negatives": True},
    "cmc-nce": {"objective": "nce", "z_mode": "running"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_host_read_per_training_step(case, tmp_path, host_reads, fashion_mnist_available):
    method = case.split("-")[0]
    config = load_config(f"{method}_fashion_mnist_quick", {
        "data_root": str(tmp_path / "data"), "out_dir": str(tmp_path / "runs"), "train_subset": 96, "eval_subset": 32,
        "batch_size": 16, "num_negatives": 64, "queue_size": 64, "device": "cpu", "progress": False,
        **CASES[case],
    })  # fmt: skip

    run = build_run(config)
    batches = list(itertools.islice(iter(run.data.train_loader), 6))  # made first: the loader's work is not the step's

    def reads(steps: int, check_every: int) -> Counter:
        run.data.train_loader = batches[:steps]
        host_reads.clear()
        stats = train_one_epoch(run, check_every=check_every)
        counted = Counter(host_reads)
        assert abs(stats["loss"]) < float("inf"), stats  # it trained, to a finite loss
        return counted

    first = reads(1, check_every=100)  # an NCE reads its Z once, on its first batch
    few, more = reads(2, check_every=100), reads(6, check_every=100)
    assert more == few, f"host reads grow with the steps: {dict(few)} for 2 steps, {dict(more)} for 6"
    assert few == Counter(item=1, tolist=1), dict(few)  # the epoch's mean loss and its one NaN check
    z_reads = {"instdisc": 1, "cmc": 2}.get(method, 0) if config.objective == "nce" else 0  # one per NCE (CMC: two)
    assert first - few == Counter(item=z_reads), dict(first)
    # a check every 2 steps: one read of the last two losses per check (6 steps: 3 checks)
    assert reads(6, check_every=2) == Counter(item=1, tolist=3)


def test_the_counter_sees_host_reads(host_reads):
    x = torch.arange(4.0)
    x.item() if x.numel() == 1 else x[0].item()
    bool(x[0] > 1), float(x[1]), int(x[2]), x.tolist(), x[x > 1], torch.unique(x), x.nonzero()
    assert host_reads == Counter(item=1, __bool__=1, __float__=1, __int__=1, tolist=1, unique=1, nonzero=1,
                                 **{"boolean mask": 1})  # fmt: skip


def test_cuda_optimizer_takes_the_scalers_flag_on_the_device():
    """With AMP on CUDA, GradScaler.step reads its found-inf flag on the host every step unless the optimizer
    declares ``_step_supports_amp_scaling`` (then the flag goes to the fused kernel on the device). The trainer's
    CUDA optimizer must be such a one; on the CPU (no scaler) it stays the plain SGD the resume tests pin down."""
    from instdisc_lite import load_config
    from instdisc_lite.train import make_optimizer

    config = load_config("fashion_mnist_quick")
    params = [torch.nn.Parameter(torch.zeros(3))]
    cuda = make_optimizer(params, config, torch.device("cuda"))  # built only: no CUDA tensor is touched
    assert cuda.defaults["fused"] is True and getattr(cuda, "_step_supports_amp_scaling", False)
    cpu = make_optimizer(params, config, torch.device("cpu"))
    assert not cpu.defaults["fused"] and not getattr(cpu, "_step_supports_amp_scaling", False)
    for opt in (cuda, cpu):  # the paper's SGD either way
        group = opt.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (
            config.lr,
            config.sgd_momentum,
            config.weight_decay,
        )
