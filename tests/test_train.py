"""Training end to end: exact resume, atomic checkpoints, refusal to clobber runs, NaN guard, real learning."""

from __future__ import annotations

import json
import math

import pytest
import torch

import instdisc_lite
from instdisc_lite import NCE, NonFiniteLossError, RunExistsError, build_run, load_config, train
from instdisc_lite.checkpoint import atomic_save
from instdisc_lite.evaluate import extract_features
from instdisc_lite.run_dir import ResumeMismatchError
from instdisc_lite.train import evaluate_final, learning_rate

TIME_FIELDS = {"time", "elapsed"}


def quick(tmp_path, **overrides) -> dict:
    """Overrides for a Fashion-MNIST run of a few seconds."""
    values = dict(
        data_root=str(tmp_path / "data"),  # empty: found in the system directory
        out_dir=str(tmp_path / "runs"),
        train_subset=256,
        eval_subset=200,
        batch_size=64,
        max_steps_per_epoch=3,
        objective="nce",  # these tests check NCE's Z (as the quick config, here with per-image negatives)
        num_negatives=512,
        knn_k=20,
        eval_every=1,  # the kNN monitor every epoch (the quick config itself evaluates every 10)
        progress=False,
        device="cpu",
        epochs=1,  # and no image_passes budget: setting epochs clears the quick config's
    )
    values.update(overrides)
    return values


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_learning_rate_schedule_is_the_papers():
    config = load_config("cifar10_resnet18")
    assert [learning_rate(config, e) for e in (0, 119)] == [0.03, 0.03]
    assert learning_rate(config, 120) == pytest.approx(0.003) and learning_rate(config, 159) == pytest.approx(0.003)
    assert learning_rate(config, 160) == pytest.approx(0.0003) and learning_rate(config, 199) == pytest.approx(0.0003)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    atomic_save({"step": 1, "w": torch.arange(5)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # half a file is already on disk ...
        raise OSError("disk full")  # ... when the write fails

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.arange(7)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temp file left
    state = load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5))
    atomic_save({"step": 3}, path)  # and a later save still works
    assert load(path)["step"] == 3


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, fashion_mnist_available):
    straight = train("fashion_mnist_quick", quick(tmp_path, name="straight", epochs=2))
    first = train("fashion_mnist_quick", quick(tmp_path, name="split", epochs=1))
    assert first.epoch == 1
    resumed = train("fashion_mnist_quick", quick(tmp_path, name="split", epochs=2), resume=True)
    assert resumed.epoch == 2

    a, b = load(straight.run_dir / "checkpoint.pt"), load(resumed.run_dir / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:  # encoder, bank, NCE's Z
        assert torch.equal(a["method"][key], b["method"][key]), key
    assert {"bank.memory", "objective.z"} <= a["method"].keys()
    for key, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    # the in-memory runs agree too, and they did move away from the start
    assert torch.equal(straight.bank.memory, resumed.bank.memory)
    assert straight.objective.z.item() == resumed.objective.z.item() > 0
    assert not torch.equal(first.bank.memory, resumed.bank.memory)

    rows_a, rows_b = read_metrics(straight.run_dir), read_metrics(resumed.run_dir)
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys() and {"loss", "lr", "z", "knn_top1", "knn_top5"} <= ra.keys()
        assert {k: v for k, v in ra.items() if k not in TIME_FIELDS} == {
            k: v for k, v in rb.items() if k not in TIME_FIELDS
        }
    assert rows_a[0]["loss"] != rows_a[1]["loss"]
    assert json.loads((straight.run_dir / "results.json").read_text())["final_knn_top1"] == pytest.approx(
        json.loads((resumed.run_dir / "results.json").read_text())["final_knn_top1"]
    )


def test_image_passes_budget_sets_the_epochs_for_the_data(tmp_path, fashion_mnist_available):
    # 256 images, max_steps_per_epoch cut: a budget of 640 passes is round(640 / 256) = 2 full epochs of this data
    values = quick(tmp_path, name="budget", image_passes=640)
    del values["epochs"]
    run = train("fashion_mnist_quick", values, stop_after=1)
    assert (run.config.image_passes, run.config.epochs, run.epoch) == (640, 2, 1)
    stored = (run.run_dir / "config.yaml").read_text()
    assert "image_passes: 640" in stored and "epochs: 2" in stored
    # resumed with the same budget: the epochs it came to on this data, not the YAML's 30
    resumed = train("fashion_mnist_quick", values, resume=True)
    assert (resumed.config.epochs, resumed.epoch) == (2, 2)
    assert [row["epoch"] for row in read_metrics(resumed.run_dir)] == [1, 2]
    assert (resumed.run_dir / "results.json").exists()  # the final evaluation ran: the budget was met
    # epochs set explicitly on resume replace the budget (and extend the run)
    longer = train("fashion_mnist_quick", quick(tmp_path, name="budget", epochs=3), resume=True)
    assert (longer.config.image_passes, longer.epoch) == (None, 3)
    # another budget is refused: its epochs could move the lr milestones of the epochs already trained
    with pytest.raises(ResumeMismatchError, match="image_passes"):
        train("fashion_mnist_quick", {**values, "image_passes": 5000}, resume=True)


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, fashion_mnist_available):
    overrides = quick(tmp_path, name="taken", max_steps_per_epoch=1)
    run = train("fashion_mnist_quick", overrides, final_eval=False)
    ckpt = run.run_dir / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(RunExistsError) as err:
        train("fashion_mnist_quick", overrides)
    assert "--resume" in str(err.value) and "--overwrite" in str(err.value)
    assert ckpt.read_bytes() == before
    again = train("fashion_mnist_quick", overrides, overwrite=True, final_eval=False)
    assert again.epoch == 1 and ckpt.exists()
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]


def test_resume_without_checkpoint_says_so(tmp_path, fashion_mnist_available):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train("fashion_mnist_quick", quick(tmp_path, name="never"), resume=True)


# ------------------------------------------------------------------------------------------------
# A loss that becomes NaN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_mode", ["fixed", "running"])
def test_nan_loss_raises_and_keeps_last_checkpoint(tmp_path, monkeypatch, fashion_mnist_available, z_mode):
    overrides = quick(tmp_path, name="nan", z_mode=z_mode, max_steps_per_epoch=2)
    good = train("fashion_mnist_quick", overrides, final_eval=False)
    ckpt, metrics = good.run_dir / "checkpoint.pt", good.run_dir / "metrics.jsonl"
    before, metrics_before = ckpt.read_bytes(), metrics.read_text()
    real_loss = NCE.data_loss
    calls = []

    def poisoned(self, features, indices, **kwargs):
        calls.append(1)
        loss = real_loss(self, features, indices, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss  # fine for one step, then NaN

    monkeypatch.setattr(NCE, "data_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        train("fashion_mnist_quick", {**overrides, "epochs": 2}, resume=True)
    message = str(err.value)
    assert "nan" in message and "epoch 2, step 2" in message
    assert "lower the learning rate" in message and "checkpoint (epoch 1) is untouched" in message
    assert ("z_mode=running" in message) == (z_mode == "fixed")
    assert ckpt.read_bytes() == before and metrics.read_text() == metrics_before
    assert sorted(p.name for p in good.run_dir.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]


def test_absurd_learning_rate_is_caught(tmp_path, fashion_mnist_available):
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train("fashion_mnist_quick", quick(tmp_path, name="lr", lr=1e30, max_steps_per_epoch=4, weight_decay=0.0))


# ------------------------------------------------------------------------------------------------
# The paper's GPU configs, one step each on generated data, on the CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10_resnet18", "imagenet_resnet18", "imagenet_resnet50"])
def test_gpu_config_runs_one_step_end_to_end(name, tmp_path, tiny_cifar10, tiny_imagenet):
    data = tiny_cifar10 if name.startswith("cifar") else tiny_imagenet
    num_train = 20 if name.startswith("cifar") else 8
    run = train(
        name,
        overrides=dict(
            data_root=str(data["root"]), out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1, batch_size=4,
            num_workers=0, progress=False, device="cpu",
        ),
        overwrite=True,
    )  # fmt: skip
    run_dir = tmp_path / name
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["z"] > 0
    assert 0 <= rows[0]["knn_top1"] <= 100
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1 and 0 <= results["final_knn_top1"] <= results["final_knn_top5"] <= 100
    state = load(run_dir / "checkpoint.pt")
    assert state["epoch"] == 1 and state["method"]["bank.memory"].shape == (num_train, 128)
    assert state["config"]["arch"] == load_config(name).arch
    # the one step wrote 4 bank rows, which stay unit-norm
    torch.testing.assert_close(state["method"]["bank.memory"].norm(dim=1), torch.ones(num_train))
    assert isinstance(run.encoder, instdisc_lite.models.Encoder)


# ------------------------------------------------------------------------------------------------
# Learning on real Fashion-MNIST
# ------------------------------------------------------------------------------------------------


def learning_config(tmp_path):
    overrides = quick(
        tmp_path, name="learn", train_subset=2000, eval_subset=1000, epochs=10, batch_size=64,
        max_steps_per_epoch=None, objective="softmax", knn_k=200, eval_every=10,
    )  # fmt: skip  # the shipped quick recipe (exact softmax, feature-filled bank), shortened
    return load_config("fashion_mnist_quick", overrides)


@pytest.mark.slow
def test_short_fashion_mnist_run_learns_instance_discrimination(tmp_path, fashion_mnist_available):
    n = 256
    overrides = quick(
        tmp_path, name="instances", train_subset=n, epochs=12, batch_size=64, max_steps_per_epoch=None,
        objective="softmax", augment="none", eval_every=12, lr_milestones=[1.0], bank_init="random",
    )  # fmt: skip
    run = train("fashion_mnist_quick", overrides, final_eval=False)
    losses = [row["loss"] for row in run.metrics]
    assert losses[-1] < math.log(n) < losses[0]  # from worse than chance (random bank) to well below it
    clean, _ = extract_features(run.encoder, run.data.train_eval_loader, run.device, run.data.eval_transform)
    own = (clean @ run.bank.memory.T).argmax(dim=1) == torch.arange(n)
    assert own.float().mean().item() > 0.3  # chance: 1/256


@pytest.mark.slow
def test_short_fashion_mnist_run_beats_untrained_network_knn(tmp_path, fashion_mnist_available):
    config = learning_config(tmp_path)
    untrained = evaluate_final(build_run(config))["knn_top1"]
    run = train(config)
    assert run.final["knn_top1"] > untrained + 2.0, (untrained, run.final["knn_top1"])
