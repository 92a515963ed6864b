"""The scoring core on one device, end to end, with JPEGs decoded on the device and on the CPU,
side by side in one run: JPEG bytes in memory -> decode -> both streams' prepared inputs ->
H-Net and L-Net -> Algorithm 1 rows.

    python benchmarks/gpu_throughput.py                        # 20,480 images, default models, CUDA
    python benchmarks/gpu_throughput.py --n 256 --device cpu   # a smoke run anywhere

* ``device`` decode: :func:`twostream.core.device_decode.decode_on_device` (torchvision's batched
  ``decode_jpeg``: nvJPEG on CUDA) and ``prepare`` on the device, then the models, in one loop
  (as the batch job's high-stream actor does with ``job.decode=device``);
* ``cpu`` decode: Pillow and ``prepare`` in a pool of threads (one per core) feeding the device
  loop, a few batches ahead (as the batch job's read/decode tasks feed its actors).

Printed per decoder: images/s end to end; the share of the wall time spent decoding and
preparing (device: timed with synchronisation; CPU: the time the device loop waited for the
pool); GPU utilisation (the mean of NVML samples every 0.1 s, where NVML is there). Needs no Ray:
``benchmarks/gpu_check.sh`` runs it on GPU machines that have none.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("benchmarks.gpu_throughput")


def make_jpegs(n: int, distinct: int = 512) -> list[bytes]:
    """``n`` JPEGs (quality 90, longest side about 256 px): ``distinct`` variants of the shipped
    demo photographs, repeated."""
    from PIL import Image

    from twostream.demo import photos as demo_photos

    photos = list(demo_photos.photographs().values())
    blobs = []
    for k in range(min(n, distinct)):
        buf = io.BytesIO()
        Image.fromarray(demo_photos.variant(photos[k % len(photos)], k // len(photos), 256)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return [blobs[k % len(blobs)] for k in range(n)]


class GpuUtilisation:
    """Mean GPU utilisation (%) from NVML samples taken every ``period`` s between start and stop;
    None without NVML (no ``pynvml``, or no NVIDIA device)."""

    def __init__(self, device_index: int = 0, period: float = 0.1) -> None:
        self.samples: list[int] = []
        self.period = period
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception as exc:  # no NVML here: say so, measure the rest
            log.info("GPU utilisation not sampled: %s", exc)
            self._read = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self._read())

    def __enter__(self) -> GpuUtilisation:
        if self._read:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._read:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


class Core:
    """Both streams on ``device``, and the scoring of prepared batches."""

    def __init__(self, cfg, device) -> None:
        from twostream.core.scoring import Scorer

        self.cfg = cfg
        self.device = device
        scorer = Scorer(cfg)
        self.high, self.low = scorer.high_scorer, scorer.low_scorer

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def score(self, high, low, sizes) -> int:
        """Both streams' top-k and Algorithm 1 for prepared batches; returns the rows scored."""
        from twostream.core.results import score_rows

        hi, hp = self.high.topk_prepared(high)
        li, lp = self.low.topk_prepared(low)
        ids = [str(k) for k in range(len(sizes))]
        return len(score_rows(ids, [None] * len(ids), sizes, hi, hp, li, lp, self.cfg.thresholds))


def device_decode_run(core: Core, blobs: list[bytes], batch: int) -> dict:
    """Decode, prepare and score on the device, a batch at a time."""
    from twostream.core.device_decode import decode_on_device
    from twostream.core.scoring import prepare

    rows = 0
    decode_s = 0.0
    t0 = time.perf_counter()
    for start in range(0, len(blobs), batch):
        t1 = time.perf_counter()
        images, _ = decode_on_device(blobs[start : start + batch], core.cfg.limits, core.device)
        images = [i for i in images if i is not None]
        high, low = prepare(core.high.stream, images), prepare(core.low.stream, images)
        core.sync()
        decode_s += time.perf_counter() - t1
        rows += core.score(high, low, [tuple(i.shape[1:]) for i in images])
    core.sync()
    wall = time.perf_counter() - t0
    return {"rows": rows, "wall_s": round(wall, 3), "images_per_s": round(len(blobs) / wall, 1),
            "decode_share": round(decode_s / wall, 3)}


def cpu_decode_run(core: Core, blobs: list[bytes], batch: int, workers: int) -> dict:
    """Pillow + prepare in ``workers`` threads, chunks of ``batch // workers``, a few batches
    ahead; the device loop scores whole batches."""
    import torch

    from twostream.core.scoring import decode_many, prepare

    def prepared(chunk: list[bytes]):
        images, _ = decode_many(chunk, core.cfg.limits)
        images = [i for i in images if i is not None]
        return prepare(core.high.stream, images), prepare(core.low.stream, images), [i.shape[:2] for i in images]

    chunk = max(1, batch // workers)
    starts = deque(range(0, len(blobs), chunk))
    rows = 0
    wait_s = 0.0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(prepared, blobs[s : s + chunk]) for s in
                        [starts.popleft() for _ in range(min(len(starts), 3 * workers))])
        while pending:
            parts = []
            while pending and sum(len(p[2]) for p in parts) < batch:
                t1 = time.perf_counter()
                parts.append(pending.popleft().result())
                wait_s += time.perf_counter() - t1
                if starts:
                    s = starts.popleft()
                    pending.append(pool.submit(prepared, blobs[s : s + chunk]))
            rows += core.score(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                               [size for p in parts for size in p[2]])
    core.sync()
    wall = time.perf_counter() - t0
    return {"rows": rows, "wall_s": round(wall, 3), "images_per_s": round(len(blobs) / wall, 1),
            "decode_share": round(wait_s / wall, 3), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20480, help="images (default 20,480)")
    parser.add_argument("--batch", type=int, default=256, help="images per device batch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--decoders", default="device,cpu", help="which decoders, in this order")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU decode threads")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--save-jpegs", type=Path, metavar="DIR", help="also write the JPEGs there (input of a Ray job)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from twostream.core.config import load_config

    device = torch.device(args.device)
    cfg = load_config(None, [f"high.device={device.type}", f"low.device={device.type}",
                             f"high.batch_size={args.batch}", f"low.batch_size={args.batch}"] + args.overrides)
    torch.set_num_threads(1 if device.type == "cuda" else torch.get_num_threads())  # the pool's threads each decode
    log.info("making %d JPEGs", args.n)
    blobs = make_jpegs(args.n)
    if args.save_jpegs:
        args.save_jpegs.mkdir(parents=True, exist_ok=True)
        for k, blob in enumerate(blobs):
            (args.save_jpegs / f"img{k:06d}.jpg").write_bytes(blob)
    core = Core(cfg, device)
    result = {"images": args.n, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "high": cfg.high.model, "high_weights": cfg.high.weights,
              "low": cfg.low.model, "batch": args.batch, "mean_jpeg_bytes": sum(map(len, blobs)) // len(blobs)}
    for decoder in args.decoders.split(","):
        run = (lambda b: device_decode_run(core, b, args.batch)) if decoder == "device" else \
              (lambda b: cpu_decode_run(core, b, args.batch, args.workers))
        run(blobs[: 2 * args.batch])  # warm-up: kernels, cuDNN's choices, nvJPEG's state
        log.info("%s decode: %d images", decoder, args.n)
        with GpuUtilisation(device.index or 0) as gpu:
            figures = run(blobs)
        result[f"{decoder}_decode"] = figures | {"gpu_utilisation_pct": gpu.mean}
    if "device_decode" in result and "cpu_decode" in result:
        result["device_over_cpu_decode"] = round(result["device_decode"]["images_per_s"]
                                                 / result["cpu_decode"]["images_per_s"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
