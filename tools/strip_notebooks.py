"""Strip the book's notebooks for git: no outputs, no execution counts, no per-run metadata.

Notebooks are stored stripped and executed by the book build and by nbval. Usage::

    python tools/strip_notebooks.py            # strip book/*.ipynb in place
    python tools/strip_notebooks.py --check    # exit 1 (and list them) if any notebook is not stripped
    python tools/strip_notebooks.py a.ipynb    # only these files

Only outputs and run state are removed; sources, cell ids and notebook metadata (kernelspec, Colab) are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
# cell metadata written by executing a notebook (timings, scroll state), not by its author
RUN_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
RUN_NOTEBOOK_METADATA = ("widgets", "papermill")


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; return whether anything changed."""
    changed = False
    for cell in nb.cells:
        for key in RUN_CELL_METADATA:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell.outputs = []
                changed = True
            if cell.get("execution_count") is not None:
                cell.execution_count = None
                changed = True
        elif "attachments" in cell and not cell.attachments:
            del cell["attachments"]
            changed = True
    for key in RUN_NOTEBOOK_METADATA:
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: book/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="report unstripped notebooks, change nothing")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "book").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    verb = "not stripped" if args.check else "stripped"
    for path in dirty:
        print(f"{verb}: {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
