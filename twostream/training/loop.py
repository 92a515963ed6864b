"""The training loop of ``twostream train-low`` and the weight file it writes.

:func:`train` fine-tunes (``init`` weights) or trains (``random``) a registered low-resolution
model on a labelled folder: SGD with momentum and a one-cycle learning rate (linear up to ``lr``
over the first 40% of the steps, then down to 0, per step, as in Wong et al. 2020), optionally on
adversarial examples (:mod:`.adversarial`), with the standard crop-and-flip augmentation. Every
random draw of epoch ``e`` comes from a generator seeded by ``(seed, e)``, so a run resumed from
the checkpoint of epoch ``e`` continues exactly as an uninterrupted one. After each epoch the
held-out split's clean accuracy (and PGD accuracy on its first ``quick_eval`` images) is logged
and a checkpoint ``epoch-NNN.pt`` written; at the end, clean and PGD accuracy on the whole
held-out split go into the weight file's metadata.

With ``keep="best"`` (the default) the file holds the latest epoch within one standard error of
the best of those quick held-out figures (PGD accuracy for adversarial training, clean accuracy
otherwise; :func:`select_epoch`), and adversarial training stops once the quick PGD accuracy
falls below half its best: FGSM training's
*catastrophic overfitting* (Wong et al. 2020, who stop early for the same reason), after which
robustness does not come back. ``keep="last"`` keeps the last epoch and never stops early.

The fast recipe (airbench94's published ingredients, each an option): label smoothing, Nesterov
momentum, an exponential moving average of the weights (``ema``: the decay per step, warmed up as
``min(ema, (1 + t) / (10 + t))``; the averaged weights are the ones evaluated, kept and written),
translate-and-flip augmentation, and the serving-path augmentation of
:func:`~.data.serving_augment`. A network with a ``whiten_init`` method (``airbench94``) trained
from ``random`` has its first layer set from the first (up to) 5,000 training images of the
seeded order before the first step, with ``whiten_eps`` (``--whiten-eps``; about 1 for adversarial
training, which the default 5e-4 destabilises): held-out images never enter it.

The weight file is ``{"state_dict": <the network's tensors>, "meta": {...}}``, readable with
``torch.load(weights_only=True)`` and loaded strictly by ``low.weights=PATH``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from twostream.core.config import LowStreamConfig
from twostream.core.labels import CIFAR10_LABELS
from twostream.core.models import Stream, build_stream
from twostream.training.adversarial import make_attack, pgd
from twostream.training.data import LabelledImages, augment, holdout_split, load_folder, serving_augment
from twostream.training.options import TrainOptions

log = logging.getLogger(__name__)

__all__ = ["evaluate", "select_epoch", "train"]

FORMAT = "twostream-train-low/1"
WARMUP = 0.4  # share of the steps over which the learning rate rises to its peak
COLLAPSE = 0.5  # quick PGD accuracy below this share of its best: catastrophic overfitting
WHITEN_IMAGES = 5000  # training images the whitening layer is fitted on


class WeightAverage:
    """An exponential moving average of a network's state (parameters and BN statistics), warmed
    up: the decay at step ``t`` is ``min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                self.state[k].lerp_(v.detach(), 1.0 - d)
            else:
                self.state[k].copy_(v)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _lr_at(step: int, total: int, peak: float) -> float:
    """One-cycle: linear 0 -> peak over the first WARMUP of the steps, then linear to 0."""
    top = max(1, round(WARMUP * total))
    return peak * step / top if step < top else peak * max(0.0, (total - step) / max(1, total - top))


def _batches(data: LabelledImages, idx: torch.Tensor, size: int, device: torch.device):
    for start in range(0, len(idx), size):
        chunk = idx[start : start + size]
        yield data.x[chunk].to(device).float().div_(255.0), data.y[chunk].to(device)


def evaluate(stream: Stream, data: LabelledImages, idx: torch.Tensor, *, eps: float, steps: int,
             restarts: int, batch_size: int, seed: int, device: torch.device) -> tuple[float, float]:
    """(clean accuracy, PGD-``steps`` accuracy at ``eps``) of ``stream`` on ``data[idx]``, eval mode."""
    if len(idx) == 0:
        return float("nan"), float("nan")
    stream.eval()
    gen = torch.Generator().manual_seed(seed)
    clean = robust = 0
    for x, y in _batches(data, idx, batch_size, device):
        with torch.no_grad():
            clean += int((stream(x).argmax(1) == y).sum())
        adv = pgd(stream, x, y, eps, steps, gen, restarts=restarts) if eps > 0 else x
        with torch.no_grad():
            robust += int((stream(adv).argmax(1) == y).sum())
    return clean / len(idx), robust / len(idx)


def select_epoch(history: list[dict], adversarial: bool, n: int) -> tuple[int, bool]:
    """(the epoch to keep, whether training has collapsed) from the per-epoch held-out figures on
    ``n`` images: ``holdout_pgd`` (adversarial) or ``holdout_clean``. The latest epoch within one
    standard error (``sqrt(p (1 - p) / n)``) of the best figure ``p`` is kept: a quick estimate
    cannot tell such epochs apart, and the later one has seen more of the schedule. Collapsed:
    the last epoch's PGD accuracy is under :data:`COLLAPSE` of the best one's."""
    key = "holdout_pgd" if adversarial else "holdout_clean"
    if any(math.isnan(h[key]) for h in history):  # nothing held out: nothing to choose by
        return int(history[-1]["epoch"]), False
    best = max(h[key] for h in history)
    tolerance = math.sqrt(best * (1.0 - best) / max(n, 1))
    keep = max(h["epoch"] for h in history if h[key] >= best - tolerance)
    collapsed = adversarial and history[-1]["holdout_pgd"] < COLLAPSE * best
    return int(keep), collapsed


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch-[0-9][0-9][0-9].pt"))


def _resume(opts: TrainOptions, stream: Stream, optimizer: torch.optim.Optimizer,
            average: WeightAverage | None) -> tuple[int, list, dict]:
    """Load the latest checkpoint of ``opts.checkpoint_dir`` (and its weight average): (epochs
    done, history, the best epoch's weights)."""
    found = _checkpoints(Path(opts.checkpoint_dir))
    if not found:
        log.warning("--resume: no checkpoint in %s, starting from epoch 1", opts.checkpoint_dir)
        return 0, [], {}
    ckpt = torch.load(found[-1], map_location="cpu", weights_only=True)
    if ckpt["options"] != opts.run_signature():
        diff = {k: (ckpt["options"].get(k), v) for k, v in opts.run_signature().items()
                if ckpt["options"].get(k) != v}
        raise ValueError(f"--resume: {found[-1]} was made with other options "
                         f"(checkpoint vs now: {diff}); use another --checkpoint-dir")
    stream.net.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if average is not None:
        average.state = {k: v.to(average.state[k].device) for k, v in ckpt["ema_state_dict"].items()}
    log.info("resumed from %s (epoch %d of %d)", found[-1], ckpt["epoch"], opts.epochs)
    return int(ckpt["epoch"]), list(ckpt["history"]), ckpt["best_state_dict"]


def train(opts: TrainOptions, command: str = "") -> dict:
    """Run the training ``opts`` describe, write ``opts.out`` and return its metadata."""
    opts.check()
    device = _device(opts.device)
    torch.manual_seed(opts.seed)
    stream = build_stream(LowStreamConfig(model=opts.arch, weights=opts.init), "low")
    if stream.num_classes != len(CIFAR10_LABELS):
        raise ValueError(f"--arch {opts.arch!r} has {stream.num_classes} classes, not the 10 of CIFAR-10")
    data = load_folder(opts.data, stream, opts.limit, opts.seed, cache_dir=opts.data_cache)
    train_idx, held_idx = holdout_split(len(data), opts.holdout, opts.seed)
    if len(train_idx) == 0:
        raise ValueError(f"--holdout {opts.holdout} leaves no training image of {len(data)}")
    stream = stream.to(device).train()
    whiten = getattr(stream.net, "whiten_init", None)
    if callable(whiten) and opts.init == "random":
        first = train_idx[torch.randperm(len(train_idx), generator=_epoch_generator(opts.seed, 1_000_000))][:WHITEN_IMAGES]
        whiten((data.x[first].to(device).float() / 255.0 - stream.mean) / stream.std, eps=opts.whiten_eps)
        log.info("whitening layer fitted on %d training images (eps %g)", len(first), opts.whiten_eps)
    optimizer = torch.optim.SGD([p for p in stream.parameters() if p.requires_grad], lr=0.0,
                                momentum=opts.momentum, nesterov=opts.nesterov, weight_decay=opts.weight_decay)
    attack = make_attack(opts.attack, opts.eps, opts.pgd_steps)
    average = WeightAverage(stream.net, opts.ema) if opts.ema > 0 else None
    judged = copy.deepcopy(stream) if average is not None else stream  # what is evaluated and kept
    start, history, best_state = _resume(opts, stream, optimizer, average) if opts.resume else (0, [], {})
    adversarial = opts.attack != "none" and opts.eps > 0
    quick_n = min(len(held_idx), opts.quick_eval)
    stopped = None
    eval_kw = dict(eps=opts.eps, steps=opts.eval_pgd_steps, restarts=opts.eval_restarts,
                   batch_size=opts.batch_size, seed=opts.seed, device=device)
    began = time.monotonic()
    for epoch in range(start, opts.epochs):
        loss_sum, correct, seen = _train_epoch(opts, epoch, stream, data, train_idx, optimizer, attack, average,
                                               device)
        if average is not None:
            judged.net.load_state_dict(average.state)
        clean, robust = evaluate(judged, data, held_idx[: opts.quick_eval], **eval_kw)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "holdout_clean": clean, "holdout_pgd": robust,
                        "seconds": round(time.monotonic() - began, 1)})
        log.info("epoch %d/%d: train loss %.4f acc %.4f; held-out (first %d) clean %.4f PGD %.4f",
                 epoch + 1, opts.epochs, loss_sum / seen, correct / seen,
                 min(len(held_idx), opts.quick_eval), clean, robust)
        best, collapsed = select_epoch(history, adversarial, quick_n)
        if best == epoch + 1:
            best_state = _cpu_state(judged)
        if opts.checkpoint_dir:
            folder = Path(opts.checkpoint_dir)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": epoch + 1, "options": opts.run_signature(), "history": history,
                        "state_dict": _cpu_state(stream), "optimizer": optimizer.state_dict(),
                        "best_state_dict": best_state,
                        **({"ema_state_dict": _cpu_state(judged)} if average is not None else {})},
                       folder / f"epoch-{epoch + 1:03d}.pt")
        if opts.keep == "best" and collapsed:
            stopped = epoch + 1
            log.warning("epoch %d: held-out PGD accuracy fell to %.4f from %.4f at epoch %d: catastrophic "
                        "overfitting; stopping, keeping epoch %d", epoch + 1, history[-1]["holdout_pgd"],
                        history[best - 1]["holdout_pgd"], best, best)
            break
    selected = select_epoch(history, adversarial, quick_n)[0] if opts.keep == "best" and history else len(history)
    if selected != len(history):
        judged.net.load_state_dict(best_state)
    elif average is not None:
        judged.net.load_state_dict(average.state)
    stream = judged
    clean, robust = evaluate(stream, data, held_idx, **eval_kw)
    meta = _metadata(opts, stream, data, len(train_idx), len(held_idx), clean, robust, history, command)
    meta.update(keep=opts.keep, selected_epoch=selected, stopped_after_epoch=stopped)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _cpu_state(stream), "meta": meta}, out)
    log.info("wrote %s (epoch %d): held-out clean %.4f, PGD-%d %.4f", out, selected, clean,
             opts.eval_pgd_steps, robust)
    return meta


def _train_epoch(opts: TrainOptions, epoch: int, stream: Stream, data: LabelledImages, train_idx: torch.Tensor,
                 optimizer: torch.optim.Optimizer,
                 attack: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
                 average: WeightAverage | None,
                 device: torch.device) -> tuple[float, int, int]:
    """Epoch ``epoch`` (0-based) over the training images in its seeded order, a step per batch
    (the learning rate of the one-cycle schedule, augmentation, the attack, the weight average);
    returns the loss summed over the images, the images classified right, and the images seen."""
    steps_per_epoch = -(-len(train_idx) // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    gen = _epoch_generator(opts.seed, epoch)
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    stream.train()
    loss_sum = correct = seen = 0
    bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="img", leave=False)
    for k, (x, y) in enumerate(_batches(data, order, opts.batch_size, device)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(epoch * steps_per_epoch + k, total, opts.lr)
        if opts.serving_augmentation():
            x = serving_augment(x, gen, stream.spec, crop_scale=opts.crop_scale, rescale=opts.rescale,
                                rescale_max=opts.rescale_max, jpeg=opts.jpeg, jpeg_p=opts.jpeg_p,
                                color_jitter=opts.color_jitter)
        if opts.augment:
            x = augment(x, gen, pad=opts.translate)
        logits = stream(attack(stream, x, y, gen))
        loss = F.cross_entropy(logits, y, label_smoothing=opts.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update(stream.net, epoch * steps_per_epoch + k)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return loss_sum, correct, seen


def _cpu_state(stream: Stream) -> dict[str, torch.Tensor]:
    """A copy of the network's tensors on the CPU (never views of the live ones)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in stream.net.state_dict().items()}


def _metadata(opts: TrainOptions, stream: Stream, data: LabelledImages, n_train: int, n_held: int,
              clean: float, robust: float, history: list, command: str) -> dict:
    spec = stream.spec
    return {
        "format": FORMAT,
        "architecture": opts.arch,
        "num_classes": stream.num_classes,
        "classes": list(CIFAR10_LABELS),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": list(spec.size),
        "resize": f"{spec.interpolation}, antialiased, squash={spec.squash}",
        "init": opts.init,
        "whiten_eps": opts.whiten_eps,
        "data": {"folder": str(opts.data), "images": len(data), "train_images": n_train,
                 "holdout_images": n_held, "holdout_fraction": opts.holdout, "limit": opts.limit,
                 "class_counts": data.class_counts()},
        "epochs": opts.epochs,
        "attack": opts.attack,
        "epsilon": opts.eps,
        "pgd_steps": opts.pgd_steps if opts.attack == "pgd" else None,
        "optimizer": {"name": "sgd", "lr_max": opts.lr, "schedule": "one-cycle", "momentum": opts.momentum,
                      "nesterov": opts.nesterov, "weight_decay": opts.weight_decay, "batch_size": opts.batch_size,
                      "label_smoothing": opts.label_smoothing, "ema": opts.ema, "augment": opts.augment},
        "augmentation": {"flip_translate": opts.augment, "translate": opts.translate,
                         "crop_scale": opts.crop_scale, "rescale": opts.rescale, "rescale_max": opts.rescale_max,
                         "jpeg": list(opts.jpeg) if opts.jpeg else None, "jpeg_p": opts.jpeg_p,
                         "color_jitter": opts.color_jitter},
        "seed": opts.seed,
        "holdout_clean_accuracy": clean,
        "holdout_pgd_accuracy": robust,
        "holdout_pgd": {"steps": opts.eval_pgd_steps, "restarts": opts.eval_restarts, "epsilon": opts.eps,
                        "step_size": 2.5 * opts.eps / opts.eval_pgd_steps},
        "history": history,
        "torch": str(torch.__version__),
        "command": command,
    }
