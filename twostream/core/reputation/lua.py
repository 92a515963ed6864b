"""Algorithm 2 for Redis: :data:`OBSERVE_SCRIPT`, the text of ``observe.lua`` (one image of one
source, applied atomically; its keys and arguments are described at its top), read from this
package (package data in the wheel). :class:`twostream.online.redis_store.RedisReputation` runs it."""

from __future__ import annotations

from importlib.resources import files

OBSERVE_SCRIPT: str = files(__package__).joinpath("observe.lua").read_text(encoding="utf-8")
