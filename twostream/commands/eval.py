"""``twostream eval``: the evaluation grid (jobs/evaluate.py) from the command line.

Runs on the Ray cluster at ``--address``/$RAY_ADDRESS, or on a local Ray started for the run.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jobs.evaluate import add_grid_args

    parser = subparsers.add_parser("eval", help="attack datasets, score them, write Tables 1-2")
    add_grid_args(parser)
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from jobs.evaluate import format_summary, load_eval_config, run_grid
    from twostream.evaluation.runner import cells

    config = load_eval_config(args.config, args.overrides, datasets=args.dataset,
                              attacks=args.attack, subset=args.subset)
    try:
        cells(config.eval)
    except ValueError as exc:
        print(f"twostream eval: {exc}", file=sys.stderr)
        return 2
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or None)
    try:
        summary = run_grid(config, args.output, progress=not args.no_progress)
    finally:
        if started_here:
            ray.shutdown()
    sys.stdout.write(format_summary(summary) + "\n")
    return 1 if summary["failed"] else 0
