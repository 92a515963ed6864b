"""Throughput of ``twostream audit`` on a generated log with scores given (no model runs).

    python benchmarks/audit_throughput.py --lines 1000000 [--workdir DIR] [--format csv]

Generates (once per workdir) an upload log of ``--lines`` lines from ``--sources`` sources, a
few of them attackers sending bursts of adversarial images, plus a batch-job-style scores
Parquet (image_id, verdict, label, top-k columns) with one row per upload, and a sprinkle of
bad lines; then runs the whole audit (log pass, replay, timeline, report; ``--what-if`` adds
replays) and prints lines/s and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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


def generate(workdir: Path, lines: int, sources: int, attackers: int, fmt: str, seed: int = 0) -> tuple[Path, Path]:
    log_path = workdir / f"uploads-{lines}.{fmt}"
    scores_path = workdir / f"scores-{lines}.parquet"
    if log_path.exists() and scores_path.exists():
        return log_path, scores_path
    rng = np.random.default_rng(seed)
    t0 = 1_700_000_000.0
    src = rng.integers(0, sources, lines)
    ts = t0 + np.sort(rng.uniform(0, 7 * 86400, lines))  # one week
    rng.shuffle(ts)  # the log is not in time order per source
    ids = np.char.add("img-", np.arange(lines).astype(str))
    attacker = src < attackers
    # attackers: 70% adversarial; everyone else: 2%
    adversarial = np.where(attacker, rng.random(lines) < 0.7, rng.random(lines) < 0.02)
    ip = np.char.add("10.", np.char.add((src // 65536).astype(str), np.char.add(".", np.char.add(
        ((src // 256) % 256).astype(str), np.char.add(".", (src % 256).astype(str))))))
    agents = np.array(["Mozilla/5.0 (X11; Linux x86_64)", "python-requests/2.32", "curl/8.5.0"])
    table = pa.table({
        "timestamp": pa.array(ts.round(3)),
        "client_ip": pa.array(ip),
        "request_uri": pa.array(np.char.add("/uploads/", np.char.add(ids, ".jpg"))),
        "user_agent": pa.array(agents[np.where(attacker, 1, src % 3)]),
    })
    if fmt == "csv":
        pacsv.write_csv(table, log_path)
        with open(log_path, "a") as handle:  # a few bad lines at the end
            handle.write("not-a-time,10.0.0.1,/uploads/img-1.jpg,x\n1700000000,10.0.0.1,/uploads/none.jpg,x\n"
                         "1700000000,10.0.0.1\n")
    elif fmt == "parquet":
        pq.write_table(table, log_path)
    else:
        raise SystemExit("--format csv or parquet")
    # scores as the batch job writes them (subset of its columns)
    n = lines
    cat = 281  # 'tabby' -> CIFAR-10 cat
    high_idx = np.tile(np.array([cat, 0, 1, 2, 4], np.int32), (n, 1))
    high_prob = np.tile(np.array([0.6, 0.1, 0.1, 0.1, 0.05], np.float32), (n, 1))
    high_prob[adversarial, 0] = 0.05  # below p1 -> rejected
    low_idx = np.tile(np.array([3, 0], np.int32), (n, 1))
    low_prob = np.tile(np.array([0.9, 0.05], np.float32), (n, 1))
    scores = pa.table({
        "image_id": pa.array(ids),
        "verdict": pa.array(np.where(adversarial, "adversarial", "accepted")),
        "label": pa.array(np.where(adversarial, None, "cat"), pa.string()),
        "high_idx": pa.FixedSizeListArray.from_arrays(high_idx.ravel(), 5).cast(pa.list_(pa.int32())),
        "high_prob": pa.FixedSizeListArray.from_arrays(high_prob.ravel(), 5).cast(pa.list_(pa.float32())),
        "low_idx": pa.FixedSizeListArray.from_arrays(low_idx.ravel(), 2).cast(pa.list_(pa.int32())),
        "low_prob": pa.FixedSizeListArray.from_arrays(low_prob.ravel(), 2).cast(pa.list_(pa.float32())),
    })
    pq.write_table(scores, scores_path)
    return log_path, scores_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=20_000)
    parser.add_argument("--attackers", type=int, default=20)
    parser.add_argument("--format", default="csv", choices=["csv", "parquet"])
    parser.add_argument("--workdir", default="/tmp/twostream-audit-bench")
    parser.add_argument("--what-if", dest="what_if", action="append", default=[])
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.generate_only:
        generate(workdir, args.lines, args.sources, args.attackers, args.format)
        return 0
    # generate in a child process, so that the peak RSS below is the audit's own
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate-only", "--lines", str(args.lines), "--sources",
                    str(args.sources), "--attackers", str(args.attackers), "--format", args.format,
                    "--workdir", str(workdir)], check=True)
    log_path, scores_path = generate(workdir, args.lines, args.sources, args.attackers, args.format)
    gen_s = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    config = load_config(flags={"audit": {"what_if": args.what_if, "report": not args.no_report}})
    result = run_audit(str(log_path), str(workdir / "out"), scores_uri=str(scores_path), config=config)
    elapsed = time.perf_counter() - t
    s = result.summary
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "lines": s["lines"], "bad_lines": s["bad_lines"], "sources": s["sources"],
        "sources_ever_blacklisted": s["sources_ever_blacklisted"], "format": args.format,
        "what_if": args.what_if, "seconds": round(elapsed, 2), "stages": s["seconds"],
        "lines_per_second": round(s["lines"] / elapsed), "peak_rss_mb": round(peak_mb),
        "peak_rss_before_audit_mb": round(rss_before / 1024), "generate_seconds": round(gen_s, 1),
        "log_mb": round(os.path.getsize(log_path) / 2**20, 1), "cpus": os.cpu_count(),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
