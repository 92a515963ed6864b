"""Time and peak memory of reading a batch manifest (``read_manifest``), code before and after a
change side by side.

    python benchmarks/manifest_read.py [--rows 1000000] [--code DIR ...] [--workdir DIR]

Writes (once per workdir) a CSV and a JSON Lines manifest of ``--rows`` rows (image id, key,
source, ISO-8601 timestamp), then reads each in a child process per ``--code`` folder (the
``twostream`` package under it; e.g. ``/work/main`` for the code before a change) and prints one
JSON line per (code, manifest): seconds of the read (wall and CPU, all threads; on a shared
machine compare the CPU seconds), the child's peak RSS (``ru_maxrss``), and their ratios to the
first ``--code``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CHILD = """
import json, resource, sys, time
from twostream.batch.manifest import read_manifest
start, cpu = time.perf_counter(), time.process_time()
table, _ = read_manifest(sys.argv[1])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"rows": table.num_rows, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def manifests(workdir: Path, rows: int) -> list[Path]:
    """The CSV and JSON Lines manifests of ``rows`` rows (written once)."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / f"manifest-{rows}.csv", workdir / f"manifest-{rows}.jsonl"]
    if not paths[0].exists():
        with open(paths[0], "w") as handle:
            handle.write("image_id,key,source,timestamp\n")
            for k in range(rows):
                handle.write(f"img-{k},shard-{k // 1000}/img-{k}.jpg,10.0.{k % 256}.{k // 256 % 256},"
                             f"2023-11-14T22:{k // 60 % 60:02d}:{k % 60:02d}Z\n")
    if not paths[1].exists():
        with open(paths[1], "w") as handle:
            for k in range(rows):
                handle.write(json.dumps({"image_id": f"img-{k}", "key": f"shard-{k // 1000}/img-{k}.jpg",
                                         "source": f"10.0.{k % 256}.{k // 256 % 256}", "timestamp": 1_700_000_000 + k})
                             + "\n")
    return paths


def measure(code: str, path: Path) -> dict:
    """Read ``path`` with the package under ``code`` in a child process."""
    env = {**os.environ, "PYTHONPATH": code}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--code", action="append", help="folder holding the twostream package (repeatable)")
    parser.add_argument("--workdir", default="/tmp/twostream-manifest-read")
    args = parser.parse_args()
    codes = args.code or [str(REPO)]
    for path in manifests(Path(args.workdir), args.rows):
        base: dict | None = None
        for code in codes:
            got = measure(code, path)
            base = base or got
            print(json.dumps({"manifest": path.name, "code": code, **got,
                              "seconds_ratio": round(got["seconds"] / max(base["seconds"], 1e-9), 2),
                              "cpu_ratio": round(got["cpu_seconds"] / max(base["cpu_seconds"], 1e-9), 2),
                              "rss_ratio": round(got["peak_rss_mb"] / max(base["peak_rss_mb"], 1), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
