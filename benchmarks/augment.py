"""Images per second of the paper's CIFAR-10 augmentation: a whole batch on the device vs per image with PIL
(prints figures side by side; not a test).

Both paths go from the stored uint8 images to a normalised float batch ``(B, 3, 32, 32)`` on the device, through
the package's own loaders (:func:`instdisc_lite.data.build_data`), on a generated CIFAR-10 of the real on-disk
format (uniform-noise pixels, which cost PIL and the tensor ops what real ones do):

* ``batch``: ``augment_on_device: true`` — the images held as one uint8 tensor, a batch sliced by the
  TensorBatchLoader and augmented by :class:`~instdisc_lite.batch_augment.ColourBatchAugment`, with torch's
  threads as set (``--threads``, default all of this process's CPUs) and with 1 thread;
* ``per_image_w2`` / ``per_image_w0``: ``augment_on_device: false`` — torchvision's transforms on PIL images in
  2 DataLoader worker processes / in this process, as a run with ``num_workers: 2`` / ``0`` does.

Each case times whole epochs of ``--images`` images (batch 128) after a warm-up epoch; rounds are interleaved so
a change in background load hits all cases alike, and the figure is the median over ``--repeats`` rounds. With a
CUDA device the batch path is measured there as well (the per-image path is the CPU's either way). The CPU
seconds other processes used during the run are recorded (``others_cpu_cores_during_run``): on a shared machine
they, not the code, may set the figures.

    python benchmarks/augment.py                 # under a minute on 2 idle CPU cores
    python benchmarks/augment.py --images 10240 --repeats 5

Writes ``results/augment_<cpu|cuda>.json`` (figures, raw times and provenance).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from fake_cifar10 import write_cifar10  # noqa: E402
from quality import _busy_seconds, provenance  # noqa: E402

from instdisc_lite import load_config  # noqa: E402
from instdisc_lite.data import build_data, set_epoch  # noqa: E402

BATCH = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2560, help="images per timed epoch (a multiple of 128 is exact)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the batch path (default: all CPUs)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default results/augment_<device>.json)")
    return p.parse_args(argv)


def make_epoch(root: Path, images: int, on_device: bool, workers: int, device: torch.device):
    """A function that runs one training epoch of the path and returns its seconds (ending with the batch on
    ``device``, synchronised)."""
    config = load_config(
        "cifar10_resnet18",
        {"data_root": str(root), "train_subset": images, "batch_size": BATCH, "num_workers": workers,
         "augment_on_device": on_device},
    )  # fmt: skip
    bundle = build_data(config, device)
    bundle.train_augment.to(device)
    epoch = [0]

    def run() -> float:
        set_epoch(bundle.train_loader, epoch[0], config.seed)
        epoch[0] += 1
        start = time.perf_counter()
        for batch, _, _ in bundle.train_loader:
            with torch.no_grad():
                (view,) = bundle.views(batch.to(device, non_blocking=True), 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert view.shape == (BATCH, 3, 32, 32) and view.dtype == torch.float32
        return time.perf_counter() - start

    return run, len(bundle.train_loader) * BATCH


def with_threads(run, threads: int):
    def timed() -> float:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(saved)

    return timed


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or cpus
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        per_batch = -(-args.images // 5)  # five training batch files, as CIFAR-10's
        write_cifar10(tmp, per_batch, num_test=BATCH)
        batch_run, n = make_epoch(Path(tmp), args.images, True, 0, cpu)
        cases = {
            f"batch_{threads}_threads": batch_run,
            "batch_1_thread": with_threads(batch_run, 1),
            "per_image_w2": make_epoch(Path(tmp), args.images, False, 2, cpu)[0],
            "per_image_w0": make_epoch(Path(tmp), args.images, False, 0, cpu)[0],
        }
        if torch.cuda.is_available():
            cases["batch_cuda"] = make_epoch(Path(tmp), args.images, True, 0, torch.device("cuda"))[0]
        busy0, own0, t0 = _busy_seconds(), sum(os.times()[:2]), time.perf_counter()
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.repeats + 1):  # round 0 warms up (worker start-up, first allocations)
            for name, run in cases.items():
                took = run()
                if round_ > 0:
                    seconds[name].append(took)
        wall = time.perf_counter() - t0
        busy1, own1 = _busy_seconds(), sum(os.times()[:2])
        cases.clear()  # shuts the DataLoader workers down: their CPU time counts (as children's) once they are reaped
        gc.collect()
    own = own1 - own0 + sum(os.times()[2:4])  # no worker ran before t0 (they start with the first epoch)
    others = None if busy0 is None or busy1 is None else max(busy1 - busy0 - own, 0.0) / wall
    rate = {name: round(n / statistics.median(times), 1) for name, times in seconds.items()}
    reference = rate["per_image_w2"]
    result = {
        "images_per_s": rate,
        "ratio_vs_per_image_w2": {name: round(r / reference, 2) for name, r in rate.items()},
        "seconds_per_epoch": seconds,
        "images_per_epoch": n,
        "batch_size": BATCH,
        "repeats": args.repeats,
        "torch_threads": threads,
        "cpus_available": cpus,
        "others_cpu_cores_during_run": None if others is None else round(others, 2),
        "provenance": provenance(sys.argv if argv is None else ["benchmarks/augment.py", *map(str, argv)]),
    }
    print(" | ".join(f"{name:>18}" for name in ["", *rate]))
    print(" | ".join([f"{'images/s':>18}", *(f"{r:18.0f}" for r in rate.values())]))
    print(" | ".join([f"{'x per_image_w2':>18}", *(f"{r / reference:18.2f}" for r in rate.values())]))
    if others is not None:
        print(f"other processes kept ~{others:.2f} of {os.cpu_count()} CPU cores busy during the run")
    out = args.output or ROOT / "results" / f"augment_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
