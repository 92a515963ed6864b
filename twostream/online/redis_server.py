"""The embedded Redis: :class:`EmbeddedRedis` starts a local ``redis-server`` (Debian's package)
on a free loopback port, with its append-only file in a state directory, and stops it.

Durability is Redis's append-only file (``appendonly yes``; no RDB snapshots). With
``appendfsync everysec`` (the default) Redis writes each step to the file before answering and
fsyncs once a second: a kill of Redis loses nothing answered, a crash of the machine (power,
kernel) at most the last second or two (Redis postpones writes up to 2 s while a slow disk is
still syncing). ``always`` fsyncs each step before it is answered: nothing answered is lost, at
a cost per request (the tests use it). A graceful stop (SIGTERM) loses nothing. The next start
on the same directory reloads the file. The server never outlives the process that started it
(Linux: it gets SIGTERM when that process dies, even by SIGKILL), and holds the directory's lock
while it runs, so two servers never share one append-only file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger("twostream.redis")

DEFAULT_DIR = Path("~/.cache/twostream/redis").expanduser()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _terminated_with_parent(args: list[str]) -> list[str]:
    """``args`` run through util-linux's ``setpriv --pdeathsig TERM`` where it exists (Linux): the
    server then gets SIGTERM when the thread that started it ends, however it ends. setpriv sets
    that before it execs the server, so no Python runs between fork and exec (``preexec_fn`` is
    unsafe in a process with threads). Elsewhere the server runs as it is."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else args


class EmbeddedRedis:
    """A ``redis-server`` child process on ``127.0.0.1`` (no password: loopback only). Start it from
    the main thread: the server is stopped when the thread that started it ends."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        appendfsync: Literal["always", "everysec"] = "everysec",
        port: int | None = None,
        executable: str = "redis-server",
    ) -> None:
        self.directory = Path(directory).expanduser() if directory else DEFAULT_DIR
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self.executable = executable
        self.process: subprocess.Popen | None = None
        self._lock: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the server (reloading the append-only file in the directory); returns its URL."""
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(
                f"{self.executable} not found: install Debian's redis-server package "
                f"(apt-get install redis-server), or set serve.redis_url to a running Redis"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        args = [
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
        ]
        # the server holds the directory's lock too, and gets SIGTERM when this process dies, however
        # it dies: a server left behind would share the append-only file with the next one
        self.process = subprocess.Popen(_terminated_with_parent(args), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, pass_fds=(self._lock,))
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        log.info("redis-server on %s (append-only file in %s, appendfsync %s)", self.url, self.directory,
                 self.appendfsync)
        return self.url

    def _take_lock(self) -> None:
        """One server per directory (two would corrupt the append-only file)."""
        if self._lock is not None:
            return
        fd = os.open(self.directory / "twostream.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.directory} is in use by another embedded redis-server "
                               f"(another `twostream serve`?): set serve.redis_dir") from None
        self._lock = fd

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop gracefully (SIGTERM: Redis flushes its append-only file), else kill; frees the directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
