"""The trainer under torchrun (2 processes, gloo on CPU): exact resume with every rank's RNG stream, a checkpoint
resumed on another number of ranks, the parametric classifier kept identical across ranks, and a NaN on one rank
stopping all of them instead of leaving the others waiting in a collective."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instdisc_lite import train

PROBE = """
import json, sys, torch
from instdisc_lite import distributed
from instdisc_lite.train import NonFiniteLossError, train

out, tag, overrides, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
if tag == "nan":  # rank 1 alone sees a NaN loss at its second step
    from instdisc_lite.nce import NCE
    real, calls = NCE.data_loss, []
    def poisoned(self, *args, **kw):
        calls.append(1)
        loss = real(self, *args, **kw)
        return loss * float("nan") if distributed.rank() == 1 and len(calls) >= 2 else loss
    NCE.data_loss = poisoned
try:
    run = train("fashion_mnist_quick", overrides=overrides, **kwargs)
except NonFiniteLossError as err:
    open(f"{out}/{tag}_rank{distributed.rank()}.txt", "w").write(str(err))
    distributed.cleanup()
    sys.exit(0)
objective = {k: v for k, v in run.objective.state_dict().items() if not k.startswith("bank.")}
torch.save({"bank": run.bank.memory, "model": run.encoder.state_dict(), "objective": objective, "epoch": run.epoch,
            "losses": [row["loss"] for row in run.metrics]}, f"{out}/{tag}_rank{distributed.rank()}.pt")
distributed.cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, tag: str, overrides: dict, timeout: float = 240, **kwargs) -> list[dict]:
    """Train under ``torchrun --nproc_per_node=2`` and return what each rank saved."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(script), str(tmp_path), tag, json.dumps(overrides), json.dumps(kwargs)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"{tag}_rank{r}.pt") for r in range(2)] if tag != "nan" else []


def base(tmp_path: Path, **extra) -> dict:
    values = dict(
        data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"), train_subset=512, eval_subset=200,
        batch_size=32, objective="nce", num_negatives=128, knn_k=20, epochs=2, progress=False, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return values


def assert_equal_states(a: dict, b: dict) -> None:
    assert torch.equal(a["bank"], b["bank"])
    for part in ("model", "objective"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_two_rank_resume_is_exact_and_replicas_agree(tmp_path, fashion_mnist_available):
    straight = torchrun(tmp_path, "straight", base(tmp_path, name="straight"), overwrite=True)
    assert_equal_states(straight[0], straight[1])  # every rank holds the same bank, weights and Z
    torchrun(tmp_path, "first", base(tmp_path, name="split"), stop_after=1, final_eval=False)
    resumed = torchrun(tmp_path, "resumed", base(tmp_path, name="split"), resume=True)
    for rank in range(2):  # each rank got its own RNG stream back, so the resumed run is the uninterrupted one
        assert resumed[rank]["epoch"] == 2
        assert_equal_states(straight[rank], resumed[rank])
        assert straight[rank]["losses"] == resumed[rank]["losses"]
    results = json.loads((tmp_path / "runs" / "split" / "results.json").read_text())
    assert results["world_size"] == 2
    # the 2-rank checkpoint of epoch 1 also resumes in one process (global batch and lr change; it says nothing
    # about bit-identity, but it must run and continue from epoch 1)
    single = tmp_path / "single"
    single.mkdir()
    (single / "runs").mkdir()
    os.replace(tmp_path / "runs" / "split", single / "runs" / "split")
    run = train("fashion_mnist_quick", {**base(single, name="split"), "epochs": 3}, resume=True, final_eval=False)
    assert run.epoch == 3 and [r["epoch"] for r in run.metrics] == [1, 2, 3]


def test_parametric_classifier_is_identical_across_ranks(tmp_path, fashion_mnist_available):
    ranks = torchrun(tmp_path, "parametric", base(tmp_path, name="p", objective="parametric", epochs=1),
                     final_eval=False)  # fmt: skip
    w0, w1 = ranks[0]["objective"]["classifier.weight"], ranks[1]["objective"]["classifier.weight"]
    assert torch.equal(w0, w1), "the n-way classifier drifted apart across ranks"
    assert_equal_states(ranks[0], ranks[1])


def test_nan_on_one_rank_stops_every_rank(tmp_path, fashion_mnist_available):
    torchrun(tmp_path, "nan", base(tmp_path, name="nan", epochs=1), timeout=180, final_eval=False)
    messages = [(tmp_path / f"nan_rank{r}.txt").read_text() for r in range(2)]
    assert "nan" in messages[1] and "step 2" in messages[1]
    assert "another rank" in messages[0] and "step 2" in messages[0]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_lr_is_scaled_linearly_with_the_global_batch(world):
    from instdisc_lite import load_config
    from instdisc_lite.schedule import learning_rate

    config = load_config("cifar10_resnet18")
    assert learning_rate(config, 0, world) == pytest.approx(config.lr * world)
    assert learning_rate(config, 199, world) == pytest.approx(config.lr * world * 0.01)
    unscaled = load_config("cifar10_resnet18", {"scale_lr": False})
    assert learning_rate(unscaled, 0, world) == pytest.approx(config.lr)
    # the paper's global batch of 128 split over the processes: the paper's lr
    split = load_config("cifar10_resnet18", {"batch_size": 128 // world})
    assert split.lr_batch == 128 and learning_rate(split, 0, world) == pytest.approx(config.lr)
    # no lr_batch: lr is for one process's batch_size
    quick = load_config("fashion_mnist_quick")
    assert quick.lr_batch is None and learning_rate(quick, 0, world) == pytest.approx(quick.lr * world)


def test_sync_bn_on_cpu_is_a_config_error(tmp_path, fashion_mnist_available, monkeypatch):
    """SyncBatchNorm has no CPU kernel; a multi-process CPU run asking for it gets one line before any step."""
    from instdisc_lite import ConfigError, distributed, load_config
    from instdisc_lite.train import build_run

    config = load_config("fashion_mnist_quick", base(tmp_path, name="s", sync_bn=True))
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)  # as under torchrun, without the process group
    with pytest.raises(ConfigError, match="sync_bn=true needs CUDA"):
        build_run(config)
    monkeypatch.undo()
    run = build_run(config)  # one process: sync_bn has nothing to synchronise and is ignored
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in run.encoder.modules())
