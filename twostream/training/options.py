"""The options of a ``twostream train-low`` run (importable without torch, for the CLI's parser)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["ATTACKS", "KEEP", "TrainOptions"]

ATTACKS = ("none", "fgsm-rs", "pgd")
KEEP = ("best", "last")


@dataclass(frozen=True)
class TrainOptions:
    """Everything that determines a training run (a checkpoint resumes only the same options)."""

    data: str
    out: str
    arch: str = "cifar_resnet32"
    init: str = "random"
    epochs: int = 10
    attack: str = "fgsm-rs"
    eps: float = 8 / 255
    pgd_steps: int = 7
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    holdout: float = 0.1
    seed: int = 0
    limit: int | None = None
    augment: bool = True
    translate: int = 4
    label_smoothing: float = 0.0
    nesterov: bool = False
    ema: float = 0.0
    jpeg: tuple[int, int] | None = None
    jpeg_p: float = 0.5
    rescale: float = 0.0
    rescale_max: int = 8
    color_jitter: float = 0.0
    crop_scale: float = 1.0
    whiten_eps: float = 5e-4
    data_cache: str | None = None
    eval_pgd_steps: int = 10
    eval_restarts: int = 1
    quick_eval: int = 512
    keep: str = "best"
    checkpoint_dir: str | None = None
    resume: bool = False
    device: str = "auto"

    def check(self) -> None:
        """Raise ValueError naming the first bad option."""
        import torch

        from twostream.core.models import available_models

        if self.arch not in available_models("low"):
            raise ValueError(f"--arch {self.arch!r}: not a low-resolution model "
                             f"(available: {', '.join(available_models('low'))})")
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack {self.attack!r}: choose one of {', '.join(ATTACKS)}")
        if self.keep not in KEEP:
            raise ValueError(f"--keep {self.keep!r}: choose one of {', '.join(KEEP)}")
        positive = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--lr": self.lr,
                    "--pgd-steps": self.pgd_steps, "--eval-pgd-steps": self.eval_pgd_steps,
                    "--eval-restarts": self.eval_restarts, "--quick-eval": self.quick_eval}
        for flag, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"--eps must be in [0, 1] (pixel units), got {self.eps}")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"--limit must be at least 2, got {self.limit}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")
        if not 0 <= self.translate <= 16:
            raise ValueError(f"--translate must be in [0, 16] pixels, got {self.translate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"--ema must be a decay in [0, 1) (0 = off), got {self.ema}")
        if self.jpeg is not None and not 1 <= self.jpeg[0] <= self.jpeg[1] <= 100:
            raise ValueError(f"--jpeg {self.jpeg[0]}-{self.jpeg[1]}: qualities must be LOW-HIGH "
                             "with 1 <= LOW <= HIGH <= 100")
        for flag, p in {"--jpeg-p": self.jpeg_p, "--rescale": self.rescale}.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{flag} is a probability in [0, 1], got {p}")
        if self.rescale_max < 2:
            raise ValueError(f"--rescale-max must be at least 2 (times the input size), got {self.rescale_max}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"--color-jitter must be in [0, 1), got {self.color_jitter}")
        if not 0.05 <= self.crop_scale <= 1.0:
            raise ValueError(f"--crop-scale must be in [0.05, 1] (1 = no crop), got {self.crop_scale}")
        if not (math.isfinite(self.whiten_eps) and self.whiten_eps > 0.0):
            raise ValueError(f"--whiten-eps must be a positive finite number, got {self.whiten_eps}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")

    def serving_augmentation(self) -> bool:
        """Whether any augmentation of the serving path (crop, rescale, JPEG, colour) is on."""
        return (self.crop_scale < 1.0 or self.rescale > 0.0 or (self.jpeg is not None and self.jpeg_p > 0)
                or self.color_jitter > 0.0)

    def run_signature(self) -> dict:
        """The options a resumed run must share with its checkpoint."""
        skip = {"out", "checkpoint_dir", "resume", "device", "data_cache"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
