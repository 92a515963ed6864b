"""The evaluation grid: one (dataset, attack) cell at a time, Ray-free.

A cell selects the dataset's images, attacks them (or reuses the cached adversarial images),
scores the 8-bit result through :meth:`twostream.core.scoring.Scorer.score_batch` (the serving path)
and returns one row per image. ``jobs/evaluate.py`` runs cells as parallel Ray tasks; tables
come from the rows (:mod:`twostream.evaluation.metrics`).

Storage under the output URI:

* ``adv/<dataset>/<attack>.npz`` + ``.json``: the adversarial images (uint8, ``(N, S, S, 3)``)
  and what made them (ids, attack parameters, seed, models, working size). A cell whose cache
  metadata matches reuses the images, so tables can be recomputed without attacking again.
* ``rows/<dataset>__<attack>.parquet``: the per-image rows (:data:`ROW_SCHEMA`); a cell whose
  rows exist with the same cache key is skipped (cells are the unit of resume).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from twostream import storage
from twostream.attacks import ATTACKS
from twostream.attacks.run import attack_params, run_attack
from twostream.core.config import EvalSettings, TwoStreamConfig
from twostream.evaluation.datasets import Dataset, from_batch, load_images, open_dataset, to_batch

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("attack", pa.string()),
    ("image_id", pa.string()),
    ("truth", pa.int8()),  # CIFAR-10 index, -1 = out of scope
    ("high_idx", pa.list_(pa.int32())),
    ("high_prob", pa.list_(pa.float32())),
    ("low_idx", pa.list_(pa.int8())),
    ("low_prob", pa.list_(pa.float32())),
    ("verdict", pa.string()),  # accepted | adversarial | error
    ("label", pa.string()),
    ("agreement", pa.float32()),
    ("linf", pa.float32()),  # max |x_adv - x| on [0, 1] pixels (8-bit images)
    ("l2", pa.float32()),  # ||x_adv - x||_2 per image on [0, 1] pixels
    ("attack_success", pa.bool_()),  # adaptive: accepted with a wrong label (its own check)
    ("seed", pa.int64()),
    ("params", pa.string()),  # JSON of the attack's parameters
])


@dataclass(frozen=True)
class Cell:
    dataset: str  # spec, ``[name=]kind:location``
    attack: str


def cells(settings: EvalSettings) -> list[Cell]:
    """The grid, dataset-major."""
    if not settings.datasets:
        raise ValueError("eval.datasets: name at least one dataset (e.g. imagenet-sample:PATH)")
    return [Cell(d, a) for d in settings.datasets for a in settings.attacks]


def select_images(dataset: Dataset, attack: str, settings: EvalSettings) -> Dataset:
    """The images a cell runs on: a seeded in-scope subset (smaller for slow attacks, nested in
    the main subset), plus out-of-scope images for ``clean``."""
    chosen = dataset.in_scope().subset(settings.subset, settings.seed)
    if attack in settings.attack_subset:
        chosen = chosen.subset(settings.attack_subset[attack], settings.seed)
    if attack == "clean" and settings.out_of_scope:
        extra = dataset.out_of_scope().subset(settings.out_of_scope, settings.seed)
        chosen = Dataset(chosen.name, chosen.ids + extra.ids, chosen.uris + extra.uris,
                         np.concatenate([chosen.labels, extra.labels]), chosen.meta)
    return chosen


def cache_key(dataset: Dataset, attack: str, config: TwoStreamConfig) -> dict[str, Any]:
    """Everything the adversarial images depend on."""
    s = config.eval
    return {
        "dataset": dataset.name, "attack": attack, "ids": list(dataset.ids), "seed": s.seed,
        "size": s.size, "params": attack_params(attack, s.params.get(attack)),
        "high": [config.high.model, config.high.weights], "low": [config.low.model, config.low.weights],
        "thresholds": [config.thresholds.p1, config.thresholds.p2] if attack.startswith("adaptive") else None,
        "reduced_decode": config.limits.reduced_decode,  # the clean images' pixels (load_images)
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_uris(output: str, dataset: str, attack: str) -> tuple[str, str, str]:
    adv = storage.join(output, "adv", dataset, f"{attack}.npz")
    return adv, adv[: -len(".npz")] + ".json", storage.join(output, "rows", f"{dataset}__{attack}.parquet")


def _load_cached(npz_uri: str, meta_uri: str, digest: str) -> tuple[np.ndarray, dict] | None:
    if not (storage.exists(npz_uri) and storage.exists(meta_uri)):
        return None
    meta = json.loads(storage.read_bytes(meta_uri))
    if meta.get("digest") != digest:
        log.info("cache %s is for other settings; attacking again", npz_uri)
        return None
    with np.load(io.BytesIO(storage.read_bytes(npz_uri))) as data:
        return data["images"], meta


def _save_cached(npz_uri: str, meta_uri: str, images: np.ndarray, meta: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images)
    storage.write_bytes(npz_uri, buf.getvalue())
    storage.write_bytes(meta_uri, json.dumps(meta, indent=1, default=str).encode())


def run_cell(cell: Cell, config: TwoStreamConfig, output: str, scorer=None) -> pa.Table:
    """Attack (or reuse), score and write one cell; returns its rows."""
    from twostream.core.scoring import Scorer

    s = config.eval
    dataset = select_images(open_dataset(cell.dataset), cell.attack, s)
    key = cache_key(dataset, cell.attack, config)
    digest = _digest(key)
    npz_uri, meta_uri, rows_uri = _cell_uris(output, dataset.name, cell.attack)
    if storage.exists(rows_uri):
        done = storage.read_parquet(rows_uri)
        if (done.schema.metadata or {}).get(b"digest") == digest.encode():
            log.info("%s/%s: rows exist, skipped", dataset.name, cell.attack)
            return done
    scorer = scorer or Scorer(config)
    started = time.perf_counter()
    clean = load_images(dataset, s.size, config.limits, (scorer.high.spec, scorer.low.spec))
    cached = _load_cached(npz_uri, meta_uri, digest)
    if cached is not None:
        adv, meta = cached
        log.info("%s/%s: %d adversarial images from the cache", dataset.name, cell.attack, len(adv))
    else:
        result = run_attack(cell.attack, to_batch(clean), dataset.labels, scorer.high, scorer.low,
                            params=s.params.get(cell.attack), seed=s.seed, batch_size=s.batch_size,
                            thresholds=(config.thresholds.p1, config.thresholds.p2))
        adv = from_batch(result.x_adv)
        success = result.info.get("success")
        meta = {**key, "digest": digest, "params": result.params, "wall_s": result.wall_s,
                "info": {k: v for k, v in result.info.items() if np.isscalar(v)},
                "success": None if success is None else np.asarray(success).tolist()}
        _save_cached(npz_uri, meta_uri, adv, meta)
        log.info("%s/%s: attacked %d images in %.1f s", dataset.name, cell.attack, len(adv), result.wall_s)
    scored = scorer.score(list(adv), dataset.ids).to_arrow()
    diff = adv.astype(np.float32) / 255.0 - clean.astype(np.float32) / 255.0
    n = len(dataset)
    success = meta.get("success")
    rows = pa.table({
        "dataset": [dataset.name] * n,
        "attack": [cell.attack] * n,
        "image_id": list(dataset.ids),
        "truth": dataset.labels.astype(np.int8),
        **{name: scored[name] for name in ("high_idx", "high_prob", "low_idx", "low_prob", "verdict", "label")},
        "agreement": scored["agreement"].cast(pa.float32()),
        "linf": np.abs(diff).reshape(n, -1).max(axis=1) if n else np.zeros(0, np.float32),
        "l2": np.sqrt((diff.reshape(n, -1) ** 2).sum(axis=1)) if n else np.zeros(0, np.float32),
        "attack_success": [bool(v) for v in success] if success is not None else [None] * n,
        "seed": [s.seed] * n,
        "params": [json.dumps(meta["params"], sort_keys=True, default=str)] * n,
    }, schema=ROW_SCHEMA).replace_schema_metadata({"digest": digest})
    storage.write_parquet(rows, rows_uri)
    log.info("%s/%s: %d rows in %.1f s", dataset.name, cell.attack, n, time.perf_counter() - started)
    return rows


def read_rows(output: str) -> pa.Table:
    """All per-image rows written under ``output/rows``, datasets by name, attacks in :data:`ATTACKS` order."""
    uris = storage.list_files(storage.join(output, "rows"), (".parquet",))
    tables = [storage.read_parquet(u).replace_schema_metadata(None) for u in uris]
    if not tables:
        return ROW_SCHEMA.empty_table()
    rank = {attack: k for k, attack in enumerate(ATTACKS)}
    tables.sort(key=lambda t: (t["dataset"][0].as_py(), rank[t["attack"][0].as_py()]) if t.num_rows else ("", 0))
    return pa.concat_tables(tables)
