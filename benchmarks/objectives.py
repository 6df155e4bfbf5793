"""Cost of the InstDisc objectives and of the whole training step (prints figures; not a test).

Measures, in one run, the time per step of

* the four objectives of the paper, on random unit features that require grad (no encoder):
  NCE with m negatives per image (the paper / official code), NCE with one shared set of m negatives,
  the exact non-parametric softmax over all n bank rows, and the parametric softmax (an n x d classifier);
  and, as the reference, the official lemniscate.pytorch NCE (:class:`OfficialNCE`, re-implemented here: alias
  draws, one ``B x (m + 1) x d`` gather, a batched matmul, its criterion with its eps), printed beside our two
  NCEs as speed-ups. "loss fwd+bwd" is the forward and backward of the loss; "update" is ``bank.update`` for
  the bank objectives and the SGD step on the n x d weights for the parametric softmax (its equivalent of
  refreshing the bank); "total" is their sum. One batch of the same size checks that our NCE gives the
  official loss and gradient on the same indices.
* the crossover of the two ways our per-image NCE scores its noise (dense ``F V^T`` then pick, or a gather of
  the ``B x m`` rows), over m at the same n and B (``--parts crossover``).
* the whole InstDisc step (encoder forward + NCE + backward + SGD step + bank update) against a plain
  supervised step with the same encoder (encoder + linear ``num_classes``-way classifier + cross-entropy
  + SGD step), on random images of the chosen size (no data loading, no augmentation).

Each case is warmed up, then run ``--repeats`` times; the cases are interleaved round by round so a change in
background load hits all of them alike. Figures are medians. On CUDA every phase is bracketed by
``torch.cuda.synchronize()`` and the peak memory of each objective's forward+backward is measured.
Everything runs in fp32.

    python benchmarks/objectives.py        # small_cnn on 28x28x1 images (the default; ~2 min on 2 idle CPU cores)
    python benchmarks/objectives.py --arch resnet18_cifar --image-size 32 --repeats 3
    python benchmarks/objectives.py --device cuda --repeats 50

Writes ``results/objectives_<device>.json`` (figures, raw times and provenance).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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
from instdisc_lite.nce import DENSE_SCORES_MAX_RATIO, NCE  # noqa: E402
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
    parts = ["all", "objectives", "crossover", "steps"]
    p.add_argument("--parts", default="all", choices=parts, help="what to measure (default all)")
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


# ---------------------------------------------------------------------------------------------- the official NCE

# lemniscate.pytorch's NCECriterion adds this to both denominators of eq. 5
OFFICIAL_EPS = 1e-7


class AliasSampler:
    """Walker's alias method, the way the official code draws its noise (``lemniscate.pytorch``'s ``AliasMethod``).

    Built once from ``probs`` ``(n,)``: a table ``prob`` ``(n,)`` of acceptance probabilities and ``alias`` ``(n,)``
    of fallbacks, so that a draw is O(1) for any distribution: pick a slot k uniformly, keep k with probability
    ``prob[k]``, else take ``alias[k]``. The official code builds it from uniform "unigrams" (all ones), so every
    ``prob`` is 1 and no alias is ever taken, but every draw still costs the whole procedure: one uniform integer,
    two table lookups, one Bernoulli and a select per sample.
    """

    def __init__(self, probs: torch.Tensor) -> None:
        p = (probs.double() / probs.sum()).tolist()
        n = len(p)
        prob = [n * x for x in p]
        alias = [0] * n
        small = [k for k, x in enumerate(prob) if x < 1.0]
        large = [k for k, x in enumerate(prob) if x >= 1.0]
        while small and large:  # pair an under-full slot with an over-full one, which tops it up
            lo, hi = small.pop(), large.pop()
            alias[lo] = hi
            prob[hi] = (prob[hi] - 1.0) + prob[lo]
            (small if prob[hi] < 1.0 else large).append(hi)
        for k in small + large:  # what rounding leaves over is full
            prob[k] = 1.0
        self.prob = torch.tensor(prob, dtype=torch.float32)
        self.alias = torch.tensor(alias, dtype=torch.long)

    def to(self, device: torch.device) -> AliasSampler:
        self.prob, self.alias = self.prob.to(device), self.alias.to(device)
        return self

    def draw(self, count: int) -> torch.Tensor:
        """``(count,)`` indices distributed as ``probs``."""
        k = torch.empty(count, dtype=torch.long, device=self.prob.device).random_(0, len(self.prob))
        keep = torch.bernoulli(self.prob.index_select(0, k))  # 1: keep k, 0: take its alias
        return k * keep.long() + self.alias.index_select(0, k) * (1 - keep).long()


class _OfficialNCEFunction(torch.autograd.Function):
    """The official ``NCEFunction``: ``out[b, k] = exp(v_{idx[b, k]} . f_b / tau) / Z``, ``(B, m + 1)``, by ONE
    gather of the ``B x (m + 1)`` bank rows into a ``(B, m + 1, d)`` tensor and a batched matmul. Its parameters are
    read on the host every call (``params`` = [m, tau, Z, momentum], as the official buffer); Z is set on the first
    call to n x the mean of ``exp(score / tau)`` over all ``m + 1`` columns (the positive included) and kept.
    The backward is the official one: ``d out / d f_b = sum_k out[b, k] v_{idx[b, k]} / tau`` from the saved rows.
    (The official backward also writes the positives' rows into the memory; here that is ``bank.update``, after the
    backward, as for every bank objective.)
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, params: torch.Tensor):
        m, tau, z = int(params[0].item()), params[1].item(), params[2].item()
        b, d = features.shape
        weight = torch.index_select(memory, 0, idx.view(-1)).view(b, m + 1, d)
        out = torch.bmm(weight, features.detach().view(b, d, 1)).view(b, m + 1)
        out.div_(tau).exp_()
        if z < 0:  # the first batch sets Z, for good
            params[2] = out.mean() * memory.shape[0]
            z = params[2].item()
        out.div_(z)
        ctx.save_for_backward(weight, out)
        ctx.tau = tau
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, out = ctx.saved_tensors
        grad = grad_out * out / ctx.tau  # d out / d score = out / tau (Z is a constant)
        return torch.bmm(grad.unsqueeze(1), weight).squeeze(1), None, None, None


class OfficialNCE(nn.Module):
    """The official lemniscate.pytorch NCE (``NCEAverage`` + ``NCECriterion``), re-implemented as the reference.

    ``forward(features (B, d), indices (B,), idx=None) -> (1,)`` loss. ``idx`` ``(B, m + 1)``: the bank rows to
    score; drawn by :class:`AliasSampler` (m + 1 per image, uniform) when not given, and slot 0 is always overwritten
    with the positive. The criterion, with ``P_n = 1/n`` and the ``(B, m + 1)`` output P of the layer::

        loss = -[ sum_b log(P_b0 / (P_b0 + m P_n + eps)) + sum_b sum_k log(m P_n / (P_bk + m P_n + eps)) ] / B

    ``eps`` is the official 1e-7; ``eps=0`` gives eq. 6 exactly (the value :class:`instdisc_lite.nce.NCE` computes).
    """

    def __init__(self, bank: MemoryBank, num_negatives: int, temperature: float, eps: float = OFFICIAL_EPS) -> None:
        super().__init__()
        self.bank = bank
        self.num_negatives = num_negatives
        self.eps = eps
        self.sampler = AliasSampler(torch.ones(bank.num_items)).to(bank.memory.device)
        self.register_buffer("params", torch.tensor([num_negatives, temperature, -1.0, bank.momentum]))

    @property
    def z(self) -> float:
        return self.params[2].item()

    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, m + 1)`` rows to score: m + 1 alias draws per image, then the positives in slot 0."""
        idx = self.sampler.draw(indices.shape[0] * (self.num_negatives + 1)).view(indices.shape[0], -1)
        idx.select(1, 0).copy_(indices)
        return idx

    def layer(self, features: torch.Tensor, indices: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``NCEAverage``: the ``(B, m + 1)`` probabilities ``exp(score / tau) / Z``, the positive in column 0."""
        if idx is None:
            idx = self.sample(indices)
        else:
            idx = idx.clone()
            idx.select(1, 0).copy_(indices)
        return _OfficialNCEFunction.apply(features, self.bank.memory, idx, self.params)

    def criterion(self, out: torch.Tensor) -> torch.Tensor:
        """``NCECriterion`` of the layer's output ``(B, m + 1)``: a ``(1,)`` loss."""
        b, m = out.shape[0], out.shape[1] - 1
        pn = 1.0 / self.bank.num_items
        p_pos = out.select(1, 0)
        ln_pmt = torch.div(p_pos, p_pos.add(m * pn + self.eps)).log_()
        pon_div = out.narrow(1, 1, m).add(m * pn + self.eps)
        ln_pon = torch.div(pon_div.clone().fill_(m * pn), pon_div).log_()
        return -(ln_pmt.sum(0) + ln_pon.view(-1, 1).sum(0)) / b

    def forward(self, features: torch.Tensor, indices: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.criterion(self.layer(features, indices, idx))


def agreement(args: argparse.Namespace, device: torch.device) -> dict:
    """Loss and gradient of our NCE (per-image, Z fixed to the official Z) against the official one on one batch of
    the benchmark's size, on the same indices; and how much the official eps moves the loss."""
    n, d, m, B = args.n, args.dim, args.negatives, args.batch_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
    indices = torch.randperm(n, generator=gen)[:B].to(device)
    # features near their rows, as after some training, so the positive term is not negligible
    rows = bank.memory[indices].cpu()
    feats = F.normalize(rows + 0.5 * torch.randn(B, d, generator=gen), dim=1).to(device)
    out: dict = {}
    grads = {}
    for eps in (OFFICIAL_EPS, 0.0):
        official = OfficialNCE(bank, m, args.temperature, eps=eps)
        torch.manual_seed(args.seed)  # the same draw for both eps
        f = feats.clone().requires_grad_()
        idx = official.sample(indices)
        loss = official(f, indices, idx)
        loss.backward()
        out[f"official_loss_eps_{eps:g}"] = loss.item()
        grads[eps] = f.grad
    ours = NCE(bank, num_negatives=m, temperature=args.temperature, z_mode="fixed")
    ours.z.fill_(official.z)
    f = feats.clone().requires_grad_()
    loss = ours(f, indices, noise_indices=idx[:, 1:])
    loss.backward()
    ref0, ref_eps = out["official_loss_eps_0"], out[f"official_loss_eps_{OFFICIAL_EPS:g}"]
    out.update(
        z=official.z,
        ours_loss=loss.item(),
        rel_loss_diff_vs_eps_0=abs(loss.item() - ref0) / abs(ref0),
        rel_grad_diff_vs_eps_0=((f.grad - grads[0.0]).norm() / grads[0.0].norm()).item(),
        rel_loss_diff_vs_official_eps=abs(loss.item() - ref_eps) / abs(ref_eps),
        rel_loss_change_by_official_eps=abs(ref_eps - ref0) / abs(ref0),
    )
    return out


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

    bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
    official = OfficialNCE(bank, m, args.temperature).to(device)
    cases = [Case(
        "official_nce", "official NCE (lemniscate.pytorch; reference)", bank_step(official, bank), objective=official,
        gather_bytes=B * (m + 1) * d * f32, gather_formula="B*(m+1)*d*4 (alias draws, one gather, bmm)",
        logits_bytes=B * (m + 1) * f32, update="bank.update (official: in the backward)",
    )]  # fmt: skip
    for shared in (False, True):
        bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
        nce = NCE(bank, num_negatives=m, temperature=args.temperature, shared_negatives=shared).to(device)
        if shared:
            gather, formula = m * d * f32, "m*d*4"
        elif nce.dense_scoring():
            gather, formula = 0, "none (B x n scores F V^T, then the B x m picked; backward: embedding_bag)"
        else:
            gather, formula = B * m * d * f32, "B*m*d*4"
        cases.append(Case(
            "nce_shared" if shared else "nce_per_image",
            f"NCE, {'shared' if shared else 'per-image'} negatives",
            bank_step(nce, bank),
            objective=nce, gather_bytes=gather, gather_formula=formula, logits_bytes=B * (m + 1) * f32,
            update="bank.update", scoring="shared" if shared else ("dense" if nce.dense_scoring() else "gather"),
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


# ---------------------------------------------------------------------------------------------- crossover

# m/n of the crossover sweep, m from n/400 to n/25; the benchmark's own m is added (CIFAR-10's 4096 of 50,000: n/12)
CROSSOVER_FRACTIONS = (1 / 400, 1 / 200, 1 / 100, 1 / 50, 1 / 25)


def crossover_cases(args: argparse.Namespace, device: torch.device, sync: Callable[[], None]) -> list[Case]:
    """Per-image NCE loss forward+backward, scored densely and by gathering, for several m at the benchmark's n, B."""
    n, d, B = args.n, args.dim, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    bank = MemoryBank(n, d, generator=torch.Generator().manual_seed(args.seed)).to(device)
    idx = torch.randperm(n, generator=gen)[:B].to(device)
    feats = F.normalize(torch.randn(B, d, generator=gen), dim=1).to(device).requires_grad_()
    lap = timer(sync)
    cases = []
    for m in sorted({max(1, round(n * frac)) for frac in CROSSOVER_FRACTIONS} | {args.negatives}):
        for scoring in ("dense", "gather"):
            nce = NCE(bank, num_negatives=m, temperature=args.temperature, scoring=scoring).to(device)

            def step(nce: NCE = nce) -> Phases:
                feats.grad = None
                lap()
                nce(feats, idx).backward()
                return {"loss": lap()}

            cases.append(Case(f"m{m}_{scoring}", f"m={m} {scoring}", step, m=m, scoring=scoring))
    return cases


def report_crossover(cases: list[Case], args: argparse.Namespace) -> dict:
    """Prints dense against gather per m; returns the figures and the m/n where they cost the same."""
    n, B = args.n, args.batch_size
    print(f"\nPer-image NCE, dense scores (F V^T, then pick) against gathering the B x m rows: loss fwd+bwd, "
          f"n={n}, B={B}, d={args.dim}, ms (median of {len(cases[0].samples)})")  # fmt: skip
    rows, table = [], []
    by_m = {}
    for c in cases:
        by_m.setdefault(c.meta["m"], {})[c.meta["scoring"]] = c.median("loss")
    for m, t in sorted(by_m.items()):
        ratio = t["gather"] / t["dense"]
        rows.append({"m": m, "m_over_n": m / n, "Bm_over_n": B * m / n, "dense_ms": 1e3 * t["dense"],
                     "gather_ms": 1e3 * t["gather"], "gather_over_dense": ratio})  # fmt: skip
        table.append([str(m), f"{m / n:.4f}", f"{B * m / n:.2f}", f"{1e3 * t['dense']:.1f}",
                      f"{1e3 * t['gather']:.1f}", f"{ratio:.2f}", "dense" if ratio > 1 else "gather"])  # fmt: skip
    print_table(["m", "m/n", "B*m/n", "dense", "gather", "gather/dense", "faster"], table)
    cross = None  # log-linear interpolation of gather/dense = 1 between the first pair of m that brackets it
    for a, b in zip(rows, rows[1:], strict=False):
        ra, rb = math.log(a["gather_over_dense"]), math.log(b["gather_over_dense"])
        if ra <= 0 < rb:
            t = -ra / (rb - ra)
            cross = math.exp(math.log(a["m_over_n"]) + t * (math.log(b["m_over_n"]) - math.log(a["m_over_n"])))
            break
    rule = 1 / DENSE_SCORES_MAX_RATIO
    where = f"m/n = {cross:.4f} (n = {1 / cross:.0f} m)" if cross else "outside the swept m"
    print(f"  crossover: {where}; NCE(scoring='auto') scores densely while m/n >= {rule:.4f} "
          f"(n <= {DENSE_SCORES_MAX_RATIO} m)")  # fmt: skip
    return {"rows": rows, "crossover_m_over_n": cross, "rule_dense_while_m_over_n_at_least": rule}


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


# the goals of issue 10 for our NCE against the official one: loss forward+backward, official time / ours
SPEEDUP_GOALS = {"nce_shared": 50.0, "nce_per_image": 1.5}


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
          "parametric softmax.\n  gather = noise rows copied out of the bank: B*m*d*4 bytes per-image when "
          "gathered, m*d*4 shared; logits = B x (m+1) scores for NCE, B x n for the softmaxes.")  # fmt: skip
    report_against_official(cases)


def report_against_official(cases: list[Case]) -> None:
    """Our two NCEs beside the official one, as speed-ups (official time / ours) against the goals."""
    ref = next(c for c in cases if c.key == "official_nce")
    print("\nNCE against the official approach (same n, d, m, B; speed-up = official ms / ours, median per case):")
    rows = []
    for c in cases:
        if c.key not in ("official_nce", *SPEEDUP_GOALS):
            continue
        goal = SPEEDUP_GOALS.get(c.key)
        speedup = ref.median("loss") / c.median("loss")
        rows.append([c.label, c.meta.get("scoring", "alias + gather"), f"{1e3 * c.median('loss'):.2f}",
                     f"{1e3 * c.median('total'):.2f}", f"{speedup:.2f}x",
                     f"{ref.median('total') / c.median('total'):.2f}x",
                     f">= {goal:g}x" if goal else "-",
                     ("met" if speedup >= goal else "NOT met") if goal else "-"])  # fmt: skip
    print_table(["NCE", "scores by", "loss f+b ms", "total ms", "speed-up f+b", "speed-up total", "goal (f+b)",
                 ""], rows)  # fmt: skip


def report_agreement(agree: dict) -> None:
    print(f"\nSame loss as the official NCE (one batch of this size, same indices, our Z fixed to its Z = "
          f"{agree['z']:.6g}): relative difference of the loss {agree['rel_loss_diff_vs_eps_0']:.1e} and of the "
          f"gradient {agree['rel_grad_diff_vs_eps_0']:.1e} against its criterion with eps = 0.\n  The official "
          f"eps = {OFFICIAL_EPS:g} itself moves its loss by {agree['rel_loss_change_by_official_eps']:.1e} relative "
          f"(ours against it: {agree['rel_loss_diff_vs_official_eps']:.1e}): (m + 1) terms, each changed by about "
          f"eps / (P + m/n).")  # fmt: skip


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
        speedups = {key: obj[0].median("loss") / next(c for c in obj if c.key == key).median("loss")
                    for key in SPEEDUP_GOALS}  # fmt: skip
        for key, value in speedups.items():
            summaries[key]["speedup_loss_vs_official"] = value
            summaries[key]["speedup_goal"] = SPEEDUP_GOALS[key]
        result["objectives"] = {"baseline": "parametric", "reference": "official_nce", "cases": summaries}
        del obj
        agree = agreement(args, device)
        report_agreement(agree)
        result["objectives"]["agreement_with_official"] = agree
    if args.parts in ("all", "crossover"):
        cross = crossover_cases(args, device, sync)
        measure(cross, min(warmup, 1), min(repeats, 3), sync)
        result["crossover"] = report_crossover(cross, args) | {"cases": {c.key: c.summary() for c in cross}}
        del cross
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
