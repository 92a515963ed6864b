"""The batch job's input: every object under it, the shards, and the raw rows of each.

Planning (:func:`plan_input`) lists every object under the input prefix (local folder or
``s3://``) and makes each one an :class:`Entry`, the promise of exactly one output row:

- **Keys** are full names, extension included: a loose file's path relative to the input
  (``loose/a.b.jpg``), a tar member's ``<tar key>#<name in the tar>``. Keys and URIs are unique
  over the input by construction: names are written one-to-one (:func:`escape_name`: ``%`` and
  ``#`` as ``%25`` and ``%23``, a name that is not valid UTF-8 with its bytes ``%XX``-escaped,
  an error row), so a bare ``#`` only ever joins a tar to its member; a name stored twice in one
  tar is two rows (:func:`_copies`). Image ids claimed by sidecars are checked after reading
  (:mod:`twostream.batch.ids`).
- **Sidecars**: ``X.json`` beside ``X`` (``a.jpg.json``), else ``S.json`` beside the one file
  whose name is ``S`` plus one extension (``a.json`` beside ``a.jpg``), in the same folder (or
  tar), carries ``image_id``/``source``/``timestamp`` for that file and is no row of its own. A
  ``.json`` that no file takes (an orphan), or that two files would take (``a.json`` beside
  ``a.jpg`` and ``a.png``), is an error row.
- **Links are never followed**: a symbolic link (local walk with ``os.scandir``/``lstat``, since
  pyarrow's local listing follows links and loops), a tar's symlink or hard-link member, a
  device, FIFO or socket: an error row each. Directories (and S3 folder markers) are not objects.
- **Uploads are bytes**: every read (:func:`read_unit`, through :func:`twostream.storage.read_bytes`
  or the tar's raw file) takes them as stored, never decompressed, and stops past
  ``limits.max_bytes``; a compressed tar (``.tar.gz``, ``.tgz``, ..., or compressed data named
  ``.tar``) is one error row. Local folders are opened by descriptor, so paths past ``PATH_MAX``
  are listed and read.
- **Tars** (``*.tar``) are read for their member headers at planning (seeking over the data, so
  the plan knows every member, its offset and size); a damaged region is skipped to the next
  valid header, each damaged region is one error row, members after it are read as usual, and a
  member cut off by the end of the file is an error row.

A :class:`Shard` (a tar, or ``files_per_shard`` loose files in name order) is the unit of
resume; it is read in :func:`work_units` of at most ``rows_per_task`` entries (a big tar is read
by several tasks, each seeking to its members). The job spools each shard's entries to a
Parquet file as soon as its tar is listed, so that the driver holds counts, not entries, however
many objects the input has; a work unit then carries only where its entries are.
:func:`read_unit` yields one raw row per entry (bytes, sidecar metadata, or the reason it cannot
be read); :func:`attach_identity` gives each row its image id, source and timestamp: the
manifest row matched at planning (:class:`twostream.batch.manifest.Matcher`), else the sidecar,
else key/``unknown``/0.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from twostream import storage
from twostream.batch.manifest import UNKNOWN_SOURCE, Match, Matcher, identity_text, stem
from twostream.core.jsontext import load_object
from twostream.core.timestamps import parse_timestamp

TAR_SUFFIXES = (".tar",)
SIDECAR_SUFFIX = ".json"
_BLOCK = tarfile.BLOCKSIZE


class InputError(ValueError):
    """The input is missing, empty or cannot be listed; the message says which."""


@dataclass
class Entry:
    """One listed object: the promise of exactly one output row."""

    key: str
    uri: str
    size: int = 0
    stamp: str = ""  # loose files: mtime (ns); tar members: their tar's stamp is the shard's
    offset: int = -1  # tar members: where their data starts
    sidecar: list | None = None  # [name, uri, offset, size] of the sidecar travelling with it
    error: str | None = None  # known at planning: why this object cannot be scored
    ident: list | None = None  # [image_id, source, timestamp] from the manifest (set by the job)
    path: str = ""  # loose files: where to read them, when not at ``uri`` (a name escaped in ``uri``)
    name: str = ""  # tar members: the member's name in its tar (what a manifest may call it)


@dataclass
class Shard:
    """One unit of resume: a tar, or a group of loose files; ``entries`` are its rows in order,
    held, or (``spool``) in a Parquet file of :data:`ENTRY_SCHEMA` (:func:`spool_entries`)."""

    shard_id: str
    kind: str  # "tar" | "files"
    uri: str = ""  # the tar
    stamp: str = ""  # the tar's size and mtime
    entries: list[Entry] = field(default_factory=list)
    listed: int = 0  # objects listed: entries + sidecars that travel with one + directories
    directories: int = 0
    sidecars: int = 0  # sidecars travelling with their file (no row of their own)
    first: int = 0  # a work unit: row number of entries[0] in its shard
    total: int = -1  # a work unit: rows of its whole shard
    rows: int = 0  # entries (rows owed) of this shard or work unit
    planned_errors: int = 0  # entries known at planning to be errors
    spool: str = ""  # where the whole shard's entries are, when not held

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        data = json.loads(text)
        data["entries"] = [Entry(**e) for e in data["entries"]]
        return cls(**data)

    def load_entries(self) -> list[Entry]:
        """The entries: held, else rows ``first .. first + rows`` of the spool file."""
        if self.entries or not self.spool:
            return self.entries
        return read_entries(self.spool, self.first, self.rows)


def _shard(shard: Shard) -> Shard:
    """``shard`` with its counts of entries set."""
    shard.rows = len(shard.entries)
    shard.planned_errors = sum(e.error is not None for e in shard.entries)
    return shard


# ---------------------------------------------------------------------------------------------
# Spooled entries: the plan of millions of objects without holding them
# ---------------------------------------------------------------------------------------------
ENTRY_SCHEMA = pa.schema([
    ("key", pa.string()), ("uri", pa.string()), ("size", pa.int64()), ("stamp", pa.string()),
    ("offset", pa.int64()), ("sidecar_name", pa.string()), ("sidecar_uri", pa.string()),
    ("sidecar_offset", pa.int64()), ("sidecar_size", pa.int64()), ("error", pa.string()),
    ("image_id", pa.string()), ("source", pa.string()), ("timestamp", pa.float64()),
    ("path", pa.string()), ("name", pa.string()),
])
ENTRY_ROW_GROUP = 1024  # rows per Parquet row group: a work unit reads only the groups it needs


def spool_entries(shard: Shard, uri: str) -> None:
    """Write a shard's entries to ``uri`` (:data:`ENTRY_SCHEMA`) and let go of them."""
    sidecars = [e.sidecar or [None] * 4 for e in shard.entries]
    idents = [e.ident or [None] * 3 for e in shard.entries]
    columns = [[getattr(e, name) for e in shard.entries] for name in ("key", "uri", "size", "stamp", "offset")]
    columns += [list(c) for c in zip(*sidecars)] or [[]] * 4
    columns += [[e.error for e in shard.entries]]
    columns += [list(c) for c in zip(*idents)] or [[]] * 3
    columns += [[e.path for e in shard.entries], [e.name for e in shard.entries]]
    table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, ENTRY_SCHEMA)], schema=ENTRY_SCHEMA)
    storage.write_parquet(table, uri, row_group_size=ENTRY_ROW_GROUP)
    shard.spool, shard.entries = uri, []


def read_entries(uri: str, first: int, count: int) -> list[Entry]:
    """Entries ``first .. first + count`` of a spool file, reading only their row groups."""
    if count <= 0:
        return []
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as handle:
        groups = range(first // ENTRY_ROW_GROUP, (first + count - 1) // ENTRY_ROW_GROUP + 1)
        table = pq.ParquetFile(handle).read_row_groups(list(groups))
    rows = table.slice(first - groups[0] * ENTRY_ROW_GROUP, count).to_pylist()
    if len(rows) != count:
        raise RuntimeError(f"{uri}: {len(rows)} entries from row {first}, {count} planned")
    return [Entry(r["key"], r["uri"], r["size"], r["stamp"], r["offset"],
                  None if r["sidecar_name"] is None else
                  [r["sidecar_name"], r["sidecar_uri"], r["sidecar_offset"], r["sidecar_size"]],
                  r["error"], None if r["image_id"] is None else [r["image_id"], r["source"], r["timestamp"]],
                  r["path"], r["name"])
            for r in rows]


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
MEMBER_SEP = "#"  # between a tar's key (or URI) and its member's name; escaped in every name


def escape_name(raw: bytes) -> str:
    """Bytes of a file name -> the text of keys and URIs, one-to-one (``urllib.parse.
    unquote_to_bytes`` gives the bytes back): valid UTF-8 as is but ``%`` and ``#`` as ``%25``
    and ``%23``; else every byte outside printable ASCII, ``%`` and ``#`` as ``%XX``. So no name
    holds a bare ``#``, which then only joins a tar to its member (``x.tar#a.jpg``)."""
    try:
        return raw.decode("utf-8").replace("%", "%25").replace("#", "%23")
    except UnicodeDecodeError:
        return "".join(chr(b) if 0x20 < b < 0x7F and b not in b"%#" else f"%{b:02X}" for b in raw)


def _bad_name(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return f"file name is not valid UTF-8 (shown %XX-escaped): {raw!r}"


def _safe_id(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return f"{cleaned[:80]}-{zlib.crc32(text.encode('utf-8', 'surrogateescape')):08x}"


def _copies(members: list["_Member"], tar_name: str) -> list[bool]:
    """A name stored more than once in a tar: the first keeps it, copy ``k`` (k >= 2) becomes
    ``name#k`` (a bare ``#``, which no escaped name holds: no other member can be named so) and
    an error row. Returns which members may take a sidecar (not the copies)."""
    counts: dict[str, int] = defaultdict(int)
    for m in members:
        counts[m.key] += 1
    seen: dict[str, int] = defaultdict(int)
    claims = []
    for m in members:
        name = m.key
        seen[name] += 1
        if seen[name] > 1:
            m.key = f"{name}{MEMBER_SEP}{seen[name]}"
            m.error = m.error or (f"tar member name {name!r} is stored {counts[name]} times in {tar_name}: "
                                  f"this is copy {seen[name]}, only the first is scored")
        claims.append(seen[name] == 1)
    return claims


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------
@dataclass
class _Object:
    key: str
    uri: str
    size: int = 0
    stamp: str = ""
    error: str | None = None
    path: str = ""  # where to read it, when not at ``uri``


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _readable(uri: str, raw: str) -> str:
    """Where to read an object listed as ``uri``: "" when that is ``uri`` itself, else ``raw``."""
    return "" if raw == uri else raw


def _walk_local(root: str) -> tuple[list[_Object], int]:
    """Every object under a local folder, links not followed; (objects, directories). Folders
    are opened by descriptor (:func:`twostream.storage.open_local`), so a file whose path is
    longer than the kernel's limit is listed (and read) like any other."""
    base = os.fsencode(root)
    objects: list[_Object] = []
    directories = 0
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            fd = storage.open_local(os.path.join(base, rel_dir) if rel_dir else base, os.O_RDONLY | os.O_DIRECTORY)
            try:
                infos = []  # (name, lstat or None, the error of lstat)
                with os.scandir(fd) as it:
                    for item in sorted(it, key=lambda e: e.name):
                        try:
                            infos.append((os.fsencode(item.name), item.stat(follow_symlinks=False), None))
                        except OSError as exc:
                            infos.append((os.fsencode(item.name), None, exc))
                links = {}
                for name, info, _ in infos:
                    if info is not None and stat.S_ISLNK(info.st_mode):
                        try:
                            links[name] = escape_name(os.readlink(name, dir_fd=fd))
                        except OSError:
                            links[name] = "?"
            finally:
                os.close(fd)
        except OSError as exc:
            key = escape_name(rel_dir)
            objects.append(_Object(key, os.path.join(root, key),
                                   error=f"cannot list folder: {exc.strerror or exc}"))
            continue
        for name, info, problem in infos:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            key = escape_name(rel)
            uri = os.path.join(root, key)
            if problem is not None:
                objects.append(_Object(key, uri, error=f"cannot stat: {problem.strerror or problem}"))
                continue
            if stat.S_ISDIR(info.st_mode):
                directories += 1
                stack.append(rel)
                continue
            error = _bad_name(rel)
            if stat.S_ISLNK(info.st_mode):
                error = f"symbolic link to {links[name]!r}: links are not followed"
            elif not stat.S_ISREG(info.st_mode):
                error = f"not a regular file ({_kind_of(info.st_mode)})"
            path = "" if error else _readable(uri, os.path.join(root, os.fsdecode(rel)))
            objects.append(_Object(key, uri, info.st_size, str(info.st_mtime_ns), error, path))
    objects.sort(key=lambda o: o.key)
    return objects, directories


def _list_objects(input_uri: str) -> tuple[list[_Object], int]:
    """Every object under the input, sorted by key; (objects, directories)."""
    fs, path = storage.filesystem(input_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {input_uri}")
    if info.type == pafs.FileType.File:
        name = path.rsplit("/", 1)[-1]
        return [_Object(escape_name(name.encode()), str(input_uri), info.size or 0, str(info.mtime_ns or ""))], 0
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(path)
    objects, directories = [], 0
    for item in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if item.type == pafs.FileType.Directory:
            directories += 1
            continue
        rel = posixpath.relpath(item.path, path)
        key = escape_name(rel.encode("utf-8", "surrogateescape"))
        uri = storage.S3_PREFIX + posixpath.join(path, key)
        objects.append(_Object(key, uri, item.size or 0, str(item.mtime_ns or ""),
                               path=_readable(uri, storage.S3_PREFIX + item.path)))
    objects.sort(key=lambda o: o.key)
    return objects, directories


# ---------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------
def _pair_sidecars(keys: Sequence[str], usable: Sequence[bool],
                   claim: Sequence[bool] | None = None) -> tuple[dict[int, int], dict[int, str]]:
    """Which sidecar each file takes (file index -> sidecar index) and why the other ``.json``
    are rows of their own (sidecar index -> error); see the module docstring. ``claim``: which
    objects may take a sidecar (default all)."""
    index = {k: i for i, k in enumerate(keys)}
    is_sidecar = [u and k.lower().endswith(SIDECAR_SUFFIX) for k, u in zip(keys, usable)]
    claims: dict[int, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if is_sidecar[i] or (claim is not None and not claim[i]):
            continue
        exact = index.get(key + SIDECAR_SUFFIX)
        if exact is not None and is_sidecar[exact]:
            claims[exact].append(i)
            continue
        head, _, tail = key.rpartition("/")
        if "." in tail.lstrip("."):
            by_stem = index.get((f"{head}/" if head else "") + tail[: tail.rindex(".")] + SIDECAR_SUFFIX)
            if by_stem is not None and is_sidecar[by_stem]:
                claims[by_stem].append(i)
    taken, errors = {}, {}
    for s, ok in enumerate(is_sidecar):
        if not ok:
            continue
        owners = claims.get(s, [])
        if len(owners) == 1:
            taken[owners[0]] = s
        elif owners:
            names = ", ".join(keys[i] for i in owners)
            errors[s] = f"ambiguous sidecar: {len(owners)} files could take it ({names}); name it <file>.json"
        else:
            errors[s] = "sidecar without its file (orphan): no file named like it without .json or .<ext>.json"
    return taken, errors


def _entries(objects: Sequence[_Object], sidecar_of, claim: Sequence[bool] | None = None
             ) -> tuple[list[Entry], int]:
    """Objects of one folder tree or tar -> entries (sidecars attached); (entries, sidecars attached)."""
    keys = [o.key for o in objects]
    taken, errors = _pair_sidecars(keys, [o.error is None for o in objects], claim)
    attached = set(taken.values())
    entries = []
    for i, obj in enumerate(objects):
        if i in attached:
            continue
        entry = Entry(obj.key, obj.uri, obj.size, obj.stamp, getattr(obj, "offset", -1),
                      error=obj.error or errors.get(i), path=obj.path)
        if i in taken:
            entry.sidecar = sidecar_of(objects[taken[i]])
        entries.append(entry)
    return entries, len(attached)


# ---------------------------------------------------------------------------------------------
# Tars
# ---------------------------------------------------------------------------------------------
@dataclass
class _Member(_Object):
    offset: int = -1
    whole: bool = False  # the row stands for the whole tar (none of its members can be listed)


def _member_error(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return f"symbolic link member (to {info.linkname!r}): links are not followed"
    if info.islnk():
        return f"hard link member (to {info.linkname!r}): links are not followed"
    if info.ischr() or info.isblk() or info.isfifo():
        kind = "character device" if info.ischr() else "block device" if info.isblk() else "FIFO"
        return f"not a regular file ({kind} member)"
    if info.issparse():
        return "sparse tar member: not supported"
    if not info.isreg():
        return f"unsupported tar member type {info.type!r}"
    return None


def _nonzero(handle, start: int, end: int) -> bool:
    """Whether bytes [start, end) of a seekable file hold anything but zeros."""
    handle.seek(start)
    left = end - start
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            return False
        if chunk.strip(b"\0"):
            return True
        left -= len(chunk)
    return False


COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".taz", ".tar.z", ".tar.bz2", ".tbz", ".tbz2", ".tb2", ".tar.xz",
                           ".txz", ".tar.zst", ".tzst", ".tar.lz4", ".tar.lz", ".tar.lzma", ".tlz", ".tar.br")


def _compressed_tar(what: str) -> str:
    return (f"compressed tar ({what}): compressed tars are not read (uploads are read as stored, never "
            "decompressed); upload it uncompressed as .tar, or its files loose")


def index_tar(uri: str, path: str = "") -> tuple[list[_Member], int]:
    """Every member of a tar (headers only, seeking over the data); (members, directories).
    ``path``: where to read the tar when not at ``uri``.

    Each member's ``key`` is its escaped name in the tar (:func:`escape_name`); a damaged
    region's is ``#damaged@<offset>``. Damaged regions (bytes with no valid header where one is
    due) are skipped to the next valid header (``ignore_zeros``) and each becomes one error
    member; a member whose data the file cuts off is an error member. A tar whose first bytes
    say it is compressed is one error member. Members are not sorted: their order in the tar."""
    name = uri.rsplit("/", 1)[-1]
    members: list[_Member] = []
    directories = 0

    def damaged(start: int, end: int, why: str) -> None:
        members.append(_Member(f"{MEMBER_SEP}damaged@{start}", uri, end - start,
                               error=f"damaged tar: bytes {start}-{end} {why}; any member stored there is lost"))

    with storage.open_input_file(path or uri) as handle:
        size = handle.size()
        kind = storage.compressed_kind(handle.read(8))
        if kind is not None:
            return [_Member(name, uri, size, error=_compressed_tar(f"{kind} data in a file named .tar"),
                            whole=True)], 0
        handle.seek(0)
        expected = 0  # where the next header should start
        try:
            with tarfile.open(fileobj=handle, mode="r:", ignore_zeros=True) as tar:
                for info in tar:
                    if info.offset > expected and _nonzero(handle, expected, info.offset):
                        damaged(expected, info.offset, "hold no valid member header")
                    data_end = info.offset_data + (info.size if info.isreg() else 0)
                    expected = info.offset_data + (-(-info.size // _BLOCK) * _BLOCK if info.isreg() else 0)
                    raw = info.name.encode("utf-8", "surrogateescape")
                    if info.isdir():
                        directories += 1
                        continue
                    error = _bad_name(raw) or _member_error(info)
                    if error is None and data_end > size:
                        error = f"truncated tar member: {max(size - info.offset_data, 0)} of {info.size} bytes present"
                    members.append(_Member(escape_name(raw), uri, info.size, error=error, offset=info.offset_data))
        except (tarfile.TarError, EOFError) as exc:
            if size == 0:
                members.append(_Member(name, uri, 0, error="empty file (0 bytes), not a tar", whole=True))
            elif expected < size:  # (at or past the end: the last member is the truncated one)
                damaged(expected, size, f"cannot be read as tar ({exc})")
            return members, directories
        end = min(expected, size)
        if end < size and _nonzero(handle, end, size):
            damaged(end, size, "hold no valid member header")
    return members, directories


def _tar_shard(obj: _Object) -> Shard:
    """A tar's shard. Members pair with sidecars by their names in the tar; their keys are
    ``<tar key>#<member>``, their URIs ``<tar URI>#<member>`` (unique over the input: no escaped
    name holds a bare ``#``); a name stored twice is two rows (:func:`_copies`); a tar that
    cannot be indexed at all is one error row under its own key and URI."""
    shard = Shard(_safe_id("tar-" + obj.key), "tar", obj.path or obj.uri, f"{obj.size}:{obj.stamp}")
    try:
        members, shard.directories = index_tar(obj.uri, obj.path)
    except OSError as exc:
        members = [_Member(obj.key, obj.uri, obj.size, error=f"cannot read tar: {exc}", whole=True)]
    if any(m.whole for m in members):  # (then it is the only one)
        shard.entries = [Entry(obj.key, obj.uri, obj.size, obj.stamp, error=members[0].error)]
    else:
        claim = _copies(members, obj.key)
        shard.entries, shard.sidecars = _entries(
            members, lambda m: [m.key, f"{obj.uri}{MEMBER_SEP}{m.key}", m.offset, m.size], claim)
        for entry in shard.entries:
            entry.name = entry.key
            entry.key, entry.uri = f"{obj.key}{MEMBER_SEP}{entry.name}", f"{obj.uri}{MEMBER_SEP}{entry.name}"
    shard.listed = len(members) + shard.directories
    return _shard(shard)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The shards of an input, plus the folders listed on the way (not objects, no rows) and,
    when a manifest was given, how its rows matched."""

    shards: list[Shard]
    folders: int = 0
    match: Match | None = None

    @property
    def rows(self) -> int:
        """Rows the job owes: one per entry."""
        return sum(s.rows for s in self.shards)


def _identities(table: pa.Table) -> list[list]:
    return [table.column(name).to_pylist() for name in ("image_id", "source", "timestamp")]


def _match_name(matcher: Matcher, entry: Entry) -> str:
    """The name a manifest row may give an entry: its key, else (a tar member) its name in the
    tar, whichever the manifest holds (itself or its stem); two inputs matching one row are then
    refused by the matcher, and the full key (``x.tar#a.jpg``) tells them apart."""
    if not entry.name:
        return entry.key
    for name in (entry.key, entry.name):
        if name in matcher.by_value or (stem(name) is not None and stem(name) in matcher.by_value):
            return name
    return entry.name


def _attach(matcher: Matcher, identities: list[list], entries: Sequence[Entry]) -> None:
    rows = matcher.rows([_match_name(matcher, e) for e in entries], [e.uri for e in entries], [e.key for e in entries])
    for entry, row in zip(entries, rows):
        if row >= 0:
            entry.ident = [column[row] for column in identities]


def plan_input(input_uri: str, files_per_shard: int = 256, manifest: pa.Table | None = None,
               spool: str | None = None) -> Plan:
    """Every object of the input in shards, in a stable order (same input, same plan); raises
    :class:`InputError` for a missing or empty input.

    ``manifest``: each entry gets its matched row's identity, shard by shard (``plan.match``
    says how the rows matched; :class:`ManifestError` when one row matches two inputs).
    ``spool``: a folder where each shard's entries are written as soon as it is listed
    (:func:`spool_entries`), so that planning holds one tar's entries at a time, not the
    input's; loose files' names are listed together in any case (sidecars pair across them)."""
    objects, folders = _list_objects(input_uri)
    if not objects:
        raise InputError(f"input holds no files: {input_uri}")
    matcher = Matcher(manifest) if manifest is not None else None
    identities = _identities(manifest) if manifest is not None else []
    shards: list[Shard] = []

    def add(shard: Shard) -> None:
        if matcher is not None:
            _attach(matcher, identities, shard.entries)
        if spool is not None:
            spool_entries(shard, storage.join(spool, f"{shard.shard_id}.parquet"))
        shards.append(shard)

    for obj in objects:
        suffix = next((x for x in COMPRESSED_TAR_SUFFIXES if obj.key.lower().endswith(x)), None)
        if obj.error is None and suffix is not None:
            obj.error = _compressed_tar(f"named {suffix}")
    is_tar = [o.error is None and o.key.lower().endswith(TAR_SUFFIXES) for o in objects]
    for obj in (o for o, t in zip(objects, is_tar) if t):
        add(_tar_shard(obj))
    entries, _ = _entries([o for o, t in zip(objects, is_tar) if not t],
                          lambda o: [o.key, o.path or o.uri, -1, o.size])
    del objects
    for start in range(0, len(entries), files_per_shard):
        chunk = entries[start : start + files_per_shard]
        attached = sum(e.sidecar is not None for e in chunk)
        add(_shard(Shard(f"files-{start // files_per_shard:06d}", "files", entries=chunk,
                         listed=len(chunk) + attached, sidecars=attached)))
    return Plan(shards, folders, matcher.result() if matcher is not None else None)


def work_units(shards: Sequence[Shard], rows_per_task: int) -> list[Shard]:
    """The shards cut into read tasks of at most ``rows_per_task`` entries (``first``/``total``
    say where each sits in its shard; a spooled shard's units carry no entries, only where to
    read them)."""
    units = []
    for shard in shards:
        for start in range(0, max(shard.rows, 1), rows_per_task):
            count = min(rows_per_task, shard.rows - start) if shard.rows else 0
            units.append(Shard(shard.shard_id, shard.kind, shard.uri, shard.stamp,
                               shard.entries[start : start + rows_per_task], first=start, total=shard.rows,
                               rows=count, spool=shard.spool))
    return units


def shard_chunks(shards: Sequence[Shard], rows_per_task: int, order: Iterable[int] | None = None) -> list[list[int]]:
    """Indices of ``shards`` (in ``order``, by default their own) in consecutive groups, each the
    shards one task of a later phase reads: a shard joins the group before it while the group's
    rows (entries, one staging row each) stay within ``rows_per_task``; a larger shard is a group
    of its own. By rows, not shards: a tar shard holds all its members, whatever
    ``job.files_per_shard``."""
    chunks: list[list[int]] = []
    rows = 0
    for k in range(len(shards)) if order is None else order:
        if chunks and rows + shards[k].rows <= rows_per_task:
            chunks[-1].append(k)
            rows += shards[k].rows
        else:
            chunks.append([k])
            rows = shards[k].rows
    return chunks


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _parse_sidecar(data: bytes, name: str) -> tuple[dict[str, Any], str | None]:
    """A sidecar's bytes -> (its JSON object, None), or ({}, why not: invalid JSON or UTF-8,
    nested too deeply, not an object, a key given twice)."""
    try:
        return load_object(data), None
    except ValueError as exc:
        return {}, f"sidecar {name} is {exc}" if str(exc).startswith("not ") else f"sidecar {name}: {exc}"


def _read_range(handle, offset: int, size: int) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise OSError(f"truncated: {len(data)} of {size} bytes")
    return data


def _too_large(size: int, max_bytes: int) -> str:
    return f"file too large: {size} bytes > limit {max_bytes}"


def read_unit(unit: Shard, max_bytes: int) -> Iterator[dict]:
    """One raw row per entry of a work unit, in order: ``key``, ``uri``, ``row`` (in its shard),
    ``data``, ``meta`` (the sidecar's dict), ``ident``, ``read_error``."""
    tar = None
    try:
        entries = unit.load_entries()
        if unit.kind == "tar" and any(e.error is None for e in entries):
            tar = storage.open_input_file(unit.uri)
        for k, entry in enumerate(entries):
            row = {"key": entry.key, "uri": entry.uri, "row": unit.first + k, "data": b"", "meta": {},
                   "ident": entry.ident, "read_error": entry.error}
            if entry.error is None:
                row["data"], row["meta"], row["read_error"] = _read_entry(entry, tar, max_bytes)
            yield row
    finally:
        if tar is not None:
            tar.close()


def _read_entry(entry: Entry, tar, max_bytes: int) -> tuple[bytes, dict, str | None]:
    """An entry's bytes as stored (never decompressed), at most ``max_bytes`` of them whatever
    the listing said, and its sidecar's dict; or the reason it cannot be read."""
    if entry.size > max_bytes:
        return b"", {}, _too_large(entry.size, max_bytes)
    try:
        if tar is not None:
            data = _read_range(tar, entry.offset, entry.size)
        else:
            data = storage.read_bytes(entry.path or entry.uri, max_bytes)
            if len(data) != entry.size:
                return b"", {}, f"changed since planning: {len(data)} bytes, listed with {entry.size}"
    except storage.TooLargeError as exc:
        return b"", {}, f"{exc} (limits.max_bytes; listed with {entry.size})"
    except OSError as exc:
        return b"", {}, f"cannot read: {exc}"
    meta: dict = {}
    if entry.sidecar is not None and entry.ident is None:  # the manifest, when it matched, wins
        name, uri, offset, size = entry.sidecar
        try:
            if size > max_bytes:
                raise storage.TooLargeError(_too_large(size, max_bytes))
            raw = _read_range(tar, offset, size) if tar is not None else storage.read_bytes(uri, max_bytes)
        except OSError as exc:
            return b"", {}, f"cannot read sidecar {name}: {exc}"
        meta, error = _parse_sidecar(raw, name)
        if error:
            return b"", {}, error
    return data, meta, None


def _sidecar_text(meta: dict, names: tuple[str, ...], problems: list[str]) -> str | None:
    """The first of ``names`` the sidecar gives (not null or empty), checked; None if none is
    given or it is refused (the reason appended to ``problems``)."""
    for name in names:
        value = meta.get(name)
        if value is None or value == "":
            continue
        try:
            return identity_text(name, value)
        except ValueError as exc:
            problems.append(str(exc))
            return None
    return None


def attach_identity(row: dict) -> dict:
    """Set ``image_id``, ``source`` and ``timestamp``: the manifest's, else the sidecar's, else
    key/``unknown``/0. A sidecar value refused (:func:`~twostream.batch.manifest.identity_text`,
    :func:`~twostream.core.timestamps.parse_timestamp`) makes the row an error saying why; the
    other fields keep their values. Never raises, whatever the sidecar holds."""
    if row["ident"] is not None:
        row["image_id"], row["source"], row["timestamp"] = row["ident"][0], row["ident"][1], float(row["ident"][2])
        return row
    meta = row["meta"] if isinstance(row["meta"], dict) else {}
    problems: list[str] = []
    row["image_id"] = _sidecar_text(meta, ("image_id", "id"), problems) or row["key"]
    row["source"] = _sidecar_text(meta, ("source", "source_id"), problems) or UNKNOWN_SOURCE
    row["timestamp"] = 0.0
    stamp = meta.get("timestamp")
    if stamp is not None and stamp != "":
        try:
            row["timestamp"] = parse_timestamp(stamp)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        row["read_error"] = row["read_error"] or "sidecar: " + "; ".join(problems)
    return row
