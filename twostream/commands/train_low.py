"""``twostream train-low``: train or fine-tune the low-resolution stream (L-Net) on a labelled folder.

Plainly or adversarially (FGSM with random start, PGD-k), with the stream's own resize and
normalisation, a fixed seed, checkpoints and resume; writes a weight file with its metadata that
``--set low.weights=PATH`` loads strictly (:mod:`twostream.training`). Prints the metadata's
figures when done.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twostream.training.options import TrainOptions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from twostream.training.options import ATTACKS, KEEP, TrainOptions

    d = TrainOptions(data="", out="")
    parser = subparsers.add_parser(
        "train-low", help="train or fine-tune the low-resolution stream, optionally adversarially",
        description="Train or fine-tune a CIFAR-10 L-Net on <data>/<class>/<image> (class folders "
                    "named airplane ... truck) and write a weight file with metadata.")
    parser.add_argument("--data", required=True, metavar="FOLDER",
                        help="ImageFolder named by CIFAR-10 class (local or s3://)")
    parser.add_argument("--out", required=True, metavar="FILE", help="weight file to write")
    parser.add_argument("--init", default=d.init, metavar="WEIGHTS",
                        help="starting weights (any low.weights source, e.g. bundled:cifar10_resnet32); "
                             f"default {d.init}")
    parser.add_argument("--arch", default=d.arch, help=f"low-resolution model; default {d.arch}")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    parser.add_argument("--attack", default=d.attack, choices=ATTACKS,
                        help=f"training perturbation; default {d.attack}")
    parser.add_argument("--eps", default="8/255", help="L-inf epsilon in [0, 1] pixel units, e.g. 8/255 (default)")
    parser.add_argument("--pgd-steps", type=int, default=d.pgd_steps,
                        help=f"steps of --attack pgd; default {d.pgd_steps}")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak of the one-cycle learning rate; default {d.lr}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    parser.add_argument("--holdout", type=float, default=d.holdout,
                        help=f"share of the folder held out for the accuracies; default {d.holdout}")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    parser.add_argument("--limit", type=int, metavar="N", help="use a seeded subset of N images")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no random translation and flip")
    parser.add_argument("--translate", type=int, default=d.translate,
                        help=f"largest random translation in pixels (zero padding); default {d.translate}")
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                        help=f"label smoothing of the cross-entropy; default {d.label_smoothing}")
    parser.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum; default {d.momentum}")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    parser.add_argument("--ema", type=float, default=d.ema,
                        help="decay per step of the moving average of the weights that is evaluated and "
                             f"written (0 = off, e.g. 0.999); default {d.ema}")
    parser.add_argument("--jpeg", metavar="LOW-HIGH",
                        help="re-encode training images as JPEG at a quality drawn from LOW-HIGH, e.g. 30-95")
    parser.add_argument("--jpeg-p", type=float, default=d.jpeg_p,
                        help=f"share of images re-encoded when --jpeg is given; default {d.jpeg_p}")
    parser.add_argument("--rescale", type=float, default=d.rescale,
                        help="probability that a batch is upscaled (2 to --rescale-max times) and brought back "
                             f"down with the stream's own resize; default {d.rescale}")
    parser.add_argument("--rescale-max", type=int, default=d.rescale_max,
                        help=f"largest upscale factor of --rescale; default {d.rescale_max}")
    parser.add_argument("--color-jitter", type=float, default=d.color_jitter,
                        help="brightness, contrast and saturation factors drawn from [1-S, 1+S]; "
                             f"default {d.color_jitter} (off)")
    parser.add_argument("--crop-scale", type=float, default=d.crop_scale,
                        help="random resized crops of at least this share of the area, resized back "
                             f"with the stream's resize; default {d.crop_scale} (off)")
    parser.add_argument("--whiten-eps", type=float, default=d.whiten_eps,
                        help="eps of the whitening first layer (airbench94 from random): each 2x2 patch "
                             "direction is scaled by 1/sqrt(variance + eps), so a small eps amplifies the "
                             "low-variance, high-frequency directions an L-inf attacker drives (about 40x at "
                             f"the default {d.whiten_eps}, airbench's); use about 1 for adversarial training")
    parser.add_argument("--data-cache", metavar="DIR",
                        help="keep the decoded training images here as a uint8 .npy array, reused by later runs")
    parser.add_argument("--eval-pgd-steps", type=int, default=d.eval_pgd_steps,
                        help=f"PGD steps of the held-out robust accuracy; default {d.eval_pgd_steps}")
    parser.add_argument("--eval-restarts", type=int, default=d.eval_restarts,
                        help=f"PGD restarts of the held-out robust accuracy; default {d.eval_restarts}")
    parser.add_argument("--quick-eval", type=int, default=d.quick_eval, metavar="N",
                        help=f"held-out images of the per-epoch figures; default {d.quick_eval}")
    parser.add_argument("--keep", default=d.keep, choices=KEEP,
                        help="weights written: the latest epoch within one standard error of the best "
                             "quick held-out accuracy (PGD when adversarial; stops early on catastrophic "
                             f"overfitting), or the last; default {d.keep}")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="write epoch-NNN.pt after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                        help="default auto (CUDA when present)")
    parser.set_defaults(run=run)


def command_line(opts: "TrainOptions", eps_text: str) -> str:
    """The full command that reproduces ``opts`` (every option explicit), for the metadata."""
    words = ["twostream", "train-low", "--data", opts.data, "--out", opts.out, "--init", opts.init,
             "--arch", opts.arch, "--epochs", str(opts.epochs), "--attack", opts.attack,
             "--eps", eps_text, "--lr", str(opts.lr), "--batch-size", str(opts.batch_size),
             "--holdout", str(opts.holdout), "--seed", str(opts.seed),
             "--eval-pgd-steps", str(opts.eval_pgd_steps), "--eval-restarts", str(opts.eval_restarts),
             "--keep", opts.keep, "--quick-eval", str(opts.quick_eval), "--device", opts.device]
    if opts.attack == "pgd":
        words += ["--pgd-steps", str(opts.pgd_steps)]
    if opts.limit is not None:
        words += ["--limit", str(opts.limit)]
    if not opts.augment:
        words.append("--no-augment")
    words += ["--momentum", str(opts.momentum), "--weight-decay", str(opts.weight_decay),
              "--translate", str(opts.translate), "--label-smoothing", str(opts.label_smoothing),
              "--ema", str(opts.ema), "--rescale", str(opts.rescale), "--rescale-max", str(opts.rescale_max),
              "--color-jitter", str(opts.color_jitter), "--crop-scale", str(opts.crop_scale),
              "--whiten-eps", str(opts.whiten_eps)]
    if opts.nesterov:
        words.append("--nesterov")
    if opts.jpeg is not None:
        words += ["--jpeg", f"{opts.jpeg[0]}-{opts.jpeg[1]}", "--jpeg-p", str(opts.jpeg_p)]
    if opts.data_cache:
        words += ["--data-cache", opts.data_cache]
    if opts.checkpoint_dir:
        words += ["--checkpoint-dir", opts.checkpoint_dir] + (["--resume"] if opts.resume else [])
    return shlex.join(words)


def parse_jpeg(text: str | None) -> tuple[int, int] | None:
    """``30-95`` -> (30, 95); a single quality ``75`` -> (75, 75); None stays None."""
    if text is None:
        return None
    low, _, high = text.strip().partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--jpeg {text!r}: expected qualities LOW-HIGH such as 30-95") from None


def run(args: argparse.Namespace) -> int:
    from twostream.core.models import WeightsError
    from twostream.evaluation.datasets import DatasetError
    from twostream.training.adversarial import parse_eps
    from twostream.training.loop import train
    from twostream.training.options import TrainOptions

    try:
        opts = TrainOptions(
            data=args.data, out=args.out, arch=args.arch, init=args.init, epochs=args.epochs,
            attack=args.attack, eps=parse_eps(args.eps), pgd_steps=args.pgd_steps, lr=args.lr,
            batch_size=args.batch_size, holdout=args.holdout, seed=args.seed, limit=args.limit,
            augment=args.augment, eval_pgd_steps=args.eval_pgd_steps,
            eval_restarts=args.eval_restarts, keep=args.keep, checkpoint_dir=args.checkpoint_dir,
            resume=args.resume, device=args.device, translate=args.translate,
            label_smoothing=args.label_smoothing, nesterov=args.nesterov, momentum=args.momentum,
            weight_decay=args.weight_decay, ema=args.ema,
            jpeg=parse_jpeg(args.jpeg), jpeg_p=args.jpeg_p, rescale=args.rescale, rescale_max=args.rescale_max,
            color_jitter=args.color_jitter, crop_scale=args.crop_scale, whiten_eps=args.whiten_eps,
            data_cache=args.data_cache,
            quick_eval=args.quick_eval)
        meta = train(opts, command=command_line(opts, args.eps))
    except (ValueError, OSError, WeightsError, DatasetError) as exc:
        sys.stderr.write(f"twostream train-low: {exc}\n")
        return 2
    summary = {k: meta[k] for k in ("architecture", "epochs", "selected_epoch", "attack", "epsilon",
                                    "holdout_clean_accuracy", "holdout_pgd_accuracy")}
    sys.stdout.write(json.dumps({"out": args.out, **summary}, indent=2) + "\n")
    return 0
