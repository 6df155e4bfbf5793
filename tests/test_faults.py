"""Fault injection: the trainer tried as a hostile user would.

Kills (``kill -9`` at random points, during a checkpoint write, Ctrl-C) followed by ``--resume`` must give a run
bit-identical to an uninterrupted one, for the in-memory tensor loader (Fashion-MNIST) and for the DataLoader with
worker processes (CIFAR-10). Bad values, odd names, corrupt or planted checkpoints, corrupt data, a full disk, a
twin process with the same name: each gets one ``error:`` line, and an existing run is left as it was.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instdisc_lite import NonFiniteLossError, load_config, train
from instdisc_lite.__main__ import main
from instdisc_lite.checkpoint import CheckpointError, atomic_save, load_checkpoint, strip_wrapper_prefixes
from instdisc_lite.run_dir import RunExistsError, RunInUseError
from instdisc_lite.train import build_run, load_run_checkpoint, save_run_checkpoint

TIME_FIELDS = {"time", "elapsed"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fashion(tmp_path: Path, **extra) -> dict:
    """A Fashion-MNIST run of a few seconds per epoch (NCE, so Z is part of the state)."""
    values = dict(
        data_root=str(tmp_path / "data"), out_dir=str(tmp_path / "runs"), name="f", train_subset=384,
        eval_subset=100, batch_size=64, objective="nce", num_negatives=128, knn_k=20, eval_every=1, epochs=4,
        progress=False, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return values


def cifar(root: Path, tmp_path: Path, **extra) -> dict:
    """The CIFAR-10 path (torchvision loader, per-image PIL augmentation in 2 worker processes), small CNN."""
    values = dict(
        data_root=str(root), out_dir=str(tmp_path / "runs"), name="c", arch="small_cnn", num_workers=2,
        batch_size=8, num_negatives=32, knn_k=10, eval_every=1, epochs=3, progress=False, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return values


def cli(config: str, values: dict, *flags: str) -> list[str]:
    return [sys.executable, "-m", "instdisc_lite", "train", "--config", config, *flags, "--set",
            *(f"{k}={v}" for k, v in values.items())]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]


def assert_same_state(a_dir: Path, b_dir: Path) -> None:
    """Two runs' checkpoints and metrics are bit-identical (wall times aside)."""
    a, b = load(a_dir / "checkpoint.pt"), load(b_dir / "checkpoint.pt")
    assert a["epoch"] == b["epoch"]
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:  # encoder, bank, Z
        assert torch.equal(a["method"][key], b["method"][key]), f"{key} differs"
    for key, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert metrics(a_dir) == metrics(b_dir)
    assert [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in a["metrics"]] == metrics(a_dir)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Kills and interruptions, then --resume: bit-identical to a run that was never interrupted
# ------------------------------------------------------------------------------------------------


def wait_for_progress(run_dir: Path, proc: subprocess.Popen, lines_before: int, timeout: float = 120) -> None:
    """Until the run has logged one more epoch than ``lines_before`` (or the process has ended)."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) > lines_before:
            return
        time.sleep(0.05)


def interrupted_run(command: list[str], run_dir: Path, signals: list[int], seed: int) -> list[int]:
    """Run ``command``; after each new epoch is logged, wait a random part of an epoch and send the next signal;
    restart with --resume (or --overwrite before the first checkpoint) until the run finishes. Returns the exit
    codes of the interrupted processes."""
    rng, codes = random.Random(seed), []
    for sig in [*signals, None]:
        flag = "--resume" if (run_dir / "checkpoint.pt").exists() else "--overwrite"
        proc = subprocess.Popen(command + [flag], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if sig is not None:
            done = (
                len((run_dir / "metrics.jsonl").read_text().splitlines()) if (run_dir / "metrics.jsonl").exists() else 0
            )
            wait_for_progress(run_dir, proc, done)
            time.sleep(rng.uniform(0.0, 0.8))  # somewhere in the next epoch (or its evaluation, or its save)
            if proc.poll() is None:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        if sig is None:
            assert proc.returncode == 0, err[-3000:]
        else:
            codes.append(proc.returncode)
            if proc.returncode == 130:  # Ctrl-C: one line that says how to continue
                lines = error_lines(err)
                assert len(lines) == 1 and "--resume" in lines[0], err[-2000:]
    return codes


def test_kill_and_resume_is_bit_identical_tensor_loader(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=5)
    straight = subprocess.run(cli("fashion_mnist_quick", {**values, "name": "straight"}), env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "runs" / "f"
    codes = interrupted_run(cli("fashion_mnist_quick", values), run_dir, [signal.SIGKILL, signal.SIGINT,
                            signal.SIGKILL], seed=0)  # fmt: skip
    assert -signal.SIGKILL in codes or 130 in codes, f"no interruption landed: {codes}"
    assert_same_state(tmp_path / "runs" / "straight", run_dir)
    assert not list(run_dir.glob(".*.tmp"))  # a kill during a save leaves a temp file; the next start removed it
    res_a = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    res_b = json.loads((run_dir / "results.json").read_text())
    assert res_a["final_knn_top1"] == res_b["final_knn_top1"]


def test_kill_and_resume_is_bit_identical_worker_loader(tmp_path, tiny_cifar10):
    values = cifar(tiny_cifar10["root"], tmp_path, epochs=4)
    straight = subprocess.run(cli("cifar10_resnet18", {**values, "name": "straight"}), env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "runs" / "c"
    codes = interrupted_run(cli("cifar10_resnet18", values), run_dir, [signal.SIGKILL, signal.SIGKILL], seed=1)
    assert -signal.SIGKILL in codes, f"no kill landed: {codes}"
    assert_same_state(tmp_path / "runs" / "straight", run_dir)


SLOW_SAVE = """
import io, pathlib, sys, time, torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, pathlib.Path)):
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    pathlib.Path(sys.argv[1]).write_text("writing")  # the test kills us now, half-way through the file
    time.sleep(60)
    f.write(data[len(data) // 2 :])
torch.save = slow_save
from instdisc_lite.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_during_checkpoint_write(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=2)
    train("fashion_mnist_quick", {**values, "name": "straight"})
    first = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt = first.run_dir / "checkpoint.pt"
    before = ckpt.read_bytes()
    script, marker = tmp_path / "slow_save.py", tmp_path / "marker"
    script.write_text(SLOW_SAVE)
    args = cli("fashion_mnist_quick", values, "--resume")[3:]  # after "-m instdisc_lite"
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode()[-2000:]
    proc.kill()
    proc.wait()
    assert ckpt.read_bytes() == before  # the half-written file never replaced the checkpoint
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert list(first.run_dir.glob(".checkpoint.pt.*.tmp")), "the kill should have left the temporary file"
    resumed = train("fashion_mnist_quick", values, resume=True)
    assert not list(first.run_dir.glob(".*.tmp")), "stale temporary files are removed at the next start"
    assert resumed.epoch == 2
    assert_same_state(tmp_path / "runs" / "straight", first.run_dir)


# ------------------------------------------------------------------------------------------------
# Checkpoints that cannot be trusted
# ------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_payload_does_not_run(tmp_path, fashion_mnist_available, capsys):
    values = fashion(tmp_path, epochs=2)
    run = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt, marker = run.run_dir / "checkpoint.pt", tmp_path / "pwned"
    state = load(ckpt)
    state["metrics"] = [Payload(marker)]
    torch.save(state, ckpt)  # a full pickle: weights_only=False would run Payload on load
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_checkpoint(ckpt)
    assert main(cli("fashion_mnist_quick", values, "--resume")[3:]) == 2
    assert not marker.exists(), "loading the checkpoint ran planted code"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not loaded" in lines[0]


def test_rng_states_are_stored_as_tensors_and_plain_data(tmp_path, fashion_mnist_available):
    run = train("fashion_mnist_quick", fashion(tmp_path, epochs=1), final_eval=False)
    state = torch.load(run.run_dir / "checkpoint.pt", weights_only=True)  # would raise on any other object
    (rng,) = state["rng"]  # one state per rank
    assert set(rng) >= {"python", "numpy", "torch"} and torch.is_tensor(rng["numpy"]["keys"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_checkpoint", "stack_underflow"])
def test_damaged_checkpoint_is_one_line(tmp_path, fashion_mnist_available, capsys, damage):
    values = fashion(tmp_path, epochs=2)
    run = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt = run.run_dir / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "stack_underflow":  # a pickle opcode with nothing to pop: the unpickler raises IndexError
        ckpt.write_bytes(b"\x80\x02t.")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    damaged = snapshot(run.run_dir)
    assert main(cli("fashion_mnist_quick", values, "--resume")[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0], lines
    assert snapshot(run.run_dir) == damaged  # nothing rewritten


def test_checkpoint_of_another_size_is_one_line(tmp_path, fashion_mnist_available, capsys):
    values = fashion(tmp_path, epochs=2)
    run = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt = run.run_dir / "checkpoint.pt"
    state = load(ckpt)
    state["config"]["train_subset"] = 256  # claims a config whose bank has 256 rows; the tensors hold 384
    atomic_save(state, ckpt)
    assert main(cli("fashion_mnist_quick", {**values, "train_subset": 256}, "--resume")[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0] and "bank.memory" in lines[0], lines


def test_compiled_and_plain_runs_share_checkpoint_keys(tmp_path, fashion_mnist_available):
    config = load_config("fashion_mnist_quick", fashion(tmp_path, compile=True))
    compiled = build_run(config)
    assert type(compiled.model).__name__ == "OptimizedModule"
    path = save_run_checkpoint(compiled, tmp_path / "ckpt.pt")
    assert not any("_orig_mod." in k for k in load(path)["method"])
    plain = build_run(load_config("fashion_mnist_quick", fashion(tmp_path)))
    load_run_checkpoint(plain, path)  # a compiled run's checkpoint resumes an uncompiled one
    prefixed = {f"_orig_mod.module.{k}": v for k, v in plain.encoder.state_dict().items()}
    assert strip_wrapper_prefixes(prefixed).keys() == plain.encoder.state_dict().keys()


# ------------------------------------------------------------------------------------------------
# Bad values and odd names: one line, exit 2, the existing run untouched
# ------------------------------------------------------------------------------------------------

BAD_VALUES = [
    "batch_size=0", "temperature=0", "lr=-1", "low_dim=0", "dataset=mnist", "arch=vgg", "objective=simclr",
    "z_mode=adaptive", "augment=heavy", "eval_every=0", "checkpoint_every=0", "epochs=0", "knn_k=0",
    "batch_size=100000", "device=cuda", "name=..", "name=../x", "name=/abs", "name=a/b", "crop_scale=0",
    "lr=abc", "bank_momentum=1", "nonsense_key=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> tuple[Path, dict]:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("real Fashion-MNIST is not installed")
    tmp_path = tmp_path_factory.mktemp("existing")
    values = fashion(tmp_path, epochs=2, name="keep")
    train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    return tmp_path, values


@pytest.mark.parametrize("flag", ["", "--resume", "--overwrite"])
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_bad_value_is_one_line_and_leaves_run_untouched(existing_run, capsys, bad, flag):
    tmp_path, values = existing_run
    before = snapshot(tmp_path)
    key, value = bad.split("=", 1)
    overrides = {**values, key: value} if key != "name" else {**values, "name": value}
    code = main(cli("fashion_mnist_quick", overrides, *([flag] if flag else []))[3:])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    if key != "nonsense_key":
        assert key in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a refused run changed files"


@pytest.mark.parametrize("name", ["..", "../x", "/abs/x", "a/b", ".", ""])
def test_run_name_cannot_escape_out_dir(tmp_path, name, fashion_mnist_available):
    workdir = tmp_path / "work"
    (workdir / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match="name"):
        train("fashion_mnist_quick", {**fashion(workdir), "out_dir": str(workdir / "runs"), "name": name})
    assert snapshot(tmp_path) == {}


# ------------------------------------------------------------------------------------------------
# Reusing a run directory
# ------------------------------------------------------------------------------------------------


def test_run_without_checkpoint_is_not_overwritten(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=1)
    run = train("fashion_mnist_quick", values)
    (run.run_dir / "checkpoint.pt").unlink()
    before = snapshot(run.run_dir)
    with pytest.raises(RunExistsError, match="metrics.jsonl"):
        train("fashion_mnist_quick", values)
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        train("fashion_mnist_quick", values, resume=True)
    assert snapshot(run.run_dir) == before


def test_twin_process_is_refused_while_the_run_is_live(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=50)
    run_dir = tmp_path / "runs" / "f"
    proc = subprocess.Popen(cli("fashion_mnist_quick", values), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_progress(run_dir, proc, 0)
        assert proc.poll() is None
        before = snapshot(run_dir)["config.yaml"]
        with pytest.raises(RunInUseError, match="in use by pid"):
            train("fashion_mnist_quick", values, overwrite=True)
        with pytest.raises(RunInUseError):
            train("fashion_mnist_quick", values, resume=True)
        assert snapshot(run_dir)["config.yaml"] == before
    finally:
        proc.kill()
        proc.wait()
    # kill -9 released the lock: the run resumes
    resumed = train("fashion_mnist_quick", {**values, "epochs": 50}, resume=True, stop_after=0, final_eval=False)
    assert resumed.epoch >= 1


def test_overwrite_removes_the_old_run_before_writing(tmp_path, fashion_mnist_available, monkeypatch):
    values = fashion(tmp_path, epochs=1)
    run = train("fashion_mnist_quick", values)
    assert (run.run_dir / "results.json").exists()
    train_module = sys.modules["instdisc_lite.train"]  # (the package's ``train`` attribute is the function)

    def killed(*args, **kwargs):  # as if the process died right after the old run was cleared
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_config", killed)
    with pytest.raises(KeyboardInterrupt):
        train("fashion_mnist_quick", values, overwrite=True)
    monkeypatch.undo()
    assert not (run.run_dir / "results.json").exists() and not (run.run_dir / "checkpoint.pt").exists()
    leftover = tmp_path / "runs" / ".f.replaced-deadbeef"  # what a kill during the delete would leave
    (leftover / "sub").mkdir(parents=True)
    again = train("fashion_mnist_quick", values, overwrite=True, final_eval=False)
    assert sorted(p.name for p in again.run_dir.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    assert not leftover.exists()


# ------------------------------------------------------------------------------------------------
# Resume against the stored config
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def half_run(tmp_path, fashion_mnist_available) -> tuple[Path, dict]:
    values = fashion(tmp_path, epochs=10, max_steps_per_epoch=1, eval_every=5)
    run = train("fashion_mnist_quick", values, stop_after=7, final_eval=False)  # lr dropped at epoch 6 of 10
    return run.run_dir, values


@pytest.mark.parametrize(
    ("change", "expect"),
    [({"arch": "small_cnn"}, "arch"), ({"epochs": 20}, "lr milestones"), ({"epochs": 5}, "already trained 7"),
     ({"lr": 0.1}, "lr"), ({"temperature": 0.2, "seed": 3}, "temperature"), ({"objective": "softmax"}, "objective")],
)  # fmt: skip
def test_resume_refuses_changes_to_what_is_trained(half_run, change, expect, capsys):
    run_dir, values = half_run
    before = snapshot(run_dir)
    assert main(cli("fashion_mnist_quick", {**values, **change}, "--resume")[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], lines
    assert snapshot(run_dir) == before, "a refused resume rewrote the run's files"


def test_resume_allows_changes_to_how_it_runs(half_run, capsys):
    run_dir, values = half_run
    changed = {**values, "knn_k": 10, "eval_every": 1, "num_workers": 1, "progress": True}
    resumed = train("fashion_mnist_quick", changed, resume=True, final_eval=False)
    assert resumed.epoch == 10 and "knn_k: 20 -> 10" in capsys.readouterr().err
    assert load_config(run_dir / "config.yaml").knn_k == 10


def test_resume_may_extend_epochs_before_the_first_milestone(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=10, max_steps_per_epoch=1, eval_every=5)
    train("fashion_mnist_quick", values, stop_after=3, final_eval=False)  # first drop at epoch 6 (of 10) or 12
    run = train("fashion_mnist_quick", {**values, "epochs": 20}, resume=True, final_eval=False, stop_after=13)
    lrs = [row["lr"] for row in run.metrics]
    assert lrs[:12] == [0.03] * 12 and lrs[12] == pytest.approx(0.003)  # the new schedule, no jump back up


# ------------------------------------------------------------------------------------------------
# NaN guard, data and disk errors
# ------------------------------------------------------------------------------------------------


def test_nan_guard_never_saves_a_poisoned_state(tmp_path, fashion_mnist_available):
    values = fashion(tmp_path, epochs=3)
    run = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt = run.run_dir / "checkpoint.pt"
    before, metrics_before = ckpt.read_bytes(), (run.run_dir / "metrics.jsonl").read_text()

    def poison(r):  # the loss stays finite, but the BatchNorm statistics do not
        bn = next(m for m in r.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match=r"running_var.*checkpoint \(epoch 1\) is untouched"):
        train("fashion_mnist_quick", values, resume=True, on_epoch_end=poison)
    assert ckpt.read_bytes() == before and (run.run_dir / "metrics.jsonl").read_text() == metrics_before
    resumed = train("fashion_mnist_quick", values, resume=True)  # the message was true: it resumes cleanly
    assert resumed.epoch == 3 and all(torch.isfinite(v).all() for v in resumed.encoder.state_dict().values()
                                      if v.is_floating_point())  # fmt: skip


def test_huge_learning_rate_poisons_batchnorm_but_no_checkpoint(tmp_path, fashion_mnist_available):
    # lr = 1e10 keeps the loss finite (features are normalised) while BatchNorm's running_var overflows in epoch 1
    values = fashion(tmp_path, epochs=3, lr=1e10, weight_decay=0.0)
    with pytest.raises(NonFiniteLossError, match=r"running_var became NaN or infinite .* not saved") as err:
        train("fashion_mnist_quick", values)
    assert "No checkpoint had been written yet" in str(err.value)
    assert not (tmp_path / "runs" / "f" / "checkpoint.pt").exists()
    assert not (tmp_path / "runs" / "f" / "metrics.jsonl").exists()


def test_truncated_idx_file_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "data" / "fashion-mnist"
    data.mkdir(parents=True)
    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.exists():
        pytest.skip("real Fashion-MNIST is not installed")
    for f in src.glob("*.gz"):
        (data / f.name).write_bytes(f.read_bytes())
    bad = data / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:100_000])[:50_000])
    assert main(cli("fashion_mnist_quick", fashion(tmp_path))[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], lines


def test_unwritable_out_dir_is_one_line(tmp_path, capsys, fashion_mnist_available):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(cli("fashion_mnist_quick", fashion(tmp_path, out_dir=str(blocker / "runs")))[3:]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0], lines


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, fashion_mnist_available):
    values = fashion(tmp_path, epochs=2)
    run = train("fashion_mnist_quick", values, stop_after=1, final_eval=False)
    ckpt = run.run_dir / "checkpoint.pt"
    before = ckpt.read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main(cli("fashion_mnist_quick", values, "--resume")[3:]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left" in lines[0] and "--resume" in lines[0], lines
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and not list(run.run_dir.glob(".*.tmp"))
