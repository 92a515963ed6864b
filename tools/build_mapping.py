"""Build twostream/core/data/imagenet_to_cifar10.csv from WordNet 3.0 hypernyms (a developer tool).

ImageNet-1k classes are WordNet 3.0 noun synsets (wnid ``n02123045`` = noun offset 02123045).
A class maps to a CIFAR-10 label when the label's root synset is among its hypernyms (the
class itself included); explicit overrides apply CIFAR-10's own class definitions on top, and
the borderline classes where the rule already agrees with them are listed (with reasons) and
checked at build time.

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


# Borderline classes where the hypernym rule already gives CIFAR-10's answer: each decision is
# written down here with its reason and checked at build time, so a change of WordNet files or of
# ROOTS that moves one of them stops the build instead of silently changing the table.
CONFIRMED: dict[str, tuple[str, str]] = {
    # cat: CIFAR-10 "cat" is the house cat (its examples: tabby, Egyptian cat).
    "n02123159": ("cat", "tiger cat: a striped domestic cat (domestic_cat.n.01), not a tiger"),
    "n02129604": ("other", "tiger: a big cat; felines outside domestic_cat.n.01 are not CIFAR cats"),
    "n02129165": ("other", "lion: a big cat, not a house cat"),
    "n02125311": ("other", "cougar: a wild cat, not a house cat"),
    "n02497673": ("other", "Madagascar cat: a lemur (primate), the name is a trap"),
    # dog: CIFAR-10 "dog" is the domestic dog; other canines stay out.
    "n02114367": ("other", "timber wolf: a canine, not a domestic dog"),
    "n02115641": ("other", "dingo: WordNet files it under wild dog, not dog.n.01"),
    "n02116738": ("other", "African hunting dog: a wild canine despite the name"),
    "n02119022": ("other", "red fox: a canine, not a dog"),
    "n07697537": ("other", "hotdog: a sausage sandwich"),
    # horse / deer: equines and ruminants other than the two roots stay out.
    "n02391049": ("other", "zebra: an equine but not Equus caballus; not in CIFAR-10 horse"),
    "n02403003": ("other", "ox: a bovine, not a horse"),
    "n02395406": ("other", "hog: a swine, not a horse"),
    "n02422699": ("other", "impala: an antelope; ImageNet-1k has no cervid, so deer stays empty"),
    "n02423022": ("other", "gazelle: an antelope, not a deer"),
    "n02417914": ("other", "ibex: a wild goat, not a deer"),
    # frog / bird
    "n01629819": ("other", "European fire salamander: an amphibian but not an anuran"),
    "n02704792": ("other", "amphibian: an amphibious motor vehicle, not a frog"),
    "n01608432": ("bird", "kite (21): the bird of prey, not the toy"),
    "n02012849": ("bird", "crane (134): the wading bird"),
    "n03126707": ("other", "crane (517): the lifting machine"),
    # airplane: fixed-wing aeroplanes only.
    "n02690373": ("airplane", "airliner: a commercial aeroplane"),
    "n02692877": ("other", "airship: a lighter-than-air aircraft, not an aeroplane"),
    "n02782093": ("other", "balloon: not an aeroplane"),
    "n04266014": ("other", "space shuttle: a spacecraft, not under airplane.n.01"),
    "n03954731": ("other", "plane (726): a carpenter's tool, the name is a trap"),
    "n04592741": ("other", "wing: an aircraft part, not a whole aeroplane"),
    # automobile: sedans, SUVs and the like (Krizhevsky 2009).
    "n02930766": ("automobile", "cab: a taxi is a sedan-like car"),
    "n03594945": ("automobile", "jeep: an SUV-like off-road car"),
    "n03670208": ("automobile", "limousine: a long sedan"),
    "n04037443": ("automobile", "racer: a racing car"),
    "n03777568": ("automobile", "Model T: an early car"),
    "n02814533": ("automobile", "beach wagon: a station wagon"),
    "n03444034": ("other", "go-kart: an open-frame kart, not a car"),
    "n03445924": ("other", "golfcart: not a car"),
    "n03895866": ("other", "passenger car: a railway car (car.n.02), not an automobile"),
    "n03393912": ("other", "freight car: a railway car"),
    "n04335435": ("other", "streetcar: a tram"),
    "n02974003": ("other", "car wheel: a car part"),
    "n03769881": ("other", "minibus: a bus, in neither vehicle class"),
    "n04146614": ("other", "school bus: a bus"),
    "n04487081": ("other", "trolleybus: a bus"),
    "n04065272": ("other", "recreational vehicle: a motor home, not a car or a truck"),
    # truck: only big trucks (Krizhevsky 2009).
    "n04467665": ("truck", "trailer truck: an articulated lorry, the archetypal big truck"),
    "n03345487": ("truck", "fire engine: a large truck"),
    "n03417042": ("truck", "garbage truck: a large truck"),
    "n04461696": ("truck", "tow truck: a truck"),
    "n04465501": ("other", "tractor: a farm vehicle, not a truck"),
    "n03384352": ("other", "forklift: an industrial vehicle, not a truck"),
    "n03478589": ("other", "half track: a military tracked vehicle"),
    "n04389033": ("other", "tank: an armoured vehicle"),
    "n04252225": ("other", "snowplow: not a truck in WordNet; the plough dominates the picture"),
    # ship: vessel.n.02 (watercraft). CIFAR-10's ship images include boats of every size, so
    # small boats are kept rather than cut at some arbitrary size.
    "n02951358": ("ship", "canoe: a small boat; CIFAR-10 ship covers boats"),
    "n03447447": ("ship", "gondola: a boat"),
    "n04273569": ("ship", "speedboat: a motorboat"),
    "n03662601": ("ship", "lifeboat: a sea boat"),
    "n03344393": ("ship", "fireboat: a boat"),
    "n04347754": ("ship", "submarine: a warship (vessel) seen on the surface in most photos"),
    "n04606251": ("ship", "wreck: a ship, damaged"),
    "n04612504": ("ship", "yawl: a boat (two-masted sailing boat in ImageNet's images)"),
    "n03873416": ("other", "paddle: an oar, not a boat"),
    "n03874293": ("other", "paddlewheel: a part of a boat"),
    "n02859443": ("other", "boathouse: a building"),
    "n03216828": ("other", "dock: a landing pier, not a vessel"),
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
        if wnid in CONFIRMED and label != CONFIRMED[wnid][0]:
            raise SystemExit(f"{wnid} {name}: hypernym rule gives {label}, decided {CONFIRMED[wnid]}")
        if wnid in OVERRIDES:
            label = OVERRIDES[wnid][0]
        rows.append({"imagenet_index": str(index), "wnid": wnid, "name": name, "cifar10_label": label})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--output", type=Path, default=Path("twostream/core/data/imagenet_to_cifar10.csv"))
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
