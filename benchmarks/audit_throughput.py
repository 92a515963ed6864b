"""Throughput of ``twostream audit`` on a generated log with scores given (no model runs).

    python benchmarks/audit_throughput.py --lines 1000000 [--workdir DIR] [--format csv] [--dirty]

Generates (once per workdir) an upload log of ``--lines`` lines from ``--sources`` sources, a
few of them attackers sending bursts of adversarial images, plus a batch-job-style scores
Parquet (image_id, verdict, label, top-k columns) with one row per upload, and a sprinkle of
bad lines; then runs the whole audit (log pass, replay, timeline, report; ``--what-if`` adds
replays) and prints lines/s and the process's peak RSS.

``--dirty`` (CSV): also derives a dirty copy of the log, with 1% junk lines inserted (binary
noise, records cut off inside a quoted value, wrong field counts, unclosed quotes) and invalid
UTF-8 (Latin-1 bytes, lone continuation bytes) in 1% of the records' user agents and image
keys' query strings, and audits the clean and the dirty log, each in its own process, printing
both times, the ratio and each peak RSS.
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


def make_dirty(clean: Path, fraction: float = 0.01, seed: int = 1) -> Path:
    """A copy of the clean CSV log with ``fraction`` junk lines inserted and invalid UTF-8 in
    ``fraction`` of the records (their user agent and image query string); the records stay."""
    dirty = clean.with_name(clean.stem + "-dirty" + clean.suffix)
    if dirty.exists():
        return dirty
    rng = np.random.default_rng(seed)
    lines = clean.read_bytes().split(b"\n")
    header, body = lines[0], [ln for ln in lines[1:] if ln]
    for k in np.flatnonzero(rng.random(len(body)) < fraction):
        ts, ip, uri, agent = body[k].split(b",", 3)
        body[k] = b",".join([ts, ip, uri[:-1] + b"?t=\xff\xfe\"", agent[:-1] + b" caf\xe9 \x80\""])
    junk_kinds = [
        lambda: rng.integers(0, 256, int(rng.integers(10, 120)), dtype=np.uint8).tobytes().replace(b"\n", b" "),
        lambda: body[int(rng.integers(len(body)))][: int(rng.integers(5, 40))],  # cut off (often inside quotes)
        lambda: b"1700000000,10.0.0.1",  # too few fields
        lambda: b'"unclosed,' + rng.integers(48, 122, 30, dtype=np.uint8).tobytes(),
    ]
    n_junk = int(len(body) * fraction)
    spots = np.sort(rng.integers(0, len(body), n_junk))
    out, last = [header], 0
    for j, spot in enumerate(spots):
        out += body[last:spot]
        out.append(junk_kinds[j % len(junk_kinds)]())
        last = spot
    out += body[last:]
    dirty.write_bytes(b"\n".join(out) + b"\n")
    return dirty


def audit_once(log_path: Path, scores_path: Path, out: Path, what_if: list[str], report: bool) -> dict:
    """Run the audit in this process; its figures and this process's peak RSS."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    config = load_config(flags={"audit": {"what_if": what_if, "report": report}})
    result = run_audit(str(log_path), str(out), scores_uri=str(scores_path), config=config)
    elapsed = time.perf_counter() - t
    s = result.summary
    return {
        "log": log_path.name, "lines": s["lines"], "bad_lines": s["bad_lines"], "warnings": s["warnings"],
        "sources": s["sources"], "sources_ever_blacklisted": s["sources_ever_blacklisted"],
        "seconds": round(elapsed, 2), "stages": s["seconds"], "lines_per_second": round(s["lines"] / elapsed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_rss_before_audit_mb": round(rss_before / 1024), "log_mb": round(os.path.getsize(log_path) / 2**20, 1),
    }


def _child(args: argparse.Namespace, log_path: Path, scores_path: Path, name: str) -> dict:
    """:func:`audit_once` in a fresh process (so that each peak RSS is that audit's own)."""
    cmd = [sys.executable, __file__, "--audit-only", str(log_path), "--scores-path", str(scores_path),
           "--workdir", args.workdir, *(f"--what-if={w}" for w in args.what_if)]
    if args.no_report:
        cmd.append("--no-report")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {"case": name, **json.loads(proc.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=20_000)
    parser.add_argument("--attackers", type=int, default=20)
    parser.add_argument("--format", default="csv", choices=["csv", "parquet"])
    parser.add_argument("--workdir", default="/tmp/twostream-audit-bench")
    parser.add_argument("--what-if", dest="what_if", action="append", default=[])
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--dirty", action="store_true", help="also audit a dirty copy (CSV): clean vs dirty")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--audit-only", metavar="LOG", help=argparse.SUPPRESS)
    parser.add_argument("--scores-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.audit_only:
        out = workdir / ("out-" + Path(args.audit_only).stem)
        print(json.dumps(audit_once(Path(args.audit_only), Path(args.scores_path), out, args.what_if,
                                    not args.no_report)))
        return 0
    if args.dirty and args.format != "csv":
        raise SystemExit("--dirty needs --format csv")
    if args.generate_only:
        log_path, _ = generate(workdir, args.lines, args.sources, args.attackers, args.format)
        if args.dirty:
            make_dirty(log_path)
        return 0
    # generate in a child process, so that the peak RSS below is the audit's own
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate-only", "--lines", str(args.lines), "--sources",
                    str(args.sources), "--attackers", str(args.attackers), "--format", args.format,
                    "--workdir", str(workdir), *(["--dirty"] if args.dirty else [])], check=True)
    log_path, scores_path = generate(workdir, args.lines, args.sources, args.attackers, args.format)
    gen_s = time.perf_counter() - t
    common = {"format": args.format, "what_if": args.what_if, "generate_seconds": round(gen_s, 1),
              "cpus": os.cpu_count()}
    if not args.dirty:
        print(json.dumps({**audit_once(log_path, scores_path, workdir / "out", args.what_if, not args.no_report),
                          **common}, indent=1))
        return 0
    clean = _child(args, log_path, scores_path, "clean")
    dirty = _child(args, make_dirty(log_path), scores_path, "dirty")
    print(json.dumps({"clean": clean, "dirty": dirty, **common}, indent=1))
    print(f"clean {clean['lines']:,} lines {clean['seconds']:.2f} s, peak RSS {clean['peak_rss_mb']} MB | "
          f"dirty {dirty['lines']:,} lines ({dirty['bad_lines']:,} bad, "
          f"{dirty['warnings']['lines_with_invalid_utf8']:,} with invalid UTF-8) {dirty['seconds']:.2f} s, "
          f"peak RSS {dirty['peak_rss_mb']} MB | dirty/clean time {dirty['seconds'] / clean['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
