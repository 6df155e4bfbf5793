"""The book's mode switch (instdisc_lite.book): quick | full | paper | auto, CI's smoke run of full mode, where runs
go, glue without myst-nb, the Colab form and the chapters' expected run times."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from instdisc_lite import book, load_config
from instdisc_lite.book import (
    COLAB_DRIVE_MOUNT,
    COLAB_DRIVE_RUNS,
    FULL_TRAINING_EPOCHS,
    RUNS_DIR_ENV,
    SMOKE_CAP,
    TRAIN_IMAGES,
    book_mode,
    colab_settings,
    expected_times,
    results_files,
    runs_dir,
    shortened,
    training_run_config,
)
from instdisc_lite.schedule import milestone_epochs


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("INSTDISC_BOOK_MODE", raising=False)
    monkeypatch.delenv("INSTDISC_BOOK_SMOKE", raising=False)
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)


def test_auto_is_quick_without_a_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    mode = book_mode()
    assert (mode.name, mode.quick, mode.smoke) == ("quick", True, False)
    assert mode.pick(quick=1, full=2) == 1


def test_environment_chooses_full(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_MODE", "FULL")
    mode = book_mode()
    assert mode.name == "full" and mode.pick(quick=1, full=2) == 2


def test_auto_is_full_on_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    mode = book_mode()
    assert (mode.name, mode.device.type) == ("full", "cuda")


def test_paper_mode_defaults_to_full_where_a_call_gives_no_paper_value():
    paper, full, quick = book_mode("paper"), book_mode("full"), book_mode("quick")
    assert paper.name == "paper" and not paper.quick
    assert paper.pick(quick=1, full=2, paper=3) == 3 and paper.pick(quick=1, full=2) == 2
    assert full.pick(quick=1, full=2, paper=3) == 2 and quick.pick(quick=1, full=2, paper=3) == 1
    assert paper.pick(quick=1, full=2, paper=None) is None, "an explicit None is a value, not 'use full'"


def test_unknown_mode_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_MODE", "fast")
    with pytest.raises(ValueError, match="quick, full, paper, auto"):
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


def test_smoke_run_caps_paper_mode_too(monkeypatch):
    monkeypatch.setenv("INSTDISC_BOOK_SMOKE", "1")
    mode = book_mode("paper")
    assert mode.capped({"epochs": 200, "train_subset": None}) == {k: SMOKE_CAP[k] for k in SMOKE_CAP}


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
    subset = load_config("fashion_mnist_quick", ["train_subset=20000"])  # a subset: the ratio is taken against it
    sizes = shortened(subset, 2 * subset.train_subset)
    assert sizes["train_subset"] == subset.train_subset and sizes["num_negatives"] == subset.num_negatives
    quick = load_config("fashion_mnist_quick")  # all 60,000 images
    assert shortened(quick, 6000)["num_negatives"] == round(quick.num_negatives / 10)
    assert shortened(base, 1)["num_negatives"] == 1, "at least one noise sample"


def test_training_run_config_per_mode(monkeypatch, tmp_path):
    quick = training_run_config(book_mode("quick"), tmp_path)
    assert (quick.dataset, quick.out_dir, quick.progress) == ("fashion_mnist", str(tmp_path), False)
    quick_base = load_config("fashion_mnist_quick")
    assert quick.train_subset < TRAIN_IMAGES["fashion_mnist"] and quick.epochs < quick_base.epochs  # shortened
    assert quick.image_passes is None and quick_base.image_passes  # epochs set: the quick budget gives way
    shipped = load_config("cifar10_resnet18")
    paper = training_run_config(book_mode("paper"), tmp_path)
    assert (paper.dataset, paper.epochs, paper.train_subset, paper.num_negatives) == (
        "cifar10",
        shipped.epochs,
        None,
        4096,
    )
    full = training_run_config(book_mode("full"), tmp_path)
    assert (full.dataset, full.epochs, full.train_subset) == ("cifar10", FULL_TRAINING_EPOCHS, None)
    assert full.epochs < paper.epochs, "full mode is the paper's run, shortened to fit one Colab session"
    # the lr steps sit at the same fractions of the run, so the shortened schedule has the paper's shape
    for f, p in zip(milestone_epochs(full), milestone_epochs(paper), strict=True):
        assert abs(f / full.epochs - p / paper.epochs) <= 1 / full.epochs
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


def test_runs_dir_is_one_directory_per_mode_under_one_setting(monkeypatch, tmp_path):
    assert runs_dir(book_mode("full")) == Path("runs/book/full")
    assert runs_dir(book_mode("quick")) != runs_dir(book_mode("paper")), "modes must not share run directories"
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "drive"))
    assert runs_dir(book_mode("paper")) == tmp_path / "drive" / "book" / "paper"


def test_glue_uses_myst_nb_when_installed(monkeypatch):
    calls = []
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, value, display=True: calls.append((name, value, display))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    book._myst_glue.cache_clear()
    try:
        book.glue("ch0_x", 1.5, display=False)
    finally:
        book._myst_glue.cache_clear()
    assert calls == [("ch0_x", 1.5, False)]


def test_glue_prints_without_myst_nb(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import myst_nb raises ImportError, as on Colab
    book._myst_glue.cache_clear()
    try:
        book.glue("ch0_accuracy", 81.25, display=False)
        book.glue("ch0_shown", 42, display=True)
    finally:
        book._myst_glue.cache_clear()
    assert capsys.readouterr().out.splitlines() == ["ch0_accuracy = 81.25", "42"]


def test_colab_settings_choose_the_mode(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    environ = {RUNS_DIR_ENV: COLAB_DRIVE_RUNS}  # a rerun of the cell with Drive unticked
    settings = colab_settings("Paper", False, environ=environ, mount=lambda path: pytest.fail("no Drive asked"))
    assert settings == {"INSTDISC_BOOK_MODE": "paper"} and environ == settings
    out = capsys.readouterr().out
    assert "paper mode" in out and "no GPU" in out, "paper mode on a CPU runtime deserves a warning"
    colab_settings("quick", False, environ={})
    assert "no GPU" not in capsys.readouterr().out, "quick mode is meant for a CPU"
    environ = {RUNS_DIR_ENV: "/somewhere/else"}  # a runs directory the reader set is not ours to drop
    colab_settings("quick", False, environ=environ)
    assert environ[RUNS_DIR_ENV] == "/somewhere/else"
    with pytest.raises(ValueError, match="quick, full, paper.*form"):
        colab_settings("auto", False, environ={})


def test_colab_settings_keep_runs_on_drive(monkeypatch):
    mounted, environ = [], {}
    settings = colab_settings("full", True, environ=environ, mount=mounted.append)
    assert mounted == [COLAB_DRIVE_MOUNT] and environ == settings
    assert environ == {"INSTDISC_BOOK_MODE": "full", RUNS_DIR_ENV: COLAB_DRIVE_RUNS}
    monkeypatch.setattr(book.os, "environ", environ)
    assert runs_dir(book_mode()) == Path(COLAB_DRIVE_RUNS) / "book" / "full"
    assert "google.colab" not in sys.modules
    with pytest.raises(ImportError):  # off Colab there is no Drive to mount
        colab_settings("full", True, environ={})


@pytest.fixture
def timing_results(tmp_path) -> Path:
    """A results/ with a quick-mode timing and a PROVISIONAL placeholder of perf's runtime_estimates.json (schema
    only: its numbers are made up for this test and are not estimates of anything)."""
    times = {
        "mode": "quick",
        "chapters": {"01_classes_to_instances": {"wall_s": 95.0}, "02_memory_bank": {"wall_s": 40.0}},
        "provenance": {"cpu": {"cores": 2, "model": "test CPU"}, "command": "test"},
    }
    estimates = {
        "assumption": {"provisional": "test placeholder, not an estimate"},
        "chapters": {"01_classes_to_instances": {"full_t4_s_estimate": 1000.0, "paper_t4_s_estimate": 9000.0}},
        "provenance": {"provisional": True},
    }
    (tmp_path / "chapter_times.json").write_text(json.dumps(times))
    (tmp_path / "runtime_estimates.json").write_text(json.dumps(estimates))
    return tmp_path


def test_expected_times_read_measured_and_estimated_seconds(timing_results):
    t = expected_times("01_classes_to_instances", book_mode("full"), results=timing_results)
    assert t.seconds == {"quick": 95.0, "full": 1000.0, "paper": 9000.0}
    table = t._repr_markdown_()
    assert "| quick | about 2 min on a 2-core CPU (measured) |" in table
    assert "| **full** (this run) | about 17 min on a T4 GPU (estimate) |" in table
    assert "| paper | about 2.5 h on a T4 GPU (estimate) |" in table
    assert "<- this run" in str(t) and str(t).count("\n") == 2


def test_expected_times_say_not_measured_yet_where_data_is_missing(timing_results, tmp_path):
    partial = expected_times("02_memory_bank", "quick", results=timing_results)  # timed, but no estimate yet
    assert partial.seconds == {"quick": 40.0, "full": None, "paper": None}
    assert [text for _, text in partial.rows()][1:] == ["not measured yet"] * 2
    nothing = expected_times("01_classes_to_instances", results=tmp_path / "absent")  # no results/ (Colab)
    assert set(nothing.seconds.values()) == {None} and "not measured yet" in nothing._repr_markdown_()
    (timing_results / "runtime_estimates.json").write_text("{not json")
    with pytest.raises(ValueError, match="runtime_estimates.json is not valid JSON"):
        expected_times("01_classes_to_instances", results=timing_results)
