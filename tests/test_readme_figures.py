"""The README's "Measured figures" block is what tools/readme_figures.py makes of results/*.json.

Fix a failure of the first test with ``python3 tools/readme_figures.py`` (or ``make readme-figures``) after a
benchmark has rewritten its results file or a shipped config changed its Z.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "tools" / "readme_figures.py")
rf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rf)


def block(text: str) -> str:
    return text[text.index(rf.BEGIN) + len(rf.BEGIN) : text.index(rf.END)]


def test_readme_block_is_what_the_results_files_give():
    current = block((ROOT / "README.md").read_text())
    assert current == "\n" + rf.render(), (
        "README.md's Measured figures block is stale; run `python3 tools/readme_figures.py`"
    )


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    for name in (rf.QUALITY, rf.OBJECTIVES, rf.FIXED_Z):
        shutil.copy(ROOT / "results" / name, out / name)
    return out


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_row_the_benchmark_adds_shows_up_and_unknown_fields_are_ignored(results):
    def add_row(data):
        cases = data["objectives"]["cases"]
        base = cases[data["objectives"]["baseline"]]["loss_ms"]["median"]
        cases["nce_official"] = {
            "label": "NCE, the official NCEAverage layer (reference)",
            "loss_ms": {"median": 2 * base, "min": base, "max": 3 * base, "all": [2 * base] * 10},
            "some_new_field": {"nested": [1, 2, 3]},
        }
        data["a_new_top_level_field"] = "ignored"

    edit(results / rf.OBJECTIVES, add_row)
    text = rf.render(results)
    assert "| NCE, the official NCEAverage layer (reference) | " in text
    assert "| 2.00 |" in text  # its ratio to the baseline, computed from the medians


def words(text: str) -> str:
    return " ".join(text.split())  # the block is wrapped at 120 columns


def test_verdicts_are_computed_from_the_files(results):
    edit(results / rf.QUALITY, lambda d: d["wall_s"].update(train_and_eval=rf.QUALITY_GOAL_S - 1))
    assert "within the 10-minute goal" in words(rf.render(results))
    edit(results / rf.QUALITY, lambda d: d["wall_s"].update(train_and_eval=rf.QUALITY_GOAL_S + 1))
    assert "over the 10-minute goal" in words(rf.render(results))

    # on a busy machine the run's own CPU time gives the idle-machine figure: CPU seconds / torch threads
    def busy(cpu_s: float):
        def change(d):
            d.update(others_cpu_cores_during_run=1.0, cpu_s_train_and_eval=cpu_s)
            d["provenance"]["torch_threads"] = 2

        return change

    edit(results / rf.QUALITY, busy(2 * rf.QUALITY_GOAL_S - 20))
    assert f"is about {rf.QUALITY_GOAL_S - 10:.0f} s" in words(rf.render(results))
    assert "on an idle machine, within the goal" in words(rf.render(results))
    edit(results / rf.QUALITY, busy(2 * rf.QUALITY_GOAL_S + 20))
    assert "on an idle machine, over the goal" in words(rf.render(results))
    edit(results / rf.QUALITY, lambda d: d.update(others_cpu_cores_during_run=0.0))
    assert "idle machine" not in rf.render(results)  # an idle run's wall time says it all
    for speedup, verdict in ((60.0, "met"), (40.0, "not met")):
        edit(results / rf.OBJECTIVES, lambda d, s=speedup: d["objectives"]["cases"]["nce_shared"].update(
            speedup_loss_vs_official=s, speedup_goal=50.0))  # fmt: skip
        assert f"NCE, shared negatives: {speedup:.1f}× (goal ≥ 50×, {verdict})" in words(rf.render(results))
    edit(results / rf.FIXED_Z, lambda d: d["summary"]["fixed"][-1].update(loss=0.0))
    assert "diverged" not in rf.render(results)


def test_check_exits_1_with_one_line_when_stale_and_the_tool_fixes_it(tmp_path, results, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{rf.BEGIN}\ntyped by hand\n{rf.END}\n\nmore\n")
    assert rf.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "python3 tools/readme_figures.py" in out[0]
    assert rf.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert rf.main(["--check", "--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{rf.END}\n\nmore\n") and "typed by hand" not in text
