"""The ``twostream`` console script.

Each subcommand lives in its own module under :mod:`twostream.commands`, exposing
``add_parser(subparsers)`` and ``run(args) -> int``; heavy imports stay inside ``run`` so that
``twostream --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from twostream import __version__
from twostream.core.config import ConfigError

# Module names under twostream.commands, in the order shown by --help.
COMMANDS = ["classify", "audit", "sample", "score", "cluster", "serve", "reputation", "eval", "simulate", "train_low",
            "robustness", "calibrate", "blackbox"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twostream", description="Two-stream adversarial image detection."
    )
    parser.add_argument("--version", action="version", version=f"twostream {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"twostream.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"twostream: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
