"""Why NCE with a fixed Z diverges on Fashion-MNIST: fixed vs running Z, measured step by step.

The paper estimates NCE's normaliser once, ``Z = n * mean_k exp(v_k^T f / tau)`` on the first batch, and keeps
it. At that moment the bank is random: ``v^T f ~ N(0, 1/d)``, so ``E exp(v^T f / tau) = exp(1 / (2 d tau^2))``
(about 2.2 for d = 128, tau = 0.07). Once the features of a 10-class dataset cluster, many noise samples sit
close to f and the true ``Z`` grows by orders of magnitude. With the stale Z, ``P(i|v) / (m P_n)`` explodes for
the close noise samples: their ``h`` saturates towards 1 and each pushes with ``h / tau``. The positive's pull
``(1 - h) / tau`` stays near full strength (measured: h of the positives stays small), but the summed push of the
noise outweighs it by two to three orders of magnitude: the loss is dominated by repulsion from the dataset's
dense regions and the feature gradients grow by orders of magnitude over a run with a running Z.

This script trains the same run twice, ``z_mode=fixed`` and ``z_mode=running`` (everything else equal, same
seed), and records every ``--stat-every`` steps: the Z in use, the batch's own estimate (eq. 7), the mean h of
the positives, the fraction of noise samples with h > 0.5, the pull ``1 - h_pos`` and the push ``sum_k h_k``
(the weights of the positive's and the noise samples' gradients, both times 1/tau), and the gradient norm per
feature; after each epoch, the kNN top-1 of the test features against the bank and the mean cosine similarity
of random bank pairs (how concentrated the features are).

    python benchmarks/fixed_z.py                                  # a few minutes on 2 idle CPU cores
    python benchmarks/fixed_z.py --set temperature=0.1 --out results/fixed_z_tau0.1.json

Writes ``results/fixed_z.json`` (per-epoch summaries, the per-step trace and provenance).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from quality import provenance  # noqa: E402

from instdisc_lite.config import TrainConfig, load_config  # noqa: E402
from instdisc_lite.data import set_epoch  # noqa: E402
from instdisc_lite.nce import NCE  # noqa: E402
from instdisc_lite.train import Run, build_run, evaluate_bank, learning_rate  # noqa: E402

# The trial run that diverged: a plain small CNN, NCE with m = 4096 negatives, tau = 0.07, lr 0.03.
# A 10k-image subset keeps it to minutes; h depends on Z / n, so the dynamics do not depend on n.
DEFAULTS = {
    "arch": "small_cnn",
    "objective": "nce",
    "num_negatives": 4096,
    "shared_negatives": True,  # same Z dynamics as per-image noise, a fraction of the cost
    "temperature": 0.07,
    "bank_init": "random",
    "crop_scale": 0.2,
    "eval_every": 1,
    "lr": 0.03,
    "warmup_epochs": 0,
    "train_subset": 10000,
    "batch_size": 256,
    "epochs": 4,
    "progress": False,
}


@torch.no_grad()
def step_stats(nce: NCE, features: torch.Tensor, indices: torch.Tensor, noise: torch.Tensor) -> dict[str, float]:
    """Z in use vs the batch estimate, and how saturated h is for positives and noise."""
    pos = (features * nce.bank.get(indices)).sum(1) / nce.temperature
    neg = nce.noise_scores(features, noise)
    log_z = math.log(nce.z.item())
    shift = log_z + math.log(nce.num_negatives / nce.bank.num_items)  # h = sigmoid(score - log Z - log(m/n))
    h_pos, h_neg = torch.sigmoid(pos - shift), torch.sigmoid(neg - shift)
    return {
        "z_used": nce.z.item(),
        "z_batch": nce.estimate_z(neg).item(),
        "h_pos": h_pos.mean().item(),
        "noise_h_gt_half": (h_neg > 0.5).float().mean().item(),
        "pull": (1 - h_pos).mean().item(),
        "push": h_neg.sum(1).mean().item(),
        "noise_cos_mean": (neg.mean() * nce.temperature).item(),
        "noise_cos_max": (neg.max(1).values.mean() * nce.temperature).item(),
    }


@torch.no_grad()
def bank_concentration(run: Run, pairs: int = 20000) -> float:
    """Mean cosine similarity of random pairs of bank rows (0 for a random bank, 1 for a collapsed one)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(run.bank.num_items, (pairs,), generator=g) for _ in range(2))
    return (run.bank.memory[a] * run.bank.memory[b]).sum(1).mean().item()


def train_instrumented(config: TrainConfig, stat_every: int) -> dict:
    """The trainer's loop (same steps as ``train_one_epoch``) with the NCE internals recorded."""
    run = build_run(config)
    nce = run.objective
    if not isinstance(nce, NCE):
        raise SystemExit("fixed_z.py needs objective=nce")
    trace, epochs, start = [], [], time.perf_counter()
    for epoch in range(config.epochs):
        lr = learning_rate(config, epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        set_epoch(run.data.train_loader, epoch, config.seed)
        run.method.train()
        losses = []
        for step, (images, _, indices) in enumerate(run.data.train_loader):
            with torch.no_grad():
                images = run.data.train_augment(images.to(run.device))
            indices = indices.to(run.device)
            features = run.encoder(images)  # the InstDisc method's step, opened up to record NCE's internals
            features.retain_grad()
            noise = nce.sample_noise(features.shape[0])
            loss = nce(features, indices, noise_indices=noise)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            if step % stat_every == 0:
                row = {"epoch": epoch + step / len(run.data.train_loader), "loss": loss.item()}
                row.update(step_stats(nce, features.detach(), indices, noise))
                row["grad_norm"] = (features.grad.norm(dim=1) * features.shape[0]).mean().item()  # loss is a mean
                trace.append(row)
            run.bank.update(indices, features.detach())
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
        rows = [r for r in trace if epoch <= r["epoch"] < epoch + 1]
        summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "epoch"}
        summary.update(epoch=epoch + 1, loss=sum(losses) / len(losses), lr=lr, **evaluate_bank(run))
        summary["bank_cos_mean"] = bank_concentration(run)
        summary["elapsed"] = time.perf_counter() - start
        epochs.append(summary)
        print(
            f"  {config.z_mode:>7} epoch {epoch + 1}: loss {summary['loss']:8.2f}  kNN {summary['knn_top1']:5.2f}%  "
            f"Z_batch/Z_used {summary['z_batch'] / summary['z_used']:9.3g}  h_pos {summary['h_pos']:.3f}  "
            f"noise h>0.5 {100 * summary['noise_h_gt_half']:6.3f}%  pull {summary['pull']:.3f}  "
            f"push {summary['push']:7.2f}  |grad| {summary['grad_norm']:7.2f}  bank cos {summary['bank_cos_mean']:.3f}",
            flush=True,
        )
    return {"epochs": epochs, "trace": trace, "config": config.to_dict()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion_mnist_quick", help="base config (the script's defaults on top)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--modes", nargs="+", default=["fixed", "running"], choices=["fixed", "running"])
    parser.add_argument("--stat-every", type=int, default=4, help="record the NCE internals every N steps")
    parser.add_argument("--out", default=str(ROOT / "results" / "fixed_z.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = {}
    t0 = time.perf_counter()
    for mode in args.modes:
        base = {**DEFAULTS, "name": f"fixed_z_{mode}", "z_mode": mode}
        config = load_config(args.config, {**base, **_overrides(args.overrides)})
        print(f"z_mode={mode}: {config.arch}, m={config.num_negatives}, tau={config.temperature}, lr={config.lr}")
        runs[mode] = train_instrumented(config, args.stat_every)
    result = {
        "summary": {mode: r["epochs"] for mode, r in runs.items()},
        "trace": {mode: r["trace"] for mode, r in runs.items()},
        "config": {mode: r["config"] for mode, r in runs.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "provenance": provenance(sys.argv if argv is None else ["benchmarks/fixed_z.py", *argv]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out} ({result['wall_s']:.0f} s)")
    return result


def _overrides(items: list[str]) -> dict:
    from instdisc_lite.config import parse_overrides

    return parse_overrides(items)


if __name__ == "__main__":
    main()
