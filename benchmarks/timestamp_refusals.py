"""What refusing timestamps costs: the audit over a millisecond log, read as seconds (every line a
bad line, `timestamp out of range` with its "looks like milliseconds" detail) and with
``--map timestamp_unit=ms`` (every line good); and the scalar parser of manifests and sidecars.

    python benchmarks/timestamp_refusals.py --lines 1000000 [--workdir DIR]

Prints, for each audit, the wall time, lines/s and the bad lines by reason; then the scalar
parser's rate on accepted and refused values.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twostream.audit.run import run_audit  # noqa: E402
from twostream.core.config import load_config  # noqa: E402
from twostream.core.timestamps import TimestampError, parse_timestamp  # noqa: E402

log = logging.getLogger("timestamp_refusals")


def generate(workdir: Path, lines: int, images: int = 10_000, sources: int = 2_000) -> tuple[Path, Path]:
    """A CSV log of ``lines`` uploads with epoch-millisecond timestamps over a week, and the scores."""
    rng = np.random.default_rng(0)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path, scores = workdir / f"ms-{lines}.csv", workdir / "scores.parquet"
    if not log_path.exists():
        ms = np.sort(1_700_000_000_000 + rng.integers(0, 7 * 86_400_000, lines))
        table = pa.table({"timestamp": pa.array(ms, pa.int64()),
                          "source": pa.array([f"10.0.{k // 250}.{k % 250}" for k in rng.integers(0, sources, lines)]),
                          "image": pa.array([f"img-{k}" for k in rng.integers(0, images, lines)])})
        pacsv.write_csv(table, log_path, pacsv.WriteOptions(quoting_style="none"))
    if not scores.exists():
        verdicts = rng.choice(["accepted", "adversarial"], images, p=[0.9, 0.1])
        pq.write_table(pa.table({"image_id": [f"img-{k}" for k in range(images)], "verdict": verdicts,
                                 "label": ["cat" if v == "accepted" else None for v in verdicts]}), scores)
    return log_path, scores


def audit(log_path: Path, scores: Path, out: Path, unit: str) -> None:
    config = load_config(None, [], {"audit": {"columns": {"timestamp_unit": unit}, "report": True}})
    started = time.perf_counter()
    result = run_audit(str(log_path), str(out), scores_uri=str(scores), config=config)
    wall = time.perf_counter() - started
    s = result.summary
    print(f"unit={unit}: {s['lines']:,} lines in {wall:.1f} s ({s['lines'] / wall:,.0f} lines/s); "
          f"good {s['good_lines']:,}, bad {s['bad_lines']:,} {s['bad_by_reason']}")


def scalar_rate(n: int = 200_000) -> None:
    accepted = [str(1_700_000_000 + k) for k in range(n)] + [f"2023-11-14T22:13:{k % 60:02d}Z" for k in range(n)]
    refused = [1_700_000_000_000 + k for k in range(n)]
    started = time.perf_counter()
    for value in accepted:
        parse_timestamp(value)
    middle = time.perf_counter()
    for value in refused:
        try:
            parse_timestamp(value)
        except TimestampError:
            pass
    done = time.perf_counter()
    print(f"parse_timestamp: {len(accepted) / (middle - started):,.0f} accepted values/s (seconds and ISO text), "
          f"{len(refused) / (done - middle):,.0f} refused millisecond values/s (message with its hint)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/twostream-timestamp-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    log_path, scores = generate(workdir, args.lines)
    audit(log_path, scores, workdir / "out-s", "s")
    audit(log_path, scores, workdir / "out-ms", "ms")
    scalar_rate()


if __name__ == "__main__":
    main()
