"""The endpoint answering while thousands of slow-header clients are connected (issue 29).

    python benchmarks/serve_slow_clients.py                        # this checkout, 5,000 clients
    python benchmarks/serve_slow_clients.py --repo /work/main      # another checkout's code (before)
    python benchmarks/serve_slow_clients.py --clients 5000 --addresses 100 --hold-s 40

Starts ``twostream serve`` from ``--repo`` (HAProxy ingress, the default; tiny random-init models
as in tests/integration/test_serve_app.py, an embedded redis-server in a temporary directory) on a loopback
port, waits until ``/healthz`` answers, then keeps ``--clients`` connections open that each send a
request line and one header and never the rest, from ``--addresses`` loopback source addresses
(127.0.0.0/8 is all loopback on Linux: a crowd of clients, each below the per-client limit). A
connection the server closes (header timeout, per-client limit) is opened again, at most
``--reopen-per-s`` a second: the crowd stays as large as the server lets it be. Meanwhile, once a
second for ``--hold-s`` seconds, a fresh client times ``GET /healthz`` and ``POST /v1/classify``
(a 48x40 PNG) with a ``--probe-timeout-s`` timeout. Prints the latencies (p50, max, how many
within 1 s, how many failed) and how many slow clients were connected, then stops everything
(SIGINT) and prints how long the stop took. Loopback only; bounded by ``--hold-s``. The client
process raises its own file limit (``resource.setrlimit``) to the hard limit.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
HIGH_MODEL, LOW_MODEL = "resnet10t", "cifar_resnet20"
SLOW_HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def request(port: int, raw: bytes, timeout: float) -> tuple[float, int | str]:
    """Seconds until the status line of a fresh connection's answer, and its status (else what failed)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(max(0.01, timeout - (time.perf_counter() - t0)))
            sock.sendall(raw)
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return time.perf_counter() - t0, "closed"
                head += chunk
            return time.perf_counter() - t0, int(head.split()[1])
    except OSError as exc:
        return time.perf_counter() - t0, type(exc).__name__


class Crowd:
    """``n`` slow-header connections from ``addresses`` loopback addresses, reopened when closed."""

    def __init__(self, port: int, n: int, addresses: int, reopen_per_s: float) -> None:
        self.port, self.n, self.reopen_per_s = port, n, reopen_per_s
        self.sources = [f"127.0.{10 + k // 250}.{1 + k % 250}" for k in range(addresses)]
        self.sel = selectors.DefaultSelector()
        self.open = 0
        self.opened = self.closed_by_server = self.failed = 0
        self.stop = threading.Event()

    def _open(self, k: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((self.sources[k % len(self.sources)], 0))
            err = sock.connect_ex(("127.0.0.1", self.port))
            if err not in (0, 115):  # EINPROGRESS
                raise OSError(err, os.strerror(err))
        except OSError:
            sock.close()
            self.failed += 1
            return
        self.sel.register(sock, selectors.EVENT_WRITE, k)
        self.open += 1
        self.opened += 1

    def run(self) -> None:
        pending = list(range(self.n))
        budget, last = 0.0, time.monotonic()
        first_round = True
        while not self.stop.is_set():
            now = time.monotonic()
            budget = min(budget + (now - last) * self.reopen_per_s, self.reopen_per_s)
            last = now
            while pending and (first_round or budget >= 1):
                self._open(pending.pop())
                budget -= 0 if first_round else 1
            first_round = False
            for key, events in self.sel.select(timeout=0.05):
                sock, k = key.fileobj, key.data
                if events & selectors.EVENT_WRITE:
                    try:
                        sock.send(SLOW_HEAD)
                        self.sel.modify(sock, selectors.EVENT_READ, k)
                        continue
                    except OSError:
                        pass
                elif events & selectors.EVENT_READ:
                    try:
                        if sock.recv(4096):
                            pass
                    except OSError:
                        pass
                    self.closed_by_server += 1
                self.sel.unregister(sock)
                sock.close()
                self.open -= 1
                pending.append(k)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(HERE), help="checkout whose `twostream serve` runs")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--addresses", type=int, default=100, help="loopback source addresses of the crowd")
    parser.add_argument("--reopen-per-s", type=float, default=5000.0)
    parser.add_argument("--hold-s", type=float, default=40.0)
    parser.add_argument("--probe-timeout-s", type=float, default=10.0)
    parser.add_argument("--set", action="append", default=[], help="extra --set of twostream serve")
    args = parser.parse_args()
    logging_quiet = {"RAY_DEDUP_LOGS": "1"}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    import torch

    from twostream.core.config import HighStreamConfig, LowStreamConfig
    from twostream.core.models import build_stream

    tmp = Path(tempfile.mkdtemp(prefix="slow-clients-"))
    weights = {}
    for kind, model, cfg, seed in (("high", HIGH_MODEL, HighStreamConfig, 0), ("low", LOW_MODEL, LowStreamConfig, 1)):
        torch.manual_seed(seed)
        weights[kind] = tmp / f"{kind}.pt"
        torch.save(build_stream(cfg(model=model, weights="random"), kind).net.state_dict(), weights[kind])
    port = free_port()
    sets = [f"high.model={HIGH_MODEL}", f"high.weights={weights['high']}", "high.num_cpus=0.5", "high.threads=1",
            f"low.model={LOW_MODEL}", f"low.weights={weights['low']}", "low.num_cpus=0.5", "low.threads=1",
            f"serve.redis_dir={tmp / 'redis'}", "serve.drain_s=1", *args.set]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": args.repo,
                                                                              **logging_quiet}
    commit = subprocess.run(["git", "-C", args.repo, "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    print(f"twostream serve from {args.repo} ({commit[:80]}), port {port}", flush=True)
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "twostream.cli", "serve", "--port", str(port), "--num-cpus", "2",
                             *[a for s in sets for a in ("--set", s)]], cwd=args.repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    health = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    image = png()
    probes = iter(range(10**9))

    def classify() -> bytes:  # a new source each time: 200, never a blacklisted 403
        return (b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: image/png\r\n"
                b"X-Source-Id: bench-probe-%d\r\nContent-Length: %d\r\n\r\n" % (next(probes), len(image))) + image
    try:
        deadline = time.monotonic() + 300
        while request(port, health, 5)[1] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"twostream serve did not come up; its log: {log.name}")
            time.sleep(0.5)
        quiet = [request(port, classify(), args.probe_timeout_s) for _ in range(3)]
        print(f"without slow clients: classify {', '.join(f'{t * 1e3:.0f} ms ({s})' for t, s in quiet)}", flush=True)

        crowd = Crowd(port, args.clients, args.addresses, args.reopen_per_s)
        thread = threading.Thread(target=crowd.run, daemon=True)
        thread.start()
        time.sleep(5.0)  # the crowd connects
        print(f"{crowd.open} slow-header clients connected after 5 s (from {args.addresses} addresses)", flush=True)
        results: dict[str, list[tuple[float, int | str]]] = {"healthz": [], "classify": []}
        crowd_sizes = []
        end = time.monotonic() + args.hold_s
        while time.monotonic() < end:
            t = time.monotonic()
            crowd_sizes.append(crowd.open)
            results["healthz"].append(request(port, health, args.probe_timeout_s))
            results["classify"].append(request(port, classify(), args.probe_timeout_s))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
        crowd.stop.set()
        thread.join(30)
        print(f"slow clients connected during the probes: min {min(crowd_sizes)}, median "
              f"{statistics.median(crowd_sizes):.0f}, max {max(crowd_sizes)}; connections opened "
              f"{crowd.opened}, closed by the server {crowd.closed_by_server}, failed to open {crowd.failed}")
        for name, rows in results.items():
            ok = sorted(t for t, status in rows if isinstance(status, int))
            within = sum(1 for t, status in rows if status in (200, 403) and t <= 1.0)
            failed = sum(1 for _, status in rows if not isinstance(status, int))
            statuses = sorted({str(status) for _, status in rows})
            p50 = f"{statistics.median(ok) * 1e3:.0f} ms" if ok else "-"
            worst = f"{max(t for t, _ in rows) * 1e3:.0f} ms"
            print(f"{name:9s}: {len(rows)} probes, {within} answered within 1 s, {failed} failed "
                  f"(timeout {args.probe_timeout_s:g} s); p50 {p50}, max {worst}; statuses {statuses}")
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
            print(f"SIGINT: exited {proc.returncode} after {time.monotonic() - t0:.1f} s")
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"SIGINT: still running after 120 s, killed (log {log.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
