"""``twostream sample``: write the demo/test upload set (real photos + FGSM copies)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.cli import add_config_args

    parser = subparsers.add_parser("sample", help="generate a sample upload set (photos + FGSM copies)")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--adversarial-fraction", type=float, default=0.25)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--attackers", type=int, default=2, help="sources sending perturbed copies")
    parser.add_argument("--shards", type=int, default=2, help="tar shards (half the images)")
    parser.add_argument("--eps", type=float, default=8 / 255, help="FGSM step")
    parser.add_argument("--out", type=Path, help="folder (default: cached under ~/.cache/twostream)")
    add_config_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from twostream import samples
    from twostream.cli import config_from_args

    config = config_from_args(args)
    kwargs = dict(sources=args.sources, attackers=args.attackers, shards=args.shards, eps=args.eps)
    if args.out:
        info = samples.generate(args.out, args.n, args.adversarial_fraction, config=config, **kwargs)
    else:
        info = samples.cached(args.n, args.adversarial_fraction, config=config, **kwargs)
    print(f"{info.n} images ({info.adversarial} perturbed, from {info.attackers} of {info.sources} "
          f"sources) in {info.input_dir}\nmanifest: {info.manifest}")
    return 0
