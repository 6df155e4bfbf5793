"""Cost of the InstDisc objectives and of the whole training step (prints figures; not a test).

Measures, in one run, the time per step of

* the four objectives of the paper, on random unit features that require grad (no encoder):
  NCE with m negatives per image (the paper / official code), NCE with one shared set of m negatives,
  the exact non-parametric softmax over all n bank rows, and the parametric softmax (an n x d classifier).
  "loss fwd+bwd" is the forward and backward of the loss; "update" is ``bank.update`` for the bank
  objectives and the SGD step on the n x d weights for the parametric softmax (its equivalent of
  refreshing the bank); "total" is their sum.
* the whole InstDisc step (encoder forward + NCE + backward + SGD step + bank update) against a plain
  supervised step with the same encoder (encoder + linear ``num_classes``-way classifier + cross-entropy
  + SGD step), on random images of the chosen size (no data loading, no augmentation).

Each case is warmed up, then run ``--repeats`` times; the cases are interleaved round by round so a change in
background load hits all of them alike. Figures are medians. On CUDA every phase is bracketed by
``torch.cuda.synchronize()`` and the peak memory of each objective's forward+backward is measured.
Everything runs in fp32.

    python benchmarks/objectives.py        # small_cnn on 28x28x1 images (the default; ~1 min on 2 idle CPU cores)
    python benchmarks/objectives.py --arch resnet18_cifar --image-size 32 --repeats 3
    python benchmarks/objectives.py --device cuda --repeats 50

Writes ``results/objectives_<device>.json`` (figures, raw times and provenance).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):  # run from a checkout without installing the package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from quality import cpu_model  # noqa: E402  (one definition, shared by the benchmarks)

import instdisc_lite  # noqa: E402
from instdisc_lite.memory_bank import MemoryBank  # noqa: E402
from instdisc_lite.models import ARCHITECTURES, build_encoder  # noqa: E402
from instdisc_lite.nce import NCE  # noqa: E402
from instdisc_lite.nonparametric import NonParametricSoftmax  # noqa: E402
from instdisc_lite.parametric import ParametricSoftmax  # noqa: E402

MIB = 2**20
# the optimiser of the paper's CIFAR recipe; its values do not change the cost
SGD_KW = {"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4}

Phases = dict[str, float]


# ---------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="n, training images = bank rows (default 50000)")
    p.add_argument("--dim", type=int, default=128, help="d, feature dimension (default 128)")
    p.add_argument("--negatives", "-m", type=int, default=4096, help="m, NCE noise samples (default 4096)")
    p.add_argument("--batch-size", "-B", type=int, default=256, help="B, batch size (default 256)")
    p.add_argument("--temperature", type=float, default=0.07, help="tau (default 0.07)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 10 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 2 CPU, 10 CUDA)")
    p.add_argument("--arch", default="small_cnn", choices=sorted(ARCHITECTURES), help="encoder (default small_cnn)")
    p.add_argument("--in-channels", type=int, default=None, help="image channels (default 1 for small_cnn, else 3)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default 28 for small_cnn, else 32)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the supervised baseline (default 10)")
    p.add_argument("--parts", default="all", choices=["all", "objectives", "steps"], help="what to measure")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default results/objectives_<device>.json)")
    args = p.parse_args(argv)
    if args.in_channels is None:
        args.in_channels = 1 if args.arch == "small_cnn" else 3
    if args.image_size is None:
        args.image_size = 28 if args.arch == "small_cnn" else 32
    for name in ("n", "dim", "negatives", "batch_size", "num_classes", "in_channels", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.n:
        p.error("--batch-size must not exceed --n (a batch holds distinct images)")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1 (NCE estimates its Z on the first batch)")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- provenance


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: torch.device, argv: list[str]) -> dict:
    diff = _run(["git", "diff", "--stat", "HEAD", "--", "instdisc_lite"])
    info = {
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
        "package_diff_vs_commit": diff,  # "" = the package is as committed (others may edit it concurrently)
        "package_path": str(Path(instdisc_lite.__file__).parent),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())  # fmt: skip
    return info


class LoadMonitor:
    """CPU time used by *other* processes while we measure: system busy time (/proc/stat) minus our own."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        busy = None
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            vals = [int(v) for v in fields]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            busy = (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
        except (OSError, ValueError, IndexError):
            pass
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def report(self) -> dict:
        wall0, busy0, own0 = self.start
        wall1, busy1, own1 = self._sample()
        wall = max(wall1 - wall0, 1e-9)
        out = {"wall_s": round(wall, 1), "own_cpu_cores": round((own1 - own0) / wall, 2),
               "loadavg_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}  # fmt: skip
        if busy0 is not None and busy1 is not None:
            out["others_cpu_cores"] = round(max(busy1 - busy0 - (own1 - own0), 0.0) / wall, 2)
        return out


# ---------------------------------------------------------------------------------------------- timing


def make_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class Case:
    """One thing to time: ``step()`` runs one step and returns ``{phase: seconds}``."""

    def __init__(self, key: str, label: str, step: Callable[[], Phases], **meta) -> None:
        self.key, self.label, self.step, self.meta = key, label, step, meta
        self.samples: list[Phases] = []

    def median(self, phase: str) -> float:
        return statistics.median(s[phase] for s in self.samples)

    def summary(self) -> dict:
        phases = list(self.samples[0])
        out = {"label": self.label, **self.meta}
        for ph in phases:
            xs = [s[ph] * 1e3 for s in self.samples]
            out[f"{ph}_ms"] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}
        return out


def timer(sync: Callable[[], None]) -> Callable[[], float]:
    """Returns ``lap()``: seconds since the previous lap, after synchronising the device."""
    last = [0.0]

    def lap() -> float:
        sync()
        now = time.perf_counter()
        dtime, last[0] = now - last[0], now
        return dtime

    return lap


def measure(cases: list[Case], warmup: int, repeats: int, sync: Callable[[], None]) -> None:
    for case in cases:
        for _ in range(warmup):
            case.step()
    sync()
    for r in range(repeats):  # interleaved: round r runs every case once
        for case in cases:
            case.samples.append(case.step())
        if sys.stderr.isatty():
            print(f"\r  round {r + 1}/{repeats}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- objectives


def objective_cases(args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> list[Case]:
    n, d, m, B = args.n, args.dim, args.negatives, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    # a few batches of distinct indices (as in an epoch) and random unit features; cycled through
    batches = []
    for _ in range(4):
        idx = torch.randperm(n, generator=gen)[:B].to(device)
        feats = F.normalize(torch.randn(B, d, generator=gen), dim=1).to(device).requires_grad_()
        batches.append((idx, feats))
    lap = timer(sync)
    f32 = torch.finfo(torch.float32).bits // 8

    def bank_step(objective: nn.Module, bank: MemoryBank) -> Callable[[], Phases]:
        counter = [0]

        def step() -> Phases:
            idx, feats = batches[counter[0] % len(batches)]
            counter[0] += 1
            feats.grad = None
            lap()
            loss = objective(feats, idx)
            loss.backward()
            t_loss = lap()
            bank.update(idx, feats.detach())
            t_upd = lap()
            return {"loss": t_loss, "update": t_upd, "total": t_loss + t_upd}

        return step

    cases = []
    for shared in (False, True):
        bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
        nce = NCE(bank, num_negatives=m, temperature=args.temperature, shared_negatives=shared).to(device)
        gather = (m if shared else B * m) * d * f32
        cases.append(Case(
            "nce_shared" if shared else "nce_per_image",
            f"NCE, {'shared' if shared else 'per-image'} negatives",
            bank_step(nce, bank),
            objective=nce, gather_bytes=gather, gather_formula="m*d*4" if shared else "B*m*d*4",
            logits_bytes=B * (m + 1) * f32, update="bank.update",
        ))  # fmt: skip
    bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
    softmax = NonParametricSoftmax(bank, temperature=args.temperature).to(device)
    cases.append(Case(
        "softmax", "non-parametric softmax (exact)", bank_step(softmax, bank), objective=softmax,
        gather_bytes=0, gather_formula="none (reads all n*d bank rows in place)",
        logits_bytes=B * n * f32, update="bank.update",
    ))  # fmt: skip

    torch.manual_seed(args.seed)
    param = ParametricSoftmax(d, n).to(device)
    opt = torch.optim.SGD(param.parameters(), **SGD_KW)
    counter = [0]

    def param_step() -> Phases:
        idx, feats = batches[counter[0] % len(batches)]
        counter[0] += 1
        feats.grad = None
        opt.zero_grad(set_to_none=True)
        lap()
        loss = param(feats, idx)
        loss.backward()
        t_loss = lap()
        opt.step()
        t_upd = lap()
        return {"loss": t_loss, "update": t_upd, "total": t_loss + t_upd}

    cases.append(Case(
        "parametric", "parametric softmax (n x d classifier)", param_step, objective=param,
        gather_bytes=0, gather_formula="none (n*d weights + their grad + SGD momentum)",
        logits_bytes=B * n * f32, update="SGD step on W",
    ))  # fmt: skip
    cases[-1].meta["batches"] = batches  # for the memory pass
    return cases


def peak_memory(cases: list[Case], device: torch.device) -> None:
    """Peak CUDA memory of one loss forward+backward, above what was allocated before it."""
    batches = cases[-1].meta.pop("batches")
    if device.type != "cuda":
        return
    idx, feats = batches[0]
    for case in cases:
        feats.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.meta["objective"](feats, idx).backward()
        torch.cuda.synchronize()
        case.meta["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    feats.grad = None


# ---------------------------------------------------------------------------------------------- whole steps


def step_cases(args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> list[Case]:
    n, d, B = args.n, args.dim, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    shape = (B, args.in_channels, args.image_size, args.image_size)
    batches = []
    for _ in range(2):
        images = torch.randn(shape, generator=gen).to(device)
        labels = torch.randint(args.num_classes, (B,), generator=gen).to(device)
        idx = torch.randperm(n, generator=gen)[:B].to(device)
        batches.append((images, labels, idx))
    lap = timer(sync)

    def encoder() -> nn.Module:
        torch.manual_seed(args.seed)  # every case starts from the same weights
        return build_encoder(args.arch, d, args.in_channels).to(device).train()

    # supervised baseline: same encoder, linear classifier on its d-dim output, cross-entropy
    sup_model = nn.Sequential(encoder(), nn.Linear(d, args.num_classes)).to(device)
    sup_opt = torch.optim.SGD(sup_model.parameters(), **SGD_KW)
    sup_count = [0]

    def supervised() -> Phases:
        images, labels, _ = batches[sup_count[0] % len(batches)]
        sup_count[0] += 1
        lap()
        loss = F.cross_entropy(sup_model(images), labels)
        sup_opt.zero_grad(set_to_none=True)
        loss.backward()
        t_fb = lap()
        sup_opt.step()
        t_opt = lap()
        return {"fwd_bwd": t_fb, "sgd": t_opt, "bank": 0.0, "total": t_fb + t_opt}

    cases = [Case("supervised", f"supervised ({args.num_classes}-way linear + CE)", supervised)]

    for shared in (False, True):
        model = encoder()
        bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
        nce = NCE(bank, num_negatives=args.negatives, temperature=args.temperature, shared_negatives=shared)
        nce = nce.to(device)
        opt = torch.optim.SGD(model.parameters(), **SGD_KW)
        count = [0]

        def instdisc(model=model, bank=bank, nce=nce, opt=opt, count=count) -> Phases:
            images, _, idx = batches[count[0] % len(batches)]
            count[0] += 1
            lap()
            features = model(images)
            loss = nce(features, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t_fb = lap()
            opt.step()
            t_opt = lap()
            bank.update(idx, features.detach())
            t_bank = lap()
            return {"fwd_bwd": t_fb, "sgd": t_opt, "bank": t_bank, "total": t_fb + t_opt + t_bank}

        kind = "shared" if shared else "per-image"
        cases.append(Case(f"instdisc_nce_{kind.replace('-', '_')}", f"InstDisc, NCE {kind} negatives", instdisc))
    return cases


# ---------------------------------------------------------------------------------------------- report


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / MIB:,.1f} MiB" if b >= MIB else f"{b / 1024:,.1f} KiB"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def spread(case: Case, phase: str = "total") -> str:
    xs = [s[phase] for s in case.samples]
    med = statistics.median(xs)
    return f"±{100 * (max(xs) - min(xs)) / 2 / med:.0f}%" if med > 0 else "-"


def report_objectives(cases: list[Case], args: argparse.Namespace, device: torch.device) -> None:
    base = next(c for c in cases if c.key == "parametric")
    print(f"\nObjectives: loss on random unit features (B={args.batch_size}, d={args.dim}, n={args.n}, "
          f"m={args.negatives}), fp32, ms/step (median of {len(base.samples)}); "
          "ratios vs the parametric softmax")  # fmt: skip
    headers = ["objective", "loss f+b", "update", "total", "range", "x param f+b", "x param total",
               "gather (analytic)", "logits (analytic)"]  # fmt: skip
    if device.type == "cuda":
        headers.append("peak f+b (measured)")
    rows = []
    for c in cases:
        row = [c.label, f"{1e3 * c.median('loss'):.2f}", f"{1e3 * c.median('update'):.2f}",
               f"{1e3 * c.median('total'):.2f}", spread(c),
               f"{c.median('loss') / base.median('loss'):.2f}", f"{c.median('total') / base.median('total'):.2f}",
               fmt_bytes(c.meta["gather_bytes"]) if c.meta["gather_bytes"] else "none",
               fmt_bytes(c.meta["logits_bytes"])]  # fmt: skip
        if device.type == "cuda":
            row.append(fmt_bytes(c.meta.get("peak_bytes")))
        rows.append(row)
    print_table(headers, rows)
    print("  update = bank.update for the bank objectives, the SGD step (momentum) on the n x d weights for the "
          "parametric softmax.\n  gather = noise rows copied out of the bank: B*m*d*4 bytes per-image, m*d*4 "
          "shared; logits = B x (m+1) scores for NCE, B x n for the softmaxes.")  # fmt: skip


def report_steps(cases: list[Case], args: argparse.Namespace) -> None:
    base = cases[0]
    print(f"\nWhole training step: {args.arch}, {args.in_channels}x{args.image_size}x{args.image_size} random images, "
          f"B={args.batch_size}, SGD(momentum 0.9), fp32, no data loading/augmentation, ms/step "
          f"(median of {len(base.samples)}); ratios vs the supervised step")  # fmt: skip
    headers = ["step", "fwd+bwd", "SGD step", "bank update", "total", "range", "x supervised", "extra vs sup."]
    rows = []
    for c in cases:
        rows.append([c.label, f"{1e3 * c.median('fwd_bwd'):.2f}", f"{1e3 * c.median('sgd'):.2f}",
                     f"{1e3 * c.median('bank'):.2f}" if c.key != "supervised" else "-",
                     f"{1e3 * c.median('total'):.2f}", spread(c),
                     f"{c.median('total') / base.median('total'):.2f}",
                     f"{1e3 * (c.median('total') - base.median('total')):+.2f} ms"])  # fmt: skip
    print_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    repeats = args.repeats or (50 if cuda else 10)
    warmup = args.warmup or (10 if cuda else 2)
    sync = make_sync(device)
    prov = provenance(device, sys.argv if argv is None else ["benchmarks/objectives.py", *argv])
    where = prov.get("gpu_name") or f"{prov['cpu_model']}, {prov['cpu_count']} cores, {prov['torch_threads']} threads"
    print(f"instdisc_lite objectives benchmark | {device} ({where}) | torch {torch.__version__} | "
          f"commit {(prov['git_commit'] or '?')[:10]} | warm-up {warmup}, repeats {repeats}")  # fmt: skip
    torch.manual_seed(args.seed)
    monitor = LoadMonitor()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict = {"provenance": prov, "config": config | {"repeats": repeats, "warmup": warmup}}

    if args.parts in ("all", "objectives"):
        obj = objective_cases(args, device, sync)
        measure(obj, warmup, repeats, sync)
        peak_memory(obj, device)
        report_objectives(obj, args, device)
        summaries = {}
        for c in obj:
            c.meta.pop("objective")
            summaries[c.key] = c.summary()
            summaries[c.key]["ratio_total_vs_parametric"] = c.median("total") / obj[-1].median("total")
            summaries[c.key]["ratio_loss_vs_parametric"] = c.median("loss") / obj[-1].median("loss")
        result["objectives"] = {"baseline": "parametric", "cases": summaries}
        del obj
    if args.parts in ("all", "steps"):
        steps = step_cases(args, device, sync)
        measure(steps, warmup, repeats, sync)
        report_steps(steps, args)
        summaries = {c.key: c.summary() | {"ratio_vs_supervised": c.median("total") / steps[0].median("total")}
                     for c in steps}  # fmt: skip
        result["steps"] = {"baseline": "supervised", "cases": summaries}

    load = monitor.report()
    result["load"] = load
    cores = prov["cpu_affinity"] or prov["cpu_count"] or 1
    others = load.get("others_cpu_cores")
    msg = f"\nwall {load['wall_s']} s; this process used {load['own_cpu_cores']} cores on average"
    if others is not None:
        msg += f", other processes {others} of {cores} cores"
    print(msg)
    under_load = others is not None and others > 0.25
    result["measured_under_load"] = under_load
    if under_load:
        print(
            f"WARNING: measured under load — other processes kept ~{others} of {cores} CPU cores busy; "
            "absolute times are inflated and noisy, ratios are more trustworthy (cases were interleaved)."
        )

    out = args.output or ROOT / "results" / f"objectives_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"figures written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return result


if __name__ == "__main__":
    main()
