"""The one table of column names: which spellings of a column name each field of an upload
record, for manifests and upload logs alike.

A column matches an alias when its name, lowercased and trimmed of blanks, equals it; a field
takes the first alias, in the order below, that the file has. The audit's one ``image`` field (the
image an upload names) takes the image id's, the key's and the URI's aliases in :data:`IMAGE`'s
order; a manifest keeps the three apart (it matches inputs by key, else URI, else image id).
"""

from __future__ import annotations

from collections.abc import Iterable

FIELDS: dict[str, tuple[str, ...]] = {
    "timestamp": ("timestamp", "time", "ts", "@timestamp", "datetime", "date", "time_local", "request_time",
                  "event_time", "uploaded_at", "created_at"),
    "source": ("source", "source_id", "sourceid", "ip", "client_ip", "clientip", "remote_addr", "remote_ip", "c-ip",
               "host", "remote_host", "user", "username", "user_id", "remote_user"),
    "image_id": ("image_id", "id", "imageid", "image"),
    "key": ("key", "image_key", "object_key"),
    "uri": ("uri", "url", "path", "request_uri", "request_path", "cs-uri-stem", "file"),
    "user_agent": ("user_agent", "useragent", "http_user_agent", "agent", "cs(user-agent)", "ua"),
}
# the audit's image: a log names an upload's image by any of these; ``id`` and ``imageid`` last,
# as they may well name something else in a log that has a better column
IMAGE: tuple[str, ...] = ("image_id", "image", "key", "image_key", "object_key", "uri", "url", "path",
                          "request_uri", "request_path", "cs-uri-stem", "file", "id", "imageid")
assert sorted(IMAGE) == sorted(FIELDS["image_id"] + FIELDS["key"] + FIELDS["uri"])
FIELD_OF = {alias: name for name, aliases in FIELDS.items() for alias in aliases}  # alias -> its field


def normal(name: str) -> str:
    """A column name as aliases are written: lowercased, blanks trimmed."""
    return name.lower().strip()


def first_present(aliases: Iterable[str], columns: Iterable[str]) -> str | None:
    """The first of ``columns`` (in file order) that the first present alias matches; None if none does."""
    by_name: dict[str, str] = {}
    for column in columns:
        by_name.setdefault(normal(column), column)
    return next((by_name[a] for a in aliases if a in by_name), None)
