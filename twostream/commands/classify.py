"""``twostream classify IMG...``: score local image files and print each verdict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.core.config import add_config_args

    parser = subparsers.add_parser("classify", help="score local image files")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--chunk", type=int, default=32, help="images scored per call")
    add_config_args(parser)
    parser.set_defaults(run=run)


def _format(result, path: Path) -> str:
    from twostream.core.labels import CIFAR10_LABELS
    from twostream.core.mapping import load_mapping

    if result.error:
        return f"{path}: error: {result.error}"
    names = load_mapping().names
    verdict = f"accepted as {result.label}" if result.label else "REJECTED (adversarial)"
    lines = [f"{path}: {verdict}  agreement={result.agreement:.3f}"]
    high = ", ".join(
        f"{names[i]} [{m}] {p:.3f}"
        for i, p, m in zip(result.high_idx, result.high_prob, result.high_labels)
    )
    low = ", ".join(f"{CIFAR10_LABELS[i]} {p:.3f}" for i, p in zip(result.low_idx, result.low_prob))
    timing = " ".join(f"{k}={v:.1f}ms" for k, v in result.timings_ms.items())
    lines += [f"  high top-5: {high}", f"  low top-2:  {low}", f"  timings:    {timing}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from twostream.core.config import config_from_args
    from twostream.core.labels import Verdict
    from twostream.core.scoring import Scorer

    config = config_from_args(args)
    scorer = Scorer(config)
    failures = 0
    paths: list[Path] = args.images
    with tqdm(total=len(paths), unit="img", disable=len(paths) < 2, file=sys.stderr) as bar:
        for start in range(0, len(paths), args.chunk):
            chunk, blobs = [], []
            for path in paths[start : start + args.chunk]:
                try:
                    blobs.append(path.read_bytes())
                    chunk.append(path)
                except OSError as exc:
                    failures += 1
                    tqdm.write(f"{path}: error: cannot read: {exc}", file=sys.stdout)
            for path, result in zip(chunk, scorer.score_batch(blobs, ids=[str(p) for p in chunk])):
                failures += result.verdict == Verdict.ERROR
                text = json.dumps(result.to_dict()) if args.json else _format(result, path)
                tqdm.write(text, file=sys.stdout)
            bar.update(min(args.chunk, len(paths) - start))
    return 1 if failures == len(paths) else 0
