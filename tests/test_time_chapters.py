"""tools/time_chapters.py writes the quick-mode timings that the chapters' run-time tables read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat

from instdisc_lite.book import expected_times

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("time_chapters", ROOT / "tools" / "time_chapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_timed_notebook_is_read_back_by_expected_times(tmp_path, monkeypatch):
    tool = _tool()
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import os\nassert os.environ['INSTDISC_BOOK_MODE'] == 'quick'")]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "99_tiny.ipynb")
    out = tmp_path / "results" / "chapter_times.json"
    out.parent.mkdir()
    out.write_text(json.dumps({"chapters": {"01_kept": {"wall_s": 50.0}}}))  # an earlier entry is kept
    monkeypatch.delenv("INSTDISC_BOOK_MODE", raising=False)
    assert tool.main(["--out", str(out), "--max-other-load", "1000", str(tmp_path / "99_tiny.ipynb")]) == 0
    written = json.loads(out.read_text())
    entry = written["chapters"]["99_tiny"]
    assert entry["wall_s"] > 0 and entry["quiet"] and entry["cpu_cores"] >= 1 and entry["other_load_cores"] >= 0
    assert written["chapters"]["01_kept"] == {"wall_s": 50.0}
    provenance = written["provenance"]
    assert {"command", "commit", "date", "cpu", "other_load"} <= set(provenance)
    assert provenance["cpu"]["cores"] >= 1 and "loadavg_at_start" in provenance["other_load"]
    assert expected_times("99_tiny", results=out.parent).seconds["quick"] == entry["wall_s"]


def test_a_failing_notebook_is_reported_and_not_timed(tmp_path, monkeypatch):
    import nbclient

    def broken(self, **kwargs):
        raise RuntimeError("broken chapter")

    monkeypatch.setattr(nbclient.NotebookClient, "execute", broken)  # no kernel needed to fail
    tool = _tool()
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "98_broken.ipynb")
    out = tmp_path / "times.json"
    assert tool.main(["--out", str(out), str(tmp_path / "98_broken.ipynb")]) == 1
    assert "98_broken" not in json.loads(out.read_text())["chapters"]
