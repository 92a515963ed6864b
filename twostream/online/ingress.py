"""Hardening of Ray Serve's HAProxy ingress where Ray has no setting for it (docs/serve.md).

Ray Serve 2.60 writes the HAProxy configuration itself from a fixed template and takes only some
values from its environment (``RAY_SERVE_HAPROXY_MAXCONN``, ``..._TIMEOUT_CLIENT_S``, the
``keep_alive_timeout_s`` of ``http_options``: ``jobs.ray_cluster.serve_cluster_env`` sets those).
It has no setting for a header timeout, a per-client connection limit, the address of the stats
page and of the Prometheus exporter (both bound to every interface) or the admin socket's mode
(666). Its one public hook is ``RAY_SERVE_HAPROXY_BINARY_PATH``, the HAProxy executable it runs:
``jobs/haproxy_hardened.sh`` runs this file as a script, which rewrites the configuration file
Ray just wrote (:func:`harden`) and then executes the real HAProxy with Ray's own arguments.

Every edit must find exactly the line it edits; when Ray's template changes so that one does not,
:class:`HardeningError` names it and HAProxy is not started (the endpoint fails to start, it never
runs without the hardening). Standard library only: it runs in Ray's HAProxy manager process.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

SETTINGS_ENV = "TWOSTREAM_HAPROXY_HARDENING"  # JSON of Hardening, set by serve_cluster_env
REAL_BINARY_ENV = "TWOSTREAM_HAPROXY_BINARY"  # the HAProxy executable to run after the rewrite
MARK = "# hardened by twostream (twostream/online/ingress.py)"
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program|cache|ring|mailers)\b")


class HardeningError(RuntimeError):
    """Ray's HAProxy configuration does not have the line an edit needs (the text says which)."""


@dataclass(frozen=True)
class Hardening:
    """What :func:`harden` adds; the ``serve.*`` settings of the same meaning (``ServeSettings``)."""

    header_timeout_s: float = 10.0  # timeout http-request: the whole request head, and keep-alive idle
    per_client_connections: int = 64  # concurrent connections per client address; 0: no limit
    stats_page: bool = False  # keep HAProxy's stats page (bound to the serve host); False: removed
    socket_mode: str = "600"  # the admin socket's mode (Ray writes 666)

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, text: str) -> Hardening:
        return cls(**json.loads(text))


def _sections(text: str) -> list[list[str]]:
    """The configuration as sections of lines (the first: whatever precedes the first keyword)."""
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        if _SECTION.match(line):
            out.append([])
        out[-1].append(line)
    return out


def _one(sections: list[list[str]], header: str) -> list[str]:
    found = [s for s in sections if s and s[0].split() == header.split()]
    if len(found) != 1:
        raise HardeningError(f"Ray's HAProxy config has {len(found)} '{header}' sections, expected one")
    return found[0]


def _index(section: list[str], pattern: str, what: str) -> tuple[int, re.Match[str]]:
    hits = [(i, m) for i, line in enumerate(section) if (m := re.match(pattern, line))]
    if len(hits) != 1:
        raise HardeningError(f"Ray's HAProxy config: section '{section[0].strip()}' has {len(hits)} {what} "
                             "lines, expected one")
    return hits[0]


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def harden(text: str, hardening: Hardening) -> str:
    """Ray's HAProxy configuration with the hardening applied (idempotent: text already hardened
    is returned as it is). Raises :class:`HardeningError` naming the line it could not find."""
    if MARK in text:
        return text
    sections = _sections(text)
    glob = _one(sections, "global")
    i, m = _index(glob, r"^(\s*stats socket \S+ .*\bmode )(\d+)\b", "'stats socket ... mode'")
    glob[i] = glob[i][: m.start(2)] + hardening.socket_mode + glob[i][m.end(2):]
    glob.insert(1, "    " + MARK)

    defaults = _one(sections, "defaults")
    defaults[:] = [line for line in defaults if not re.match(r"^\s*timeout http-request\b", line)]
    defaults.insert(1, f"    timeout http-request {_ms(hardening.header_timeout_s)}  # twostream: header timeout")

    front = _one(sections, "frontend http_frontend")
    i, m = _index(front, r"^\s*bind (\S+):(\d+)\b", "'bind'")
    host = m.group(1)  # Ray's rendering of serve.host (* for 0.0.0.0)
    if hardening.per_client_connections > 0:
        front[i + 1:i + 1] = [
            f"    # twostream: at most {hardening.per_client_connections} connections per client address",
            "    stick-table type ipv6 size 100k expire 60s store conn_cur",
            "    tcp-request connection track-sc0 src",
            f"    tcp-request connection reject if {{ sc_conn_cur(0) gt {hardening.per_client_connections} }}",
        ]

    prom = _one(sections, "frontend prometheus")
    i, m = _index(prom, r"^(\s*bind )(\S*):(\d+)\b", "'bind'")
    prom[i] = f"{m.group(1)}{host}:{m.group(3)}{prom[i][m.end():]}  # twostream: the serve host only"

    stats = _one(sections, "listen stats")
    if hardening.stats_page:
        i, m = _index(stats, r"^(\s*bind )(\S*):(\d+)\b", "'bind'")
        stats[i] = f"{m.group(1)}{host}:{m.group(3)}{stats[i][m.end():]}  # twostream: the serve host only"
    else:
        stats[:] = ["# twostream: HAProxy's stats page removed (serve.haproxy_stats_page=false)"]
    return "\n".join(line for section in sections for line in section) + "\n"


def harden_file(path: str, hardening: Hardening) -> None:
    """Rewrite Ray's configuration file in place, under the lock file Ray writes it under."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            hardened = harden(text, hardening)
            if hardened != text:
                tmp = f"{path}.twostream.tmp"
                with open(tmp, "w") as f:
                    f.write(hardened)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    """Run as Ray's HAProxy binary: harden each ``-f`` file, then become the real HAProxy."""
    real = os.environ.get(REAL_BINARY_ENV)
    if not real:
        print(f"twostream HAProxy wrapper: {REAL_BINARY_ENV} is not set", file=sys.stderr)
        return 2
    hardening = Hardening.from_env(os.environ.get(SETTINGS_ENV) or "{}")
    try:
        for flag, value in zip(argv, argv[1:]):
            if flag == "-f":
                harden_file(value, hardening)
    except (HardeningError, OSError) as exc:
        print(f"twostream HAProxy wrapper: not starting HAProxy unhardened: {exc}", file=sys.stderr)
        return 2
    os.execv(real, [real, *argv])
    return 2  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
