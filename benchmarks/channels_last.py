"""Forward time per image of both default streams, contiguous vs channels-last weights.

    python benchmarks/channels_last.py                   # one torch thread, batches 1 8 16 32
    python benchmarks/channels_last.py --threads 2 --batches 1 8

Prints ms per image for each stream and batch size in both memory formats, the speed-up, and
the largest difference between the two formats' logits (float rounding only). Pairs are timed
alternately, ``--reps`` times, and the median is taken, so drifts in CPU speed hit both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions per pair")
    args = parser.parse_args(argv)

    import torch

    from twostream.core.config import TwoStreamConfig
    from twostream.core.models import build_stream

    torch.set_num_threads(args.threads)
    cfg = TwoStreamConfig()
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per image (median of {args.reps})")
    for kind in ("high", "low"):
        channels_last = build_stream(getattr(cfg, kind), kind)  # what twostream builds
        contiguous = build_stream(getattr(cfg, kind), kind).to(memory_format=torch.contiguous_format)
        size = channels_last.spec.size
        x = torch.rand(max(args.batches), 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            diff = float((channels_last(x) - contiguous(x)).abs().max())
            for batch in args.batches:
                times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
                calls = max(1, max(args.batches) // batch)
                for _ in range(args.reps):
                    for name, net in (("contiguous", contiguous), ("channels_last", channels_last)):
                        net(x[:batch])
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            net(x[:batch])
                        times[name].append((time.perf_counter() - t0) * 1e3 / (calls * batch))
                plain, cl = statistics.median(times["contiguous"]), statistics.median(times["channels_last"])
                print(f"{kind:4s} {channels_last.name:22s} batch {batch:3d}: contiguous {plain:7.2f}  "
                      f"channels_last {cl:7.2f}  speed-up {plain / cl:4.2f}x", flush=True)
        print(f"{kind:4s} largest |logit difference| between the formats: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
