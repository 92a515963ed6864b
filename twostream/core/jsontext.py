"""JSON text from uploads and logs read without surprises: :func:`load_object` is the one reader of
a JSON object that refuses what ``json.loads`` lets through silently (a key given twice keeps the
last) or raises past its ``ValueError`` (nesting deep enough to exhaust the stack)."""

from __future__ import annotations

import json


class _Object(dict):
    """A JSON object that remembers keys given twice (json.loads keeps the last silently)."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated = [key for key, _ in pairs if key in self] if len(self) < len(pairs) else []
        if self.repeated:
            seen: set[str] = set()
            self.repeated = [key for key, _ in pairs if key in seen or seen.add(key)]


def load_object(data: bytes | str) -> dict:
    """JSON text that must be one object, with no key given twice -> the object; raises
    ``ValueError`` saying what is wrong (invalid JSON or UTF-8, nesting too deep, another type)."""
    try:
        value = json.loads(data, object_pairs_hook=_Object)
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object (a JSON {type(value).__name__})")
    if value.repeated:
        raise ValueError(f"the key {value.repeated[0]!r} is given more than once")
    return value
