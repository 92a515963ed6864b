"""``twostream sample``: write the demo upload set (honest senders, an out-of-scope sender and three
attackers, each source's role in the manifest; see ``twostream.demo.sample`` and docs/demo.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("sample", help="generate the demo upload set (roles in its manifest)")
    parser.add_argument("--out", type=Path, help="folder (default: cached under ~/.cache/twostream)")
    parser.add_argument("--shards", type=int, default=2, help="tar shards (the later half of the uploads)")
    parser.add_argument("--max-side", type=int, default=320, help="longest side of the uploads, px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    add_config_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from twostream.core.config import config_from_args
    from twostream.demo import sample

    config = config_from_args(args)
    options = dict(shards=args.shards, max_side=args.max_side, config=config, seed=args.seed,
                   progress=not args.no_progress)
    if args.out:
        info = sample.generate(args.out, sample.DEMO, **options)
    else:
        info = sample.cached(sample.DEMO, **options)
    for s in sample.DEMO:
        print(f"  {s.source:<14} {s.role:<22} {len(s.pattern):>3} uploads"
              + (f", {s.pattern.count('a')} attacked ({s.attack})" if s.attack else ""))
    print(f"{info.uploads} images ({info.attacked} attacked, from {info.sources} sources) in {info.input_dir}\n"
          f"manifest (with the roles): {info.manifest}")
    return 0
