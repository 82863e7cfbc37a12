"""`rlhf-ray <command> --config run.yaml [--set key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from rlhf_ray.config import ConfigError, RunConfig, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set pretrain.steps=10 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("pipeline", "run every stage in order, skipping finished ones"),
        ("data", "write the demo data (if configured) and validate every record file"),
        ("tokenizer", "train (or adopt) the tokenizer"),
        ("config", "print the resolved config"),
    ]:
        _add_config_args(commands.add_parser(name, help=help_text))
    return parser


def run_command(command: str, cfg: RunConfig) -> None:
    from rlhf_ray import pipeline

    if command == "config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    elif command == "data":
        pipeline.prepare_run(cfg)
        pipeline.make_demo_data(cfg)
        pipeline.check_data(cfg)
    elif command == "tokenizer":
        pipeline.prepare_run(cfg)
        pipeline.make_demo_data(cfg)
        pipeline.check_data(cfg, kinds=["pretrain"])
        pipeline.make_tokenizer(cfg)
    elif command == "pipeline":
        pipeline.run_pipeline(cfg)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_command(args.command, cfg)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("RLHF_RAY_DEBUG"):
            raise
        print(f"rlhf-ray: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
