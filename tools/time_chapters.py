"""Time the book's chapters in quick mode on this CPU and write ``results/chapter_times.json``.

The file is what every chapter's run-time table quotes for quick mode (``instdisc_lite.book.expected_times``). Each
notebook is executed from scratch in a fresh kernel with nbclient (working directory ``book/``, as in the book
build; ``INSTDISC_BOOK_MODE=quick``), one after the other, and its wall time recorded with the provenance of the
measurement: the command, the git commit, the date, the CPU and how busy the rest of the machine was meanwhile. A
timing is only as good as the machine is quiet, so the CPU time that *other* processes used during each chapter is
measured (``/proc/stat``'s busy time less this script's and its kernels' own) and stored beside it as
``other_load_cores`` (average cores busy with other work); a chapter timed while that exceeded ``--max-other-load``
is stored with ``"quiet": false`` and reported. Run it on a quiet machine with the CPU count the figure should
describe (the book quotes "a N-core CPU" from the ``cpu_cores`` recorded here).

    python tools/time_chapters.py                           # every chapter, book/NN_*.ipynb
    python tools/time_chapters.py book/00_preface.ipynb     # some chapters; the other entries of --out are kept
    python tools/time_chapters.py --out /tmp/times.json book/00_preface.ipynb
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
OUT = ROOT / "results" / "chapter_times.json"


def default_chapters() -> list[Path]:
    """Every notebook of the book, ``book/NN_name.ipynb`` (the preface too)."""
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def cpu_ticks() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from the first line of ``/proc/stat``."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already counted in user and nice


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (each kernel is waited for when it shuts down)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_description() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown",
    )  # fmt: skip
    return {"model": model, "cores": len(os.sched_getaffinity(0)), "logical_cpus_on_machine": os.cpu_count()}


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "book", "instdisc_lite")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def time_chapter(path: Path, cell_timeout: int) -> dict[str, Any]:
    """Execute ``path`` from scratch in quick mode; its wall seconds and the other processes' load meanwhile."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=cell_timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    busy0 = cpu_ticks()
    own0 = own_cpu_seconds()
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except Exception as e:  # a failing chapter has no time worth recording
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    wall = time.perf_counter() - start
    busy1 = cpu_ticks()
    own = own_cpu_seconds() - own0
    other = max(0.0, (busy1 - busy0) - own)
    return {
        "wall_s": round(wall, 2),
        "own_cpu_s": round(own, 2),
        "other_load_cores": round(other / wall, 3),
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every chapter, book/NN_*.ipynb)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"the JSON file to write (default: {OUT.relative_to(ROOT)})"
    )
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell before a chapter fails")
    parser.add_argument(
        "--max-other-load", type=float, default=0.25,
        help="average cores of other work above which a chapter's timing is marked not quiet (default 0.25)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.paths] or default_chapters()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2

    os.environ["INSTDISC_BOOK_MODE"] = "quick"  # the kernels inherit this environment
    os.environ.pop("INSTDISC_BOOK_SMOKE", None)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # a fresh runs directory: a run left by an earlier build would be reused and shorten the timing; chapters
    # still share runs with each other in order, as they do for a reader (chapter 6 reuses chapter 5's)
    runs_root = tempfile.mkdtemp(prefix="instdisc_chapter_runs_")
    os.environ["INSTDISC_RUNS_DIR"] = runs_root
    cpu, commit = cpu_description(), git_commit()
    loadavg_start = os.getloadavg()
    existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
    chapters: dict[str, Any] = dict(existing.get("chapters", {}))
    failed, noisy, measured = [], [], []
    for path in paths:
        print(f"timing {path.name} in quick mode ...", flush=True)
        entry = time_chapter(path, args.cell_timeout)
        if entry["error"]:
            failed.append(f"{path.name}: {entry['error']}")
            print(f"  FAILED after {entry['wall_s']:.0f} s: {entry['error']}", flush=True)
            continue
        del entry["error"]
        entry["quiet"] = entry["other_load_cores"] <= args.max_other_load
        entry.update(cpu_cores=cpu["cores"], cpu_model=cpu["model"], date=_now(), commit=commit["commit"])
        chapters[path.stem] = entry
        measured.append(entry)
        if not entry["quiet"]:
            noisy.append(path.stem)
        print(f"  {entry['wall_s']:.1f} s wall, {entry['own_cpu_s']:.1f} s CPU, other load "
              f"{entry['other_load_cores']:.2f} cores", flush=True)  # fmt: skip

    shutil.rmtree(runs_root, ignore_errors=True)
    result = {
        "mode": "quick",
        "unit": "wall seconds to execute each notebook from scratch in a fresh kernel (cwd book/), quick mode",
        "chapters": dict(sorted(chapters.items())),
        "provenance": {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            **commit,
            "date": _now(),
            "cpu": cpu,
            "python": platform.python_version(),
            "torch": _version("torch"),
            "other_load": {
                "what": "CPU time of other processes during each chapter / its wall time (cores); loadavg at start",
                "loadavg_at_start": [round(x, 2) for x in loadavg_start],
                "max_other_load_cores": max((e["other_load_cores"] for e in measured), default=None),
                "threshold_cores": args.max_other_load,
                "not_quiet": noisy,
            },
            "chapters_timed_by_this_command": [p.stem for p in paths],
            "runs_dir": "a fresh temporary INSTDISC_RUNS_DIR: no run was reused from an earlier build",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}" + (f"; NOT QUIET (timings less reliable): {', '.join(noisy)}" if noisy else ""))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
