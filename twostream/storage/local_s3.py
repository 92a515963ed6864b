"""The local object store: a real S3-speaking server (moto's ``moto_server``) on 127.0.0.1.

Why moto: it installs from PyPI into the same virtual environment (the ``local`` extra), needs
no other runtime, speaks the S3 REST API that boto3 and pyarrow's S3FileSystem (the AWS C++
SDK) use, including multipart uploads, ListObjectsV2 paging and the SDK's default request
checksums, and it is the S3 emulator botocore's own maintainers test against. The other
registry choice, ``s3rver`` (npm), needs Node.js and stores pyarrow's uploads with their
aws-chunked encoding unless checksums are turned off client-side, i.e. a different code path
from AWS. MinIO, SeaweedFS and Garage are not on the reachable registries. moto keeps objects
in memory, which suits tests and the demo.

The code talking to it is exactly the AWS path: ``AWS_ENDPOINT_URL`` plus the standard
credential chain (here dummy ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``).

Usage: ``with LocalStore() as store: store.env`` (a dict to export), or
``python -m twostream.storage.local_s3 start|stop|status [--port P] [--state DIR]`` (a daemon with a
pid file, used by ``cluster/local.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PORT = 9010
STATE_DIR = Path(os.environ.get("TWOSTREAM_STATE", Path.home() / ".cache" / "twostream" / "run"))
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "twostream",
    "AWS_SECRET_ACCESS_KEY": "twostream-local",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        raise RuntimeError("moto_server not found: install twostream[local] (moto[server])")
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


def _wait_ready(endpoint: str, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):  # noqa: S310 - localhost
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"local S3 server at {endpoint} not ready after {timeout}s")


def env_for(endpoint: str) -> dict[str, str]:
    """Environment variables that point the AWS SDKs (boto3, pyarrow) at ``endpoint``."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def s3_client(endpoint: str | None = None):
    """A boto3 S3 client (endpoint from the argument or AWS_ENDPOINT_URL)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL"))


def create_bucket(name: str, endpoint: str | None = None) -> None:
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def upload_tree(local: Path, uri: str, endpoint: str | None = None) -> int:
    """Upload every file under ``local`` to ``s3://bucket/prefix``; returns the count."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client(endpoint)
    count = 0
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local).as_posix()]))
            client.upload_file(str(path), bucket, key)
            count += 1
    return count


class LocalStore:
    """A moto S3 server as a child process; a context manager that stops it on exit."""

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return env_for(self.endpoint)

    def start(self) -> "LocalStore":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            _moto_command(self.port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait_ready(self.endpoint, self.proc)
        return self

    def apply_env(self) -> None:
        """Export this server's endpoint and credentials into ``os.environ``."""
        os.environ.update(self.env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "LocalStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- daemon mode for cluster/local.sh and `twostream cluster up/down` -------------------------
def _state_file(state: Path) -> Path:
    return state / "localstore.json"


def daemon_status(state: Path = STATE_DIR) -> dict | None:
    """The running daemon's {pid, port, endpoint}, or None."""
    path = _state_file(state)
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    try:
        os.kill(info["pid"], 0)
    except OSError:
        return None
    return info


def daemon_start(port: int = DEFAULT_PORT, state: Path = STATE_DIR) -> dict:
    """Start moto_server in the background (idempotent); returns {pid, port, endpoint}."""
    running = daemon_status(state)
    if running:
        return running
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "localstore.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(_moto_command(port), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_ready(endpoint, proc)
    info = {"pid": proc.pid, "port": port, "endpoint": endpoint}
    _state_file(state).write_text(json.dumps(info))
    return info


def daemon_stop(state: Path = STATE_DIR) -> bool:
    info = daemon_status(state)
    _state_file(state).unlink(missing_ok=True)
    if not info:
        return False
    os.kill(info["pid"], signal.SIGTERM)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twostream.storage.local_s3")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--state", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    if args.action == "start":
        info = daemon_start(args.port, args.state)
        print(json.dumps({**info, **env_for(info["endpoint"])}))
    elif args.action == "stop":
        print("stopped" if daemon_stop(args.state) else "not running")
    else:
        info = daemon_status(args.state)
        print(json.dumps(info) if info else "not running")
        return 0 if info else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
