"""Cost of the L-Net families per 32x32 image: parameters, GFLOP (torch's FLOP counter, one
multiply-add = 2 FLOP), and images/s of the stream's forward on this CPU (one thread, batch 256),
with and without the flip test-time augmentation; then the whole ``Scorer`` (decode, H-Net,
L-Net, comparator) on real photographs with each L-Net setting, measured in interleaved rounds
(so that a busy machine slows every setting alike) and as a ratio to the ResNet-32 without flips
(today's default). Prints tables; no assertion.

    PYTHONPATH=. python benchmarks/lnet_cost.py [--threads 1] [--batch 256] [--repeats 5] \
        [--photos ../shared/assets/imagenet-sample] [--n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from twostream.core.config import LowStreamConfig, load_config
from twostream.core.models import build_stream
from twostream.core.scoring import Scorer

MODELS = ("cifar_resnet32", "airbench94")
# (model, weights, tta) for the whole Scorer; the first is the ratio's reference
SCORER_LOWS = (
    ("cifar_resnet32", "bundled:cifar10_resnet32", "none"),
    ("cifar_resnet32", "bundled:cifar10_resnet32", "flip"),
    ("airbench94", "bundled:airbench94_std", "none"),
    ("airbench94", "bundled:airbench94_std", "flip"),
)


def stream_costs(batch: int, repeats: int) -> None:
    print(f"{'model':16} {'tta':5} {'params':>10} {'GFLOP/img':>10} {'img/s':>8}")
    for name in MODELS:
        for tta in ("none", "flip"):
            stream = build_stream(LowStreamConfig(model=name, weights="random", tta=tta), "low")
            params = sum(p.numel() for p in stream.net.parameters())
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                stream(torch.rand(1, 3, 32, 32))
            x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                stream(x)  # warm-up
                began = time.perf_counter()
                for _ in range(repeats):
                    stream(x)
                rate = batch * repeats / (time.perf_counter() - began)
            print(f"{name:16} {tta:5} {params:>10,} {counter.get_total_flops() / 1e9:>10.3f} {rate:>8.0f}")


def scorer_rates(photos: Path, n: int, rounds: int, threads: int) -> None:
    images = [p.read_bytes() for p in sorted(photos.glob("*.JPEG"))[:n]]
    if not images:
        raise SystemExit(f"no *.JPEG photographs in {photos}")
    scorers = {}
    for model, weights, tta in SCORER_LOWS:
        cfg = load_config(overrides=[f"low.model={model}", f"low.weights={weights}", f"low.tta={tta}",
                                     f"high.threads={threads}", f"low.threads={threads}"])
        scorers[(model, tta)] = Scorer(cfg)
        scorers[(model, tta)].score_batch(images[:4])  # warm-up
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in scorers}
    for _ in range(rounds):
        for key, scorer in scorers.items():
            began = time.perf_counter()
            scorer.score_batch(images)
            rates[key].append(len(images) / (time.perf_counter() - began))
    reference = statistics.median(rates[next(iter(rates))])
    print(f"\nwhole Scorer, {len(images)} photographs of {photos}, {rounds} interleaved rounds, {threads} thread(s)")
    print(f"{'low.model':16} {'tta':5} {'img/s (median)':>15} {'ratio':>7}  rounds")
    for (model, tta), values in rates.items():
        median = statistics.median(values)
        print(f"{model:16} {tta:5} {median:>15.2f} {median / reference:>7.3f}  "
              + " ".join(f"{v:.2f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photos", type=Path, default=Path("../shared/assets/imagenet-sample"))
    parser.add_argument("--n", type=int, default=64, help="photographs per Scorer round (0: skip the Scorer)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stream_costs(args.batch, args.repeats)
    if args.n:
        scorer_rates(args.photos, args.n, args.rounds, args.threads)


if __name__ == "__main__":
    main()
