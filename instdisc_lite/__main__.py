"""Command line: ``python -m instdisc_lite train --config NAME_OR_PATH [--set key=value ...]``.

``python -m instdisc_lite embed --run runs/NAME --out features.npy [--split train|test]`` writes the features of a
trained run's images: an (N, d) float32 .npy of unit rows, in dataset order (the bank rows; for your own data, the
order of the .npz file or of the folder's sorted files).

Every expected failure (bad config, missing or corrupt data, a run that exists or is in use, a checkpoint that
cannot be used, NaN, a full disk, Ctrl-C) prints one ``error:`` line that says what to do, and exits non-zero:
2 for input the user can fix, 1 for a failure during training, 130 for an interruption.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig, load_config, shipped_configs


def _os_error_line(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        fix = "free some space, then continue with --resume (the last checkpoint is intact)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable directory (--set out_dir=...)"
    else:
        fix = "check the path, then continue with --resume (the last checkpoint is intact)"
    return f"cannot write{where}: {what}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instdisc_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a config and print its evaluation")
    tr.add_argument("--config", required=True, help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML path")
    tr.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    tr.add_argument("--resume", action="store_true", help="continue runs/<name>/checkpoint.pt exactly")
    tr.add_argument("--overwrite", action="store_true", help="delete runs/<name> and start over")
    rep = sub.add_parser("reproduce", help="run one of the paper's studies (a grid of runs) into results/")
    rep.add_argument("study", help="table1, temperature, embedding, proximal, z or train_size")
    rep.add_argument("--scale", default="quick", help="quick (Fashion-MNIST, CPU) or full (CIFAR-10 ResNet18, GPU)")
    rep.add_argument("--jobs", type=int, default=1, help="arms trained at once (processes)")
    rep.add_argument("--results", default="results", help="where the result files go (default: results/)")
    emb = sub.add_parser("embed", help="write the L2-normalised features of a trained run's images to a .npy file")
    emb.add_argument("--run", required=True, help="the run directory, runs/<name> (its config.yaml and checkpoint.pt)")
    emb.add_argument("--out", required=True, help="the .npy file to write: (N, d) float32, one unit row per image")
    emb.add_argument("--split", choices=("train", "test"), default="train",
                     help="train (default): every training image, in dataset order; test: the test set")  # fmt: skip
    emb.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    emb.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                     help="override the run's config keys, e.g. test_path=new.npz to embed other images")  # fmt: skip
    sub.add_parser("configs", help="list the shipped configs and the valid config keys")
    show = sub.add_parser("show", help="print a resolved config as YAML")
    show.add_argument("--config", required=True)
    show.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = parser.parse_args(argv)

    try:
        if args.command == "reproduce":
            return _reproduce(args.study, args.scale, args.jobs, args.results)
        if args.command == "embed":
            return _embed(args.run, Path(args.out), args.split, args.device, args.overrides)
        if args.command == "configs":
            print("shipped configs:", ", ".join(shipped_configs()))
            print("config keys:", ", ".join(TrainConfig.field_names()))
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "show":
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        return _train(config, args.resume, args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _reproduce(study: str, scale: str, jobs: int, results: str) -> int:
    from .data import DatasetError
    from .reproduce import reproduce

    try:  # an unknown study, scale or --jobs is a ConfigError: main's one line and exit 2
        reproduce(study, scale, jobs, results)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"error: interrupted; run the same command again to continue ({study}: finished arms are kept)",
            file=sys.stderr,
        )
        return 130
    return 0


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be written (checked before the run is loaded), or None."""
    if out.suffix != ".npy":
        return f"--out must name a .npy file, got {str(out)!r}"
    if out.is_dir():
        return f"--out {out} is a directory; name a .npy file in it"
    if not out.parent.is_dir():
        return f"the directory of --out ({out.parent}) does not exist; create it first"
    return None


def _embed(run_dir: str, out: Path, split: str, device: str, overrides: list[str]) -> int:
    from .checkpoint import CheckpointError, atomic_save_npy
    from .data import DatasetError
    from .train import embed, load_trained_run

    problem = _out_problem(out)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        features = embed(load_trained_run(run_dir, device, overrides), split)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)  # ValueError: no test set to embed
        return 2
    try:
        atomic_save_npy(features.numpy(), out)
    except OSError as err:
        print(f"error: cannot write {out}: {err.strerror or err}; choose a writable --out", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(out), "split": split, "shape": list(features.shape), "run_dir": str(run_dir)}))
    return 0


def _train(config: TrainConfig, resume: bool, overwrite: bool) -> int:
    from . import distributed
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .run_dir import RunExistsError, RunInUseError
    from .train import NonFiniteLossError, TrainingInterrupted, train

    try:
        run = train(config, resume=resume, overwrite=overwrite)
        main_process = distributed.is_main_process()
    except (ConfigError, DatasetError, RunExistsError, RunInUseError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        print(f"error: {err or 'interrupted; continue with --resume'}", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    if not main_process:  # only rank 0 prints the result
        return 0
    final = {f"final_{k}": v for k, v in (run.final or {}).items()}
    print(json.dumps({"run_dir": str(run.run_dir), **(run.metrics[-1] if run.metrics else {}), **final}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
