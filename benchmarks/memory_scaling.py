"""Peak RSS of the driver and of the Ray workers while the input grows (e.g. 10k vs 100k small
images, tiny models): memory should stay flat because the pipeline streams. ``--large N``: N
flat-colour 6000x6000 PNGs instead (small files, 108 MB of pixels each, under
``limits.max_pixels``): memory must follow bytes decoded at once, not the shard (target: peak
under 3 GB in all for 30 of them).

    python benchmarks/memory_scaling.py --sizes 2000 10000
    python benchmarks/memory_scaling.py --large 30

Each size runs the job on a fresh local Ray; a sampler thread records the summed RSS of the
processes the driver started (the local Ray: GCS, raylet, workers; from /proc) and the driver's
peak RSS every 0.5 s.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SMALL = ["high.model=mobilenetv3_small_050", "high.weights=random", "low.model=cifar_resnet20",
         "low.weights=random", "job.files_per_shard=500"]


def write_images(root: Path, n: int, large: bool = False) -> None:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if large:
        Image.new("RGB", (6000, 6000), (120, 180, 40)).save(buf, "PNG")
    else:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((48, 48)).save(buf, "JPEG")
    blob = buf.getvalue()
    suffix = ".png" if large else ".jpg"
    for k in range(n):  # same bytes, different keys: measures the pipeline, not the codec
        (root / f"{k:07d}{suffix}").write_bytes(blob)


def worker_rss() -> int:
    """Summed RSS of this driver's descendants: the local Ray it started (GCS, raylet, workers),
    not another Ray on the same machine (from /proc; no psutil needed)."""
    import os

    parent, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                parent[int(pid)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/status") as handle:
                rss[int(pid)] = next((int(line.split()[1]) * 1024 for line in handle
                                      if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError):
            pass
    me, total = os.getpid(), 0
    for pid in rss:
        up = parent.get(pid)
        while up and up != me:
            up = parent.get(up)
        if up == me:
            total += rss[pid]
    return total


def run(n: int, overrides: list[str], large: bool = False) -> dict:
    import ray

    from jobs.ray_cluster import connect
    from jobs.score import run_job
    from twostream.core.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "in", n, large)
        peak = {"workers": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["workers"] = max(peak["workers"], worker_rss())
                time.sleep(0.5)

        connect(log_to_driver=False, object_store_memory=1 << 30)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            summary = run_job(load_config(None, overrides), str(Path(tmp) / "in"), str(Path(tmp) / "out"),
                              None, progress=False)
        finally:
            stop.set()
            thread.join()
            ray.shutdown()
    return {"images": n, "size": "6000x6000" if large else "48x48",
            "scoring_images_per_s": round(summary["throughput"]["scoring_images_per_s"], 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "workers_peak_rss_mb": round(peak["workers"] / 2**20),
            "peak_in_all_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                                    + peak["workers"] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--large", type=int, default=0, help="N images of 6000x6000 instead of --sizes")
    args = parser.parse_args()
    if args.large:
        print(json.dumps(run(args.large, SMALL, large=True)), flush=True)
        return
    for n in args.sizes:
        print(json.dumps(run(n, SMALL)), flush=True)


if __name__ == "__main__":
    main()
