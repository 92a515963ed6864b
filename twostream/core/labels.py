"""The names every part of twostream shares: the CIFAR-10 classes, the verdicts of Algorithm 1
and the responses of Algorithm 2. Compare against these, never against string literals."""

from __future__ import annotations

from enum import StrEnum

CIFAR10_LABELS: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
OTHER_LABEL = "other"  # an ImageNet class outside the ten categories


class Verdict(StrEnum):
    """Algorithm 1 on one input. ``ERROR``: it could not be scored (not an Algorithm-2 event).
    ``QUERY_ATTACK``: the stateful query detector matched it to earlier near-identical queries; it
    counts in Algorithm 2 as a rejection, like ``ADVERSARIAL``."""

    ACCEPTED = "accepted"
    ADVERSARIAL = "adversarial"
    QUERY_ATTACK = "query_attack"
    ERROR = "error"


class Refusal(StrEnum):
    """What Algorithm 2 answers besides a CIFAR-10 label (the label of an accepted image)."""

    ADVERSARIAL = "adversarial"
    QUERY_ATTACK = "query_attack"
    BLOCKED = "blocked"
    ERROR = "error"
