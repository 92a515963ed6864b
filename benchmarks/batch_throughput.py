"""Images/s of the Ray batch job vs a plain single-process PyTorch loop (same models, same batch
sizes, same images), and their ratio.

    python benchmarks/batch_throughput.py --n 256                       # default models
    python benchmarks/batch_throughput.py --n 512 --small               # tiny models: overhead-bound

The plain loop: read files -> decode_many -> prepare+stream_topk (high) -> prepare+stream_topk
(low) -> score_rows, batch by batch, torch using all cores. The Ray job: jobs.score.run_job on a
local Ray (all cores), scoring phase only (the reputation/final phases are reported apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def plain_loop(cfg, paths: list[Path]) -> float:
    import torch

    from twostream.core.models import build_stream
    from twostream.core.results import score_rows
    from twostream.core.scoring import decode_many, prepare, resolve_device, stream_topk

    dev = resolve_device("cpu")
    high = build_stream(cfg.high, "high").eval()
    low = build_stream(cfg.low, "low").eval()
    bs = cfg.high.batch_size
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(paths), bs):
            images, _ = decode_many([p.read_bytes() for p in paths[s : s + bs]], cfg.limits)
            images = [i for i in images if i is not None]
            hi, hp = stream_topk(high, prepare(high, images), cfg.high.top_k, cfg.high.batch_size, dev)
            li, lp = stream_topk(low, prepare(low, images), cfg.low.top_k, cfg.low.batch_size, dev)
            score_rows([str(k) for k in range(len(images))], [None] * len(images),
                       [i.shape[:2] for i in images], hi, hp, li, lp, cfg.thresholds)
    return len(paths) / (time.perf_counter() - t0)


def ray_job(cfg, folder: Path, out: Path) -> dict:
    import ray

    from jobs.ray_cluster import connect
    from jobs.score import run_job

    connect(log_to_driver=False)
    try:
        return run_job(cfg, str(folder), str(out), None, progress=False)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="tiny random models (overhead-bound)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from twostream.core.config import load_config

    cfg = load_config(None, (SMALL if args.small else []) + args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "in", args.n)
        plain = plain_loop(cfg, paths)
        summary = ray_job(cfg, Path(tmp) / "in", Path(tmp) / "out")
    ray_rate = summary["throughput"]["scoring_images_per_s"]
    result = {"images": args.n, "models": "small" if args.small else "default",
              "high": cfg.high.model, "low": cfg.low.model,
              "plain_loop_images_per_s": round(plain, 2), "ray_job_scoring_images_per_s": round(ray_rate, 2),
              "ray_job_end_to_end_images_per_s": round(summary["throughput"]["end_to_end_images_per_s"], 2),
              "ratio_ray_over_plain": round(ray_rate / plain, 3), "wall_s": summary["wall_s"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
