"""Your own data: ``dataset: npz`` and ``dataset: folder``, with or without labels or a test set, trained end to end;
``python -m instdisc_lite embed`` writes a trained run's features; bad files are one clear line each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from instdisc_lite import load_config, train
from instdisc_lite.__main__ import main
from instdisc_lite.checkpoint import CheckpointError
from instdisc_lite.config import DATASETS, OWN_DATASETS
from instdisc_lite.data import (
    OWN_DATA,
    UNLABELLED,
    BatchAugment,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
    build_data,
    scan_image_folder,
)
from instdisc_lite.evaluate import extract_features
from instdisc_lite.views import rgb_to_lab

N, N_TEST, SIDE = 128, 40, 16  # tiny: a run of one epoch takes about a second


def class_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images whose brightness depends on the class (anything learnable would do)."""
    base = (40 + 50 * labels).reshape(-1, *([1] * len(shape)))
    return (base + rng.integers(0, 60, size=(len(labels), *shape))).clip(0, 255).astype(np.uint8)


def save_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict:
    """Generated datasets: labelled grayscale npz (+ test), unlabelled RGB npz, labelled RGB folder (+ test) of
    mixed sizes, unlabelled grayscale folder."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    raw_classes = np.array([3, 7, 11, 20])  # any integers: mapped to 0..3 in sorted order
    y, y_test = raw_classes[rng.integers(0, 4, N)], raw_classes[rng.integers(0, 4, N_TEST)]
    np.savez(root / "gray.npz", images=class_images(rng, np.searchsorted(raw_classes, y), (SIDE, SIDE)), labels=y)
    test_x = class_images(rng, np.searchsorted(raw_classes, y_test), (SIDE, SIDE))
    np.savez(root / "gray_test.npz", images=test_x, labels=y_test)
    np.savez(root / "rgb.npz", images=rng.integers(0, 256, size=(N, SIDE, SIDE, 3), dtype=np.uint8))
    for split, per_class in (("train", 8), ("test", 3)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):  # landscape and portrait images: resized and centre-cropped to one size
                shape = (20, 28, 3) if i % 2 else (28, 20, 3)
                save_png(root / "folder" / split / name / f"{i:02d}.png", class_images(rng, np.array([c]), shape)[0])
    for i in range(16):
        save_png(root / "loose" / f"{i:02d}.png", rng.integers(0, 256, size=(18, 18), dtype=np.uint8))
    return {"root": root, "y": y, "y_test": y_test, "test_x": test_x}


def config(tmp_path, **overrides):
    values = dict(arch="small_cnn_fast", train_subset=None, batch_size=64, epochs=1, eval_every=1, knn_k=20,
                  out_dir=str(tmp_path / "runs"), device="cpu", progress=False)  # fmt: skip
    return load_config("fashion_mnist_quick", {**values, **overrides})


def npz(own, tmp_path, test: bool = True, **overrides):
    paths = {"data_path": str(own["root"] / "gray.npz")}
    if test:
        paths["test_path"] = str(own["root"] / "gray_test.npz")
    return config(tmp_path, dataset="npz", **{**paths, **overrides})


def folder(own, tmp_path, **overrides):
    paths = {"data_path": str(own["root"] / "folder" / "train"), "test_path": str(own["root"] / "folder" / "test")}
    return config(tmp_path, dataset="folder", image_size=12, batch_size=8, **{**paths, **overrides})


# ------------------------------------------------------------------------------------------------
# build_data
# ------------------------------------------------------------------------------------------------


def test_every_own_dataset_has_a_reader():
    assert set(OWN_DATA) == set(OWN_DATASETS) and set(OWN_DATASETS) <= set(DATASETS)


def test_npz_grayscale_with_labels_and_test_set(own, tmp_path):
    bundle = build_data(npz(own, tmp_path))
    assert (bundle.num_train, bundle.num_test, bundle.in_channels, bundle.num_classes) == (N, N_TEST, 1, 4)
    assert torch.equal(bundle.train_labels, torch.from_numpy(np.searchsorted([3, 7, 11, 20], own["y"])))
    assert bundle.knn_unavailable is None
    images, labels, indices = next(iter(bundle.test_loader))
    assert images.shape == (N_TEST, 1, SIDE, SIDE) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], torch.from_numpy(own["test_x"])) and indices.tolist() == list(range(N_TEST))
    assert labels.tolist() == np.searchsorted([3, 7, 11, 20], own["y_test"]).tolist()
    pixels = np.load(own["root"] / "gray.npz")["images"] / 255.0  # normalised with the training images' own stats
    assert bundle.mean == pytest.approx((pixels.mean(),)) and bundle.std == pytest.approx((pixels.std(),))
    normalised = bundle.eval_transform(next(iter(bundle.train_eval_loader))[0])
    assert abs(normalised.mean().item()) < 1e-4 and normalised.std().item() == pytest.approx(1.0, abs=1e-3)
    batch = next(iter(bundle.train_loader))[0]
    assert batch.shape == (64, 1, SIDE, SIDE) and bundle.views(batch)[0].shape == (64, 1, SIDE, SIDE)
    # the quick recipe does not flip (a mirrored digit or letter is another symbol); `flip: true` turns it on
    assert isinstance(bundle.train_augment, BatchAugment) and bundle.train_augment.flip is False


def test_npz_rgb_without_labels_or_test_set(own, tmp_path):
    bundle = build_data(config(tmp_path, dataset="npz", data_path=str(own["root"] / "rgb.npz"), flip=False,
                               image_size=8, train_subset=100))  # fmt: skip
    assert (bundle.num_train, bundle.in_channels, bundle.num_classes, bundle.num_test) == (100, 3, 0, 0)
    assert bundle.train_labels is None and bundle.test_loader is None and "no labels" in bundle.knn_unavailable
    images, labels, _ = next(iter(bundle.train_eval_loader))
    assert images.shape == (100, 3, 8, 8) and (labels == UNLABELLED).all()  # channels last -> first, resized
    assert len(bundle.mean) == len(bundle.std) == 3 and bundle.train_augment.flip is False


def test_folder_labelled_by_class_folders(own, tmp_path):
    bundle = build_data(folder(own, tmp_path, train_subset=8, eval_subset=4))
    assert (bundle.num_train, bundle.num_test, bundle.in_channels, bundle.num_classes) == (8, 4, 3, 2)
    assert bundle.train_labels.tolist() == [0, 1] * 4  # the subset takes the classes in turn, not all cats first
    assert next(iter(bundle.test_loader))[1].tolist() == [0, 1, 0, 1]
    assert next(iter(bundle.train_eval_loader))[0].shape == (8, 3, 12, 12)
    files, classes = scan_image_folder(own["root"] / "folder" / "train")
    assert [f.name for f in files[:2]] == ["00.png", "01.png"] and classes == ["cat"] * 8 + ["dog"] * 8


def test_folder_without_class_folders_is_unlabelled_grayscale(own, tmp_path):
    bundle = build_data(config(tmp_path, dataset="folder", data_path=str(own["root"] / "loose"), image_size=10,
                               batch_size=8))  # fmt: skip
    assert (bundle.num_train, bundle.in_channels, bundle.train_labels) == (16, 1, None)
    one_class = build_data(folder(own, tmp_path, data_path=str(own["root"] / "folder" / "train" / "cat")))
    assert one_class.train_labels is None and one_class.knn_unavailable == "the training images have no labels"


# ------------------------------------------------------------------------------------------------
# Training, with and without labels
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_run(own, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labelled")
    return train(npz(own, tmp, name="gray"))


def test_labelled_run_scores_the_knn(labelled_run):
    metrics = labelled_run.metrics[-1]
    assert 0 <= metrics["knn_top1"] <= 100 and 0 <= labelled_run.final["knn_top1"] <= 100
    result = json.loads((labelled_run.run_dir / "results.json").read_text())
    assert result["final_knn_top1"] == labelled_run.final["knn_top1"] and "knn_skipped" not in result


@pytest.mark.parametrize("kind", ["npz_rgb", "folder_gray", "npz_no_test"])
def test_run_without_a_scorable_knn_trains_and_says_why(kind, own, tmp_path, capsys):
    configs = {
        "npz_rgb": lambda: config(tmp_path, dataset="npz", data_path=str(own["root"] / "rgb.npz"), progress=True),
        "folder_gray": lambda: config(
            tmp_path, dataset="folder", data_path=str(own["root"] / "loose"), image_size=10, batch_size=8, progress=True
        ),
        "npz_no_test": lambda: npz(own, tmp_path, test=False, progress=True),
    }
    run = train(configs[kind]())
    reason = {"npz_rgb": "no labels", "folder_gray": "no labels", "npz_no_test": "no test set"}[kind]
    assert math.isfinite(run.metrics[-1]["loss"]) and "knn_top1" not in run.metrics[-1] and run.final == {}
    result = json.loads((run.run_dir / "results.json").read_text())
    assert result["final_knn_top1"] is None and reason in result["knn_skipped"]
    assert capsys.readouterr().out.count("no kNN evaluation") == 1


def test_labelled_folder_run(own, tmp_path):
    run = train(folder(own, tmp_path))
    assert 0 <= run.final["knn_top1"] <= 100 and run.data.num_classes == 2


def test_cmc_on_own_colour_images_undoes_their_own_normalisation(own, tmp_path):
    # CMC's Lab views must undo the (rgb - mean) / std the images arrive with: for own data that is their own
    # statistics, which no dataset name can supply
    run = train(folder(own, tmp_path, method="cmc", objective="softmax", low_dim=16))
    split = run.method.encoder.split
    assert split.names == ("L", "ab") and run.data.in_channels == 3
    assert torch.allclose(split.mean.flatten(), torch.tensor(run.data.mean)), "Lab must undo the data's own mean"
    assert torch.allclose(split.std.flatten(), torch.tensor(run.data.std)), "Lab must undo the data's own std"
    images = next(iter(run.data.train_eval_loader))[0][:4].float() / 255  # raw pixels in [0, 1]
    normalised = (images - split.mean) / split.std
    lightness, _ = split(normalised)
    assert torch.allclose(lightness, (rgb_to_lab(images)[:, :1] - 50) / 50, atol=1e-4), "L of the raw pixels"
    assert math.isfinite(run.metrics[-1]["loss"])


# ------------------------------------------------------------------------------------------------
# embed
# ------------------------------------------------------------------------------------------------


def test_embed_writes_the_runs_unit_features_in_dataset_order(labelled_run, tmp_path, capsys):
    out = tmp_path / "features.npy"
    assert main(["embed", "--run", str(labelled_run.run_dir), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [N, 128]
    features = np.load(out)
    assert features.shape == (N, 128) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    data = labelled_run.data  # the trained encoder in memory, against the one embed loaded from the checkpoint
    expected, _ = extract_features(labelled_run.encoder, data.train_eval_loader, "cpu", data.eval_transform)
    assert torch.allclose(torch.from_numpy(features), F.normalize(expected, dim=1), atol=1e-5)
    test_out = tmp_path / "test.npy"
    assert main(["embed", "--run", str(labelled_run.run_dir), "--out", str(test_out), "--split", "test"]) == 0
    assert np.load(test_out).shape == (N_TEST, 128)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def embed_error(capsys, *args: str) -> str:
    assert main(["embed", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured.err
    return lines[0]


def test_embed_errors_are_one_line(labelled_run, own, tmp_path, capsys):
    run = str(labelled_run.run_dir)
    out = str(tmp_path / "f.npy")
    assert "no run directory" in embed_error(capsys, "--run", str(tmp_path / "nope"), "--out", out)
    no_checkpoint = tmp_path / "runs" / "empty"
    no_checkpoint.mkdir(parents=True)
    (no_checkpoint / "config.yaml").write_text((labelled_run.run_dir / "config.yaml").read_text())
    assert "no checkpoint at" in embed_error(capsys, "--run", str(no_checkpoint), "--out", out)
    assert "does not exist" in embed_error(capsys, "--run", run, "--out", str(tmp_path / "missing" / "f.npy"))
    assert ".npy" in embed_error(capsys, "--run", run, "--out", str(tmp_path / "f.txt"))
    (tmp_path / "dir.npy").mkdir()
    assert "is a directory" in embed_error(capsys, "--run", run, "--out", str(tmp_path / "dir.npy"))
    # a run without a test set has nothing to embed for --split test
    no_test = train(npz(own, tmp_path, test=False, name="no_test"))
    assert "no test set" in embed_error(capsys, "--run", str(no_test.run_dir), "--out", out, "--split", "test")


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what is expected
# ------------------------------------------------------------------------------------------------

BAD_NPZ = {
    "float images": (dict(images=np.zeros((4, 8, 8), np.float32)), "float32", DatasetCorruptError),
    "rank 2": (dict(images=np.zeros((4, 8), np.uint8)), "(N, H, W)", DatasetCorruptError),
    "channels first": (dict(images=np.zeros((4, 3, 8, 8), np.uint8)), "numpy.transpose", DatasetCorruptError),
    "four channels": (dict(images=np.zeros((4, 8, 8, 4), np.uint8)), "C = 1", DatasetCorruptError),
    "no images": (dict(images=np.zeros((0, 8, 8), np.uint8)), "no pixels", DatasetCorruptError),
    "no images key": (dict(pixels=np.zeros((4, 8, 8), np.uint8)), "no 'images'", DatasetCorruptError),
    "labels length": (
        dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(3)),
        "one label",
        DatasetCorruptError,
    ),
    "float labels": (dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4)), "integers", DatasetCorruptError),
    "object labels": (
        dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.array([1, "a"] * 2, dtype=object)),
        "not a readable .npz",
        DatasetCorruptError,
    ),
}


def one_line_error(error_type, make, *words: str) -> None:
    with pytest.raises(error_type) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("case", BAD_NPZ)
def test_bad_npz_is_one_clear_line(case, tmp_path):
    arrays, words, error_type = BAD_NPZ[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # (an object array is pickled into the file; reading it back is refused)
    make = config(tmp_path, dataset="npz", data_path=str(path), batch_size=1)
    one_line_error(error_type, lambda: build_data(make), str(path), words)


def test_missing_or_foreign_npz_files(tmp_path, own):
    missing = tmp_path / "missing.npz"
    for key in ("data_path", "test_path"):  # the message names the key, the file and what it should hold
        bad = npz(own, tmp_path, **{key: str(missing)})
        one_line_error(DatasetNotFoundError, lambda c=bad: build_data(c), key, str(missing), "'images' (N, H, W)")
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    one_line_error(DatasetCorruptError, lambda: build_data(npz(own, tmp_path, data_path=str(text))), str(text))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros((4, 8, 8), np.uint8))
    one_line_error(DatasetCorruptError, lambda: build_data(npz(own, tmp_path, data_path=str(single))), "single")
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    one_line_error(DatasetError, lambda: build_data(npz(own, tmp_path, test_path=str(small))), "(1, 8, 8)", "match")


def test_bad_folders_are_one_clear_line(tmp_path, own):
    def build(path):
        return lambda: build_data(config(tmp_path, dataset="folder", data_path=str(path), image_size=8, batch_size=1))

    one_line_error(DatasetNotFoundError, build(tmp_path / "nowhere"), str(tmp_path / "nowhere"), "not found")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    one_line_error(DatasetError, build(empty), str(empty), "no images", ".png")
    broken = tmp_path / "broken"
    save_png(broken / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    (broken / "b").mkdir()
    (broken / "b" / "bad.png").write_bytes(b"not a png")
    one_line_error(DatasetCorruptError, build(broken), str(broken / "b" / "bad.png"), "not a readable image")
    truncated = tmp_path / "truncated"
    save_png(truncated / "a.png", np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    data = (truncated / "a.png").read_bytes()
    (truncated / "a.png").write_bytes(data[: len(data) // 2])
    one_line_error(DatasetCorruptError, build(truncated), str(truncated / "a.png"))
    mixed = tmp_path / "mixed"
    save_png(mixed / "loose.png", np.zeros((8, 8), np.uint8))
    save_png(mixed / "a" / "x.png", np.zeros((8, 8), np.uint8))
    one_line_error(DatasetError, build(mixed), str(mixed), "both directly")


def test_cli_train_reports_a_missing_npz_in_one_line(tmp_path, capsys):
    missing = tmp_path / "mine.npz"
    code = main(["train", "--config", "fashion_mnist_quick", "--set", "dataset=npz", f"data_path={missing}",
                 f"out_dir={tmp_path / 'runs'}", "device=cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and len(captured.err.splitlines()) == 1 and str(missing) in captured.err


def test_a_resumed_budget_keeps_the_epochs_it_resolved_to_on_other_data(own, tmp_path):
    """``image_passes`` is resolved once, when the run starts: a resume given data of another size (``data_path``
    may move) keeps those epochs, and so its lr milestones. SimCLR holds nothing of the data's size, so only this
    rule keeps the schedule; a bank run's checkpoint refuses other data outright, naming the cause."""
    small = tmp_path / "half.npz"
    with np.load(own["root"] / "gray.npz") as full:
        np.savez(small, images=full["images"][: N // 2], labels=full["labels"][: N // 2])
    values = dict(arch="small_cnn_fast", train_subset=None, batch_size=32, eval_every=100, out_dir=str(tmp_path),
                  device="cpu", progress=False, dataset="npz", data_path=str(own["root"] / "gray.npz"),
                  max_steps_per_epoch=1, image_passes=3 * N)  # fmt: skip
    first = train("simclr_fashion_mnist_quick", {**values, "name": "simclr"}, stop_after=1, final_eval=False)
    assert first.config.epochs == 3  # round(3 N / N)
    resumed = train("simclr_fashion_mnist_quick", {**values, "name": "simclr", "data_path": str(small)},
                    resume=True, stop_after=2, final_eval=False)  # fmt: skip
    assert (resumed.config.epochs, resumed.epoch) == (3, 2)  # not round(3 N / (N / 2)) = 6
    train("fashion_mnist_quick", {**values, "name": "bank"}, stop_after=1, final_eval=False)
    with pytest.raises(CheckpointError, match="data of another size"):
        train("fashion_mnist_quick", {**values, "name": "bank", "data_path": str(small)}, resume=True)
