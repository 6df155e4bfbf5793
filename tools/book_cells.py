"""Bring the first cells of the book's notebooks to the chapter conventions of CONTRIBUTING.md.

Every notebook starts with the same boilerplate: the install cell (with the Colab form that chooses the mode and
Google Drive), the mode cell (which prints the mode and the chapter's expected run times) and, in a chapter, the
imports cell (glue and the runs directory from ``instdisc_lite.book``). This script writes the first two exactly,
patches the third, and tags all three so that the rendered page hides the boilerplate (``remove-cell`` for the install
cell, ``remove-input`` for the mode cell, whose output stays, ``hide-input`` for the imports) while Colab and Jupyter
still show it. Run it after adding a chapter, or after changing the convention here, then ``make strip``.

    python tools/book_cells.py [--check] [book/NN_name.ipynb ...]     # default: book/*.ipynb

``--check`` changes nothing and exits 1 listing the notebooks that are not up to date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFACE = "00_preface"

INSTALL_TEMPLATE = """\
# On Colab: choose a mode and whether to keep runs on Google Drive, then run this cell.
# Elsewhere the form does nothing (INSTDISC_BOOK_MODE rules); the package is installed.
MODE_CHOICE = "full"  # @param ["quick", "full", "paper"]
USE_DRIVE = False  # @param {{type:"boolean"}}
import sys
if "google.colab" in sys.modules:
    import subprocess
    URL = "git+{repository}"
    package = f"instdisc_lite[colab] @ {{URL}}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    from instdisc_lite.book import colab_settings
    colab_settings(MODE_CHOICE, USE_DRIVE)"""

MODE_TEMPLATE = """\
from instdisc_lite.book import book_mode, expected_times

MODE = book_mode()
print(MODE)
expected_times("{stem}", MODE)"""

# the tags of the boilerplate cells (Jupyter Book 1); the preface keeps its install cell, collapsed, because its
# text presents it
INSTALL_TAG, PREFACE_INSTALL_TAG, MODE_TAG, IMPORTS_TAG = "remove-cell", "hide-input", "remove-input", "hide-input"
BOILERPLATE_TAGS = {INSTALL_TAG, PREFACE_INSTALL_TAG, MODE_TAG, IMPORTS_TAG}
TIMES_SENTENCE = "Below are this run's mode and the chapter's expected run time in each mode."
RUNS_LINE = re.compile(r'^RUNS = Path\("runs/book"\).*$', re.M)
RUNS_NEW = "RUNS = runs_dir(MODE)  # runs/book/<mode>/, or under $INSTDISC_RUNS_DIR (git-ignored)"
BOOK_IMPORT = re.compile(r"^from instdisc_lite\.book import (.+)$", re.M)


def repository_url() -> str:
    """The repository the Colab buttons open (``_config.yml``), which the install cell installs from."""
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def install_cell_source(repository: str) -> str:
    return INSTALL_TEMPLATE.format(repository=repository)


def mode_cell_source(stem: str) -> str:
    return MODE_TEMPLATE.format(stem=stem)


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _set_source(cell: dict, text: str) -> bool:
    if _source(cell) == text:
        return False
    cell["source"] = text.splitlines(keepends=True)
    return True


def _set_tag(cell: dict, tag: str) -> bool:
    """Give ``cell`` the boilerplate tag ``tag`` (replacing another boilerplate tag, keeping any other tag)."""
    tags = cell.setdefault("metadata", {}).get("tags", [])
    new = [t for t in tags if t not in BOILERPLATE_TAGS or t == tag]
    if tag not in new:
        new.append(tag)
    if new == tags:
        return False
    cell["metadata"]["tags"] = new
    return True


def _import_order(name: str) -> tuple[int, str]:
    """isort's order by type, as ruff applies it to the package: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def _add_book_imports(text: str, names: set[str]) -> str:
    """``text`` with ``names`` imported from ``instdisc_lite.book`` (merged into the existing import if any)."""
    found = BOOK_IMPORT.search(text)
    if found:
        merged = {n.strip() for n in found.group(1).split(",")} | names
        line = f"from instdisc_lite.book import {', '.join(sorted(merged, key=_import_order))}"
        return text[: found.start()] + line + text[found.end() :]
    lines = text.split("\n")
    package = [i for i, line in enumerate(lines) if line.startswith("from instdisc_lite")]
    after = [i for i in package if line_module(lines[i]) > "instdisc_lite.book"]
    at = after[0] if after else (package[-1] + 1 if package else 0)
    lines.insert(at, f"from instdisc_lite.book import {', '.join(sorted(names, key=_import_order))}")
    return "\n".join(lines)


def line_module(line: str) -> str:
    return line.split()[1]


def imports_cell_source(text: str) -> str:
    """The chapter's imports cell with glue and the runs directory taken from ``instdisc_lite.book``."""
    names = set()
    if re.search(r"^from myst_nb import glue\n", text, re.M):
        text = re.sub(r"^from myst_nb import glue\n", "", text, flags=re.M)
        names.add("glue")
    if RUNS_LINE.search(text):
        text = RUNS_LINE.sub(RUNS_NEW, text)
        names.add("runs_dir")
    return _add_book_imports(text, names) if names else text


def fix(nb: dict, stem: str, repository: str) -> bool:
    """Rewrite the boilerplate cells of notebook ``nb`` (the JSON dict) in place; return whether anything changed."""
    cells = nb["cells"]
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    if not code:
        raise ValueError(f"{stem}: no code cells; a chapter starts with the install cell (CONTRIBUTING.md)")
    install = cells[code[0]]
    changed = _set_source(install, install_cell_source(repository))
    changed |= _set_tag(install, PREFACE_INSTALL_TAG if stem == PREFACE else INSTALL_TAG)
    mode_at = next((i for i in code if "MODE = book_mode()" in _source(cells[i])), None)
    if mode_at is None:
        raise ValueError(f"{stem}: no cell with `MODE = book_mode()`; add the mode cell after the install cell")
    changed |= _set_source(cells[mode_at], mode_cell_source(stem))
    changed |= _set_tag(cells[mode_at], MODE_TAG)
    lead = cells[mode_at - 1]
    if stem != PREFACE and lead["cell_type"] == "markdown" and TIMES_SENTENCE not in _source(lead):
        changed |= _set_source(lead, _source(lead).rstrip("\n") + "\n" + TIMES_SENTENCE)
    if stem != PREFACE:
        imports = cells[next(i for i in code if i > mode_at)]
        changed |= _set_source(imports, imports_cell_source(_source(imports)))
        changed |= _set_tag(imports, IMPORTS_TAG)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: book/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="report notebooks that are not up to date, change none")
    args = parser.parse_args(argv)
    repository = repository_url()
    stale = []
    for path in args.paths or sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        if fix(nb, path.stem, repository):
            stale.append(path)
            if not args.check:  # the notebooks' own layout: one-space indent, UTF-8, a final newline
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in stale:
        print(f"{'not up to date' if args.check else 'updated'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
