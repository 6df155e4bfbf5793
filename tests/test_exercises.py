"""Every chapter of the book ends with exercises, and every exercise has a folded solution.

For each numbered chapter in ``_toc.yml`` (``book/NN_*``, NN >= 1) the last markdown cells, from the one with an
``## Exercises`` heading to the end of the notebook, hold 3 to 5 numbered exercises (``1. ...`` at the start of a
line, outside fenced blocks) and at least as many solutions written as MyST dropdown admonitions::

    ```{admonition} Solution
    :class: dropdown

    ...
    ```

(four backticks around a solution that contains a code block). Jupyter Book renders them folded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"

MIN_EXERCISES, MAX_EXERCISES = 3, 5
HEADING = re.compile(r"^## Exercises\s*$", re.MULTILINE)
SUMMARY = re.compile(r"^## Summary\s*$", re.MULTILINE)
FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
EXERCISE = re.compile(r"^(\d+)\.\s")


def numbered_chapters() -> list[str]:
    """The chapters of ``_toc.yml`` whose file is ``book/NN_*`` with NN >= 1, as their two-digit numbers."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbers = []
    for entry in toc["chapters"]:
        match = re.fullmatch(r"book/(\d{2})_\w+", entry["file"])
        if match and int(match.group(1)) >= 1:
            numbers.append(match.group(1))
    return numbers


CHAPTERS = numbered_chapters()


def notebook_of(number: str) -> Path:
    (path,) = BOOK.glob(f"{number}_*.ipynb")
    return path


def scan(markdown: str) -> tuple[list[int], int]:
    """The exercise numbers outside fenced blocks, in order, and the number of dropdown solution admonitions."""
    exercises, solutions = [], 0
    lines = markdown.splitlines()
    fence = None  # the opening fence's characters while inside a fenced block
    for i, line in enumerate(lines):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                info = match.group(2).strip()
                following = lines[i + 1].strip() if i + 1 < len(lines) else ""
                if re.fullmatch(r"\{admonition\}\s+Solution", info) and following == ":class: dropdown":
                    solutions += 1
            elif number := EXERCISE.match(line):
                exercises.append(int(number.group(1)))
        elif (
            match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not match.group(2).strip()
        ):
            fence = None
    assert fence is None, f"a fenced block opened with {fence} is never closed"
    return exercises, solutions


def exercises_section(path: Path) -> str:
    """The markdown from the last cell with an ``## Exercises`` heading to the end; it must be the notebook's end."""
    cells = json.loads(path.read_text())["cells"]
    markdown = ["".join(cell["source"]) if cell["cell_type"] == "markdown" else "" for cell in cells]
    starts = [i for i, text in enumerate(markdown) if HEADING.search(text)]
    assert starts, f"{path.name}: no markdown cell with an '## Exercises' heading"
    tail = cells[starts[-1] :]
    assert all(cell["cell_type"] == "markdown" for cell in tail), (
        f"{path.name}: the exercises must be the last cells of the chapter (a code cell follows them)"
    )
    everything = "\n\n".join(markdown)
    summaries = [m.start() for m in SUMMARY.finditer(everything)]
    headings = [m.start() for m in HEADING.finditer(everything)]
    assert not summaries or summaries[-1] < headings[-1], f"{path.name}: the exercises must come after the Summary"
    return "\n\n".join(markdown[starts[-1] :])


@pytest.mark.parametrize("number", CHAPTERS)
def test_chapter_ends_with_exercises_and_folded_solutions(number):
    path = notebook_of(number)
    exercises, solutions = scan(exercises_section(path))
    count = len(exercises)
    assert MIN_EXERCISES <= count <= MAX_EXERCISES, (
        f"{path.name}: {count} numbered exercises, want {MIN_EXERCISES} to {MAX_EXERCISES}"
    )
    assert exercises == list(range(1, count + 1)), f"{path.name}: exercises numbered {exercises}, want 1 to {count}"
    assert solutions >= count, (
        f"{path.name}: {solutions} dropdown solution admonitions for {count} exercises "
        "(```{admonition} Solution followed by :class: dropdown)"
    )
