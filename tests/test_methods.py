"""The method interface: discovery, the InstDisc method's step, two-view data, full-precision losses."""

from __future__ import annotations

import pytest
import torch

from instdisc_lite import ConfigError, load_config
from instdisc_lite.data import BatchAugment, DataBundle, MultiView, build_data
from instdisc_lite.methods import METHODS, ORDER, Method, build_method, taxonomy
from instdisc_lite.methods.instdisc import InstDisc
from instdisc_lite.nce import NCE


def test_methods_are_discovered_in_the_books_order():
    assert "instdisc" in METHODS and METHODS["instdisc"] is InstDisc
    names = list(METHODS)
    known = [n for n in names if n in ORDER]
    assert known == sorted(known, key=ORDER.index)
    for cls in METHODS.values():
        assert issubclass(cls, Method) and cls.negatives and cls.loss and cls.num_views >= 1
    rows = taxonomy()
    assert [r["method"] for r in rows] == names and rows[0]["negatives"] == "memory bank"


def test_unknown_method_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="method.*instdisc"):
        load_config("fashion_mnist_quick", {"method": "byol"})


def test_instdisc_step_is_encode_score_then_explicit_bank_update(seeded):
    config = load_config("fashion_mnist_quick", {"objective": "nce", "num_negatives": 16, "low_dim": 8})
    method = build_method(config, num_items=40, in_channels=1)
    assert isinstance(method.objective, NCE) and method.bank is method.objective.bank
    images, indices = torch.rand(4, 1, 28, 28), torch.tensor([3, 7, 11, 39])
    before = method.bank.memory.clone()
    loss = method([images], indices)
    assert loss.dim() == 0 and torch.equal(method.bank.memory, before)  # forward never writes the bank
    loss.backward()
    assert method.encoder.backbone[0][0].weight.grad is not None
    method.after_step()
    changed = (method.bank.memory != before).any(dim=1)
    assert changed[indices].all() and not changed[[i for i in range(40) if i not in indices.tolist()]].any()
    assert {"encoder.backbone.0.0.weight", "bank.memory", "objective.z"} <= method.state_dict().keys()
    assert method.epoch_stats()["z"] > 0


def test_bundle_views_augment_tensor_batches_independently(seeded):
    augment = BatchAugment((0.5,), (0.5,))
    bundle = DataBundle(None, None, None, augment, augment, 4, torch.zeros(4), 1, 10, 2)
    images = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    one, two = bundle.views(images, 2)
    assert one.shape == two.shape == (4, 1, 28, 28) and not torch.equal(one, two)
    stacked = torch.rand(4, 2, 3, 8, 8)
    plain = DataBundle(None, None, None, torch.nn.Identity(), torch.nn.Identity(), 4, torch.zeros(4), 3, 10, 2)
    a, b = plain.views(stacked, 2)
    assert torch.equal(a, stacked[:, 0]) and torch.equal(b, stacked[:, 1])
    with pytest.raises(ValueError, match="2 views per image, the method needs 3"):
        plain.views(stacked, 3)


def test_two_view_loader_yields_two_different_crops(tiny_cifar10):
    config = load_config("cifar10_resnet18", {"data_root": str(tiny_cifar10["root"]), "batch_size": 4,
                                              "num_workers": 0, "arch": "small_cnn"})  # fmt: skip
    data = build_data(config, num_views=2)
    assert isinstance(data.train_loader.dataset.dataset.dataset.transform, MultiView)
    images, _, indices = next(iter(data.train_loader))
    assert images.shape == (4, 2, 3, 32, 32) and indices.shape == (4,)
    first, second = data.views(images, 2)
    assert not torch.equal(first, second)
    assert data.mean == (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_from_the_cli(name, tmp_path, capsys, fashion_mnist_available):
    """``python -m instdisc_lite train --config <method>_fashion_mnist_quick``, shortened to one small epoch."""
    from instdisc_lite.__main__ import main

    config = f"{name}_fashion_mnist_quick"
    code = main(["train", "--config", config, "--set", f"out_dir={tmp_path}", "train_subset=256", "eval_subset=100",
                 "batch_size=32", "epochs=1", "progress=false", "device=cpu", "knn_k=20"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    result = __import__("json").loads(out.out)
    assert 0 <= result["final_knn_top1"] <= 100 and result["epoch"] == 1
    saved = load_config(tmp_path / config / "config.yaml")
    assert saved.method == name


@pytest.mark.parametrize("name", list(METHODS))
def test_one_real_step_of_every_cifar10_config(name, tiny_cifar10, tmp_path):
    """``<method>_cifar10`` (InstDisc: ``cifar10_resnet18``) runs one step on generated CIFAR-10 and moves weights."""
    import math

    from instdisc_lite import train
    from instdisc_lite.train import build_run

    config = "cifar10_resnet18" if name == "instdisc" else f"{name}_cifar10"
    overrides = dict(
        data_root=str(tiny_cifar10["root"]), out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1, batch_size=4,
        num_workers=0, progress=False, device="cpu", arch="small_cnn",
    )  # fmt: skip
    before = build_run(load_config(config, overrides)).method.state_dict()
    run = train(config, overrides)
    assert isinstance(run.method, METHODS[name]) and run.epoch == 1 and math.isfinite(run.metrics[-1]["loss"])
    after = run.method.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # the step moved them
    assert (tmp_path / config / "checkpoint.pt").exists() and "knn_top1" in run.final


@pytest.mark.slow
@pytest.mark.parametrize("name", ["invaspread", "simclr"])
def test_short_run_of_an_in_batch_method_beats_the_untrained_network(name, tmp_path, fashion_mnist_available):
    """The in-batch methods (one test for both: same protocol); the others' own test files size theirs."""
    from instdisc_lite import train
    from instdisc_lite.train import build_run, evaluate_final

    config = load_config(
        f"{name}_fashion_mnist_quick",
        dict(data_root=str(fashion_mnist_available), out_dir=str(tmp_path), train_subset=2000, eval_subset=1000,
             epochs=2, batch_size=128, eval_every=2, progress=False, device="cpu"),
    )  # fmt: skip
    untrained = evaluate_final(build_run(config))["knn_top1"]
    run = train(config)
    losses = [row["loss"] for row in run.metrics]
    assert losses[-1] < losses[0]
    assert run.final["knn_top1"] > untrained + 2.0, (untrained, run.final["knn_top1"])
