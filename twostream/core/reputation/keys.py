"""The Algorithm-2 key of a source id: the source itself, or its network prefix when the
configuration groups addresses (``reputation.group_by_prefix``), so that an uploader who rotates
addresses within one network (the IPv6 addresses of one /64, say) shares one counter.

:func:`reputation_key` is the one rule; every caller passes through it once: the endpoint in
:meth:`twostream.online.redis_store.RedisReputation.script_call`, the batch job in
:func:`twostream.batch.reputation.staging_events`, the audit in :class:`twostream.audit.replay.Spill`; the query detector's rule 3 compares
identities through it too (``QueryDetector(source_key=identity_key(grouping))``, built by each caller). Their outputs keep the original source where they report one (the answer, the images table, the
timeline); the per-source state and tables are per key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from twostream.core.config import PrefixGrouping


def reputation_key(source: str, grouping: PrefixGrouping | None) -> str:
    """``source``'s Algorithm-2 key: with ``grouping``, a source id that is exactly an IP address
    (Python's :func:`ipaddress.ip_address` syntax: dotted-quad IPv4 without leading zeros, IPv6 with
    an optional ``%zone``) becomes its network in CIDR form, ``1.2.3.0/24`` or ``2001:db8::/64``
    (an IPv4-mapped IPv6 address ``::ffff:a.b.c.d`` counts as IPv4; a zone id is dropped); any other
    text, and every id without ``grouping``, is its own key. Never raises on hostile text."""
    if grouping is None:
        return source
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = grouping.ipv4 if address.version == 4 else grouping.ipv6
    return ipaddress.ip_network((address, bits), strict=False).with_prefixlen


def identity_key(grouping: PrefixGrouping | None) -> Callable[[str], str]:
    """:func:`reputation_key` under ``grouping`` as a function of the source id alone: what one
    identity is, for Algorithm 2 and the query detector's rule 3 (``QueryDetector(source_key=...)``)."""
    return partial(reputation_key, grouping=grouping)


def reputation_keys(sources: pa.Array | pa.ChunkedArray, grouping: PrefixGrouping | None) -> pa.Array:
    """:func:`reputation_key` of each entry of a string column (each distinct id mapped once)."""
    sources = sources.combine_chunks() if isinstance(sources, pa.ChunkedArray) else sources
    if grouping is None:
        return sources
    encoded = pc.dictionary_encode(sources)
    keys = pa.array([reputation_key(s, grouping) for s in encoded.dictionary.to_pylist()], pa.string())
    return keys.take(encoded.indices)
