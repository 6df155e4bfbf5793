"""The paper's studies as grids (instdisc_lite.reproduce): every arm resolves, results carry their provenance, a
finished arm is skipped, and every committed result file is exactly what its grid produces today."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import reproduce as rp
from instdisc_lite.__main__ import main
from instdisc_lite.config import ConfigError
from instdisc_lite.parametric import ParametricSoftmax

ROOT = Path(__file__).resolve().parent.parent
TINY = {"train_subset": 256, "epochs": 1, "eval_every": 1, "checkpoint_every": 1, "eval_subset": 200, "batch_size": 64}


@pytest.mark.parametrize("scale", rp.SCALES)
def test_every_arm_of_every_study_resolves_to_a_valid_config(scale):
    names = set()
    for study in rp.STUDIES.values():
        arms = study.arms(scale)
        assert len(arms) >= 2, f"{study.name}: a study compares at least two arms"
        for arm, overrides in arms.items():
            config = rp.arm_config(study.name, arm, scale)
            for key, value in overrides.items():
                assert getattr(config, key) == value, f"{study.name}/{arm}: {key} not applied"
            names.add(config.name)
    assert len(names) == sum(len(s.arms(scale)) for s in rp.STUDIES.values()), "run names must be unique"


def test_table1_has_the_papers_arms_and_the_fair_parametric_one():
    arms = rp.STUDIES["table1"].arms("quick")
    objectives = {arm: rp.arm_config("table1", arm, "quick").objective for arm in arms}
    assert objectives == {"parametric": "parametric", "cosine": "cosine", "softmax": "softmax",
                          "nce_m1": "nce", "nce_m10": "nce", "nce_m512": "nce", "nce_m4096": "nce"}  # fmt: skip
    ms = (1, 10, 512, 4096)
    assert [rp.arm_config("table1", f"nce_m{m}", "quick").num_negatives for m in ms] == list(ms)
    full = rp.arm_config("table1", "softmax", "full")
    assert (full.dataset, full.arch, full.epochs) == ("cifar10", "resnet18_cifar", 200)  # the paper's setting


def test_unknown_study_arm_scale_or_jobs_is_one_clear_error(capsys):
    with pytest.raises(ConfigError, match="choose one of: table1, temperature"):
        rp.arm_config("table9", "x", "quick")
    with pytest.raises(ConfigError, match="its arms: parametric, cosine"):
        rp.arm_config("table1", "nce_m7", "quick")
    with pytest.raises(ConfigError, match="choose one of: quick, full"):
        rp.arm_config("table1", "softmax", "medium")
    assert main(["reproduce", "table9"]) == 2
    assert main(["reproduce", "table1", "--jobs", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_cosine_objective_is_a_classifier_with_unit_weights_at_a_temperature():
    torch.manual_seed(0)
    head = ParametricSoftmax(8, 20, temperature=0.1, normalize=True)
    with torch.no_grad():
        head.classifier.weight.mul_(torch.arange(1, 21, dtype=torch.float32)[:, None])  # rows of unequal norm
    v, idx = F.normalize(torch.randn(5, 8), dim=1), torch.tensor([0, 3, 19, 3, 7])
    logits = v @ F.normalize(head.classifier.weight, dim=1).T / 0.1
    torch.testing.assert_close(head(v, idx), F.cross_entropy(logits, idx))
    raw = ParametricSoftmax(8, 20)
    raw.classifier.weight.data.copy_(head.classifier.weight)
    torch.testing.assert_close(raw(v, idx), F.cross_entropy(v @ head.classifier.weight.T, idx))  # eq. 1 untouched


@pytest.fixture
def one_arm_per_study(tmp_path, fashion_mnist_available):
    """Each study's first arm, trained in a tiny setting into tmp_path/results."""
    results = tmp_path / "results"
    extra = {**TINY, "out_dir": str(tmp_path / "runs")}
    paths = {}
    for name, study in rp.STUDIES.items():
        arm = next(iter(study.arms("quick")))
        size = {"train_subset": TINY["train_subset"]}  # train_size's arm sets n: keep the run tiny anyway
        paths[name] = (arm, rp.run_arm(name, arm, "quick", results, extra={**extra, **size}))
    return results, extra, paths


def test_one_arm_of_each_study_runs_and_records_its_provenance(one_arm_per_study):
    _, extra, paths = one_arm_per_study
    for study, (arm, path) in paths.items():
        stored = json.loads(path.read_text())
        assert (stored["study"], stored["arm"], stored["scale"]) == (study, arm, "quick")
        assert 0 <= stored["knn_top1"] <= 100 and 0 <= stored["probe_top1"] <= 100
        assert stored["config"] == rp.arm_config(study, arm, "quick", extra=extra).to_dict()
        assert len(stored["metrics"]) == 1 and stored["torch"] == torch.__version__ and stored["wall_s"] > 0
        assert stored["git_commit"] is None or len(stored["git_commit"].split("-")[0]) == 40
    steps = json.loads(paths["proximal"][1].read_text())["metrics"][0]["step_loss"]  # log_step_loss: every step
    assert len(steps) == TINY["train_subset"] // TINY["batch_size"] and all(isinstance(x, float) for x in steps)
    sizes = json.loads(paths["train_size"][1].read_text())
    reference = sizes["train_size"]  # every arm evaluated against all 60,000 training images, whatever n it learned on
    assert reference["reference_images"] == 60_000 and sizes["config"]["train_subset"] == TINY["train_subset"]
    assert all(0 <= reference[k] <= 100 for k in ("knn_top1", "knn_top5", "probe_top1"))
    semi = json.loads(paths["semi_supervised"][1].read_text())["semi_supervised"]  # the study's own figures
    assert semi["label_fraction"] == 0.01 and semi["num_labels"] == 10, "1 % of 256 images: one label per class"
    assert all(0 <= semi[k] <= 100 for k in ("finetune_top1", "probe_top1", "scratch_top1"))


def test_a_finished_arm_is_skipped_and_a_changed_one_is_run_again(tmp_path, monkeypatch):
    results = tmp_path / "results"
    grid = rp.STUDIES["embedding"].arms("quick")
    for arm in grid:  # pretend every arm finished, one of them with a config the grid no longer produces
        config = rp.arm_config("embedding", arm, "quick").to_dict()
        if arm == "d64":
            config["lr"] = 0.5
        path = rp.result_path(results, "embedding", "quick", arm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config": {**config, "out_dir": "elsewhere"}, "knn_top1": 50.0}))
    rp.result_path(results, "embedding", "quick", "d256").write_text('{"config": ')  # a truncated file
    ran = []
    monkeypatch.setattr(rp, "run_arm", lambda study, arm, scale, results, *a, **k: ran.append(arm) or Path(arm))
    rp.reproduce("embedding", "quick", results=results, log=lambda msg: None)
    assert ran == ["d64", "d256"], "only the stale and the unreadable arm run again (out_dir does not count)"


def test_committed_results_are_what_their_grids_produce():
    """Every result file under results/<study>/<scale>/ is an arm of that study, with the config it resolves to
    today: a change to a base config or a grid that would make a stored figure stale fails here."""
    files = sorted((ROOT / "results").glob("*/*/*.json"))
    for path in files:
        study, scale, arm = path.parts[-3], path.parts[-2], path.stem
        assert study in rp.STUDIES and scale in rp.SCALES, f"{path}: not a study/scale of instdisc_lite.reproduce"
        stored = json.loads(path.read_text())
        expected = rp.arm_config(study, arm, scale).to_dict()
        assert rp.comparable(stored["config"]) == rp.comparable(expected), f"{path} is stale: rerun the study"
        assert stored["git_commit"] and "knn_top1" in stored and "probe_top1" in stored, f"{path}: provenance"


def test_study_workers_die_with_the_study(tmp_path):
    """kill -9 of a study running --jobs N must not leave its worker processes training (they wrote results on)."""
    script = tmp_path / "study.py"
    pids = tmp_path / "pids"
    script.write_text(
        "import os, time, sys\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from multiprocessing import get_context\n"
        "from instdisc_lite.reproduce import die_with_parent\n"
        "def work(path):\n"
        "    open(path + str(os.getpid()), 'w').close(); time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    with ProcessPoolExecutor(2, mp_context=get_context('spawn'), initializer=die_with_parent) as pool:\n"
        "        list(pool.map(work, [sys.argv[1]] * 2))\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(pids) + "-"])
    deadline = time.time() + 60
    while len(list(tmp_path.glob("pids-*"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("pids-*")]
    assert len(workers) == 2, "the workers did not start"
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "a worker outlived the killed study"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) counts as dead
        return f.read().split(")")[-1].split()[0] != "Z"


def test_reproduce_starts_its_workers_with_die_with_parent(tmp_path, monkeypatch):
    seen = {}

    class Pool:
        def __init__(self, jobs, **kwargs):
            seen.update(kwargs, jobs=jobs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            class Done:
                def result(self):
                    return Path(args[1])

            return Done()

    monkeypatch.setattr(rp, "ProcessPoolExecutor", Pool)
    rp.reproduce("embedding", "quick", jobs=2, results=tmp_path, log=lambda msg: None)
    assert seen["jobs"] == 2 and seen["initializer"] is rp.die_with_parent


def test_a_key_added_later_at_its_default_does_not_make_a_result_stale():
    config = rp.arm_config("table1", "softmax", "quick").to_dict()
    defaults = rp._defaults()
    at_default = [k for k, v in config.items() if k in defaults and defaults[k] == v and k not in rp.EXECUTION_KEYS]
    set_by_base = [k for k, v in config.items() if k in defaults and defaults[k] != v and k not in rp.EXECUTION_KEYS]
    assert at_default and set_by_base
    for key in at_default:  # a result written before this key existed was computed with its default
        assert rp.comparable({k: v for k, v in config.items() if k != key}) == rp.comparable(config), key
    for key in set_by_base:  # ... but a result without a key the base sets was not computed with that value
        assert rp.comparable({k: v for k, v in config.items() if k != key}) != rp.comparable(config), key
    changed = {**config, "temperature": config["temperature"] * 2}
    assert rp.comparable(changed) != rp.comparable(config), "a changed value still counts"
