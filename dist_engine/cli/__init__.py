"""``dist-engine`` command line: generate | serve | client | graft-mtp | graft-dflash |
bench-serve | launch | join | convert. Each module holds its commands and their flags; the
engine's flags come from ``EngineArgs`` (``flags.py``)."""

from __future__ import annotations

import argparse
import logging
import sys

from dist_engine.cli import models, serving, text
from dist_engine.cli.flags import add_engine_args, engine_args, parse_bytes

__all__ = ["add_engine_args", "build_parser", "engine_args", "main", "parse_bytes"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-engine", description="dist_engine: LLM inference with tensor parallelism on Ray (run a command with -h for its flags)")
    parser.add_argument("--log-level", default="INFO", help="dist_engine's log level")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (text, serving, models):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dist_engine").setLevel(args.log_level.upper())
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
