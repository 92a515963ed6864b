"""``twostream blackbox``: the black-box evaluation (docs/blackbox.md): query attacks through the
endpoint's answer function (in process, or ``--url`` a running ``twostream serve``) and transfer
attacks from surrogate models, on in-scope photographs the defence accepts correctly."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from twostream.evaluation.blackbox import HttpOracle, LocalOracle

log = logging.getLogger(__name__)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: I must be in 0..N-1")
    return index, count


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
    parser.add_argument("--restart", action="store_true",
                        help="run an attack again (fresh seed) when it ends before the budget is spent")
    parser.add_argument("--eps", type=float, default=8.0, help="L-inf budget in 0..255 units")
    parser.add_argument("--params", type=json.loads, default={},
                        help='JSON: per-attack overrides, e.g. {"hsj": {"max_eval": 200}}')
    parser.add_argument("--url", help="attack a running twostream serve at this base URL instead of in process")
    parser.add_argument("--transfer", action="append", default=[], metavar="HIGH_MODEL=WEIGHTS,LOW_MODEL=WEIGHTS",
                        help="surrogate pair to craft the adaptive attack on (white-box), scored by the "
                             "defence (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.jsonl, table.md, transfer.json")
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs --out's runs.jsonl already holds (an interrupted run is run again)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="run only every N-th run from the I-th (0-based), to split a campaign over processes "
                             "writing to the same --out")
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
            oracle = (bb.HttpOracle(args.url) if args.url
                      else bb.LocalOracle(scorer, detector=config.detector.query_config()))
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
                   stop_at_detection=args.stop_at_detection, restart=args.restart)
    if args.url:
        shared = bb.HttpOracle(args.url, record=True)

        def make_oracle(detector: bool) -> bb.Oracle:
            return shared
    else:
        def make_oracle(detector: bool) -> bb.Oracle:
            return bb.LocalOracle(scorer, detector=config.detector.query_config() if detector else None,
                                  group_prefix=args.group_prefix)

    runs = args.out / "runs.jsonl"
    done = bb.read_runs(runs.read_text().splitlines()) if args.resume and runs.exists() else []
    todo = len(range(args.shard[0], len(ids) * len(grid.cells()), args.shard[1]))  # this shard's runs
    # SIGTERM ends the current run as "interrupted" (recorded with its counts so far), then the command.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with open(runs, "a") as sink, tqdm(total=todo * args.budget, unit="q", file=sys.stderr, mininterval=30) as bar:
        def write(result: bb.RunResult) -> None:
            sink.write(json.dumps(result.to_dict()) + "\n")
            sink.flush()
            bar.update(args.budget - result.queries)  # a run that ended early leaves its budget unspent

        try:
            results = bb.run_grid(grid, make_oracle, images[chosen], data.labels[chosen], ids, rest,
                                  params=args.params, on_result=write, done=done, shard=args.shard,
                                  progress=bar.update)
        except KeyboardInterrupt:
            log.warning("interrupted: the runs finished so far and the interrupted one are in %s", runs)
            return 130
    if args.url:
        _check_server(args, shared, bb.LocalOracle(
            scorer, detector=config.detector.query_config() if config.detector.enabled else None,
            group_prefix=args.group_prefix))
    table = bb.markdown_table(bb.summarise(results))
    (args.out / "table.md").write_text(table + "\n")
    log.info("table:\n%s", table)
    return 0


def _check_server(args: argparse.Namespace, server: HttpOracle, replay: LocalOracle) -> None:
    """After a campaign over HTTP: the server's per-source standing against the harness's answers
    (``server_agreement``; the server lists at most ``serve.max_sources_listed`` sources, 1,000 by
    default), every upload replayed in order through the in-process oracle (``replay``, the same
    config) answer for answer, and the server's detections counter against the replay's flags;
    written to ``server_check.json``."""
    from twostream.evaluation.blackbox import server_agreement

    listing = server.session.get(f"{server.base}/v1/sources", params={"limit": 1000}, timeout=60).json()
    problems = server_agreement(server.tally, listing["sources"])
    local = []
    for k in range(0, len(server.sent), 64):
        chunk = server.sent[k:k + 64]
        local += [a.response for a in replay.ask([im for im, _, _ in chunk], [src for _, src, _ in chunk])]
    differ = [k + 1 for k, ((_, _, answer), mine) in enumerate(zip(server.sent, local)) if answer != mine]
    detections = None  # the server's counter, once Ray's metrics agents have reported it (up to 60 s)
    for _ in range(12):
        text = server.session.get(f"{server.base}/metrics", timeout=60).text
        found = re.search(r"^twostream_query_detections_total (\S+)$", text, re.M)
        detections = float(found.group(1)) if found else None
        if detections == replay.detections:
            break
        time.sleep(5)
    report = {"queries": len(server.sent), "sources": len(server.tally), "server_sources": listing["count"],
              "source_problems": problems, "replay_differs_at": differ,
              "query_attack": {"server": sum(a == "query_attack" for _, _, a in server.sent),
                               "replay": local.count("query_attack")},
              "detections": {"server_metrics": detections, "replay": replay.detections},
              "per_source": {src: dict(tally) for src, tally in sorted(server.tally.items())}}
    (args.out / "server_check.json").write_text(json.dumps(report, indent=1))
    log.info("server check: %d queries from %d sources; %d per-source disagreements; the in-process replay "
             "differs at %d of them", len(server.sent), len(server.tally), len(problems), len(differ))
