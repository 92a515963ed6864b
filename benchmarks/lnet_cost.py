"""Cost of the L-Net families per 32x32 image: parameters, GFLOP (torch's FLOP counter, one
multiply-add = 2 FLOP), and images/s of the stream's forward on this CPU (one thread, batch 256),
with and without the flip test-time augmentation. Prints a table; no assertion.

    PYTHONPATH=. python benchmarks/lnet_cost.py [--threads 1] [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from twostream.core.config import LowStreamConfig
from twostream.core.models import build_stream

MODELS = ("cifar_resnet32", "airbench94")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':16} {'tta':5} {'params':>10} {'GFLOP/img':>10} {'img/s':>8}")
    for name in MODELS:
        for tta in ("none", "flip"):
            stream = build_stream(LowStreamConfig(model=name, weights="random", tta=tta), "low")
            params = sum(p.numel() for p in stream.net.parameters())
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                stream(torch.rand(1, 3, 32, 32))
            x = torch.rand(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                stream(x)  # warm-up
                began = time.perf_counter()
                for _ in range(args.repeats):
                    stream(x)
                rate = args.batch * args.repeats / (time.perf_counter() - began)
            print(f"{name:16} {tta:5} {params:>10,} {counter.get_total_flops() / 1e9:>10.3f} {rate:>8.0f}")


if __name__ == "__main__":
    main()
