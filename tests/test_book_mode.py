"""The book's mode switch (instdisc_lite.book): quick | full | auto, and CI's smoke run of full mode."""

from __future__ import annotations

import pytest

from instdisc_lite import load_config
from instdisc_lite.book import SMOKE_CAP, book_mode, results_files, shortened, training_run_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("INSTDISC_BOOK_MODE", raising=False)
    monkeypatch.delenv("INSTDISC_BOOK_SMOKE", raising=False)


def test_auto_is_quick_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    mode = book_mode()
    assert (mode.name, mode.quick, mode.smoke) == ("quick", True, False)
    assert mode.pick(quick=1, full=2) == 1


def test_environment_chooses_full(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_MODE", "FULL")
    mode = book_mode()
    assert mode.name == "full" and mode.pick(quick=1, full=2) == 2


def test_unknown_mode_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_MODE", "fast")
    with pytest.raises(ValueError, match="quick, full, auto"):
        book_mode()


def test_capped_is_identity_outside_a_smoke_run():
    sizes = {"epochs": 200, "train_subset": None, "lr": 0.03}
    assert book_mode("full").capped(sizes) == sizes


def test_smoke_run_caps_every_training_run(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_SMOKE", "1")
    mode = book_mode("full")
    assert mode.smoke and not mode.quick and "smoke" in str(mode)
    sizes = {"epochs": 200, "train_subset": None, "lr": 0.03}
    capped = mode.capped(sizes)
    assert capped == {**SMOKE_CAP, "lr": 0.03}, "every cap applies, other keys pass through"
    assert sizes["epochs"] == 200, "the caller's dict must not be modified"
    assert mode.capped({"epochs": 1})["epochs"] == 1, "a smaller value is kept"
    assert mode.capped({"epochs": 0})["epochs"] == 0, "zero epochs (an untrained baseline) stays zero"


def test_smoke_run_needs_full_mode(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_SMOKE", "1")
    with pytest.raises(ValueError, match="INSTDISC_BOOK_MODE=full"):
        book_mode("quick")
    monkeypatch.setenv("INSTDISC_BOOK_SMOKE", "yes")
    with pytest.raises(ValueError, match="0 or 1"):
        book_mode("full")


def test_shortened_keeps_the_noise_ratio():
    base = load_config("cifar10_resnet18")  # all 50,000 images, m = 4096
    sizes = shortened(base, 5000, epochs=3)
    assert sizes == {"train_subset": 5000, "num_negatives": 410, "epochs": 3}
    quick = load_config("fashion_mnist_quick")  # already a subset: the ratio is taken against it
    sizes = shortened(quick, 2 * quick.train_subset)
    assert sizes["train_subset"] == quick.train_subset and sizes["num_negatives"] == quick.num_negatives
    assert shortened(base, 1)["num_negatives"] == 1, "at least one noise sample"


def test_training_run_config_per_mode(monkeypatch, tmp_path):
    quick = training_run_config(book_mode("quick"), tmp_path)
    assert (quick.dataset, quick.out_dir, quick.progress) == ("fashion_mnist", str(tmp_path), False)
    assert quick.train_subset < load_config("fashion_mnist_quick").train_subset
    full = training_run_config(book_mode("full"), tmp_path)
    paper = load_config("cifar10_resnet18")
    assert (full.dataset, full.epochs, full.train_subset, full.num_negatives) == ("cifar10", paper.epochs, None, 4096)
    monkeypatch.setenv("INSTDISC_BOOK_SMOKE", "1")
    smoke = training_run_config(book_mode("full"), tmp_path)
    assert (smoke.epochs, smoke.train_subset, smoke.eval_subset) == tuple(
        SMOKE_CAP[k] for k in ("epochs", "train_subset", "eval_subset")
    )


def test_results_files_found_from_the_root_or_from_book(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "book").mkdir()
    for name in ("objectives_cpu.json", "quality.json", "objectives_cuda.json"):
        (tmp_path / "results" / name).write_text("{}")
    for cwd in (tmp_path, tmp_path / "book"):
        monkeypatch.chdir(cwd)
        found = [p.name for p in results_files("objectives_*.json")]
        assert found == ["objectives_cpu.json", "objectives_cuda.json"]
    (tmp_path / "book" / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "book" / "deeper")  # neither results/ nor ../results/ here
    assert results_files("quality.json") == []
