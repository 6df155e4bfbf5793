"""benchmarks/quality.py on your own data: the learned features and the pixel baselines on a generated npz, the
result file with its provenance, and one clear error where the data cannot be scored."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stripes(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """16x16 uint8 images: class 0 horizontal stripes, class 1 vertical ones, with noise."""
    grid = (np.arange(16) // 2 % 2) * 150
    pattern = np.stack([np.repeat(grid[:, None], 16, 1), np.repeat(grid[None, :], 16, 0)])
    return (pattern[labels] + rng.integers(0, 80, (len(labels), 16, 16))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(0)
    y, y_test = rng.integers(0, 2, 96), rng.integers(0, 2, 40)
    np.savez(root / "train.npz", images=stripes(rng, y), labels=y + 5)  # any integer labels
    np.savez(root / "test.npz", images=stripes(rng, y_test), labels=y_test + 5)
    np.savez(root / "unlabelled.npz", images=stripes(rng, y))
    return root / "train.npz", root / "test.npz", root / "unlabelled.npz"


TINY = ["epochs=1", "batch_size=32", "eval_every=5", "num_negatives=16"]


def test_own_npz_scored_against_its_pixels(quality, npz_pair, tmp_path, monkeypatch) -> None:
    train, test, _ = npz_pair
    monkeypatch.chdir(tmp_path)  # the run directory goes under runs/ here
    out = tmp_path / "q.json"
    overrides = ["dataset=npz", f"data_path={train}", f"test_path={test}", "train_subset=64", *TINY]
    result = quality.main(["--set", *overrides, "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["knn_top1"] == result["knn_top1"]
    assert stored["knn"]["train_images"] == 96 and stored["knn"]["test_images"] == 40  # all, not train_subset
    assert stored["dataset"] == str(train)
    assert stored["config"]["dataset"] == "npz" and stored["provenance"]["torch"] == torch.__version__
    assert set(stored["knn_top1"]) == {"learned", "raw_pixels", "pca128"}
    # stripes are told apart by their pixels: the baselines must score them (a broken baseline would not)
    assert stored["knn_top1"]["raw_pixels"] > 90 and stored["knn_top1"]["pca128"] > 90
    assert 0 <= stored["knn_top1"]["learned"] <= 100


def test_stored_config_holds_the_epochs_a_budget_came_to(quality, npz_pair, tmp_path, monkeypatch) -> None:
    train, test, _ = npz_pair
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q.json"
    tiny = [t for t in TINY if not t.startswith("epochs=")]
    overrides = ["dataset=npz", f"data_path={train}", f"test_path={test}", "train_subset=64", *tiny]
    quality.main(["--set", *overrides, "image_passes=128", "--skip-baselines", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["config"]["image_passes"] == 128
    assert stored["config"]["epochs"] == len(stored["epochs"]) == 2  # 128 passes of 64 images, not the YAML's 30


def test_pixel_baselines_match_a_direct_computation(quality) -> None:
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.integers(0, 3, 60))
    x = torch.from_numpy(rng.integers(0, 256, (60, 6, 6), dtype=np.uint8))
    got = quality.pixel_baselines(x[:40], y[:40], x[40:], y[40:], dim=8)
    flat = x.flatten(1).float() / 255
    assert got["raw_pixels"] == quality.knn(flat[:40], y[:40], flat[40:], y[40:])
    centred = flat[:40].double() - flat[:40].double().mean(0)
    u, s, vt = torch.linalg.svd(centred, full_matrices=False)  # PCA by SVD: the same 8 directions (up to sign)
    proj = vt[:8].T
    mean = flat[:40].double().mean(0)
    pca = quality.knn(((flat[:40] - mean) @ proj).float(), y[:40], ((flat[40:] - mean) @ proj).float(), y[40:])
    assert got["pca8"] == pytest.approx(pca, abs=1e-6)


def test_unscorable_data_is_one_clear_error(quality, npz_pair, tmp_path, monkeypatch) -> None:
    train, test, unlabelled = npz_pair
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="labelled training and test images"):
        quality.main(["--set", "dataset=npz", f"data_path={unlabelled}", *TINY])
    with pytest.raises(SystemExit, match="labelled training and test images"):
        quality.main(["--set", "dataset=npz", f"data_path={train}", *TINY])  # no test_path
    with pytest.raises(SystemExit, match="dataset 'cifar10'"):
        quality.main(["--config", "cifar10_resnet18"])
