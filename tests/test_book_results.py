"""The book's reader of the studies' result files (instdisc_lite.book.study_results): it finds the files, flags any
that is not what its grid produces today, and says which command makes the missing ones."""

from __future__ import annotations

import json

import pytest

from instdisc_lite import reproduce as rp
from instdisc_lite.book import study_results
from instdisc_lite.config import ConfigError


def write_result(root, study, arm, config, **more):
    path = rp.result_path(root, study, "quick", arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"study": study, "arm": arm, "config": config, **more}))


def test_fresh_stale_and_missing_files(tmp_path):
    fresh = rp.arm_config("z", "fixed_tau0.07", "quick").to_dict()
    write_result(tmp_path, "z", "fixed_tau0.07", fresh, knn_top1=70.0)
    other = {**rp.arm_config("z", "running_tau0.07", "quick").to_dict(), "temperature": 0.5}
    write_result(tmp_path, "z", "running_tau0.07", other, knn_top1=71.0)  # made by another grid
    write_result(tmp_path, "z", "fixed_tau0.1", rp.arm_config("z", "fixed_tau0.1", "quick").to_dict())  # unfinished
    found = study_results("z", "quick", tmp_path)
    assert found.arms == tuple(rp.STUDIES["z"].arms("quick")), "the grid's arms, in grid order"
    assert set(found.results) == {"fixed_tau0.07", "running_tau0.07", "fixed_tau0.1"}
    assert found.results["fixed_tau0.07"]["knn_top1"] == 70.0
    assert found.stale == ("running_tau0.07", "fixed_tau0.1")
    assert not found.complete, "running_tau0.1 has no file"
    assert found.command == "python -m instdisc_lite reproduce z --scale quick"


def test_no_results_folder_is_empty_not_an_error(tmp_path):
    found = study_results("table1", "quick", tmp_path / "absent")
    assert (found.results, found.stale, found.complete) == ({}, (), False)


def test_execution_keys_do_not_make_a_file_stale(tmp_path):
    config = {**rp.arm_config("table1", "cosine", "quick").to_dict(), "out_dir": "elsewhere", "progress": True}
    write_result(tmp_path, "table1", "cosine", config, knn_top1=60.0)
    assert study_results("table1", "quick", tmp_path).stale == ()


def test_unknown_study_or_scale(tmp_path):
    with pytest.raises(ConfigError, match="unknown study"):
        study_results("table9", "quick", tmp_path)
    with pytest.raises(ConfigError, match="unknown scale"):
        study_results("z", "huge", tmp_path)


def test_table_is_a_markdown_table_with_every_column():
    from instdisc_lite.book import table

    shown = table([{"arm": "a|b", "kNN": 81.234}, {"arm": "c", "probe": 2.5e7}], caption="Study").data
    lines = shown.splitlines()
    assert lines[0] == "**Study**"
    assert lines[2] == "| arm | kNN | probe |"  # columns in order of first appearance, from every row
    assert lines[3] == "|---|---|---|"
    assert lines[4] == "| a\\|b | 81.23 |  |"  # a pipe in a value is escaped, a missing value left empty
    assert lines[5] == "| c |  | 2.5e+07 |"
    assert table([], caption="Study").data == "*Study: no rows*"
