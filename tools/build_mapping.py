"""Build twostream/data/imagenet_to_cifar10.csv from WordNet 3.0 hypernyms (a developer tool).

ImageNet-1k classes are WordNet 3.0 noun synsets (wnid ``n02123045`` = noun offset 02123045).
A class maps to a CIFAR-10 label when the label's root synset is among its hypernyms (the
class itself included); explicit overrides apply CIFAR-10's own class definitions on top.

Needs WordNet 3.0's database files (Debian: ``apt-get install wordnet-base``, files under
/usr/share/wordnet) and timm for the ImageNet class order. Run from the repository root:

    python tools/build_mapping.py [--wordnet /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

from timm.data import ImageNetInfo

# CIFAR-10 label -> WordNet 3.0 root synsets (noun offsets), with the synset's lemma for readers.
ROOTS: dict[str, dict[int, str]] = {
    "airplane": {2691156: "airplane.n.01 (aeroplane, plane)"},
    "automobile": {2958343: "car.n.01 (auto, automobile, motorcar)"},
    "bird": {1503061: "bird.n.01"},
    "cat": {2121808: "domestic_cat.n.01 (house cat)"},
    "deer": {2430045: "deer.n.01 (cervid)"},
    "dog": {2084071: "dog.n.01 (domestic dog)"},
    "frog": {1639765: "frog.n.01 (toad, anuran)"},
    "horse": {2374451: "horse.n.01 (Equus caballus)"},
    "ship": {4530566: "vessel.n.02 (watercraft: ships and boats)"},
    "truck": {4490091: "truck.n.01 (motortruck)"},
}

# CIFAR-10's definitions (Krizhevsky 2009) where WordNet's hierarchy disagrees with them:
# "automobile" is sedans, SUVs and the like, "truck" only big trucks, neither pickups.
OVERRIDES: dict[str, tuple[str, str]] = {
    "n04552348": ("airplane", "warplane: WordNet files it under military aircraft, not airplane.n.01"),
    "n03930630": ("other", "pickup: CIFAR-10 puts pickups in neither automobile nor truck"),
    "n02701002": ("other", "ambulance: a van-bodied emergency vehicle, not a sedan/SUV-like car"),
    "n03977966": ("other", "police van: a van, neither a car nor a big truck"),
    "n03770679": ("automobile", "minivan: WordNet puts it under both car and van; a family car"),
    "n03796401": ("truck", "moving van: a box truck, a big truck (WordNet: van -> truck already)"),
}


def read_hypernyms(wordnet_dir: Path) -> dict[int, list[int]]:
    """Noun offset -> hypernym offsets (``@`` and instance ``@i`` pointers) from data.noun."""
    hypernyms: dict[int, list[int]] = {}
    with open(wordnet_dir / "data.noun", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            offset, word_count = int(fields[0]), int(fields[3], 16)
            pos = 4 + 2 * word_count
            pointer_count = int(fields[pos])
            parents = []
            for k in range(pointer_count):
                symbol, target, target_pos = fields[pos + 1 + 4 * k : pos + 4 + 4 * k]
                if symbol in ("@", "@i") and target_pos == "n":
                    parents.append(int(target))
            hypernyms[offset] = parents
    return hypernyms


def ancestors(offset: int, hypernyms: dict[int, list[int]]) -> set[int]:
    """The synset and all its hypernyms, transitively."""
    seen, stack = set(), [offset]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(hypernyms.get(node, []))
    return seen


def build(wordnet_dir: Path) -> list[dict[str, str]]:
    hypernyms = read_hypernyms(wordnet_dir)
    info = ImageNetInfo()
    rows = []
    for index in range(info.num_classes()):
        wnid = info.index_to_label_name(index)
        name = info.index_to_description(index).split(",")[0].strip()
        closure = ancestors(int(wnid[1:]), hypernyms)
        labels = [label for label, roots in ROOTS.items() if closure & set(roots)]
        if len(labels) > 1 and wnid not in OVERRIDES:
            raise SystemExit(f"{wnid} {name} falls under several labels: {labels}")
        label = labels[0] if labels else "other"
        if wnid in OVERRIDES:
            label = OVERRIDES[wnid][0]
        rows.append({"imagenet_index": str(index), "wnid": wnid, "name": name, "cifar10_label": label})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--output", type=Path, default=Path("twostream/data/imagenet_to_cifar10.csv"))
    args = parser.parse_args()
    rows = build(args.wordnet)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts = Counter(row["cifar10_label"] for row in rows)
    for label in list(ROOTS) + ["other"]:
        print(f"{label:>10}: {counts[label]}")
    print(f"    mapped: {1000 - counts['other']}")


if __name__ == "__main__":
    main()
