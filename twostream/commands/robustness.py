"""``twostream robustness``: the L-Net's own accuracy under attack, for one or more weight files.

Clean, PGD (with restarts) and ART AutoAttack accuracy at each ``--eps`` on a labelled folder at
the stream's input size (:mod:`twostream.evaluation.robustness`). Writes ``robustness.parquet``
and ``robustness.md`` under ``--output`` and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.evaluation.robustness import RobustnessSettings

    d = RobustnessSettings()
    parser = subparsers.add_parser("robustness", help="clean, PGD and AutoAttack accuracy of the L-Net",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="append", required=True, metavar="WEIGHTS",
                        help="low.weights source, e.g. bundled:cifar10_resnet32 (repeatable)")
    parser.add_argument("--model", default="cifar_resnet32", help="low-resolution model; default cifar_resnet32")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="low.tta: flip = mean of the logits of the image and its mirror; default none")
    parser.add_argument("--data", required=True, metavar="FOLDER",
                        help="ImageFolder named by CIFAR-10 class, e.g. ../shared/assets/cifar10-jpeg/test")
    parser.add_argument("--eps", action="append", metavar="EPS", help="L-inf epsilon, e.g. 8/255 (repeatable; "
                        "default 4/255 and 8/255)")
    parser.add_argument("--clean-n", type=int, metavar="N", help="seeded subset for all measures (default: all)")
    parser.add_argument("--pgd-n", type=int, default=d.pgd_n, metavar="N",
                        help=f"images attacked by PGD (nested seeded subset; 0: none); default {d.pgd_n}")
    parser.add_argument("--pgd-steps", type=int, default=d.pgd_steps, help=f"default {d.pgd_steps}")
    parser.add_argument("--pgd-restarts", type=int, default=d.pgd_restarts, help=f"default {d.pgd_restarts}")
    parser.add_argument("--aa-n", type=int, default=d.aa_n, metavar="N",
                        help=f"images attacked by AutoAttack (nested in --pgd-n's; 0: none); default {d.aa_n}")
    parser.add_argument("--aa-iters", type=int, default=d.aa_iters,
                        help=f"APGD-CE / APGD-DLR iterations; default {d.aa_iters}")
    parser.add_argument("--aa-restarts", type=int, default=d.aa_restarts,
                        help=f"APGD random starts; default {d.aa_restarts}")
    parser.add_argument("--aa-square-queries", type=int, default=d.aa_square_queries,
                        help=f"Square attack queries (0: no Square); default {d.aa_square_queries}")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", metavar="DIR", help="folder for robustness.parquet / .md (local or s3://)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    import pyarrow as pa
    import torch

    from twostream import storage
    from twostream.core.config import LowStreamConfig
    from twostream.core.models import build_stream
    from twostream.evaluation.datasets import DatasetError
    from twostream.evaluation.robustness import RobustnessSettings, markdown, measure
    from twostream.training.adversarial import parse_eps
    from twostream.training.data import load_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        eps = tuple(parse_eps(e) for e in (args.eps or ["4/255", "8/255"]))
        settings = RobustnessSettings(eps=eps, pgd_n=args.pgd_n, pgd_steps=args.pgd_steps,
                                      pgd_restarts=args.pgd_restarts, aa_n=args.aa_n, aa_iters=args.aa_iters,
                                      aa_restarts=args.aa_restarts, aa_square_queries=args.aa_square_queries,
                                      seed=args.seed, batch_size=args.batch_size)
        streams = [build_stream(LowStreamConfig(model=args.model, weights=w, tta=args.tta), "low").eval()
                   for w in args.weights]
        started = time.perf_counter()
        data = load_folder(args.data, streams[0], args.clean_n, args.seed)
    except (ValueError, DatasetError) as exc:
        sys.stderr.write(f"twostream robustness: {exc}\n")
        return 2
    model_name = args.model if args.tta == "none" else f"{args.model}+{args.tta}"
    tables = []
    for weights, stream in zip(args.weights, streams):
        if tuple(stream.spec.size) != tuple(streams[0].spec.size):
            data = load_folder(args.data, stream, args.clean_n, args.seed)
        tables.append(measure(stream, data.x, data.y, settings, weights=weights, model_name=model_name,
                              progress=not args.no_progress))
    table = pa.concat_tables(tables)
    meta = {"data": f"{args.data} ({len(data):,} images)", "wall time": f"{time.perf_counter() - started:.0f} s",
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                        f"{torch.get_num_threads()} torch threads",
            "command": "twostream " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    text = markdown(table, meta)
    if args.output:
        storage.write_parquet(table, storage.join(args.output, "robustness.parquet"))
        storage.write_bytes(storage.join(args.output, "robustness.md"), text.encode())
    sys.stdout.write(text)
    return 0
