"""Write the README's "Measured figures" block from the benchmark results in ``results/``.

Everything between ``<!-- figures:begin -->`` and ``<!-- figures:end -->`` in ``README.md`` is generated from
``results/quality.json`` (``benchmarks/quality.py``), ``results/objectives_cpu.json`` (``benchmarks/objectives.py``)
and ``results/fixed_z.json`` (``benchmarks/fixed_z.py``), plus the shipped configs for the one sentence that says
which of them use which Z. Every number, and every verdict in words ("within the 10-minute goal", "dominates",
"diverged"), is computed from those files, so the block cannot drift from them. Tables follow the files'
structure: a row the objectives benchmark adds to its ``objectives.cases`` (or ``steps.cases``) shows up without a
change here.

    python3 tools/readme_figures.py            # rewrite the block in README.md
    python3 tools/readme_figures.py --check    # exit 1, with one line, when the block is not what the files give

``tests/test_readme_figures.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "results"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
WIDTH = 120  # the README's line length

QUALITY, OBJECTIVES, FIXED_Z = "quality.json", "objectives_cpu.json", "fixed_z.json"
QUALITY_GOAL_S = 600  # the quick config's budget: train and evaluate within 10 minutes on a 2-core CPU
IDLE_CORES = 0.25  # other processes below this many busy cores: the machine counts as idle (benchmarks/objectives.py)
NCE_METHODS = ("instdisc", "cmc")  # the methods whose NCE has a Z (z_mode); the others ignore it

# What a label in a results file does not say. Keyed by the file's own keys; a key not listed here gets nothing.
CASE_NOTES = {"nce_per_image": "the paper"}
QUALITY_LABELS = {"raw_pixels": "raw pixels"}  # pca<N> and learned are named from the file below


class FiguresError(Exception):
    """A results file is missing or lacks what the block needs."""


# ---------------------------------------------------------------------------------------------- formatting


def num(x: float) -> str:
    """Three significant figures at most, whole numbers with thousands separators: 878, 12.7, 2,049, 0.96."""
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def mib(n_bytes: float) -> str:
    value = n_bytes / 2**20
    return f"{value:,.0f} MiB" if value >= 10 or value == int(value) else f"{value:.1f} MiB"


def ms(x: float) -> str:
    return f"{x:.1f} ms" if x < 10 else f"{num(x)} ms"


def plural(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def codes(names: Iterable[str]) -> str:
    return plural([f"`{n}`" for n in names])


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def para(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), WIDTH, break_long_words=False, break_on_hyphens=False)


def label_of(text: str) -> str:
    """A label as the README writes it: ``n x d`` becomes ``n × d``."""
    return text.replace(" x ", " × ")


# ---------------------------------------------------------------------------------------------- reading


def load(results: Path, name: str) -> dict[str, Any]:
    path = results / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FiguresError(f"{path} is missing; run the benchmark that writes it") from err


def get(data: dict[str, Any], *keys: str, where: str = "") -> Any:
    node: Any = data
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise FiguresError(f"{where or 'results'}: no {'.'.join(keys)}")
        node = node[key]
    return node


def torch_version(prov: dict[str, Any]) -> str:
    return str(prov.get("torch", "?"))


def machine(prov: dict[str, Any]) -> str:
    """The machine as a results file records it: its CPU (and GPU, where one was used)."""
    cores = prov.get("cpu_count")
    text = f"a {cores}-core {prov.get('cpu_model', 'unknown')} CPU" if cores else f"a {prov.get('cpu_model', '?')} CPU"
    if prov.get("gpu_name"):
        text += f" and a {prov['gpu_name']} GPU"
    return text


def device_name(prov: dict[str, Any]) -> str:
    """Where a measurement ran: ``CPU`` or the GPU's name."""
    device = str(prov.get("device", "cpu"))
    return (prov.get("gpu_name") or "GPU") if device.startswith("cuda") else device.upper()


def others_load(name: str, data: dict[str, Any]) -> float | None:
    """CPU cores other processes kept busy during the measurement, where the file records it."""
    if name == QUALITY:
        return data.get("others_cpu_cores_during_run")
    if name == OBJECTIVES:
        return (data.get("load") or {}).get("others_cpu_cores")
    return data.get("others_cpu_cores")


def median_count(case: dict[str, Any], phase: str) -> int:
    return len(case.get(f"{phase}_ms", {}).get("all", []))


# ---------------------------------------------------------------------------------------------- sections


def provenance_section(files: dict[str, dict[str, Any]]) -> str:
    provs = {name: get(data, "provenance", where=name) for name, data in files.items()}
    machines = {machine(p) for p in provs.values()}
    torches = {torch_version(p) for p in provs.values()}
    if len(machines) == 1 and len(torches) == 1:
        where = f"All measured on one machine with {machines.pop()} and torch {torches.pop()}"
    else:
        where = "Measured on: " + "; ".join(
            f"`{name}` with {machine(p)} and torch {torch_version(p)}" for name, p in provs.items()
        )
    loads = {name: others_load(name, data) for name, data in files.items()}
    recorded = {name: value for name, value in loads.items() if value is not None}
    parts = []
    if recorded:
        worst = max(recorded.values())
        state = "idle" if worst < IDLE_CORES else "not idle"
        parts.append(
            f"{state} while {codes(recorded)} {'were' if len(recorded) > 1 else 'was'} measured (other processes "
            f"kept at most {worst:.2f} CPU cores busy)"
        )
    missing = [name for name in loads if name not in recorded]
    if missing:
        parts.append(f"{codes(missing)} {'do' if len(missing) > 1 else 'does'} not record the machine's load")
    needed = ("command", "git_commit", "date", "cpu_model")
    complete = [name for name, p in provs.items() if all(p.get(k) for k in needed)]
    holds = (
        "each of these files in `results/` holds the command, commit, date and machine"
        if len(complete) == len(provs)
        else f"{codes(complete)} hold the command, commit, date and machine"
    )
    return para(f"{where}; {'; '.join(parts)}; {holds}.") if parts else para(f"{where}; {holds}.")


def quality_section(q: dict[str, Any]) -> str:
    where = QUALITY
    cfg, knn, top1 = get(q, "config", where=where), get(q, "knn", where=where), get(q, "knn_top1", where=where)
    command = get(q, "provenance", "command", where=where)
    subset = cfg.get("train_subset")
    images = f"the first {subset:,} training images" if subset else "all training images"
    intro = para(
        f"**Quality** (`{command}` → `results/{QUALITY}`): `{cfg['name']}` trained from scratch ({cfg['epochs']} "
        f"epochs over {images}), then weighted kNN (k = {knn['k']}, τ = {knn['temperature']}) of the "
        f"{knn['test_images']:,} test images against all {knn['train_images']:,} training images:"
    )
    names = {"learned": f"learned ({cfg['low_dim']}-d, instance discrimination, no labels)", **QUALITY_LABELS}
    for key in top1:
        if key.startswith("pca") and key[3:].isdigit():
            names[key] = f"PCA-{key[3:]} of the pixels"
    order = ["learned", *sorted((k for k in top1 if k != "learned"), key=lambda k: -top1[k])]
    best = max(top1.values())
    rows = []
    for key in order:
        value = f"{top1[key]:.2f} %"
        rows.append([names.get(key, key.replace("_", " ")), f"**{value}**" if top1[key] == best else value])
    wall = get(q, "wall_s", "train_and_eval", where=where)
    verdict = "within" if wall <= QUALITY_GOAL_S else "over"
    goal = f"{QUALITY_GOAL_S / 60:.0f}-minute goal"
    baselines = [k for k in top1 if k != "learned"]
    beaten = [names.get(k, k) for k in baselines if top1["learned"] > top1[k]]
    if baselines and len(beaten) == len(baselines):
        compare = "The learned features beat every baseline without learning."
    else:
        lost = [names.get(k, k) for k in baselines if top1["learned"] <= top1[k]]
        compare = f"The learned features do not beat {plural(lost)}."
    others, cpu_s = q.get("others_cpu_cores_during_run"), q.get("cpu_s_train_and_eval")
    threads = q.get("provenance", {}).get("torch_threads")
    shared = ""
    if others is not None and others >= 0.25 and cpu_s and threads:  # a busy machine: the CPU time says more
        idle = cpu_s / threads
        shared = (
            f" Other processes kept {others:.2f} cores busy meanwhile; the run's own CPU time, {cpu_s:.0f} s on "
            f"{threads} threads, is about {idle:.0f} s ({idle / 60:.1f} min) on an idle machine, "
            f"{'within' if idle <= QUALITY_GOAL_S else 'over'} the goal."
        )
    closing = para(
        f"{compare} Wall time, training plus evaluation: {wall:.0f} s ({wall / 60:.1f} min), {verdict} the {goal}."
        + shared
    )
    return "\n\n".join([intro, table(["features", "kNN top-1"], rows), closing])


def other_data_section(results: Path) -> str:
    """The same recipe on other data (``results/quality_*.json``): learned kNN against the pixel baselines."""
    shipped = yaml.safe_load((ROOT / "instdisc_lite" / "configs" / "fashion_mnist_quick.yaml").read_text())
    rows = []
    for path in sorted(results.glob("quality_*.json")):
        q = load(results, path.name)
        cfg, top1, knn = get(q, "config", where=path.name), get(q, "knn_top1", where=path.name), q["knn"]
        ignored = ("dataset", "data_path", "test_path", "name", "out_dir", "progress")
        budget = shipped.get("image_passes")
        cfg = {"image_passes": None, **cfg}  # results made before the key existed trained epochs as set
        if budget and cfg["image_passes"] == budget:
            ignored += ("epochs",)  # the shipped budget of image passes, resolved for this data
        changed = [f"{k}={v}" for k, v in cfg.items() if k not in ignored and shipped.get(k, v) != v]
        if budget and cfg["image_passes"] != budget and f"epochs={cfg['epochs']}" not in changed:
            changed.insert(0, f"epochs={cfg['epochs']}")  # epochs, not the budget, set its length
        rows.append([
            f"`{path.name}`",
            f"{knn['train_images']:,} / {knn['test_images']:,}",
            ", ".join(f"`{a}`" for a in changed) or "as shipped",
            f"{top1['learned']:.2f} %",
            f"{top1['pca128']:.2f} %",
            f"{top1['learned'] - top1['pca128']:+.2f}",
        ])  # fmt: skip
    if not rows:
        return ""
    intro = para(
        "**The same recipe on other 28×28 grayscale data** (`dataset: npz`, made offline by `tools/other_data.py`: "
        "digits are real MNIST digits, glyphs are letters rendered from fonts), weighted kNN as above:"
    )
    headers = ["result", "train / test images", "changed from the quick config", "learned", "PCA-128", "margin"]
    return "\n\n".join([intro, table(headers, rows)])


def objectives_section(o: dict[str, Any]) -> str:
    where = OBJECTIVES
    cfg, prov = get(o, "config", where=where), get(o, "provenance", where=where)
    objectives = get(o, "objectives", where=where)
    cases, base_key = objectives["cases"], objectives["baseline"]
    if base_key not in cases:
        raise FiguresError(f"{where}: the baseline {base_key!r} is not one of objectives.cases")
    base = cases[base_key]["loss_ms"]["median"]
    counts = sorted({median_count(c, "loss") for c in cases.values()})
    of = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    intro = para(
        f"**Objectives** (`{prov['command']}` → `results/{OBJECTIVES}`): n = {cfg['n']:,}, d = {cfg['dim']}, "
        f"m = {cfg['negatives']}, B = {cfg['batch_size']}, forward + backward of the loss, median of {of}, "
        f"in one run on the {device_name(prov)}:"
    )
    base_name = base_key.replace("_", " ")
    rows = []
    for key, case in cases.items():
        label = label_of(case.get("label", key))
        note = CASE_NOTES.get(key) or case.get("note")
        if note:
            label += f" ({note})"
        loss = case["loss_ms"]["median"]
        rows.append([label, num(loss), f"{loss / base:.2f}"])
    parts = [intro, table(["objective", "ms/step", f"× {base_name}"], rows)]
    text = []
    if o.get("measured_under_load"):
        others = (o.get("load") or {}).get("others_cpu_cores")
        text.append(
            f"Measured under load (other processes kept {others} CPU cores busy): absolute times are inflated, "
            "ratios less so."
        )
    steps = o.get("steps")
    if steps:
        scases, sbase = steps["cases"], steps["cases"][steps["baseline"]]
        others = {k: c for k, c in scases.items() if k != steps["baseline"]}
        ratios = "; ".join(
            f"{c.get('label', k)}: {c['total_ms']['median'] / sbase['total_ms']['median']:.2f}×"
            for k, c in others.items()
        )
        bank_ms = [c.get("bank_ms", {}).get("median", 0.0) for c in others.values()]
        banks = sorted({round(x, 1) for x in bank_ms if x > 0})
        bank = ""
        if banks:
            bank = (
                f" (the bank update itself: {banks[0]:.1f}" + (f"–{banks[-1]:.1f}" if len(banks) > 1 else "") + " ms)"
            )
        side = cfg["image_size"]
        text.append(
            f"Whole step with `{cfg['arch']}` on {side}×{side} (encoder forward and backward, SGD step, bank "
            f"update), against the same encoder's {sbase.get('label', steps['baseline'])} step: {ratios}{bank}."
        )
    reference = objectives.get("reference")
    goals = [(k, c) for k, c in cases.items() if "speedup_goal" in c and "speedup_loss_vs_official" in c]
    if reference in cases and goals:
        verdicts = "; ".join(
            f"{label_of(c.get('label', k))}: {c['speedup_loss_vs_official']:.1f}× (goal ≥ {c['speedup_goal']:g}×, "
            f"{'met' if c['speedup_loss_vs_official'] >= c['speedup_goal'] else 'not met'})"
            for k, c in goals
        )
        text.append(
            "Against the official NCE layer (first row), forward + backward, official ms ÷ ours, on this "
            f"{prov.get('cpu_model', 'CPU')} CPU: {verdicts}."
        )
    per_image, shared = cases.get("nce_per_image"), cases.get("nce_shared")
    if per_image and shared and per_image.get("gather_bytes") and shared.get("gather_bytes"):
        share = shared["loss_ms"]["median"] / per_image["loss_ms"]["median"]
        same_logits = per_image.get("logits_bytes") == shared.get("logits_bytes")
        dominates = same_logits and share < 0.5
        text.append(
            f"On the {device_name(prov)} the per-image gather of B·m·d floats "
            f"({mib(per_image['gather_bytes'])} a step) {'dominates' if dominates else 'does not dominate'}: "
            f"shared negatives gather {mib(shared['gather_bytes'])} and, "
            f"{'with the same' if same_logits else 'with other'} B × (m + 1) logits, take {100 * share:.1f} % of "
            "the time."
        )
    if text:
        parts.append(para(" ".join(text)))
    return "\n\n".join(parts)


def nce_configs() -> str:
    """Which shipped configs use which Z, read from the configs themselves."""
    sys.path.insert(0, str(ROOT))
    from instdisc_lite.config import load_config, shipped_configs

    groups: dict[str, list[str]] = {}
    others: dict[tuple[str, str], list[str]] = {}
    for name in shipped_configs():
        c = load_config(name)
        if c.method not in NCE_METHODS:
            continue
        if c.objective == "nce":
            groups.setdefault(c.z_mode, []).append(name)
        else:
            others.setdefault((c.objective, c.z_mode), []).append(name)
    words = {"running": "the running Z", "fixed": "the paper's fixed Z"}
    uses = [f"{codes(names)} {'uses' if len(names) == 1 else 'use'} {words.get(mode, mode)}"
            for mode, names in sorted(groups.items(), key=lambda kv: kv[0] != "running")]  # fmt: skip
    text = f"Of the shipped configs that train with NCE, {'; '.join(uses)}."
    for (objective, mode), names in others.items():
        what = "the exact softmax" if objective == "softmax" else f"`objective: {objective}`"
        text += (
            f" {codes(names)} {'trains' if len(names) == 1 else 'train'} with {what}; under `--set objective=nce` "
            f"{'it uses' if len(names) == 1 else 'they use'} {words.get(mode, mode)}."
        )
    return text


def fixed_z_section(f: dict[str, Any]) -> str:
    where = FIXED_Z
    configs, summary = get(f, "config", where=where), get(f, "summary", where=where)
    fixed_cfg, running_cfg = configs["fixed"], configs["running"]
    differ = sorted(k for k in fixed_cfg if k != "name" and fixed_cfg.get(k) != running_cfg.get(k))
    fixed, running = summary["fixed"], summary["running"]
    first, last = fixed[0], fixed[-1]
    diverged = last["loss"] > first["loss"] and last["grad_norm"] > first["grad_norm"]
    c = fixed_cfg
    subset = f"{c['train_subset']:,} images" if c.get("train_subset") else "all images"
    same = (
        "the same run with `z_mode=fixed` and `z_mode=running`"
        if differ == ["z_mode"]
        else f"two runs that differ in {codes(differ)}"
    )
    title = (
        "**Why NCE with Z fixed from the first batch diverged**"
        if diverged
        else "**NCE with Z fixed from the first batch against a running Z**"
    )
    random_mean = math.exp(1 / (2 * c["low_dim"] * c["temperature"] ** 2))
    n = c["train_subset"] or 0
    z0 = first["z_used"]
    grows = last["z_batch"] / last["z_used"]
    cos0, cos1 = first.get("bank_cos_mean"), last.get("bank_cos_mean")
    concentrate = f" (the mean cosine of two bank rows goes from {cos0:.2f} to {cos1:.2f})" if cos0 is not None else ""
    intro = para(
        f"{title} (`{get(f, 'provenance', 'command', where=where)}` → `results/{FIXED_Z}`; `{c['arch']}`, "
        f"m = {c['num_negatives']}, τ = {c['temperature']}, lr {c['lr']}, {c['bank_init']} initial bank, {subset}, "
        f"{c['epochs']} epochs, {same}; {f['wall_s']:.0f} s in all). Z is estimated once from a {c['bank_init']} "
        f"bank: Z = {z0:,.0f}"
        + (
            f", n × {z0 / n:.2f}, where exp(vᵀf/τ) averages exp(1/(2dτ²)) ≈ {random_mean:.2f} for random unit vectors"
            if n
            else ""
        )  # fmt: skip
        + f". As the features concentrate{concentrate}, the batch's own estimate of Z grows to {num(grows)} times "
        f"the fixed one by epoch {last['epoch']}"
        + (
            ", and with the stale Z the close noise samples get h → 1 and each pushes with h/τ:"
            if last["noise_h_gt_half"] > first["noise_h_gt_half"]
            else ":"
        )
    )
    rows = []
    by_epoch = {r["epoch"]: r for r in running}
    for r in (first, last) if len(fixed) > 1 else (first,):
        rr = by_epoch[r["epoch"]]
        rows.append([
            str(r["epoch"]), num(r["z_batch"] / r["z_used"]), f"{100 * r['noise_h_gt_half']:.1f} %",
            f"{num(r['push'])} vs {r['pull']:.2f}", f"{num(r['grad_norm'])} / {num(rr['grad_norm'])}",
            f"{num(r['loss'])} / {num(rr['loss'])}", f"{r['knn_top1']:.1f} % / {rr['knn_top1']:.1f} %",
        ])  # fmt: skip
    headers = ["epoch", "batch Z / fixed Z", "noise h > 0.5", "push Σh (noise) vs pull 1−h",
               "feature grad norm fixed / running", "loss fixed / running", "kNN fixed / running"]  # fmt: skip
    r0, r1 = running[0], running[-1]
    stable = r1["loss"] < r0["loss"] and r1["grad_norm"] < r0["grad_norm"]
    follows = r1["z_batch"] / r1["z_used"]
    closing = para(
        f"The running estimate (`z_mode=running`, an EMA with momentum {running_cfg['z_momentum']}) ends within a "
        f"factor {num(follows)} of the batch's Z, against {num(grows)} for the fixed one; "
        + (
            f"it trains stably (loss {num(r0['loss'])} → {num(r1['loss'])}, gradient norm {num(r0['grad_norm'])} → "
            f"{num(r1['grad_norm'])})"
            if stable
            else f"its loss goes {num(r0['loss'])} → {num(r1['loss'])}"
        )
        + f" and its kNN reaches {r1['knn_top1']:.1f} % where the fixed run ends at {last['knn_top1']:.1f} %. "
        f"{nce_configs()} `--set z_mode=fixed` or `--set z_mode=running` switches any run; chapter 3 looks at when a "
        "frozen Z goes wrong and when it costs little."
    )
    return "\n\n".join([intro, table(headers, rows), closing])


# ---------------------------------------------------------------------------------------------- the block


def render(results: Path = RESULTS) -> str:
    """The block's text (between the markers, without them), from the files in ``results``."""
    files = {name: load(results, name) for name in (QUALITY, OBJECTIVES, FIXED_Z)}
    sections = [
        provenance_section(files),
        quality_section(files[QUALITY]),
        other_data_section(results),
        objectives_section(files[OBJECTIVES]),
        fixed_z_section(files[FIXED_Z]),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def replace_block(text: str, body: str) -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise FiguresError(f"README.md has no {BEGIN} ... {END} block")
    return text[: start + len(BEGIN)] + "\n" + body + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the block is not what the files give")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text()
        new = replace_block(text, render(args.results))
    except (FiguresError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme.name}: the Measured figures block is stale; run `python3 tools/readme_figures.py`")
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"{args.readme.name}: Measured figures rewritten from {args.results.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
