"""Command line: ``python -m instdisc_lite train --config NAME_OR_PATH [--set key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, TrainConfig, load_config, shipped_configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instdisc_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a config and print its evaluation")
    tr.add_argument("--config", required=True, help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML path")
    tr.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    tr.add_argument("--resume", action="store_true", help="continue runs/<name>/checkpoint.pt exactly")
    tr.add_argument("--overwrite", action="store_true", help="start over even if runs/<name> has a checkpoint")
    sub.add_parser("configs", help="list the shipped configs and the valid config keys")
    show = sub.add_parser("show", help="print a resolved config as YAML")
    show.add_argument("--config", required=True)
    show.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = parser.parse_args(argv)

    try:
        if args.command == "configs":
            print("shipped configs:", ", ".join(shipped_configs()))
            print("config keys:", ", ".join(TrainConfig.field_names()))
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "show":
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        from . import distributed
        from .data import DatasetNotFoundError
        from .train import NonFiniteLossError, RunExistsError, train

        try:
            run = train(config, resume=args.resume, overwrite=args.overwrite)
            main_process = distributed.is_main_process()
        except (DatasetNotFoundError, NonFiniteLossError, RunExistsError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            distributed.cleanup()
        if not main_process:  # only rank 0 prints the result
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"run_dir": str(run.run_dir), **run.metrics[-1], **{f"final_{k}": v for k, v in run.final.items()}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
