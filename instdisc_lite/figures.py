"""Figures the book draws in more than a few lines: the method's pipeline, augmented views, points on a circle,
similarity histograms.

Each function returns its matplotlib ``Figure`` (the caller shows it), titles it and labels its axes. The data
they draw come from the package itself: :func:`augmented_views` runs a run's own training augmentation
(:meth:`~instdisc_lite.data.DataBundle.views` for in-memory data, the loader's per-image transform otherwise),
so a figure shows exactly the views that training treats as one instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from .data import DataBundle, TensorBatchLoader, epoch_seed, seeded_rng

# the pipeline diagram: name -> (centre x, centre y, width, text); the axes span [0, 12] x [0, 4]
_PIPELINE_BOXES = {
    "image": (1.1, 3.0, 2.0, "image $x_i$\n(an augmented view)"),
    "cnn": (3.6, 3.0, 1.8, "CNN backbone\n$f_\\theta$"),
    "feature": (6.4, 3.0, 2.8, "128-d feature, unit length\n$f_i = f_\\theta(x_i) / \\|f_\\theta(x_i)\\|$"),
    "score": (10.1, 3.0, 3.2, "scores $v_j^\\top f_i / \\tau$ against\nits row $v_i$ and noise rows $v_j$:\n"
              "non-parametric softmax\n(eq. 2) or NCE loss"),
    "bank": (8.2, 0.8, 3.0, "memory bank $V$\n$n \\times 128$, one row per image"),
}  # fmt: skip
_BOX_HEIGHT = 1.25


def draw_pipeline(figsize: tuple[float, float] = (11.0, 4.0)) -> Figure:
    """InstDisc's pipeline as boxes and arrows, after the paper's Figure 2: image -> CNN -> 128-d unit feature ->
    scores against the memory bank's row of the image and noise rows (non-parametric softmax, eq. 2, or NCE) -> the
    bank's row of the image refreshed with the new feature."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.set(xlim=(0, 12), ylim=(0, 4), title="InstDisc: from an image to its loss, and back into the memory bank")
    ax.axis("off")  # a diagram: the axes carry no quantity
    for x, y, w, text in _PIPELINE_BOXES.values():
        ax.add_patch(FancyBboxPatch((x - w / 2, y - _BOX_HEIGHT / 2), w, _BOX_HEIGHT, boxstyle="round,pad=0.06",
                                    fc="#e8eef7", ec="#3b5b92"))  # fmt: skip
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def edge(name: str, side: str) -> tuple[float, float]:
        x, y, w, _ = _PIPELINE_BOXES[name]
        dx = {"left": -w / 2 - 0.08, "right": w / 2 + 0.08}.get(side, 0.0)
        dy = {"top": _BOX_HEIGHT / 2 + 0.08, "bottom": -_BOX_HEIGHT / 2 - 0.08}.get(side, 0.0)
        return x + dx, y + dy

    def arrow(a: tuple[float, float], b: tuple[float, float], dashed: bool = False) -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.4, color="#333333",
                                     linestyle="--" if dashed else "-"))  # fmt: skip

    for a, b in (("image", "cnn"), ("cnn", "feature"), ("feature", "score")):
        arrow(edge(a, "right"), edge(b, "left"))
    # the bank is read (the image's own row v_i and noise rows v_j) and written (row i refreshed with f_i)
    bank_x, bank_y, bank_w, _ = _PIPELINE_BOXES["bank"]
    top = bank_y + _BOX_HEIGHT / 2 + 0.08
    arrow((bank_x + 0.35 * bank_w, top), (_PIPELINE_BOXES["score"][0], edge("score", "bottom")[1]))
    ax.text(bank_x + 0.3 * bank_w, 2.0, "read $v_i$ and\nnoise rows $v_j$", fontsize=8, ha="right", va="center")
    arrow((_PIPELINE_BOXES["feature"][0], edge("feature", "bottom")[1]), (bank_x - 0.35 * bank_w, top), dashed=True)
    ax.text(6.2, 1.6, "write: $v_i \\leftarrow f_i$\n(mixed with the old row)", fontsize=8, ha="right", va="center")
    return fig


def unnormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images ``(..., C, H, W)`` back to [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


@torch.no_grad()
def augmented_views(
    data: DataBundle, positions: Sequence[int], num_views: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images and ``num_views`` augmented views of each, through ``data``'s own training augmentation.

    Returns ``(originals (B, C, H, W), views (B, V, C, H, W))``, both normalised as the encoder sees them (undo with
    :func:`unnormalise` and ``data.mean`` / ``data.std``); ``positions`` are bank rows. In-memory data (Fashion-MNIST)
    is augmented by :meth:`DataBundle.views` on the raw batch; loader data (CIFAR-10, ImageNet) by the loader's
    per-image transform, view v drawn as a run with seed ``seed`` draws it in epoch v. The result is a function of
    ``seed``; the global RNG is left as it was.
    """
    positions = list(positions)
    if not positions or num_views < 1:
        raise ValueError(f"augmented_views needs at least one position and one view, got {positions} and {num_views}")
    loader = data.train_loader
    if isinstance(loader, TensorBatchLoader):
        raw = loader.data[torch.as_tensor(positions)]
        raw = raw.unsqueeze(1) if raw.dim() == 3 else raw
        raw = raw.to(next(data.train_augment.buffers(), raw).device)  # where the run augments (its device)
        with seeded_rng(seed):
            views = data.views(raw, num_views)
        return data.eval_transform(raw).cpu(), torch.stack(views, dim=1).cpu()
    dataset = loader.dataset  # SeededItems: item (seed, i) is image i augmented under item_seed(seed, i)
    originals = torch.stack([data.train_eval_loader.dataset[i][0] for i in positions])
    per_image = []
    for i in positions:
        drawn = [torch.as_tensor(dataset[(epoch_seed(seed, v), i)][0]) for v in range(num_views)]
        drawn = [d[0] if d.dim() == 4 else d for d in drawn]  # a MultiView transform: its first view
        per_image.append(torch.stack([data.train_augment(d[None])[0] for d in drawn]))
    return data.eval_transform(originals), torch.stack(per_image)


def view_grid(
    originals: torch.Tensor,
    views: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    row_labels: Sequence[str] | None = None,
    title: str = "Augmented views of each image: one instance each",
) -> Figure:
    """One row per image: the image, then its views. ``originals (B, C, H, W)`` and ``views (B, V, C, H, W)``
    normalised with ``mean`` / ``std`` (as :func:`augmented_views` returns them)."""
    b, v = views.shape[:2]
    fig, axes = plt.subplots(b, v + 1, figsize=(1.05 * (v + 1), 1.15 * b), squeeze=False)
    for row in range(b):
        shown = [originals[row], *views[row]]
        for col, img in enumerate(shown):
            ax = axes[row, col]
            pixels = unnormalise(img.cpu().float(), mean, std).permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        label = row_labels[row] if row_labels is not None else f"image {row}"
        axes[row, 0].set_ylabel(label, fontsize=7)
    axes[0, 0].set_title("original", fontsize=8)
    for col in range(1, v + 1):
        axes[0, col].set_title(f"view {col}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("un-augmented image, then random augmentations of it", fontsize=8)
    fig.tight_layout()
    return fig


def circle_snapshots(snapshots: Mapping[int, torch.Tensor], title: str = "Instances on the unit circle") -> Figure:
    """Small multiples of 2-d unit features: ``snapshots`` maps a training step to ``(n, 2)`` points, each drawn on
    the unit circle and coloured by its index (the same instance keeps its colour across panels)."""
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.3 * len(snapshots), 2.6), squeeze=False)
    circle = torch.linspace(0, 2 * torch.pi, 200)
    for ax, (step, points) in zip(axes[0], snapshots.items(), strict=True):
        ax.plot(circle.cos(), circle.sin(), color="lightgray", lw=1)
        colours = plt.cm.hsv(torch.linspace(0, 0.9, len(points)).numpy())
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=14, zorder=3)
        ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), aspect="equal", title=f"step {step}", xlabel="$f_1$")
        ax.set_xticks([-1, 0, 1]), ax.set_yticks([-1, 0, 1])
    axes[0, 0].set_ylabel("$f_2$")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def similarity_histograms(
    positives: Mapping[str, torch.Tensor], negatives: Mapping[str, torch.Tensor], bins: int = 60
) -> Figure:
    """One panel per stage (the keys, e.g. "untrained", "trained"): histograms of the cosine similarities of
    positive pairs (two views of one image) and of negative pairs (two different images), with their means dashed.
    Each panel has its own density scale: an untrained encoder puts every pair into one or two bins."""
    fig, axes = plt.subplots(1, len(positives), figsize=(4.2 * len(positives), 3.2), squeeze=False)
    edges = torch.linspace(-1, 1, bins + 1).numpy()
    for ax, stage in zip(axes[0], positives, strict=True):
        for pairs, colour, name in (
            (negatives[stage], "tab:gray", "negatives"),
            (positives[stage], "tab:blue", "positives"),
        ):
            ax.hist(pairs.numpy(), bins=edges, density=True, alpha=0.55, color=colour, label=name)
            ax.axvline(pairs.mean().item(), color=colour, linestyle="--", lw=1.2, label=f"mean of the {name}")
        ax.set(title=stage, xlabel="cosine similarity", ylabel="density")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Positive pairs (two views of one image) and negative pairs (two images)", fontsize=10)
    fig.tight_layout()
    return fig
