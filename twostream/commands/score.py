"""``twostream score``: the batch job (jobs/score.py) from the command line.

With ``--input``: runs the job on the Ray cluster at ``--address``/$RAY_ADDRESS, or on a local
Ray started for the run. Without ``--input`` (the embedded default, ``make demo``): starts the
local S3 server (moto), generates or reuses the cached demo sample (``twostream sample``: honest
senders and attackers, their roles in its manifest), uploads it to a bucket, runs the job from
``s3://`` on a local Ray and prints the one-screen summary with the ground truth beside the outcome.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("score", help="batch-score images on Ray (Parquet out)")
    parser.add_argument("--input", help="s3:// prefix or local folder (default: the embedded demo)")
    parser.add_argument("--manifest", help="CSV/TSV, JSON Lines, Parquet or access-log manifest, perhaps .gz")
    parser.add_argument("--output", help="s3:// prefix or local folder for results")
    parser.add_argument("--state", help="start reputation from a previous run's output (its sources/) "
                                        "or a sources table (default: job.state)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--no-progress", action="store_true")
    add_config_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from jobs.ray_cluster import connect
    from jobs.score import USER_ERRORS, run_job, with_state
    from twostream.batch.outputs import format_summary
    from twostream.core.config import config_from_args

    cfg = with_state(config_from_args(args), args.state)
    store = None
    try:
        if args.input:
            input_uri, manifest, output = args.input, args.manifest, args.output
            if not output:
                print("twostream score: --output is required with --input", file=sys.stderr)
                return 2
        else:
            from twostream.demo import sample
            from twostream.storage.local_s3 import LocalStore, create_bucket, upload_tree

            print("embedded demo: local S3 server (moto) + local Ray + the cached demo sample", file=sys.stderr)
            info = sample.cached(config=cfg, progress=not args.no_progress)
            store = LocalStore().start()
            store.apply_env()
            create_bucket("twostream-demo")
            upload_tree(info.input_dir, "s3://twostream-demo/uploads")
            import boto3

            boto3.client("s3", endpoint_url=store.endpoint).upload_file(
                str(info.manifest), "twostream-demo", "manifest.csv")
            input_uri, manifest = "s3://twostream-demo/uploads", "s3://twostream-demo/manifest.csv"
            output = args.output or os.path.join("out", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
        connect(args.address)
        try:
            summary = run_job(cfg, input_uri, output, manifest, progress=not args.no_progress)
        except USER_ERRORS as exc:
            print(f"twostream score: {exc}", file=sys.stderr)
            return 2
        print(format_summary(summary))
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if store is not None:
            store.stop()
