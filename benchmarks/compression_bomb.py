"""Peak memory of a decode process reading compression bombs named like images (issue 29).

Builds, a stream at a time (never holding the decompressed bytes), ``bomb.png.bz2`` and
``bomb.jpg.gz`` (bzip2 and gzip of ``--gib`` GiB of zeros: the same compressed stream repeated,
which decompressors read as one) and ``bomb.jpg`` (the gzip file under an image's name), then,
in a fresh process each, runs what a decode task runs on them (planning, then
``twostream.batch.stages.read_decode``: the raw read bounded by ``limits.max_bytes``, the
decode) and prints the process's peak RSS (VmHWM) above its size before the reads, with each
row's error. ``--before`` also reads them the way the job read uploads before issue 29
(pyarrow's ``open_input_stream``, which decompresses by extension), on a smaller bomb
(``--before-gib``): that is the memory the bomb costs when it is decompressed.

    python benchmarks/compression_bomb.py --gib 6 --before --before-gib 1
"""

from __future__ import annotations

import argparse
import bz2
import json
import multiprocessing
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CHUNK = 64 << 20  # bytes of zeros compressed once, the stream repeated


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def write_bombs(root: Path, gib: float) -> dict[str, int]:
    """The bombs under ``root``; returns each file's size."""
    repeats = max(1, int(gib * (1 << 30)) // CHUNK)
    zeros = bytes(CHUNK)
    bz = bz2.compress(zeros, 9)
    gz_obj = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip member
    gz = gz_obj.compress(zeros) + gz_obj.flush()
    root.mkdir(parents=True, exist_ok=True)
    for name, stream in (("bomb.png.bz2", bz), ("bomb.jpg.gz", gz), ("bomb.jpg", gz)):
        with open(root / name, "wb") as out:
            for _ in range(repeats):
                out.write(stream)
    return {p.name: p.stat().st_size for p in sorted(root.iterdir())}


def decode_task(folder: str, max_bytes: int) -> dict:
    """In a fresh process: plan the folder and run the decode task's work over it."""
    from twostream.batch import planning, stages
    from twostream.core import preprocess, scoring  # noqa: F401  (imported by the task anyway: not counted)
    from twostream.core.config import TwoStreamConfig

    cfg = TwoStreamConfig()
    cfg.limits.max_bytes = max_bytes
    plan = planning.plan_input(folder)
    base = _vm("VmRSS:")
    errors = {}
    for unit in planning.work_units(plan.shards, 256):
        for block in stages.read_decode(unit, cfg, {}):
            errors.update(zip(block.column("key").to_pylist(), block.column("error").to_pylist()))
    return {"peak_above_start_mb": round((_vm("VmHWM:") - base) / 1e6, 1), "errors": errors}


def old_read(path: str) -> dict:
    """In a fresh process: the read before issue 29 (decompressing by extension)."""
    import pyarrow.fs as pafs

    base = _vm("VmRSS:")
    with pafs.LocalFileSystem().open_input_stream(path) as stream:
        data = stream.read()
    return {"read_bytes": len(data), "peak_above_start_mb": round((_vm("VmHWM:") - base) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=6.0, help="decompressed size of each bomb, GiB")
    parser.add_argument("--max-bytes", type=int, default=50 << 20, help="limits.max_bytes (default 50 MiB)")
    parser.add_argument("--before", action="store_true", help="also read a bomb the way the job did before")
    parser.add_argument("--before-gib", type=float, default=1.0)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_bombs(Path(tmp) / "in", args.gib)
        print(json.dumps({"bombs_gib": args.gib, "file_bytes": sizes}), flush=True)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            print(json.dumps({"decode_task": pool.apply(decode_task, (str(Path(tmp) / "in"), args.max_bytes))}),
                  flush=True)
        if args.before:
            small = write_bombs(Path(tmp) / "small", args.before_gib)
            for name in ("bomb.png.bz2", "bomb.jpg.gz"):
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    got = pool.apply(old_read, (str(Path(tmp) / "small" / name),))
                print(json.dumps({"before": name, "gib": args.before_gib, "file_bytes": small[name], **got}),
                      flush=True)


if __name__ == "__main__":
    main()
