"""Is the quick config any good? Learned features against pixel baselines, on Fashion-MNIST or on your own data.

Trains ``fashion_mnist_quick`` (or ``--config``) from scratch, overwriting its run directory, then
reports weighted-kNN top-1 (k = 200, tau = 0.07, :func:`instdisc_lite.evaluate.weighted_knn`) of all the
test images against all the training images (Fashion-MNIST: 10,000 against 60,000) for

* the learned features: recomputed for every training image, without augmentation (even when the
  run trained on ``train_subset`` images only);
* raw pixels: flattened images in [0, 1] (L2-normalised inside ``weighted_knn``);
* PCA-128 of the pixels: the top 128 principal directions of the centred training images.

"wall" is training plus the evaluation of the learned features (the baselines are not counted).

    python benchmarks/quality.py                         # the shipped quick config
    python benchmarks/quality.py --set epochs=5 lr=0.06  # overrides, as for `python -m instdisc_lite train`
    python benchmarks/quality.py --set dataset=npz data_path=train.npz test_path=test.npz \
        --out results/quality_mine.json                  # the same recipe on your own labelled images

Writes ``results/quality.json`` (figures, per-epoch metrics, the resolved config and provenance).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from instdisc_lite.config import TrainConfig, load_config  # noqa: E402
from instdisc_lite.data import OWN_DATA, FashionMNIST, TensorBatchLoader, encode_labels  # noqa: E402
from instdisc_lite.evaluate import extract_features, weighted_knn  # noqa: E402
from instdisc_lite.train import train  # noqa: E402

K, TAU = 200, 0.07


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (/proc/stat), or None where unavailable."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def provenance(argv: list[str]) -> dict:
    """Command line, commit, date, machine and library versions of this measurement."""
    return {
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "git_commit": _git("rev-parse", "HEAD"),
        "package_diff_vs_commit": _git("diff", "--stat", "HEAD", "--", "instdisc_lite"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def knn(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Weighted-kNN top-1 (%) with the paper's k = 200 and tau = 0.07."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return weighted_knn(train_x, train_y, test_x, test_y, k=K, temperature=TAU, num_classes=num_classes)["top1"]


def pixel_baselines(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, dim: int = 128
) -> dict[str, float]:
    """kNN top-1 (%) of raw pixels and of PCA-``dim`` of the pixels (fit on the training images); ``train`` and
    ``test`` are uint8 images ``(N, ...)``."""
    xtr = train.flatten(1).double() / 255.0
    xte = test.flatten(1).double() / 255.0
    mean = xtr.mean(0)
    _, vecs = torch.linalg.eigh((xtr - mean).T @ (xtr - mean))  # ascending eigenvalues
    proj = vecs[:, -min(dim, xtr.shape[1]) :].flip(1)
    pca_tr, pca_te = ((xtr - mean) @ proj).float(), ((xte - mean) @ proj).float()
    return {
        "raw_pixels": knn(xtr.float(), train_y, xte.float(), test_y),
        f"pca{dim}": knn(pca_tr, train_y, pca_te, test_y),
    }


def evaluation_images(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All training and test images (uint8) and labels of the config's dataset, whatever its subsets."""
    if config.dataset == "fashion_mnist":
        train_set = FashionMNIST(config.data_root, train=True)
        test_set = FashionMNIST(config.data_root, train=False)
        return train_set.data, train_set.targets, test_set.data, test_set.targets
    if config.dataset not in OWN_DATA:
        raise SystemExit(
            f"quality.py compares against pixels of Fashion-MNIST or of your own data (dataset: npz or folder); "
            f"this config uses dataset {config.dataset!r}"
        )
    every = dataclasses.replace(config, train_subset=None, eval_subset=None)
    train, test = OWN_DATA[config.dataset](every)
    if test is None or train.labels is None or test.labels is None:
        raise SystemExit("quality.py needs labelled training and test images: give labels and a test_path")
    train_y, test_y, _ = encode_labels(train.labels, test.labels)
    return train.images, train_y, test.images, test_y


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion_mnist_quick", help="a shipped config name or a YAML path")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "results" / "quality.json"))
    parser.add_argument("--skip-baselines", action="store_true", help="only the learned features (for sweeps)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    train_x, train_y, test_x, test_y = evaluation_images(config)  # fail on bad data before training
    # the commit and package diff of the code that runs, read before it runs (the checkout may change meanwhile)
    origin = provenance(sys.argv if argv is None else ["benchmarks/quality.py", *argv])
    busy0, t0 = _busy_seconds(), time.perf_counter()
    own0 = sum(os.times()[:2])
    run = train(config, overwrite=True, final_eval=False)
    t_train = time.perf_counter() - t0
    full = TensorBatchLoader(train_x, train_y, 1024, shuffle=False)
    tests = TensorBatchLoader(test_x, test_y, 1024, shuffle=False)
    tr_f, tr_y = extract_features(run.encoder, full, run.device, run.data.eval_transform)
    te_f, te_y = extract_features(run.encoder, tests, run.device, run.data.eval_transform)
    learned = knn(tr_f.to(run.device), tr_y, te_f.to(run.device), te_y)
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_seconds(), sum(os.times()[:2])
    others = None if busy0 is None or busy1 is None else max(busy1 - busy0 - (own1 - own0), 0.0) / wall
    figures = {"learned": learned}
    if not args.skip_baselines:
        figures.update(pixel_baselines(train_x, train_y, test_x, test_y))
    result = {
        "dataset": config.dataset if config.dataset == "fashion_mnist" else str(config.data_path),
        "knn_top1": figures,
        "knn": {"k": K, "temperature": TAU, "train_images": len(train_x), "test_images": len(test_x)},
        "wall_s": {"train": round(t_train, 1), "train_and_eval": round(wall, 1)},
        # CPU seconds this process used for training + evaluation: with other jobs on the machine, the wall
        # time overstates the cost; cpu_s / torch_threads is about the wall time on an otherwise idle machine
        "cpu_s_train_and_eval": round(own1 - own0, 1),
        "others_cpu_cores_during_run": None if others is None else round(others, 2),
        "epochs": run.metrics,
        "config": run.config.to_dict(),  # resolved: the epochs an image_passes budget came to
        "provenance": origin,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    names = list(figures)
    print(" | ".join(f"{n:>10}" for n in ["", *names]))
    print(" | ".join([f"{'kNN top-1':>10}", *(f"{figures[n]:9.2f}%" for n in names)]))
    beats = all(learned > v for n, v in figures.items() if n != "learned")
    verdict = ""
    if not args.skip_baselines:
        margin = learned - figures["pca128"]
        verdict = f"; beats both baselines: {'yes' if beats else 'no'} ({margin:+.2f} points over PCA-128)"
    print(f"wall (train + eval): {wall:.0f} s ({t_train:.0f} s training, {own1 - own0:.0f} CPU s){verdict}; -> {out}")
    return result


if __name__ == "__main__":
    main()
