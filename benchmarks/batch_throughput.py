"""Images/s of the Ray batch job vs a plain single-process PyTorch loop (same models, same batch
sizes, same images), and their ratios.

    python benchmarks/batch_throughput.py --n 4096                      # default models
    python benchmarks/batch_throughput.py --n 512 --small               # tiny models: overhead-bound
    python benchmarks/batch_throughput.py --n 1024 --small --detector   # the query detector off vs on
    python benchmarks/batch_throughput.py --n 4096 --code /tmp/main      # another checkout's job (before/after)
    python benchmarks/batch_throughput.py --detector-phase 20000        # its sequential phase alone

The plain loop: read files -> decode_many -> prepare+stream_topk (high) -> prepare+stream_topk
(low) -> score_rows, batch by batch, torch using all cores; its models are built before its clock
starts (the time is printed apart). The Ray job: ``python -m jobs.score`` (the entrypoint that
``ray job submit`` runs), twice, each its own driver, on one fresh local cluster (all cores);
its scoring phase (from ``summary.json``; the reputation and final phases are reported apart):

* ``cold``: the cluster's first job, which also starts Ray Data's detached helper actors
  (stats, actor locations, autoscaling coordinator);
* ``warm``: the next job, which finds them running, as every job after the first does on a
  long-lived cluster. Each job still starts its own worker processes and actor pools.

The plain loop runs twice, before the jobs and after them (this VM's speed drifts by up to half
within minutes): the ratios are against the mean of the two, and both runs are printed.

Two rates per job: ``scoring_images_per_s`` (the scoring phase, which includes starting the actor
pools and loading the models, as the original target counts it; the plain loop's models are built
before its clock starts) and ``steady_images_per_s``: the rows of the shards committed after the
first one over the time from the first commit to the last (the shards' ``_progress`` markers),
the rate a long job runs at once the pipeline is full; ``first_commit_s``: the first commit, from
the job's start. The plain loop's rate is its steady rate. The steady rate needs shards that
commit one after another (``--n 4096``: 16 shards of 256); on a few small shards, which all
commit as the pipeline drains, it means nothing.

Where the CPU goes: the plain loop's CPU seconds (all its threads), and each job's CPU seconds per
process kind (``benchmarks/scale.py``'s sampler over this process's descendants: the job's
driver, decode tasks, both stream actors, compare tasks, the GCS, raylet and Ray's other daemons,
Ray Data's helper actors, idle workers), from its start to its end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SMALL = ["high.model=mobilenetv3_small_050", "high.weights=random",
         "low.model=cifar_resnet20", "low.weights=random"]


def make_images(root: Path, n: int) -> list[Path]:
    from twostream.demo import photos as demo_photos
    from PIL import Image

    photos = list(demo_photos.photographs().values())
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        p = root / f"img{k:06d}.jpg"
        Image.fromarray(demo_photos.variant(photos[k % len(photos)], k // len(photos), 256)).save(p, quality=90)
        paths.append(p)
    return paths


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_loop(cfg, paths: list[Path]) -> tuple[float, float, float]:
    """(images/s, seconds to build both models before the clock started, CPU seconds of the
    timed loop)."""
    import torch

    from twostream.core.models import build_stream
    from twostream.core.results import score_rows
    from twostream.core.scoring import decode_many, prepare, resolve_device, stream_topk

    dev = resolve_device("cpu")
    t_build = time.perf_counter()
    high = build_stream(cfg.high, "high").eval()
    low = build_stream(cfg.low, "low").eval()
    bs = cfg.high.batch_size
    t0, cpu0 = time.perf_counter(), _cpu_s()
    with torch.inference_mode():
        for s in range(0, len(paths), bs):
            images, _ = decode_many([p.read_bytes() for p in paths[s : s + bs]], cfg.limits)
            images = [i for i in images if i is not None]
            hi, hp = stream_topk(high, prepare(high, images), cfg.high.top_k, cfg.high.batch_size, dev)
            li, lp = stream_topk(low, prepare(low, images), cfg.low.top_k, cfg.low.batch_size, dev)
            score_rows([str(k) for k in range(len(images))], [None] * len(images),
                       [i.shape[:2] for i in images], hi, hp, li, lp, cfg.thresholds)
    return len(paths) / (time.perf_counter() - t0), t0 - t_build, _cpu_s() - cpu0


def steady_rate(output: Path, started: float) -> tuple[float | None, float]:
    """(images/s from the first shard commit to the last, seconds from ``started`` to the first
    commit), from the shards' ``_progress/<shard>.done`` markers (their rows and commit time);
    None with fewer than two commit times."""
    markers = [json.loads(p.read_text()) for p in (output / "_progress").glob("*.done")]
    commits = sorted((m["at"], m["rows"]) for m in markers)
    first = commits[0][0] - started
    if commits[-1][0] <= commits[0][0]:
        return None, first
    return sum(rows for _, rows in commits[1:]) / (commits[-1][0] - commits[0][0]), first


def ray_jobs(folder: Path, out: Path, runs: list[tuple[str, list[str]]], timeline: Path | None = None,
             code: Path = ROOT) -> tuple[dict[str, dict], dict[str, dict[str, float]], dict[str, tuple]]:
    """``summary.json``, CPU seconds per process kind and :func:`steady_rate` of each of ``runs``
    (name, overrides), one after another on one fresh local cluster (the first is the cold job,
    module docstring), each ``python -m jobs.score`` of ``code``; ``timeline``: the cluster's Ray
    timeline of all (Chrome trace JSON)."""
    import ray
    from scale import Sampler

    from jobs.ray_cluster import connect

    connect(log_to_driver=False)
    try:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        summaries, cpu, steady = {}, {}, {}
        for run, overrides in runs:
            command = [sys.executable, "-m", "jobs.score", "--input", str(folder), "--output", str(out / run),
                       "--no-progress", *[a for o in overrides for a in ("--set", o)]]
            sampler = Sampler()
            sampler.sample()  # the processes already running count from here
            sampler.start()
            started = time.time()
            with open(out / f"{run}.log", "w") as log:
                done = subprocess.run(command, env=env, cwd=code, stdout=log, stderr=subprocess.STDOUT)
            sampler.stop.set()
            sampler.join()
            cpu[run] = sampler.cpu_seconds()  # without the sampler's own (scale.Sampler.cpu_seconds)
            if done.returncode:
                sys.exit(f"the {run} job failed ({done.returncode}):\n" + (out / f"{run}.log").read_text()[-4000:])
            summaries[run] = json.loads((out / run / "summary.json").read_text())
            steady[run] = steady_rate(out / run, started)
        if timeline:
            ray.timeline(str(timeline))
        return summaries, cpu, steady
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="tiny random models (overhead-bound)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--timeline", type=Path, help="write the jobs' Ray timeline here (Chrome trace JSON)")
    parser.add_argument("--detector", action="store_true",
                        help="the query detector's cost: after a cold job, warm jobs with the detector off and on "
                             "alternately (off, on, off, on), their images/s side by side and the ratio on/off")
    parser.add_argument("--code", type=Path, help="run the jobs from this checkout (e.g. main's, for a before/after "
                                                  "pair in one window): the cluster's workers and the job drivers")
    parser.add_argument("--detector-phase", type=int, metavar="N",
                        help="only time the detector's sequential phase over N uploads, in this process")
    args = parser.parse_args()
    if args.code:  # the local Ray started below, and each job's driver, inherit it
        os.environ["PYTHONPATH"] = str(args.code.resolve())
    if args.detector_phase:
        print(json.dumps(detector_phase(args.detector_phase), indent=2))
        return
    from twostream.core.config import load_config

    overrides = (SMALL if args.small else []) + args.overrides
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "in", args.n)
        before = plain_loop(cfg, paths)
        if args.detector:
            off, on = overrides + ["detector.enabled=false"], overrides + ["detector.enabled=true"]
            runs = [("cold", off), ("off-1", off), ("on-1", on), ("off-2", off), ("on-2", on)]
        else:
            runs = [("cold", overrides), ("warm", overrides)]
        summaries, cpu, steady = ray_jobs(Path(tmp) / "in", Path(tmp), runs, args.timeline, args.code or ROOT)
        after = plain_loop(cfg, paths)
    plain, plain_cpu = (before[0] + after[0]) / 2, (before[2] + after[2]) / 2
    result = {"images": args.n, "models": "small" if args.small else "default",
              "high": cfg.high.model, "low": cfg.low.model, "overrides": overrides,
              "plain_loop_images_per_s": round(plain, 2),
              "plain_loop_runs_images_per_s": [round(before[0], 2), round(after[0], 2)],
              "plain_loop_model_build_s": round(before[1], 2), "plain_loop_cpu_s": round(plain_cpu, 1)}
    for run, summary in summaries.items():
        rate = summary["throughput"]["scoring_images_per_s"]
        steady_ips, first_commit = steady[run]
        result[run] = {"scoring_images_per_s": round(rate, 2),
                       "end_to_end_images_per_s": round(summary["throughput"]["end_to_end_images_per_s"], 2),
                       "ratio_ray_over_plain": round(rate / plain, 3),
                       "steady_images_per_s": steady_ips and round(steady_ips, 2),
                       "steady_ratio_ray_over_plain": steady_ips and round(steady_ips / plain, 3),
                       "first_commit_s": round(first_commit, 1), "wall_s": summary["wall_s"],
                       "cpu_s": cpu[run], "cpu_s_total": round(sum(cpu[run].values()), 1),
                       "cpu_ratio_ray_over_plain": round(sum(cpu[run].values()) / plain_cpu, 3)}
    if args.detector:
        result["detector"] = detector_cost(result)
    print(json.dumps(result, indent=2))


def detector_phase(n: int) -> dict:
    """The detector's sequential phase alone (``batch.detector.detect_run``, in this process) over
    ``n`` uploads: the benchmark's images (distinct photograph variants at 256 px) with every
    fourth an exact re-upload of an earlier one, fingerprinted first (phase 1's work, timed apart)."""
    import numpy as np
    import pyarrow as pa

    from twostream.batch.detector import QUERIES_SCHEMA, detect_run
    from twostream.batch.stages import fingerprint_columns
    from twostream.core.query_detector import QueryDetectorConfig
    from twostream.demo import photos as demo_photos

    config = QueryDetectorConfig()
    photos = list(demo_photos.photographs().values())
    images = [demo_photos.variant(photos[k % len(photos)], k // len(photos), 256) for k in range(n)]
    images = [images[k - 3] if k % 4 == 3 else image for k, image in enumerate(images)]
    t0 = time.perf_counter()
    fps = [fingerprint_columns(image, config) for image in images]
    t_fp = time.perf_counter() - t0
    cols = {"shard": [0] * n, "row": list(range(n)), "image_id": [f"i{k:07d}" for k in range(n)],
            "source": [f"s{k % 97}" for k in range(n)], "timestamp": [float(k) for k in range(n)],
            "height": [i.shape[0] for i in images], "width": [i.shape[1] for i in images],
            "fp_digest": [f[0] for f in fps], "fp_sample": [f[1] for f in fps], "fp_hashes": [f[2] for f in fps]}
    table = pa.table(cols, schema=QUERIES_SCHEMA)
    t0 = time.perf_counter()
    detections, window, counts = detect_run([table], None, config)
    t_run = time.perf_counter() - t0
    return {"uploads": n, "fingerprint_ms_per_image": round(t_fp / n * 1e3, 3),
            "detect_run_ms_per_upload": round(t_run / n * 1e3, 3), "detect_run_uploads_per_s": round(n / t_run, 1),
            "mean_pixels": int(np.mean([i.shape[0] * i.shape[1] for i in images])), **counts}


def detector_cost(result: dict) -> dict:
    """Mean images/s of the warm jobs with the detector off and on, and the ratios on / off: the
    scoring phase (where the fingerprints are computed), end to end (which adds the detector's
    sequential phase) and steady."""
    out: dict = {}
    for measure in ("scoring_images_per_s", "end_to_end_images_per_s", "steady_images_per_s"):
        means = {}
        for mode in ("off", "on"):
            values = [result[f"{mode}-{k}"][measure] for k in (1, 2) if result[f"{mode}-{k}"][measure]]
            means[mode] = sum(values) / len(values) if values else None
        out[measure] = {**{m: v and round(v, 2) for m, v in means.items()},
                        "ratio_on_over_off": round(means["on"] / means["off"], 3) if means["on"] and means["off"]
                        else None}
    out["detector_phase_s"] = [result[f"on-{k}"]["wall_s"].get("detector") for k in (1, 2)]
    return out


if __name__ == "__main__":
    main()
