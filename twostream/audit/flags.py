"""The audit's command line, shared by ``twostream audit`` and ``python -m jobs.audit``: the flags,
the ``audit`` config section they give (:func:`audit_section`, for ``load_config(flags=...)``),
and the summary printed at the end. Light to import (``twostream --help``); no Ray, no CLI package."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, get_args

from twostream.core.config import AuditSettings

if TYPE_CHECKING:  # pragma: no cover
    from twostream.audit.outputs import AuditResult

_DEFAULTS = AuditSettings()
_FORMATS = get_args(AuditSettings.model_fields["format"].annotation)  # auto, csv, tsv, ...


def add_audit_args(parser: argparse.ArgumentParser) -> None:
    """The audit's own arguments (``--config``/``--set`` are added by the caller)."""
    parser.add_argument("--log", required=True, metavar="URI", help="upload log (local path or s3://)")
    parser.add_argument("--output", required=True, metavar="URI", help="output folder (local or s3://)")
    parser.add_argument("--images", metavar="URI", help="image prefix; unscored images named by the log are scored")
    parser.add_argument("--scores", metavar="URI",
                        help="an earlier batch job's output (or its images/ Parquet): reused, never rescored")
    parser.add_argument("--format", choices=_FORMATS,
                        help=f"log format (default: {_DEFAULTS.format}, from the file extension)")
    parser.add_argument("--map", dest="mapping", action="append", metavar="FIELD=COLUMN",
                        help="column mapping, e.g. --map source=remote_user --map image=request_uri "
                             "--map timestamp_unit=ms (fields: timestamp, source, image, user_agent)")
    parser.add_argument("--what-if", dest="what_if", action="append", metavar="K=V,...",
                        help="replay with other settings, e.g. --what-if p1=0.05 --what-if threshold=5,cap=10 "
                             "(keys: p1, p2, threshold, cap; repeatable)")
    parser.add_argument("--clean-rate", type=float,
                        help=f"what-if: a source whose rejection rate is at most this looks clean "
                             f"(default {_DEFAULTS.clean_rate})")
    parser.add_argument("--top", type=int, help=f"suspicious sources plotted in the report (default {_DEFAULTS.top})")
    parser.add_argument("--partitions", type=int,
                        help=f"spill partitions by source: the replay holds one (memory ~ (uploads + sources) / partitions; "
                             f"default {_DEFAULTS.partitions})")
    parser.add_argument("--spill-dir", metavar="DIR", help="local folder for spill files (default: temp)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def audit_section(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as ``{"audit": {...}}`` over the config file (flags not given are None)."""
    from twostream.audit.logread import mapping_pairs  # pyarrow: not at --help time

    return {"audit": {
        "format": args.format,
        "columns": mapping_pairs(args.mapping) if args.mapping else None,
        "what_if": args.what_if,
        "clean_rate": args.clean_rate,
        "top": args.top,
        "partitions": args.partitions,
        "spill_dir": args.spill_dir,
        "report": False if args.no_report else None,
    }}


def print_summary(result: AuditResult) -> None:
    """The command's final output: counts, timing, the files written, the what-if rows."""
    s = result.summary
    print(f"{s['lines']:,} log lines ({s['bad_lines']:,} bad), {s['sources']:,} sources, "
          f"{s['sources_ever_blacklisted']:,} ever blacklisted ({s['sources_blacklisted_at_end']:,} at the end); "
          f"{s['images_scored_from_scores']:,} scores reused, {s['images_scored_now']:,} images scored now; "
          f"{s['seconds']['total']:.1f} s ({s['lines_per_second']:,.0f} lines/s)")
    if s["warnings"]["lines_with_invalid_utf8"]:
        print(f"  warning: {s['warnings']['lines_with_invalid_utf8']:,} lines with invalid UTF-8 "
              "(kept, bad bytes replaced by U+FFFD)")
    for name, uri in s["files"].items():
        print(f"  {name}: {uri}")
    if result.what_if is not None:
        print(json.dumps(result.what_if.to_pylist(), indent=None))
