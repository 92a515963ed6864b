"""``twostream eval``: the evaluation grid (jobs/evaluate.py) from the command line.

Runs on the Ray cluster at ``--address``/$RAY_ADDRESS, or on a local Ray started for the run.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jobs.evaluate import add_grid_args

    parser = subparsers.add_parser("eval", help="attack datasets, score them, write Tables 1-2")
    add_grid_args(parser)
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from jobs.evaluate import run_from_args

    return run_from_args(args, "twostream eval")
