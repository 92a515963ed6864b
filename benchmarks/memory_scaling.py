"""Peak RSS of the driver and of the Ray workers while the input grows (e.g. 10k vs 100k small
images, tiny models): memory should stay flat because the pipeline streams. ``--large N``: N
flat-colour 6000x6000 PNGs instead (small files, 108 MB of pixels each, under
``limits.max_pixels``): memory must follow bytes decoded at once, not the shard (target: peak
under 3 GB in all for 30 of them).

    python benchmarks/memory_scaling.py --sizes 2000 10000
    python benchmarks/memory_scaling.py --large 30
    python benchmarks/memory_scaling.py --one-image

``--one-image``: what a decode task adds to its process for one 6000x6000 PNG (decode, then both
streams' prepared inputs), each way in a fresh process, side by side: from a Pillow image or from
a full array, with glibc's default allocation threshold or with the job's
(``jobs.score._return_large_frees_to_the_os``): the peak (VmHWM) and what stays (VmRSS) above
the process's size before.

Each size runs the job on a fresh local Ray; every ``--period`` s (0.2) a sampler thread reads
the memory of the driver and the processes it started (the local Ray: GCS, raylet, workers; /proc smaps_rollup):
``peak_in_all_pss_mb`` is the peak of their summed PSS (the memory in use, shared pages split),
``workers_peak_rss_sum_mb`` the peak of the workers' summed RSS (counts the object store's shared
pages once per process that maps them), with the largest processes at the peak.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
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


def tree_memory() -> dict[int, tuple[str, int, int]]:
    """pid -> (command, RSS, PSS) in bytes for this driver and its descendants: the local Ray it
    started (GCS, raylet, workers), not another Ray on the same machine. PSS splits shared pages
    (the object store's shared memory, libraries) among the processes that map them, so the sum
    of PSS is the memory in use; the sum of RSS counts shared pages once per process."""
    import os

    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                parent[int(pid)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            pass
    me, out = os.getpid(), {}
    for pid in parent:
        up = pid
        while up and up != me:
            up = parent.get(up)
        if up != me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")[:60]
            fields = {}
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    name, _, rest = line.partition(":")
                    if name in ("Rss", "Pss"):
                        fields[name] = int(rest.split()[0]) * 1024
            out[pid] = (cmd, fields.get("Rss", 0), fields.get("Pss", 0))
        except (OSError, ValueError):
            pass
    return out


def run(n: int, overrides: list[str], large: bool = False, period: float = 0.2) -> dict:
    import os

    import ray

    from jobs.ray_cluster import connect
    from jobs.score import run_job
    from twostream.core.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        # in a child process: the images' memory is not the driver's (the job's driver never holds one)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(write_images, (Path(tmp) / "in", n, large))
        peak = {"pss": 0, "workers_rss": 0, "top": []}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                tree = tree_memory()
                pss = sum(p for _, _, p in tree.values())
                peak["workers_rss"] = max(peak["workers_rss"],
                                          sum(r for pid, (_, r, _) in tree.items() if pid != os.getpid()))
                if pss > peak["pss"]:
                    peak["pss"] = pss
                    top = sorted(tree.values(), key=lambda t: -t[2])[:6]
                    peak["top"] = [f"{cmd.strip()}: {p / 2**20:.0f} MB" for cmd, _, p in top]
                time.sleep(period)  # a sample takes ~20-40 ms: a shorter period catches brief peaks

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
            "scoring_images_per_s": round(summary["throughput"]["scoring_images_per_s"], 2),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "workers_peak_rss_sum_mb": round(peak["workers_rss"] / 2**20),
            "peak_in_all_pss_mb": round(peak["pss"] / 2**20),
            "at_peak": peak["top"]}


def one_image(from_pillow: bool, job_threshold: bool) -> dict:
    """In this (fresh) process: MB above the size before of the peak and of what stays after
    decoding one flat 6000x6000 PNG and preparing both streams' inputs."""
    import numpy as np
    from PIL import Image

    from jobs.score import _return_large_frees_to_the_os
    from twostream.core.config import load_config
    from twostream.core.preprocess import decode_image, decode_rgb
    from twostream.core.scoring import input_spec, prepare

    def status() -> dict[str, int]:
        with open("/proc/self/status") as handle:
            return {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in handle)
                    if k in ("VmRSS", "VmHWM")}

    cfg = load_config(None, SMALL)
    specs = [input_spec(cfg, kind) for kind in ("high", "low")]
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (120, 180, 40)).save(buf, "PNG")
    data = buf.getvalue()
    for spec in specs:  # torch's first resize allocates its own once
        prepare(spec, [np.zeros((300, 300, 3), np.uint8)])
    if job_threshold:
        _return_large_frees_to_the_os()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM back to VmRSS
    before = status()["VmRSS"]
    started = time.perf_counter()
    image = decode_rgb(data, cfg.limits) if from_pillow else decode_image(data, cfg.limits)
    prepared = [prepare(spec, [image]) for spec in specs]
    del image, prepared
    after = status()
    return {"from": "pillow" if from_pillow else "array", "threshold": "job" if job_threshold else "glibc default",
            "peak_mb": after["VmHWM"] - before, "stays_mb": after["VmRSS"] - before,
            "decode_prepare_s": round(time.perf_counter() - started, 2), "process_mb_before": before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--large", type=int, default=0, help="N images of 6000x6000 instead of --sizes")
    parser.add_argument("--period", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--one-image", action="store_true", help="one 6000x6000 image in one process, four ways")
    args = parser.parse_args()
    if args.one_image:
        ctx = multiprocessing.get_context("spawn")
        for from_pillow in (True, False):
            for job_threshold in (True, False):
                with ctx.Pool(1) as pool:
                    print(json.dumps(pool.apply(one_image, (from_pillow, job_threshold))), flush=True)
        return
    if args.large:
        print(json.dumps(run(args.large, SMALL, large=True, period=args.period)), flush=True)
        return
    for n in args.sizes:
        print(json.dumps(run(n, SMALL, period=args.period)), flush=True)


if __name__ == "__main__":
    main()
