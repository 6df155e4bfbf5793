"""The book's figure helpers: the pipeline names every stage, the augmentation grid shows the package's own views
(both data paths, reproducibly), and the plotting functions draw one panel per stage with labelled axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from instdisc_lite import load_config  # noqa: E402
from instdisc_lite.data import build_data  # noqa: E402
from instdisc_lite.figures import (  # noqa: E402
    augmented_views,
    circle_snapshots,
    draw_pipeline,
    similarity_histograms,
    unnormalise,
    view_grid,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def npz_bundle(tmp_path):
    """An in-memory bundle (the Fashion-MNIST path) over 32 generated 16x16 grayscale images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images, labels=rng.integers(0, 3, 32))
    values = {"dataset": "npz", "data_path": str(tmp_path / "x.npz"), "train_subset": None, "batch_size": 8,
              "out_dir": str(tmp_path / "runs"), "device": "cpu"}  # fmt: skip
    return build_data(load_config("fashion_mnist_quick", values)), images


def test_pipeline_names_every_stage():
    fig = draw_pipeline()
    text = " ".join(t.get_text() for t in fig.axes[0].texts)
    for stage in ("image", "CNN backbone", "128-d feature", "memory bank", "NCE", "noise", "leftarrow"):
        assert stage in text, f"the pipeline does not show {stage!r}"
    assert len(fig.axes[0].patches) == 5 + 5, "five boxes and five arrows"
    assert fig.axes[0].get_title()


def test_in_memory_views_are_the_bundles_augmentation(npz_bundle):
    data, images = npz_bundle
    torch.manual_seed(123)
    state = torch.get_rng_state()
    originals, views = augmented_views(data, [3, 5], num_views=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left as it was"
    assert originals.shape == (2, 1, 16, 16) and views.shape == (2, 4, 1, 16, 16)
    shown = unnormalise(originals, data.mean, data.std)
    assert torch.allclose(shown[:, 0], torch.as_tensor(images[[3, 5]]).float() / 255, atol=1e-5)
    assert not torch.allclose(views[:, 0], views[:, 1]), "views of one image must differ"
    assert torch.equal(augmented_views(data, [3, 5], 4, seed=7)[1], views), "the same seed gives the same views"
    assert not torch.equal(augmented_views(data, [3, 5], 4, seed=8)[1], views)
    with pytest.raises(ValueError, match="at least one position"):
        augmented_views(data, [], 4)
    fig = view_grid(originals, views, data.mean, data.std, ["a", "b"])
    assert len(fig.axes) == 2 * 5 and fig.axes[0].get_ylabel() == "a"


def test_loader_views_use_the_per_image_transform(tiny_cifar10_config):
    data = build_data(tiny_cifar10_config())
    originals, views = augmented_views(data, [0, 4, 9], num_views=3, seed=1)
    assert originals.shape == (3, 3, 32, 32) and views.shape == (3, 3, 3, 32, 32)
    assert torch.equal(originals[1], data.train_eval_loader.dataset[4][0]), "originals are the un-augmented images"
    assert not torch.allclose(views[:, 0], views[:, 1])
    assert torch.equal(augmented_views(data, [0, 4, 9], 3, seed=1)[1], views)


def test_circle_and_histogram_panels():
    g = torch.Generator().manual_seed(0)
    snaps = {step: F.normalize(torch.randn(10, 2, generator=g), dim=1) for step in (0, 5, 50)}
    fig = circle_snapshots(snaps)
    assert [ax.get_title() for ax in fig.axes] == ["step 0", "step 5", "step 50"]
    assert all(ax.get_xlabel() for ax in fig.axes) and fig.axes[0].get_ylabel()
    stages = {"untrained": torch.rand(50), "trained": torch.rand(50)}
    fig = similarity_histograms(stages, {k: -v for k, v in stages.items()})
    assert [ax.get_title() for ax in fig.axes] == ["untrained", "trained"]
    assert all(len(ax.patches) == 2 * 60 and len(ax.lines) == 2 for ax in fig.axes), "two histograms, two means"
