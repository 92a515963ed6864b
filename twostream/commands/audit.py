"""``twostream audit --log URI (--scores URI | --images URI) --output URI``: who probed the classifier.

Reads an upload log, joins it to the images (reusing ``--scores`` so nothing is scored twice,
scoring the rest in-process), replays Algorithm 2 per source in time order and writes
``sources.parquet``, ``timeline.parquet``, ``bad_lines.parquet``, ``summary.json`` and
``report.html`` under ``--output``. ``jobs/audit.py`` is the same with scoring in Ray tasks.
See docs/audit.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_audit_args(parser: argparse.ArgumentParser) -> None:
    """The audit's arguments (shared with ``python -m jobs.audit``)."""
    from twostream.cli import add_config_args

    parser.add_argument("--log", required=True, metavar="URI", help="upload log (local path or s3://)")
    parser.add_argument("--output", required=True, metavar="URI", help="output folder (local or s3://)")
    parser.add_argument("--images", metavar="URI", help="image prefix; unscored images named by the log are scored")
    parser.add_argument("--scores", metavar="URI",
                        help="an earlier batch job's output (or its images/ Parquet): reused, never rescored")
    parser.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl", "parquet", "clf"],
                        help="log format (default: from the file extension)")
    parser.add_argument("--map", dest="mapping", action="append", default=[], metavar="FIELD=COLUMN",
                        help="column mapping, e.g. --map source=remote_user --map image=request_uri "
                             "--map timestamp_unit=ms (fields: timestamp, source, image, user_agent)")
    parser.add_argument("--what-if", dest="what_if", action="append", default=[], metavar="K=V,...",
                        help="replay with other settings, e.g. --what-if p1=0.05 --what-if threshold=5,cap=10 "
                             "(keys: p1, p2, threshold, cap; repeatable)")
    parser.add_argument("--clean-rate", type=float, default=0.1,
                        help="what-if: a source whose rejection rate is at most this looks clean (default 0.1)")
    parser.add_argument("--top", type=int, default=10, help="suspicious sources plotted in the report")
    parser.add_argument("--partitions", type=int, default=16, help="spill partitions (memory ~ log / partitions)")
    parser.add_argument("--spill-dir", metavar="DIR", help="local folder for spill files (default: temp)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")
    add_config_args(parser)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="audit an upload log: which sources sent adversarial images")
    add_audit_args(parser)
    parser.set_defaults(run=run)


def audit_from_args(args: argparse.Namespace, score_fn=None):
    from twostream.audit.audit import WhatIf, parse_mapping, run_audit
    from twostream.cli import config_from_args

    config = config_from_args(args)
    return run_audit(
        args.log, args.output, images_uri=args.images, scores_uri=args.scores, config=config,
        log_format=args.format, mapping=parse_mapping(args.mapping),
        what_if=[WhatIf.parse(w) for w in args.what_if], clean_rate=args.clean_rate, top=args.top,
        partitions=args.partitions, spill_dir=args.spill_dir, report=not args.no_report, score_fn=score_fn,
    )


def print_summary(result) -> None:
    s = result.summary
    print(f"{s['lines']:,} log lines ({s['bad_lines']:,} bad), {s['sources']:,} sources, "
          f"{s['sources_ever_blacklisted']:,} ever blacklisted ({s['sources_blacklisted_at_end']:,} at the end); "
          f"{s['images_scored_from_scores']:,} scores reused, {s['images_scored_now']:,} images scored now; "
          f"{s['seconds']['total']:.1f} s ({s['lines_per_second']:,.0f} lines/s)")
    for name, uri in s["files"].items():
        print(f"  {name}: {uri}")
    if result.what_if is not None:
        print(json.dumps(result.what_if.to_pylist(), indent=None))


def run(args: argparse.Namespace) -> int:
    from twostream.audit.audit import AuditError

    try:
        result = audit_from_args(args)
    except AuditError as exc:
        print(f"twostream audit: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0
