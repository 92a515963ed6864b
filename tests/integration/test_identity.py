"""One scoring core: the same encoded images through the library's Scorer, the batch job
(``python -m jobs.score``) and the Serve app (``twostream serve``, over real HTTP) give the same
rows: verdict, label, ImageNet index, agreement (to 1e-6) and both top-k, with the default models.

Real photographs (scikit-image's chelsea, a cat: in scope; astronaut, coffee, rocket: out of
scope), chelsea mirrored as PNG, chelsea upscaled to 1804x1200 (a JPEG decoded reduced, at 1/2),
and a JPEG cut off after its header (corrupt)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import wait_healthy
from PIL import Image

pytestmark = pytest.mark.ray

requests = pytest.importorskip("requests")
skdata = pytest.importorskip("skimage.data")

REPO = Path(__file__).resolve().parents[2]


def encoded_images() -> dict[str, bytes]:
    def encode(pixels: np.ndarray, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        return buf.getvalue()

    files = {f"{name}.jpg": encode(getattr(skdata, name)(), "JPEG") for name in ("chelsea", "astronaut", "coffee", "rocket")}
    files["chelsea_mirror.png"] = encode(np.ascontiguousarray(skdata.chelsea()[:, ::-1]), "PNG")
    # decoded at 1/2 (limits.reduced_decode): 600 rows still hold 2x the H-Net's 256
    large = Image.fromarray(skdata.chelsea()).resize((1804, 1200), Image.BICUBIC)
    files["chelsea_large.jpg"] = encode(np.asarray(large), "JPEG")
    files["corrupt.jpg"] = files["coffee.jpg"][:2000]  # header intact, pixels cut off
    return files


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("identity") / "in"
    folder.mkdir()
    files = encoded_images()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, files


@pytest.fixture(scope="module")
def library_rows(images) -> dict[str, dict]:
    from twostream.core.scoring import Scorer

    _, files = images
    results = Scorer().score_batch(list(files.values()), ids=list(files))
    return {r.image_id: r.to_dict() for r in results}


@pytest.fixture(scope="module")
def batch_rows(images, tmp_path_factory) -> dict[str, dict]:
    folder, _ = images
    out = tmp_path_factory.mktemp("identity-out")
    done = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--input", str(folder), "--output", str(out), "--no-progress"],
        cwd=REPO, env=child_env(), timeout=600, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    table = pq.read_table(out / "images")
    return {row["key"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def serve_answers(images, tmp_path_factory) -> dict[str, tuple[int, dict]]:
    _, files = images
    port = free_port()
    redis_dir = tmp_path_factory.mktemp("identity-redis")
    # to a file, not a pipe: a pipe nobody reads while serving fills up and blocks the server
    log = redis_dir.parent / "identity-serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twostream.cli", "serve", "--port", str(port), "--num-cpus", "2",
             "--set", f"serve.redis_dir={redis_dir}", "--set", "serve.drain_s=1",  # stops in 1 s, not 30
             "--set", "serve.answer_detail=full"],  # the rows are compared with the scores
            cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        answers = {}
        for name, data in files.items():
            kind = "image/png" if name.endswith(".png") else "image/jpeg"
            reply = requests.post(base + "/v1/classify", data=data, timeout=120,
                                  headers={"Content-Type": kind, "X-Source-Id": f"identity-{name}"})
            answers[name] = (reply.status_code, reply.json())
        return answers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_photographs_cover_each_kind_of_row(library_rows) -> None:
    verdicts = {name: row["verdict"] for name, row in library_rows.items()}
    assert verdicts["chelsea.jpg"] == "accepted" and library_rows["chelsea.jpg"]["label"] == "cat"
    assert verdicts["astronaut.jpg"] == "adversarial"  # out of scope: no CIFAR-10 class agrees
    assert verdicts["corrupt.jpg"] == "error" and library_rows["corrupt.jpg"]["error"]


def test_a_large_jpeg_is_scored_from_its_reduced_decode(library_rows) -> None:
    """1804x1200 is decoded at 902x600 (the size scored and reported), and still read as a cat."""
    row = library_rows["chelsea_large.jpg"]
    assert (row["width"], row["height"]) == (902, 600)
    assert (row["verdict"], row["label"]) == ("accepted", "cat")


def test_batch_job_rows_equal_the_library(library_rows, batch_rows) -> None:
    assert set(batch_rows) == set(library_rows)
    for name, lib in library_rows.items():
        row = batch_rows[name]
        assert row["verdict"] == lib["verdict"], name
        assert row["label"] == lib["label"], name
        assert row["imagenet_index"] == lib["imagenet_index"], name
        assert row["agreement"] == pytest.approx(lib["agreement"], abs=1e-6), name
        assert row["error"] == lib["error"], name
        if lib["verdict"] == "error":
            assert row["high_idx"] is None and row["low_idx"] is None
            continue
        assert (row["width"], row["height"]) == (lib["width"], lib["height"])
        assert row["high_idx"] == lib["high_idx"] and row["low_idx"] == lib["low_idx"], name
        assert row["high_labels"] == lib["high_labels"] and row["low_labels"] == lib["low_labels"], name
        np.testing.assert_allclose(row["high_prob"], lib["high_prob"], atol=1e-6)
        np.testing.assert_allclose(row["low_prob"], lib["low_prob"], atol=1e-6)


def test_serve_answers_equal_the_library(library_rows, serve_answers) -> None:
    for name, lib in library_rows.items():
        status, body = serve_answers[name]
        if lib["verdict"] == "error":
            assert status == 422, body
            assert lib["error"] in json.dumps(body), body  # the same reason as the library's
            continue
        assert status == 200, body
        assert body["verdict"] == lib["verdict"], name
        assert body["label"] == lib["label"], name
        assert body["imagenet_index"] == lib["imagenet_index"], name
        assert body["agreement"] == pytest.approx(lib["agreement"], abs=1e-6), name
        assert (body["width"], body["height"]) == (lib["width"], lib["height"])
        assert [e["index"] for e in body["high_topk"]] == lib["high_idx"], name
        assert [e["cifar10"] for e in body["high_topk"]] == lib["high_labels"], name
        assert [e["index"] for e in body["low_topk"]] == lib["low_idx"], name
        np.testing.assert_allclose([e["prob"] for e in body["high_topk"]], lib["high_prob"], atol=1e-6)
        np.testing.assert_allclose([e["prob"] for e in body["low_topk"]], lib["low_prob"], atol=1e-6)
