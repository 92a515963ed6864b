"""The batch job's input: which shards there are, and the raw rows of each.

- Planning: :func:`plan_shards` turns an input prefix (local folder or ``s3://``) into
  *shards*, the unit of reading and of resume: each tar file is one shard (WebDataset layout,
  ``key.jpg`` beside an optional ``key.json``), and loose files are grouped, in sorted order,
  ``files_per_shard`` at a time; :func:`plan_digest` fingerprints a plan so a resume can check
  that the input is unchanged.
- Reading: :func:`read_shard` yields one raw row per input (bytes, key, uri, sidecar metadata);
  a file that cannot be read is still a row, with ``read_error`` set.
- Identity: :func:`attach_identity` gives each row its image id, source and timestamp from the
  manifest (:mod:`twostream.batch.manifest`), else from the sidecar JSON, else ``key``/``unknown``/0.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twostream import storage
from twostream.batch.manifest import UNKNOWN_SOURCE, ManifestIndex

TAR_SUFFIXES = (".tar",)
SIDECAR_SUFFIX = ".json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class Shard:
    """One unit of reading and of resume."""

    shard_id: str
    kind: str  # "tar" | "files"
    uris: list[str] = field(default_factory=list)  # the tar, or the loose files (+ sidecars)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        return cls(**json.loads(text))


def _relative(base: str, uri: str) -> str:
    base_path = storage.filesystem(base)[1]
    path = storage.filesystem(uri)[1]
    rel = posixpath.relpath(path.replace("\\", "/"), base_path.replace("\\", "/"))
    return path.rsplit("/", 1)[-1] if rel in (".", "") else rel


def _strip_ext(name: str) -> str:
    head, _, tail = name.rpartition("/")
    stem = tail.split(".", 1)[0] if not tail.startswith(".") else tail
    return f"{head}/{stem}" if head else stem


def _safe_id(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return f"{cleaned[:80]}-{zlib.crc32(text.encode()):08x}"


def plan_shards(input_uri: str, files_per_shard: int = 256) -> list[Shard]:
    """Shards of the input, in a stable order (same input, same plan).

    Hidden files and names starting with ``_`` are skipped; ``*.json`` are sidecars (they
    travel with the file of the same key); every other file is an input, whatever its
    extension, so a stray non-image becomes an error row instead of vanishing.
    """
    files = storage.list_files(input_uri)
    tars, loose, sidecars = [], [], set()
    for uri in files:
        name = uri.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        lower = name.lower()
        if lower.endswith(TAR_SUFFIXES):
            tars.append(uri)
        elif lower.endswith(SIDECAR_SUFFIX):
            sidecars.add(uri)
        else:
            loose.append(uri)
    shards = [Shard(_safe_id("tar-" + _relative(input_uri, t)), "tar", [t]) for t in tars]
    for start in range(0, len(loose), files_per_shard):
        chunk = loose[start : start + files_per_shard]
        with_sidecars = []
        for uri in chunk:
            with_sidecars.append(uri)
            sidecar = _strip_ext_uri(uri) + SIDECAR_SUFFIX
            if sidecar in sidecars:
                with_sidecars.append(sidecar)
        shards.append(Shard(f"files-{start // files_per_shard:06d}", "files", with_sidecars))
    return shards


def _strip_ext_uri(uri: str) -> str:
    head, _, tail = uri.rpartition("/")
    return f"{head}/{tail.split('.', 1)[0]}" if head else tail.split(".", 1)[0]


def plan_digest(shards: Sequence[Shard]) -> str:
    """A digest of the plan, recorded in the output so a resume checks the input is unchanged."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(shard.to_json().encode())
        h.update(b"\n")
    return h.hexdigest()


def _parse_sidecar(data: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _raw_row(key: str, uri: str, data: bytes | None, meta: dict, error: str | None) -> dict:
    return {"key": key, "uri": uri, "data": data or b"", "meta": json.dumps(meta) if meta else "",
            "read_error": error}


def _group_members(members: Iterable[tuple[str, bytes | None, str | None]]) -> Iterator[tuple[str, list]]:
    groups: dict[str, list] = {}
    for name, data, error in members:
        groups.setdefault(_strip_ext(name), []).append((name, data, error))
    yield from groups.items()


def _rows_from_group(key: str, entries: list, uri_of) -> list[dict]:
    meta: dict = {}
    inputs = []
    for name, data, error in entries:
        if name.lower().endswith(SIDECAR_SUFFIX) and error is None:
            meta = _parse_sidecar(data or b"")
        else:
            inputs.append((name, data, error))
    if not inputs:  # a sidecar without its image: the image is missing, say so
        return [_raw_row(key, uri_of(entries[0][0]), None, meta, "sidecar without an image file")]
    images = [e for e in inputs if e[0].lower().endswith(IMAGE_SUFFIXES)]
    primary = images[0] if images else inputs[0]
    rows = [_raw_row(key, uri_of(primary[0]), primary[1], meta, primary[2])]
    # Several image files under one key (e.g. key.jpg and key.png): each is an input of its own.
    for name, data, error in images[1:]:
        rows.append(_raw_row(_strip_ext(name) + "." + name.rsplit(".", 1)[-1], uri_of(name), data, meta, error))
    return rows


def read_shard(shard: Shard, input_uri: str, max_bytes: int | None = None) -> list[dict]:
    """Raw rows (key, uri, data, meta, read_error) of one shard, in a stable order."""
    if shard.kind == "tar":
        return _read_tar(shard.uris[0], max_bytes)
    members = []
    for uri in shard.uris:
        rel = _relative(input_uri, uri)
        try:
            fs, path = storage.filesystem(uri)
            if max_bytes is not None and fs.get_file_info(path).size > max_bytes:
                size = fs.get_file_info(path).size
                members.append((rel, None, f"file too large: {size} bytes > limit {max_bytes}"))
                continue
            members.append((rel, storage.read_bytes(uri), None))
        except OSError as exc:
            members.append((rel, None, f"cannot read: {exc}"))
    rows = []
    for key, entries in _group_members(members):
        rows.extend(_rows_from_group(key, entries, lambda name: storage.join(input_uri, name)))
    return rows


def _read_tar(uri: str, max_bytes: int | None) -> list[dict]:
    members: list[tuple[str, bytes | None, str | None]] = []
    failure = None
    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if base.startswith((".", "_")):
                    continue
                if max_bytes is not None and info.size > max_bytes:
                    members.append((info.name, None, f"file too large: {info.size} bytes > limit {max_bytes}"))
                    continue
                try:
                    handle = tar.extractfile(info)
                    data = handle.read() if handle else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member truncated ({len(data)} of {info.size} bytes)")
                    members.append((info.name, data, None))
                except (tarfile.TarError, OSError, EOFError) as exc:
                    members.append((info.name, None, f"cannot read tar member: {exc}"))
                    failure = exc
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        failure = exc
    rows = []
    for key, entries in _group_members(members):
        rows.extend(_rows_from_group(key, entries, lambda name: f"{uri}#{name}"))
    if failure is not None and not any(r["read_error"] for r in rows):
        # The tar itself is damaged beyond its last good member: one row says so.
        rows.append(_raw_row(f"{_strip_ext(uri.rsplit('/', 1)[-1])}#damaged", uri, None, {},
                             f"corrupt or truncated tar shard: {failure}"))
    return rows


def attach_identity(rows: list[dict], manifest: ManifestIndex) -> list[dict]:
    """Set image_id, source and timestamp: manifest first, then the sidecar, then defaults."""
    ids, sources, stamps, matched = manifest.lookup([r["key"] for r in rows], [r["uri"] for r in rows])
    for row, image_id, source, stamp, hit in zip(rows, ids, sources, stamps, matched):
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        if hit:
            row.update(image_id=image_id, source=source, timestamp=stamp)
            continue
        row["image_id"] = str(meta.get("image_id") or meta.get("id") or row["key"])
        row["source"] = str(meta.get("source") or meta.get("source_id") or UNKNOWN_SOURCE)
        try:
            row["timestamp"] = float(meta.get("timestamp") or 0.0)
        except (TypeError, ValueError):
            row["timestamp"] = 0.0
    return rows
