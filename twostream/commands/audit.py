"""``twostream audit --log URI (--scores URI | --images URI) --output URI``: who probed the classifier.

Reads an upload log, joins it to the images (reusing ``--scores`` so nothing is scored twice,
scoring the rest in-process), replays Algorithm 2 per source in time order and writes
``sources.parquet``, ``timeline.parquet``, ``bad_lines.parquet``, ``summary.json`` and
``report.html`` under ``--output``. ``jobs/audit.py`` is the same with scoring in Ray tasks.
The flags (:mod:`twostream.audit.flags`) feed the config's ``audit`` section. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.audit.flags import add_audit_args
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("audit", help="audit an upload log: which sources sent adversarial images")
    add_audit_args(parser)
    add_config_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from twostream.audit.flags import audit_section, print_summary
    from twostream.audit.logread import AuditError
    from twostream.audit.run import run_audit
    from twostream.core.config import config_from_args

    config = config_from_args(args, audit_section(args))
    try:
        result = run_audit(args.log, args.output, images_uri=args.images, scores_uri=args.scores, config=config)
    except AuditError as exc:
        print(f"twostream audit: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    return 0
