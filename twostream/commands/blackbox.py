"""``twostream blackbox``: the black-box evaluation (docs/blackbox.md): query attacks through the
endpoint's answer function (in process, or ``--url`` a running ``twostream serve``) and transfer
attacks from surrogate models, on in-scope photographs the defence accepts correctly."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("blackbox", help="black-box query and transfer attacks against the defence")
    parser.add_argument("--dataset", default="imagenet-sample:../shared/assets/imagenet-sample",
                        help="dataset spec (twostream.evaluation.datasets): kind:location")
    parser.add_argument("--n", type=int, default=3, help="in-scope images the defence accepts correctly")
    parser.add_argument("--size", type=int, default=256, help="working resolution (square) of the images")
    parser.add_argument("--attacks", type=_csv, default=("square", "simba", "hsj", "boundary"),
                        help="comma-separated: hsj, boundary, square, simba (empty: transfer only)")
    parser.add_argument("--details", type=_csv, default=("full", "label", "verdict"),
                        help="answer details (each attack runs at those it can use)")
    parser.add_argument("--identities", type=_csv, default=("1", "1000"),
                        help="comma-separated: a count of source ids, or ipv6-64")
    parser.add_argument("--detector", type=_csv, default=("off", "on"), help="off, on or both")
    parser.add_argument("--group-prefix", action="store_true",
                        help="Algorithm 2 counts per network (/64, /24) instead of per source id")
    parser.add_argument("--adaptive", type=_csv, default=("",),
                        help="detector-aware query shaping per query, KIND:A (A in 0..255 units): noise, jpeg, "
                             "grid16, blockrgb, blockac, texture, realjpeg (A a quality); comma-separated, "
                             "an empty item for none")
    parser.add_argument("--budget", type=int, default=10_000, help="queries per image")
    parser.add_argument("--stop-at-detection", action="store_true",
                        help="end each run at its first query_attack answer (measures queries to detection)")
    parser.add_argument("--eps", type=float, default=8.0, help="L-inf budget in 0..255 units")
    parser.add_argument("--params", type=json.loads, default={},
                        help='JSON: per-attack overrides, e.g. {"hsj": {"max_eval": 200}}')
    parser.add_argument("--url", help="attack a running twostream serve at this base URL instead of in process")
    parser.add_argument("--transfer", action="append", default=[], metavar="HIGH_MODEL=WEIGHTS,LOW_MODEL=WEIGHTS",
                        help="surrogate pair to craft the adaptive attack on (white-box), scored by the "
                             "defence (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.jsonl, table.md, transfer.json")
    parser.add_argument("--summarise", action="store_true",
                        help="only write table.md again from the runs.jsonl already in --out (a stopped run's too)")
    add_config_args(parser)
    parser.set_defaults(run=run)


def _surrogates(spec: str):
    from twostream.core.config import HighStreamConfig, LowStreamConfig
    from twostream.core.models import build_stream

    try:
        high, low = spec.split(",")
        (hm, hw), (lm, lw) = high.split("=", 1), low.split("=", 1)
    except ValueError:
        raise SystemExit(f"--transfer {spec!r}: expected HIGH_MODEL=WEIGHTS,LOW_MODEL=WEIGHTS") from None
    return (build_stream(HighStreamConfig(model=hm, weights=hw), "high").eval(),
            build_stream(LowStreamConfig(model=lm, weights=lw), "low").eval())


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from twostream.core.config import config_from_args
    from twostream.core.labels import CIFAR10_LABELS
    from twostream.core.query_detector import QueryDetector
    from twostream.core.scoring import Scorer
    from twostream.evaluation import blackbox as bb
    from twostream.evaluation.datasets import from_batch, load_images, open_dataset, to_batch

    if args.summarise:
        results = bb.read_runs((args.out / "runs.jsonl").read_text().splitlines())
        table = bb.markdown_table(bb.summarise(results))
        (args.out / "table.md").write_text(table + "\n")
        sys.stdout.write(table + "\n")
        return 0
    config = config_from_args(args)
    scorer = Scorer(config)
    data = open_dataset(args.dataset).in_scope().subset(max(8 * args.n, 40), seed=args.seed)
    images = load_images(data, args.size, config.limits, (scorer.high.spec, scorer.low.spec))
    clean = scorer.score(list(images), data.ids).results()
    correct = [k for k, r in enumerate(clean)
               if r.label is not None and CIFAR10_LABELS.index(r.label) == data.labels[k]]
    if len(correct) < args.n:
        raise SystemExit(f"only {len(correct)} of {len(data)} photographs are accepted correctly; need --n {args.n}")
    chosen = correct[: args.n]
    rest = [(images[k], int(data.labels[k])) for k in range(len(data)) if k not in chosen]
    ids = [data.ids[k] for k in chosen]
    log.info("images: %s", ", ".join(ids))
    args.out.mkdir(parents=True, exist_ok=True)
    eps = args.eps / 255.0

    if args.transfer:
        from twostream.attacks.adaptive import adaptive_attack
        from twostream.core.mapping import load_mapping

        x = to_batch(images[chosen])
        rows = {}
        for spec in args.transfer:
            high, low = _surrogates(spec)
            adv, info = adaptive_attack(x, data.labels[chosen], high, low, load_mapping().array, eps=eps,
                                        p1=config.thresholds.p1, p2=config.thresholds.p2, seed=args.seed)
            oracle = bb.LocalOracle(scorer, detector=QueryDetector()) if not args.url else bb.HttpOracle(args.url)
            scored = bb.transfer(oracle, from_batch(adv), data.labels[chosen], ids, f"{args.seed}")
            rows[spec] = {"surrogate_success": int(np.sum(info["success"])), "n": len(ids),
                          "defence_success": sum(r["success"] for r in scored), "images": scored}
            log.info("transfer %s: %d/%d fool the surrogates, %d/%d the defence", spec,
                     rows[spec]["surrogate_success"], len(ids), rows[spec]["defence_success"], len(ids))
        (args.out / "transfer.json").write_text(json.dumps(rows, indent=1))

    if not args.attacks:
        return 0
    grid = bb.Grid(attacks=args.attacks, details=args.details, identities=args.identities,
                   detector=tuple(d == "on" for d in args.detector), adaptive=args.adaptive,
                   budget=args.budget, eps=eps, group_prefix=args.group_prefix, seed=args.seed,
                   stop_at_detection=args.stop_at_detection)
    if args.url:
        shared = bb.HttpOracle(args.url)

        def make_oracle(detector: bool) -> bb.Oracle:
            return shared
    else:
        def make_oracle(detector: bool) -> bb.Oracle:
            return bb.LocalOracle(scorer, detector=QueryDetector() if detector else None,
                                  group_prefix=args.group_prefix)

    with open(args.out / "runs.jsonl", "a") as sink:
        def write(result: bb.RunResult) -> None:
            sink.write(json.dumps(result.to_dict()) + "\n")
            sink.flush()

        results = bb.run_grid(grid, make_oracle, images[chosen], data.labels[chosen], ids, rest,
                              params=args.params, on_result=write)
    table = bb.markdown_table(bb.summarise(results))
    (args.out / "table.md").write_text(table + "\n")
    log.info("table:\n%s", table)
    return 0
