"""How the cost of InstDisc grows: objectives over n, m and d, kNN over the bank size, the whole step, GPU estimates.

Measures, in one run on the CPU (prints figures; not a test):

* ``objectives``: forward + backward of the loss (random unit features that require grad, no encoder, no bank
  update) for NCE with shared negatives, NCE with per-image negatives (``scoring="auto"``: dense ``F V^T`` while
  n <= 100 m, else a gather of the B x m rows) and the exact non-parametric softmax, as

  - n grows (``N_GRID``, up to ImageNet's 1.28 M) at m = 4096, d = 128,
  - m grows (``M_GRID``, 1 ... 65,536) at n = 50,000 (CIFAR-10), d = 128 (the softmax has no m: one point),
  - d grows (``D_GRID``, 32 ... 256) at n = 50,000, m = 4096;

* ``knn``: :func:`instdisc_lite.evaluate.weighted_knn` (k = 200, its default chunks) of ``--queries`` queries as the
  bank grows to 1.28 M x 128;
* ``steps``: the whole InstDisc training step against a supervised step with the same encoder, by
  ``benchmarks/objectives.py``'s own cases (:func:`objectives.step_cases`), for each ``--step-arch``;
* ``flops``: FLOPs per image (:mod:`instdisc_lite.performance`) of the encoders and of each shipped CIFAR-10
  method's training step, and from them ESTIMATES of GPU run times (``results/runtime_estimates.json``).

Time: the median of at least ``--repeats`` steps after one warm-up (cheap points get more, within about a
second), as CPU time of the process (``time.process_time``) on one torch thread (``--threads 1``), with the wall
time beside it: on a machine shared with other jobs the wall time counts their turns too, the CPU time does not.

Memory, two figures per point, both in bytes: ``analytic`` (the tensors the case must hold, from their
shapes) and ``peak_rss_delta`` (measured: the process's peak resident set size while the case runs, minus its
resident size just before; the peak is reset before every point by writing 5 to ``/proc/self/clear_refs``, so it
is Linux only and ``None`` elsewhere). RSS counts what torch's CPU allocator holds from the OS, temporaries
included; ``tracemalloc`` would see none of it. glibc is told to return freed blocks over 128 KiB to the OS
(``mallopt``), else a point would reuse what the previous one freed and show no rise; what it still keeps makes
the RSS deltas lower bounds.

A point whose predicted step time (the previous point's, scaled by the linear work model of the case) exceeds
``--max-step-s``, or whose analytic memory exceeds ``--max-gib``, is not run: it is recorded as skipped, with
the reason. Cases within a point are interleaved round by round (as in objectives.py).

    python benchmarks/scaling.py                    # everything, ~8 minutes on 2 shared cores
    python benchmarks/scaling.py --parts flops      # only the FLOP counts and the GPU estimates

Writes ``results/scaling_cpu.json`` and (part ``flops``) ``results/runtime_estimates.json``, with provenance.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):  # run from a checkout without installing the package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import objectives  # noqa: E402  (the whole-step cases and the load monitor, not duplicated here)
from quality import provenance  # noqa: E402

from instdisc_lite.book import FULL_TRAINING_EPOCHS, shortened  # noqa: E402
from instdisc_lite.config import load_config  # noqa: E402
from instdisc_lite.evaluate import weighted_knn  # noqa: E402
from instdisc_lite.memory_bank import MemoryBank  # noqa: E402
from instdisc_lite.methods import build_method  # noqa: E402
from instdisc_lite.models import build_encoder  # noqa: E402
from instdisc_lite.nce import DENSE_SCORES_MAX_RATIO, NCE  # noqa: E402
from instdisc_lite.nonparametric import NonParametricSoftmax  # noqa: E402
from instdisc_lite.performance import (  # noqa: E402
    T4_ASSUMED,
    T4_PEAK_FP16,
    T4_PEAK_FP32,
    count_flops,
    estimate_seconds,
    flops_per_image,
)

F32 = 4
IMAGENET_N = 1_281_167
CIFAR_N, CIFAR_TEST = 50_000, 10_000
N_GRID = (1_000, 5_000, 25_000, 100_000, 400_000, IMAGENET_N)
M_GRID = (1, 16, 256, 1024, 4096, 16_384, 65_536)
D_GRID = (32, 64, 128, 256)
KNN_GRID = (10_000, 50_000, 160_000, 640_000, IMAGENET_N)
OBJECTIVES = ("nce_shared", "nce_per_image", "softmax")
PAPER_EPOCHS = 200
MAX_ROUNDS, MIN_POINT_S = 15, 1.0  # extra timed rounds for cheap points


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def return_freed_memory() -> bool:
    """Makes glibc's malloc hand blocks over 128 KiB back to the OS when they are freed (fixed mmap and trim
    thresholds), so each point's RSS rises by what it allocates instead of reusing what earlier points freed.
    False where that is not possible (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024))  # M_MMAP_ and M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> int | None:
    """Resets the kernel's peak-RSS mark of this process; returns the resident set size now (bytes), or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else 1024 * rss


def peak_rss_since(start: int | None) -> int | None:
    """Peak RSS since :func:`reset_peak_rss`, minus the RSS it returned (bytes)."""
    hwm = _status_kib("VmHWM")
    return None if start is None or hwm is None else max(1024 * hwm - start, 0)


# ---------------------------------------------------------------------------------------------- objectives


@dataclass
class Point:
    """One objective at one (n, m, d): its step, its analytic memory, and what was measured."""

    sweep: str
    objective: str
    n: int
    m: int
    d: int
    batch: int
    analytic_bytes: int
    scoring: str
    times_ms: list[float] = field(default_factory=list)  # CPU time of the process (one thread: compute time)
    wall_ms: list[float] = field(default_factory=list)
    peak_rss_delta: int | None = None
    skipped: str | None = None

    def work(self) -> float:
        """The linear work model used to predict the next point's time: rows scored per image, times d."""
        rows = {"softmax": self.n, "nce_shared": self.m}.get(self.objective)
        if rows is None:
            rows = self.n if self.scoring == "dense" else self.m
        return (rows + 1) * self.d

    def summary(self) -> dict:
        out = {k: getattr(self, k) for k in ("objective", "n", "m", "d", "batch", "scoring", "analytic_bytes")}
        if self.skipped:
            return out | {"skipped": self.skipped}
        return out | {"median_cpu_ms": statistics.median(self.times_ms), "cpu_ms": self.times_ms,
                      "median_wall_ms": statistics.median(self.wall_ms), "wall_ms": self.wall_ms,
                      "peak_rss_delta_bytes": self.peak_rss_delta}  # fmt: skip


def analytic_bytes(objective: str, n: int, m: int, d: int, batch: int, scoring: str) -> int:
    """Bytes the loss forward + backward must hold beyond the bank: scores (and their gradient) and gathered rows."""
    if objective == "softmax":
        return 3 * batch * n * F32  # logits, log-softmax, their gradient
    if objective == "nce_shared":
        return m * d * F32 + 3 * batch * (m + 1) * F32  # the (m, d) gathered rows; scores, terms, gradient
    if scoring == "dense":
        return batch * n * F32 + 3 * batch * (m + 1) * F32  # all B x n scores, picked (backward: embedding_bag)
    return batch * m * d * F32 + 3 * batch * (m + 1) * F32  # the B x m x d gathered rows


def build_objective(name: str, bank: MemoryBank, m: int) -> torch.nn.Module:
    if name == "softmax":
        return NonParametricSoftmax(bank, temperature=0.07)
    return NCE(bank, num_negatives=m, temperature=0.07, shared_negatives=name == "nce_shared")


def run_point(points: list[Point], bank: MemoryBank, repeats: int, seed: int) -> None:
    """Warm up, then time ``repeats`` interleaved rounds of every point; then the peak RSS of one step each."""
    gen = torch.Generator().manual_seed(seed)
    n, batch, d = bank.num_items, points[0].batch, bank.dim
    idx = torch.randperm(n, generator=gen)[:batch]
    feats = F.normalize(torch.randn(batch, d, generator=gen), dim=1).requires_grad_()
    objs = [build_objective(p.objective, bank, p.m) for p in points]

    def step(obj: torch.nn.Module) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of one loss forward + backward."""
        feats.grad = None
        cpu, wall = time.process_time(), time.perf_counter()
        obj(feats, idx).backward()
        return time.process_time() - cpu, time.perf_counter() - wall

    for obj in objs:
        step(obj)  # warm-up; NCE sets its Z
    rounds, start = 0, time.perf_counter()
    # at least `repeats` rounds; cheap points get more (up to MAX_ROUNDS, for MIN_POINT_S), so that a median of
    # milliseconds is not one scheduler hiccup on a shared machine
    while rounds < repeats or (rounds < MAX_ROUNDS and time.perf_counter() - start < MIN_POINT_S):
        for p, obj in zip(points, objs, strict=True):
            cpu, wall = step(obj)
            p.times_ms.append(1e3 * cpu)
            p.wall_ms.append(1e3 * wall)
        rounds += 1
    for p, obj in zip(points, objs, strict=True):
        gc.collect()
        start = reset_peak_rss()
        step(obj)
        p.peak_rss_delta = peak_rss_since(start)
    feats.grad = None


def sweep_points(args: argparse.Namespace) -> list[tuple[str, int, int, int, tuple[str, ...]]]:
    """(sweep, n, m, d, objectives) in order of growing cost within each sweep."""
    out = [("n", n, args.m, args.d, OBJECTIVES) for n in N_GRID]
    out += [("m", args.n, m, args.d, ("nce_shared", "nce_per_image")) for m in M_GRID]
    out += [("m", args.n, args.m, args.d, ("softmax",))]  # the softmax has no m: its one point, the reference line
    out += [("d", args.n, args.m, d, OBJECTIVES) for d in D_GRID]
    return out


def measure_objectives(args: argparse.Namespace) -> dict:
    results: list[Point] = []
    last: dict[tuple[str, str, str], Point] = {}  # the previous measured point of each (sweep, objective, scoring)
    limit_bytes = args.max_gib * 2**30
    for sweep, n, m, d, names in sweep_points(args):
        todo = []
        for name in names:
            scoring = "shared" if name == "nce_shared" else "exact" if name == "softmax" else (
                "dense" if n <= DENSE_SCORES_MAX_RATIO * m else "gather")  # fmt: skip
            p = Point(sweep, name, n, m, d, args.batch, analytic_bytes(name, n, m, d, args.batch, scoring), scoring)
            prev = last.get((sweep, name, scoring))  # only the same way of scoring predicts
            bank_bytes = n * d * F32
            if p.analytic_bytes + bank_bytes > limit_bytes:
                p.skipped = (f"analytic memory {(p.analytic_bytes + bank_bytes) / 2**30:.1f} GiB (with the bank) "
                             f"> --max-gib {args.max_gib:g}")  # fmt: skip
            elif prev is not None and not prev.skipped:
                predicted = statistics.median(prev.times_ms) / 1e3 * p.work() / prev.work()
                if predicted > args.max_step_s:
                    p.skipped = f"predicted {predicted:.1f} s per step > --max-step-s {args.max_step_s:g}"
            (results.append(p) if p.skipped else todo.append(p))
        if todo:
            bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed))
            run_point(todo, bank, args.repeats, args.seed)
            del bank
            gc.collect()
            results += todo
            for p in todo:
                last[(sweep, p.objective, p.scoring)] = p
        for p in [q for q in results if (q.sweep, q.n, q.m, q.d) == (sweep, n, m, d) and q.objective in names]:
            cpu_ms = statistics.median(p.times_ms) if p.times_ms else 0.0
            shown = p.skipped or (f"{cpu_ms:9.1f} ms CPU, analytic {p.analytic_bytes / 2**20:8.1f} "
                                  f"MiB, peak RSS +{(p.peak_rss_delta or 0) / 2**20:8.1f} MiB")  # fmt: skip
            print(f"  {sweep}: n={n:>9,} m={m:>6,} d={d:>3} {p.objective:14s} {p.scoring:7s} {shown}", flush=True)
    return {
        "what": "loss forward + backward, random unit features (B x d) requiring grad; no encoder, no bank update",
        "batch": args.batch,
        "fixed": {"n": args.n, "m": args.m, "d": args.d},
        "grids": {"n": list(N_GRID), "m": list(M_GRID), "d": list(D_GRID)},
        "dense_rule": f"per-image NCE scores densely while n <= {DENSE_SCORES_MAX_RATIO} m, else gathers",
        "points": [{"sweep": p.sweep, **p.summary()} for p in results],
    }


# ---------------------------------------------------------------------------------------------- kNN


def measure_knn(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    d, q, k = args.d, args.queries, 200
    queries = torch.randn(q, d, generator=gen)
    query_labels = torch.randint(1000, (q,), generator=gen)
    rows, last = [], None
    for n in KNN_GRID:
        bank_bytes, scores_bytes = n * d * F32, 256 * min(n, 262_144) * F32  # evaluate.py's default chunks
        analytic = 2 * bank_bytes + scores_bytes  # the bank, its normalised copy, one chunk of scores
        formula = "2 n d 4 (bank, normalised copy) + 256 min(n, 262144) 4 (a chunk of scores)"
        row = {"n": n, "d": d, "queries": q, "k": k, "analytic_bytes": analytic, "analytic_formula": formula}
        predicted = None if last is None else last["cpu_seconds"] * n / last["n"]
        if analytic > args.max_gib * 2**30:
            rows.append(row | {"skipped": f"analytic memory {analytic / 2**30:.1f} GiB > --max-gib {args.max_gib:g}"})
            continue
        if predicted is not None and predicted > args.max_knn_s:
            rows.append(row | {"skipped": f"predicted {predicted:.0f} s > --max-knn-s {args.max_knn_s:g}"})
            continue
        bank = torch.randn(n, d, generator=gen)
        labels = torch.randint(1000, (n,), generator=gen)
        gc.collect()
        start_rss = reset_peak_rss()
        cpu, start = time.process_time(), time.perf_counter()
        weighted_knn(bank, labels, queries, query_labels, k=k, num_classes=1000)
        seconds, wall = time.process_time() - cpu, time.perf_counter() - start
        row |= {"cpu_seconds": seconds, "wall_seconds": wall, "cpu_ms_per_query": 1e3 * seconds / q,
                "peak_rss_delta_bytes": peak_rss_since(start_rss)}  # fmt: skip
        rows.append(row)
        last = row
        del bank, labels
        print(
            f"  kNN: n={n:>9,} x {d}, {q:,} queries: {seconds:6.1f} s CPU, analytic {analytic / 2**20:7.1f} MiB, "
            f"peak RSS +{(row['peak_rss_delta_bytes'] or 0) / 2**20:7.1f} MiB",
            flush=True,
        )
    return {"what": "weighted_knn (k = 200, query_chunk 256, bank_chunk 262,144) of random queries against a random "
                    "bank with 1000 classes; one timed call per bank size (no warm-up)",
            "rows": rows}  # fmt: skip


# ---------------------------------------------------------------------------------------------- whole steps


def measure_steps(args: argparse.Namespace) -> dict:
    """objectives.py's whole-step cases (supervised vs InstDisc with both NCEs), one arch after the other."""
    out = {}
    for spec in args.step_arch:
        arch, batch = spec.split(":") if ":" in spec else (spec, "256")
        oargs = objectives.parse_args(["--arch", arch, "--batch-size", batch, "--parts", "steps",
                                       "--repeats", str(args.step_repeats), "--warmup", "1"])  # fmt: skip
        device = torch.device("cpu")
        sync = objectives.make_sync(device)
        cases = objectives.step_cases(oargs, device, sync)
        for case in cases:  # warm-up
            case.step()
        for _ in range(args.step_repeats):  # interleaved rounds, as objectives.measure, also recording CPU time
            for case in cases:
                cpu = time.process_time()
                phases = case.step()
                case.samples.append(phases | {"cpu_total": time.process_time() - cpu})
        objectives.report_steps(cases, oargs)
        base, wall_base = cases[0].median("cpu_total"), cases[0].median("total")
        print("  on CPU time: " + ", ".join(f"{c.key} {c.median('cpu_total') / base:.3f}x" for c in cases))
        out[f"{arch}_b{batch}"] = {
            "arch": arch, "batch": int(batch), "image": [oargs.in_channels, oargs.image_size, oargs.image_size],
            "n": oargs.n, "m": oargs.negatives, "baseline": "supervised",
            "cases": {c.key: c.summary() | {"ratio_vs_supervised": c.median("cpu_total") / base,
                                            "wall_ratio_vs_supervised": c.median("total") / wall_base}
                      for c in cases},
        }  # fmt: skip
    return {"what": "benchmarks/objectives.py step_cases: encoder fwd + loss + backward + SGD step (+ bank update) "
                    "on random images vs the same encoder with a linear classifier and cross-entropy; "
                    "ratio_vs_supervised: medians of CPU time (cpu_total_ms), wall_ratio_vs_supervised: of wall "
                    "time (total_ms)",
            "goal_ratio": 1.10, "runs": out}  # fmt: skip


# ---------------------------------------------------------------------------------------------- FLOPs and estimates


def method_step_flops(config_name: str, overrides: dict | None = None, batch: int = 4) -> dict:
    """FLOPs per image of one training step of a shipped config's method (forward of every view and of the loss,
    backward), counted on the CPU on random images; and of the encoder's forward alone (evaluation)."""
    cfg = load_config(config_name, overrides or {})
    ch, side = (1, 28) if cfg.dataset == "fashion_mnist" else (3, 32)
    n = cfg.train_subset or CIFAR_N
    torch.manual_seed(0)
    method = build_method(cfg, n, ch)
    views = [torch.randn(batch, ch, side, side) for _ in range(method.num_views)]
    indices = torch.randperm(n)[:batch]
    step = count_flops(lambda: method(views, indices).backward()) / batch
    forward = flops_per_image(method.encoder.eval(), (ch, side, side), backward=False, device="cpu")
    return {"config": config_name, "overrides": overrides or {}, "method": cfg.method, "arch": cfg.arch,
            "n": n, "step_flops_per_image": step, "encoder_forward_flops_per_image": forward}  # fmt: skip


@dataclass
class ChapterRun:
    """A training run a chapter makes in full mode, as its notebook sets it (``evidence`` must occur in it).

    ``paper_epochs`` / ``paper_images``: the same run in paper mode (``MODE.pick(..., paper=...)``); None where the
    notebook sets no paper size, then paper mode runs the full-mode size.
    """

    config: str
    images: int
    epochs: int
    paper_epochs: int | None = None
    paper_images: int | None = None
    count: int = 1
    overrides: dict = field(default_factory=dict)
    evals: str = "end"  # kNN monitor on the test images: "end" (once), "every" (each epoch) or "none"
    final_eval: bool = True  # recomputed features of every training and test image at the end
    extra_forward_images: int = 0  # other forward passes the chapter makes (untrained baselines, probes)
    forward_images_per_epoch: int = 0  # forward passes the chapter makes before training and after every epoch
    evidence: str = ""
    note: str = ""


# What each chapter trains in full and paper mode, read from its notebook; every `evidence` string is checked
# against it.
CHAPTERS: dict[str, list[ChapterRun]] = {
    "00_preface": [],
    "01_classes_to_instances": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            18,
            paper_epochs=30,
            count=2,
            overrides={"objective": "softmax"},
            extra_forward_images=(CIFAR_N + CIFAR_TEST) // 2,
            evidence='full={"epochs": 18}',
            note="two runs (parametric, softmax objective) + one untrained evaluation; the parametric arm's "
            "step is counted as the softmax's (both score all n per image)",
        ),
    ],  # fmt: skip
    "02_memory_bank": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            9,
            paper_epochs=15,
            count=3,
            overrides={"objective": "softmax"},
            evals="none",
            final_eval=False,
            forward_images_per_epoch=CIFAR_N,
            evidence='full={"epochs": 9}',
            note="three bank momenta; every epoch (and before the first) a forward pass over all training "
            "images measures the bank's agreement",
        ),
    ],  # fmt: skip
    "03_nce": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            10,
            count=3,
            evals="every",
            evidence='sizes = {"epochs": 10}',
            note="running Z, then fixed and running Z from a random bank",
        ),
    ],
    "04_proximal": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            5,
            paper_epochs=15,
            count=6,
            evals="every",
            evidence='full={"epochs": 5}',
            note="four proximal weights and two bank momenta",
        ),
    ],
    "05_training": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            FULL_TRAINING_EPOCHS,
            paper_epochs=PAPER_EPOCHS,
            evals="every",
            evidence="training_run_config(MODE",
            note="the shipped config, shortened to FULL_TRAINING_EPOCHS epochs in full mode and as it is in paper "
            "mode (instdisc_lite.book.training_run_config)",
        ),
    ],
    "06_evaluation": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            0,
            count=0,
            final_eval=False,
            extra_forward_images=2 * 60_000,
            evidence="reused from chapter 5",
            note="reuses chapter 5's checkpoint (run alone it trains chapter 5's 200 epochs first); features "
            "of the trained and the untrained encoder; linear probes on stored features not counted",
        ),
    ],  # fmt: skip
    "07_infonce": [],
    "08_negatives": [
        ChapterRun(
            "cifar10_resnet18",
            CIFAR_N,
            8,
            paper_epochs=20,
            extra_forward_images=CIFAR_N + CIFAR_TEST,
            evidence='"epochs": MODE.pick(quick=3, full=8, paper=20)',
            note="InstDisc, + its untrained evaluation",
        ),
        ChapterRun(
            "moco_cifar10",
            CIFAR_N,
            8,
            paper_epochs=20,
            count=2,
            overrides={"queue_size": 4096},
            extra_forward_images=(CIFAR_N + CIFAR_TEST) // 2,
            evidence="QUEUE = MODE.pick(quick=2048, full=4096)",
            note="MoCo with and without key momentum, + one untrained evaluation",
        ),
    ],  # fmt: skip
    "09_views_predictions": [
        ChapterRun(
            "cmc_cifar10",
            1024,
            200,
            overrides=shortened(load_config("cmc_cifar10"), 1024),
            evals="every",
            evidence="shortened(cmc_base, 1024)",
            note="CMC on the first 1,024 images with its config's 200 epochs (m cut in proportion)",
        ),
        ChapterRun(
            "cpc_cifar10",
            10_000,
            5,
            overrides={"train_subset": 10_000},
            final_eval=False,
            evidence='"epochs": MODE.pick(quick=2, full=5)',
            note="CPC on 10,000 images for 5 epochs",
        ),
    ],  # fmt: skip
    "10_family": [
        ChapterRun(
            name,
            20_000,
            7,
            paper_epochs=50,
            paper_images=CIFAR_N,
            extra_forward_images=2 * (20_000 + CIFAR_TEST),
            evidence="IMAGES = MODE.pick(quick=4000, full=20_000, paper=50_000)",
            note="one of the six methods, 7 epochs on 20,000 images (paper mode: 50 epochs on all 50,000); + "
            "untrained evaluation and features for the probe (counted at the full-mode size)",
        )
        for name in (
            "cifar10_resnet18",
            "invaspread_cifar10",
            "simclr_cifar10",
            "moco_cifar10",
            "cmc_cifar10",
            "cpc_cifar10",
        )
    ],  # fmt: skip
    "11_imagenet": [],
    "12_reproducing": [],
    "13_performance": [],
    "14_running_experiments": [],
}
NOT_TRAINING = {
    "00_preface": "no training",
    "07_infonce": "no training (scores of fixed features)",
    "11_imagenet": "no training in full mode (times the objectives; the ImageNet smoke step runs in quick mode only)",
    "12_reproducing": "no training (reads the studies' results)",
    "13_performance": "no training (reads the benchmarks' results)",
    "14_running_experiments": "no CIFAR-10 training (a few tiny fashion_mnist_quick runs, the same in every mode)",
}


def run_flops(run: ChapterRun, step: dict, epochs: int, images: int) -> dict:
    """Training and evaluation FLOPs of ``run.count`` runs of ``epochs`` epochs over ``images`` images."""
    evals = {"end": 1, "every": epochs, "none": 0}[run.evals] if epochs else 0
    fwd = step["encoder_forward_flops_per_image"]
    train = run.count * epochs * images * step["step_flops_per_image"]
    evaluation = run.count * (evals * CIFAR_TEST + (images + CIFAR_TEST) * run.final_eval) * fwd
    evaluation += run.extra_forward_images * fwd + run.count * (epochs + 1) * run.forward_images_per_epoch * fwd
    return {"train_flops": train, "eval_flops": evaluation}


def estimates(args: argparse.Namespace, prov: dict) -> tuple[dict, dict]:
    """FLOPs per image (results/scaling_cpu.json's ``flops``) and the chapters' GPU estimates."""
    encoders = {
        "resnet18_cifar": ("resnet18_cifar", (3, 32, 32)),
        "small_cnn_fast (Fashion-MNIST quick)": ("small_cnn_fast", (1, 28, 28)),
        "resnet18 (ImageNet)": ("resnet18", (3, 224, 224)),
        "resnet50 (ImageNet)": ("resnet50", (3, 224, 224)),
    }
    per_image = {}
    for label, (arch, shape) in encoders.items():
        net = build_encoder(arch, 128, shape[0])
        per_image[label] = {"arch": arch, "input": list(shape),
                            "forward": flops_per_image(net, shape, backward=False),
                            "forward_backward": flops_per_image(net, shape)}  # fmt: skip
        print(
            f"  {label:38s} forward {per_image[label]['forward'] / 1e9:7.3f} GFLOPs, forward+backward "
            f"{per_image[label]['forward_backward'] / 1e9:7.3f} GFLOPs per image",
            flush=True,
        )
    # a sustained throughput implied by the cited T4 figure, for comparison with the assumption
    rn50_fwd = per_image["resnet50 (ImageNet)"]["forward"]
    implied = 1198 * rn50_fwd
    assumption = {
        **T4_ASSUMED.as_dict(),
        "peak_fp16_flops_per_s": T4_PEAK_FP16,
        "peak_fp32_flops_per_s": T4_PEAK_FP32,
        "fraction_of_fp16_peak": T4_ASSUMED.flops_per_s / T4_PEAK_FP16,
        "cited_resnet50_amp_forward_images_per_s": 1198,
        "implied_forward_flops_per_s": implied,
        "implied_fraction_of_fp16_peak": implied / T4_PEAK_FP16,
        "not_counted": "data loading and augmentation, element-wise ops, normalisation, the optimiser step, host "
                       "synchronisation; a run can wait on any of these, so the real time may be longer",
    }  # fmt: skip

    steps: dict[str, dict] = {}

    def step_of(run: ChapterRun) -> dict:
        key = json.dumps([run.config, run.overrides], sort_keys=True)
        if key not in steps:
            steps[key] = method_step_flops(run.config, run.overrides)
            print(f"  step {run.config:20s} {run.overrides}: {steps[key]['step_flops_per_image'] / 1e9:.3f} GFLOPs "
                  f"per image", flush=True)  # fmt: skip
        return steps[key]

    chapters = {}
    for chapter, runs in CHAPTERS.items():
        cells = json.loads((ROOT / "book" / f"{chapter}.ipynb").read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        items, full_flops, paper_flops = [], 0.0, 0.0
        for run in runs:
            step = step_of(run)
            full = run_flops(run, step, run.epochs, run.images)
            paper_epochs = run.epochs if run.paper_epochs is None else run.paper_epochs
            paper_images = run.images if run.paper_images is None else run.paper_images
            paper = run_flops(run, step, paper_epochs if run.count else 0, paper_images)
            full_flops += full["train_flops"] + full["eval_flops"]
            paper_flops += paper["train_flops"] + paper["eval_flops"]
            found = run.evidence in source
            if not found:
                print(f"  WARNING: {chapter}: {run.evidence!r} not in the notebook; its runs may have changed")
            items.append({"config": run.config, "overrides": run.overrides, "count": run.count, "epochs": run.epochs,
                          "paper_epochs": run.paper_epochs, "paper_images": run.paper_images,
                          "images": run.images, "evals": run.evals, "final_eval": run.final_eval,
                          "extra_forward_images": run.extra_forward_images,
                          "forward_images_per_epoch": run.forward_images_per_epoch,
                          "step_flops_per_image": step["step_flops_per_image"],
                          "encoder_forward_flops_per_image": step["encoder_forward_flops_per_image"],
                          "full": full, "paper": paper, "evidence": run.evidence, "evidence_found": found,
                          "note": run.note})  # fmt: skip
        chapters[chapter] = {
            "full_t4_s_estimate": estimate_seconds(full_flops, T4_ASSUMED),
            "paper_t4_s_estimate": estimate_seconds(paper_flops, T4_ASSUMED),
            "full_flops": full_flops,
            "paper_flops": paper_flops,
            "runs": items,
            "note": NOT_TRAINING.get(chapter, ""),
        }
    r18 = next(s for s in steps.values() if s["config"] == "cifar10_resnet18" and not s["overrides"])
    epoch_flops = CIFAR_N * r18["step_flops_per_image"]
    reference = {
        "cifar10_resnet18_epoch_t4_s_estimate": estimate_seconds(epoch_flops, T4_ASSUMED),
        "cifar10_resnet18_200_epochs_t4_s_estimate": estimate_seconds(PAPER_EPOCHS * epoch_flops, T4_ASSUMED),
        "cifar10_resnet18_epoch_t4_s_estimate_at_fp32_peak": estimate_seconds(epoch_flops, T4_PEAK_FP32),
        "imagenet_resnet50_epoch_t4_s_estimate": estimate_seconds(
            IMAGENET_N * per_image["resnet50 (ImageNet)"]["forward_backward"], T4_ASSUMED),
        "step_flops_per_image": r18["step_flops_per_image"],
        "how": "images x training-step FLOPs per image (the method's forward and backward, NCE included) / the "
               "assumed throughput; evaluation passes not included",
    }  # fmt: skip
    runtime = {
        "ESTIMATE": "no GPU was used: every *_t4_s_estimate is FLOPs counted on the CPU divided by an assumed "
        "sustained T4 throughput, not a measurement",
        "assumption": assumption,
        "how": {
            "step_flops": "FlopCounterMode over one training step of the chapter's config (build_method, random "
            "images, batch 4: every view's encoder pass, the loss, the backward), per image",
            "full": "sum over the chapter's full-mode runs of count x epochs x images x step FLOPs, plus forward "
            "passes for evaluation: the kNN monitor's test images (once or every epoch, as the chapter "
            "sets it), the final evaluation's training and test images, and other forward passes the "
            "chapter makes; divided by the assumed throughput",
            "paper": "the same runs at the chapter's paper-mode sizes (MODE.pick's paper=, the full size where a "
            "notebook sets none)",
            "zero": "a chapter that trains nothing in full mode has 0",
        },  # fmt: skip
        "chapters": {
            k: {"full_t4_s_estimate": v["full_t4_s_estimate"], "paper_t4_s_estimate": v["paper_t4_s_estimate"]}
            for k, v in chapters.items()
        },  # fmt: skip
        "details": chapters,
        "reference_runs": reference,
        "provenance": prov,
    }
    flops = {"per_image": per_image, "method_steps": list(steps.values()), "gpu_estimate": reference,
             "assumption": assumption}  # fmt: skip
    return flops, runtime


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["objectives", "knn", "steps", "flops"],
                   choices=["objectives", "knn", "steps", "flops"], help="what to measure (default all)")  # fmt: skip
    p.add_argument("--batch", type=int, default=128, help="B of the objective sweeps (default 128, CIFAR's)")
    p.add_argument("--n", type=int, default=CIFAR_N, help="n of the m and d sweeps (default 50000)")
    p.add_argument("--m", type=int, default=4096, help="m of the n and d sweeps (default 4096)")
    p.add_argument("--d", type=int, default=128, help="d of the n and m sweeps and of kNN (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point, at least (default 3; median)")
    p.add_argument("--queries", type=int, default=1000, help="kNN queries (default 1000)")
    p.add_argument("--max-step-s", type=float, default=30.0, help="skip points predicted slower (default 30)")
    p.add_argument("--max-knn-s", type=float, default=90.0, help="skip kNN sizes predicted slower (default 90)")
    p.add_argument("--max-gib", type=float, default=6.0, help="skip points needing more memory (default 6)")
    p.add_argument(
        "--step-arch",
        nargs="+",
        default=["small_cnn:256", "resnet18_cifar:16"],
        help="arch:batch of the whole-step comparison (default small_cnn:256 resnet18_cifar:16)",
    )
    p.add_argument("--step-repeats", type=int, default=5, help="timed whole steps per case (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = compute time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=ROOT / "results" / "scaling_cpu.json")
    p.add_argument("--estimates", type=Path, default=ROOT / "results" / "runtime_estimates.json")
    args = p.parse_args(argv)
    for name in ("batch", "n", "m", "d", "repeats", "queries", "step_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed_malloc = return_freed_memory()
    prov = provenance(sys.argv if argv is None else ["benchmarks/scaling.py", *argv]) | {"device": "cpu"}
    print(f"instdisc_lite scaling benchmark | {prov['cpu_model']}, {prov['cpu_count']} cores, "
          f"{prov['torch_threads']} threads | torch {torch.__version__} | parts {' '.join(args.parts)}")  # fmt: skip
    torch.manual_seed(args.seed)
    old = json.loads(args.output.read_text()) if args.output.exists() else {}
    kept = [k for k in ("objectives", "knn", "steps", "flops") if k in old and k not in args.parts]
    result: dict = {k: old[k] for k in kept}  # the parts not rerun stay, with the record of the runs that made them
    invocations = [i for i in old.get("invocations", []) if set(i["parts"]) & set(kept)] if kept else []
    parts_time: dict[str, float] = {}
    monitor = objectives.LoadMonitor()
    memory_note = ("analytic_bytes: tensors the case must hold, from their shapes (the bank itself excluded for the "
                   "objectives); peak_rss_delta_bytes: measured, peak resident set size (Linux VmHWM, reset through "
                   "/proc/self/clear_refs before each point) minus the resident size just before")  # fmt: skip
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("objectives", lambda: measure_objectives(args)),
        ("knn", lambda: measure_knn(args)),
        ("steps", lambda: measure_steps(args)),
    ]
    for name, fn in steps:
        if name in args.parts:
            print(f"\n[{name}]", flush=True)
            start = time.perf_counter()
            result[name] = fn()
            parts_time[name] = time.perf_counter() - start
    if "flops" in args.parts:
        print("\n[flops]", flush=True)
        start = time.perf_counter()
        result["flops"], runtime = estimates(args, prov)
        parts_time["flops"] = time.perf_counter() - start
        write_json(args.estimates, runtime)
        for chapter, v in runtime["chapters"].items():
            print(f"  {chapter:26s} full {v['full_t4_s_estimate'] / 3600:7.2f} h, paper "
                  f"{v['paper_t4_s_estimate'] / 3600:7.2f} h  (T4 ESTIMATE)")  # fmt: skip
    load = monitor.report()
    invocations.append({"date": prov["date"], "git_commit": prov["git_commit"], "parts": list(parts_time),
                        "parts_seconds": parts_time, "load": load})  # fmt: skip
    result.update(provenance=prov, memory=memory_note, malloc_returns_freed_blocks=fixed_malloc,
                  parts_seconds=parts_time, load=load, invocations=invocations,
                  measured_under_load=(load.get("others_cpu_cores") or 0) > 0.25,
                  config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})  # fmt: skip
    print(f"\nwall {load['wall_s']} s; other processes kept {load.get('others_cpu_cores')} cores busy on average")
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
