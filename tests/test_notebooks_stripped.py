"""The book's notebooks are stored stripped and follow the chapter conventions (see CONTRIBUTING.md).

Outputs belong to builds, not to git: the book build and nbval execute every notebook from scratch. Each notebook
must also open on Colab with a GPU runtime and install the package there from its first code cell.
Fix a failure with ``make strip`` (outputs) or by editing the notebook's metadata / first code cell.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
# The repository the Colab buttons open (_config.yml) is the one the install cell installs from.
REPOSITORY = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]

INSTALL_CELL = f"""\
# On Colab: choose a mode and whether to keep runs on Google Drive, then run this cell.
# Elsewhere the form does nothing (INSTDISC_BOOK_MODE rules); the package is installed.
MODE_CHOICE = "full"  # @param ["quick", "full", "paper"]
USE_DRIVE = False  # @param {{type:"boolean"}}
import sys
if "google.colab" in sys.modules:
    import subprocess
    URL = "git+{REPOSITORY}"
    package = f"instdisc_lite[colab] @ {{URL}}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    from instdisc_lite.book import colab_settings
    colab_settings(MODE_CHOICE, USE_DRIVE)"""
# The boilerplate is hidden in the rendered book (Jupyter Book 1 cell tags) and shown on Colab, where tags do nothing.
# The preface's text presents the install cell, so there it is folded rather than removed.
INSTALL_TAG = {"00_preface": "hide-input"}
MODE_CELL = """\
from instdisc_lite.book import book_mode, expected_times

MODE = book_mode()
print(MODE)
expected_times("{stem}", MODE)"""


def test_book_has_notebooks():
    assert NOTEBOOKS, f"no notebooks in {BOOK}"


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request) -> tuple[str, nbformat.NotebookNode]:
    return request.param.name, nbformat.read(request.param, as_version=4)


def test_no_outputs_or_execution_counts(notebook):
    name, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not cell.get("outputs"), f"{name}: code cell {i} has outputs; run `make strip`"
        assert cell.get("execution_count") is None, f"{name}: code cell {i} has an execution count; run `make strip`"
        assert "execution" not in cell.metadata, f"{name}: code cell {i} has execution timings; run `make strip`"


def test_first_code_cell_is_the_colab_install_cell(notebook):
    name, nb = notebook
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name}: no code cells"
    assert code[0].source.strip() == INSTALL_CELL, (
        f"{name}: the first code cell must be exactly the Colab install cell of CONTRIBUTING.md"
    )


def test_boilerplate_cells_are_hidden_in_the_rendered_book(notebook):
    name, nb = notebook
    stem = name.removesuffix(".ipynb")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    tags = code[0].metadata.get("tags", [])
    assert INSTALL_TAG.get(stem, "remove-cell") in tags, (
        f"{name}: the install cell must be tagged {INSTALL_TAG.get(stem, 'remove-cell')!r}; run tools/book_cells.py"
    )
    mode = next((c for c in code if "MODE = book_mode()" in c.source), None)
    assert mode is not None and mode.source.strip() == MODE_CELL.format(stem=stem), (
        f"{name}: the mode cell must be exactly the one of CONTRIBUTING.md, naming {stem!r}; run tools/book_cells.py"
    )
    assert "remove-input" in mode.metadata.get("tags", []), f"{name}: the mode cell must be tagged 'remove-input'"
    assert not any("from myst_nb import" in c.source for c in code), (
        f"{name}: import glue from instdisc_lite.book (it falls back to printing where myst-nb is absent, on Colab)"
    )


def test_install_cell_does_nothing_off_colab(monkeypatch):
    import os
    import subprocess
    import sys

    assert "google.colab" not in sys.modules
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the install cell ran pip off Colab"))
    before = dict(os.environ)
    namespace: dict = {}
    exec(INSTALL_CELL, namespace)
    assert (namespace["MODE_CHOICE"], namespace["USE_DRIVE"]) == ("full", False), "the form's defaults"
    assert dict(os.environ) == before, "off Colab the form must not change the mode or the runs directory"


def test_boilerplate_tool_agrees_with_this_test():
    import importlib.util

    spec = importlib.util.spec_from_file_location("book_cells", ROOT / "tools" / "book_cells.py")
    cells = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cells)
    assert cells.install_cell_source(REPOSITORY) == INSTALL_CELL
    assert cells.mode_cell_source("01_x") == MODE_CELL.format(stem="01_x")
    assert cells.main(["--check"]) == 0, "tools/book_cells.py would change a notebook; run it"


def test_first_cell_is_a_title(notebook):
    name, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{name}: first cell must be a # title"


def test_colab_gpu_metadata(notebook):
    name, nb = notebook
    assert nb.metadata.get("accelerator") == "GPU", f'{name}: metadata.accelerator must be "GPU"'
    colab = nb.metadata.get("colab")
    assert isinstance(colab, dict), f"{name}: metadata.colab missing"
    assert colab.get("gpuType") == "T4", f'{name}: metadata.colab.gpuType must be "T4"'


def test_kernelspec_python3(notebook):
    name, nb = notebook
    kernelspec = nb.metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{name}: kernelspec must be python3, got {kernelspec!r}"
    assert kernelspec.get("language", "python") == "python", f"{name}: kernelspec language must be python"


def test_toc_lists_every_notebook_and_the_smoke_run_every_chapter():
    import importlib.util

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = [toc["root"]] + [entry["file"] for entry in toc["chapters"]]
    notebooks = [f"book/{p.stem}" for p in NOTEBOOKS]
    assert sorted(set(notebooks) - set(listed)) == [], "a notebook in book/ is missing from _toc.yml"
    chapters = [n for n in listed if n.endswith(tuple(p.stem for p in NOTEBOOKS))]
    assert chapters == sorted(chapters), f"_toc.yml must list the chapters in file-number order: {chapters}"
    spec = importlib.util.spec_from_file_location("book_smoke", ROOT / "tools" / "book_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert [f"book/{p.stem}" for p in smoke.default_chapters()] == notebooks, "book-smoke must run every notebook"
