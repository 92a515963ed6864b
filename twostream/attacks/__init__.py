"""Attacks used to evaluate the two-stream defence (SPEC 4).

The attacks by name (this module: names only, no torch, so configs can check them);
``twostream.attacks.run.run_attack(name, x, labels, high, low, ...) -> AttackResult`` runs one:

| name | type | target | implementation |
| --- | --- | --- | --- |
| ``t1-fgsm``, ``t1-ifgsm``, ``t1-mifgsm``, ``t1-deepfool``, ``t1-universal`` | I | H-Net, full resolution, resize in the graph | ART |
| ``t2-fgsm``, ``t2-ifgsm``, ``t2-pixel1``, ``t2-pixel3``, ``t2-cw`` | II | L-Net at 32x32, carried by Fig. 4 | ART + :mod:`.fig4` |
| ``adaptive-4``, ``adaptive-8``, ``adaptive-16`` | adaptive | both streams + comparator, L-inf 4/8/16 / 255 | :mod:`.adaptive` |

Every result carries its parameters and seed (``AttackResult.params``).
"""

from __future__ import annotations

TYPE1 = ("t1-fgsm", "t1-ifgsm", "t1-mifgsm", "t1-deepfool", "t1-universal")
TYPE2 = ("t2-fgsm", "t2-ifgsm", "t2-pixel1", "t2-pixel3", "t2-cw")
ADAPTIVE = ("adaptive-4", "adaptive-8", "adaptive-16")
ATTACKS = ("clean",) + TYPE1 + TYPE2 + ADAPTIVE

# Row names of the paper's tables (None: not in the paper).
PAPER_ROW = {
    "clean": "Non Attack Data", "t1-fgsm": "FGSM", "t1-ifgsm": "I-FGSM", "t1-mifgsm": "MI-FGSM",
    "t1-deepfool": "DeepFool", "t1-universal": "Universal", "t2-fgsm": "FGSM (II)",
    "t2-ifgsm": "I-FGSM (II)", "t2-pixel1": "One-pixel", "t2-pixel3": "Three-pixel",
    "t2-cw": "Carlini", "adaptive-4": None, "adaptive-8": None, "adaptive-16": None,
}
