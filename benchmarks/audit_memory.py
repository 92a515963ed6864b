"""Peak memory of ``twostream audit`` on hostile logs: one huge line, and millions of sources.

    python benchmarks/audit_memory.py [--case long-line|sources|all] [--line-mb 300]
        [--sources 2000000] [--partitions 16] [--code DIR] [--workdir DIR]

Generates (once per workdir) the logs, then audits each in a child process and prints its peak
memory: the largest sum of the RSS of the child and all its descendants, sampled every 20 ms
from /proc, and the kernel's own peak RSS of the child (``ru_maxrss`` from ``wait4``).

- ``long-line``: a CSV log with a good record, one ``--line-mb`` MB line without a newline
  inside (a record whose last field never ends), then a good record.
- ``long-line-gz``: the same log gzip-compressed (about 0.3 MB on disk; the audit reads
  ``.gz`` logs on purpose, so the bound must hold through decompression).
- ``sources``: a CSV log of ``--sources`` lines, each from a distinct source, naming 1,000
  images (so the catalogue stays small and the per-source cost shows).

``--code DIR`` audits with the ``twostream`` package found under DIR (e.g. ``/work/main`` for the
code before a change), so the same script measures before and after.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
IMAGES = 1000

_CHILD = """
import json, sys
from twostream.audit.run import run_audit
from twostream.core.config import load_config
log, scores, out, partitions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = load_config(flags={"audit": {"partitions": partitions, "report": True}})
s = run_audit(log, out, scores_uri=scores, config=config).summary
import twostream
print(json.dumps({"code": twostream.__file__, "lines": s["lines"], "bad_lines": s["bad_lines"],
                  "bad_by_reason": s["bad_by_reason"], "sources": s["sources"], "seconds": s["seconds"]["total"]}))
"""


def _scores(workdir: Path) -> Path:
    path = workdir / "scores.parquet"
    if not path.exists():
        ids = [f"img-{k}" for k in range(IMAGES)]
        verdicts = ["adversarial" if k % 10 == 0 else "accepted" for k in range(IMAGES)]
        pq.write_table(pa.table({"image_id": ids, "verdict": verdicts,
                                 "label": [None if v == "adversarial" else "cat" for v in verdicts]}), path)
    return path


def long_line_log(workdir: Path, megabytes: int, compress: bool = False) -> Path:
    """header, a good record, one ``megabytes`` MB line, a good record (gzip-compressed if ``compress``)."""
    path = workdir / f"long-line-{megabytes}mb.csv{'.gz' if compress else ''}"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    piece = b"x" * (1 << 20)
    with (gzip.open if compress else open)(tmp, "wb") as handle:
        handle.write(b"timestamp,source,image\n1700000000,10.0.0.1,img-1\n1700000001,10.0.0.2,img-")
        for _ in range(megabytes):
            handle.write(piece)
        handle.write(b"\n1700000002,10.0.0.3,img-3\n")
    tmp.rename(path)
    return path


def sources_log(workdir: Path, sources: int) -> Path:
    """``sources`` lines, each from its own source."""
    path = workdir / f"sources-{sources}.csv"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    step = 1 << 20
    with pa.OSFile(str(tmp), "wb") as sink:
        writer = None
        for a in range(0, sources, step):
            k = np.arange(a, min(a + step, sources))
            table = pa.table({
                "timestamp": pa.array(1_700_000_000.0 + rng.uniform(0, 86400, len(k)).round(3)),
                "source": pa.array(np.char.add("user-", k.astype(str))),
                "image": pa.array(np.char.add("img-", (k % IMAGES).astype(str))),
            })
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema)
            writer.write_table(table)
        writer.close()
    tmp.rename(path)
    return path


def _tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and all its descendants (0 for those that vanished meanwhile)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(code: Path, log: Path, scores: Path, out: Path, partitions: int) -> dict:
    """Audit ``log`` in a child process; its summary, peak tree RSS and peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    stdout_path, stderr_path = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    with open(stdout_path, "wb") as stdout_file, open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(log), str(scores), str(out), str(partitions)],
                                env=env, cwd=out.parent, stdout=stdout_file, stderr=stderr_file)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    stdout, stderr = stdout_path.read_text(errors="replace"), stderr_path.read_text(errors="replace")
    seconds = time.perf_counter() - started
    rc = os.waitstatus_to_exitcode(status)
    result = {"log": log.name, "log_mb": round(log.stat().st_size / 2**20, 1), "partitions": partitions,
              "exit": rc, "wall_seconds": round(seconds, 1), "peak_tree_rss_mb": round(peak[0] / 2**20),
              "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    if rc == 0:
        result.update(json.loads(stdout.strip().splitlines()[-1]))
    else:
        result["stderr_tail"] = stderr[-2000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="all", choices=["long-line", "long-line-gz", "sources", "all"])
    parser.add_argument("--line-mb", type=int, default=300)
    parser.add_argument("--sources", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--code", default=str(REPO), help="folder holding the twostream package to measure")
    parser.add_argument("--workdir", default="/tmp/twostream-audit-memory")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scores = _scores(workdir)
    logs = []
    if args.case in ("long-line", "all"):
        logs.append(long_line_log(workdir, args.line_mb))
    if args.case in ("long-line-gz", "all"):
        logs.append(long_line_log(workdir, args.line_mb, compress=True))
    if args.case in ("sources", "all"):
        logs.append(sources_log(workdir, args.sources))
    for log in logs:
        result = measure(Path(args.code), log, scores, workdir / f"out-{log.name}-{args.partitions}", args.partitions)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
