"""Hostile inputs through the batch job's Ray-free input path (planning, reading, decoding):
damaged and truncated tars, links and loops, colliding names, orphan and ambiguous sidecars,
names that are not UTF-8, special files, large compressible images, tiny images. Each case checks
one row per listed object (against a listing written out by hand), each error's reason, the
accounting, and that nothing crashes."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from twostream.batch import outputs, planning, stages
from twostream.core.config import LimitsConfig, load_config
from twostream.core.scoring import input_spec

SMALL = ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random"]


def _jpeg(size=(20, 24), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar_bytes(members) -> bytes:
    """members: (name, bytes) regular files, or (name, TarInfo-type, linkname) for the rest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member[0])
            if len(member) == 2:
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                info.type, info.linkname = member[1], member[2]
                tar.addfile(info)
    return buf.getvalue()


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar}


def _read(plan, max_bytes=10**9) -> list[dict]:
    return [planning.attach_identity(r) for u in planning.work_units(plan.shards, 2)
            for r in planning.read_unit(u, max_bytes)]


def _errors(rows) -> dict[str, str | None]:
    return {r["key"]: r["read_error"] for r in rows}


def test_damaged_tar_keeps_the_members_after_the_damage(tmp_path):
    good = _jpeg()
    data = _tar_bytes([("k1.jpg", good), ("k1.json", b'{"source": "s1"}'), ("k2.jpg", b"2" * 700),
                       ("k3.jpg", good), ("k4.jpg", b"4" * 3000)])
    where = _offsets(data)
    damaged = bytearray(data)
    damaged[where["k2.jpg"][0] : where["k2.jpg"][0] + 100] = b"\xff" * 100  # k2's header destroyed
    cut = where["k4.jpg"][1] + 1000  # k4's data cut off after 1000 of 3000 bytes
    (tmp_path / "s.tar").write_bytes(bytes(damaged[:cut]))
    plan = planning.plan_input(str(tmp_path))
    rows = _read(plan)
    k2_start, k3_header = where["k2.jpg"][0], where["k3.jpg"][0]
    assert _errors(rows) == {
        "s.tar#k1.jpg": None,  # (k1.json travels with it)
        f"s.tar##damaged@{k2_start}": f"damaged tar: bytes {k2_start}-{k3_header} hold no valid member header; "
                                      "any member stored there is lost",
        "s.tar#k3.jpg": None,  # after the damage, read as usual
        "s.tar#k4.jpg": "truncated tar member: 1000 of 3000 bytes present",
    }
    by_key = {r["key"]: r for r in rows}
    assert by_key["s.tar#k3.jpg"]["data"] == good and by_key["s.tar#k1.jpg"]["source"] == "s1"
    (shard,) = plan.shards
    # listed: k1.jpg, k1.json, the damaged region, k3.jpg, k4.jpg; k1.json is no row of its own
    assert (shard.listed, shard.sidecars, len(shard.entries)) == (5, 1, 4)


def test_tar_member_types_names_and_junk(tmp_path):
    bad_name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")  # Latin-1 bytes, not UTF-8
    (tmp_path / "t.tar").write_bytes(_tar_bytes([
        ("dir/", tarfile.DIRTYPE, ""),
        ("dir/a.jpg", _jpeg()),
        ("dir/up.jpg", tarfile.SYMTYPE, "../../etc/passwd"),
        ("dir/hard.jpg", tarfile.LNKTYPE, "dir/a.jpg"),
        ("dir/dev", tarfile.CHRTYPE, ""),
        ("dir/pipe", tarfile.FIFOTYPE, ""),
        (bad_name, b"x"),
    ]))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all " * 64)  # 1088 bytes
    (tmp_path / "empty.tar").write_bytes(b"")
    plan = planning.plan_input(str(tmp_path))
    errors = _errors(_read(plan))
    assert errors == {
        "t.tar#dir/a.jpg": None,
        "t.tar#dir/up.jpg": "symbolic link member (to '../../etc/passwd'): links are not followed",
        "t.tar#dir/hard.jpg": "hard link member (to 'dir/a.jpg'): links are not followed",
        "t.tar#dir/dev": "not a regular file (character device member)",
        "t.tar#dir/pipe": "not a regular file (FIFO member)",
        "t.tar#caf%E9.jpg": "file name is not valid UTF-8 (shown %XX-escaped): b'caf\\xe9.jpg'",
        "junk.tar##damaged@0": "damaged tar: bytes 0-1088 hold no valid member header; any member stored there is lost",
        "empty.tar": "empty file (0 bytes), not a tar",
    }
    t = next(s for s in plan.shards if s.uri.endswith("t.tar"))
    assert (t.listed, t.directories, len(t.entries)) == (7, 1, 6)  # the folder entry is no row


def test_links_loops_special_files_and_bad_names(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.jpg").write_bytes(_jpeg())
    (tmp_path / "outside.jpg").write_bytes(_jpeg())
    os.symlink(tmp_path / "outside.jpg", root / "escape.jpg")
    os.symlink("..", root / "sub" / "loop")  # a directory loop
    os.symlink("ok.jpg", root / "sub" / "inside.jpg")  # even inside the tree: not followed
    os.mkfifo(root / "pipe")
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as handle:
        handle.write(_jpeg())
    (root / "bad%FF.jpg").write_bytes(_jpeg())  # a real name equal to the escaped one: its % escaped
    plan = planning.plan_input(str(root))
    errors = _errors(_read(plan))
    assert errors == {
        "bad%25FF.jpg": None,
        "bad%FF.jpg": "file name is not valid UTF-8 (shown %XX-escaped): b'bad\\xff.jpg'",
        "escape.jpg": f"symbolic link to '{tmp_path / 'outside.jpg'}': links are not followed",
        "pipe": "not a regular file (FIFO)",
        "sub/inside.jpg": "symbolic link to 'ok.jpg': links are not followed",
        "sub/loop": "symbolic link to '..': links are not followed",
        "sub/ok.jpg": None,
    }
    assert plan.folders == 1 and plan.rows == 7


def test_colliding_names_and_sidecars(tmp_path):
    for name in ("a.jpg", "a.png", "a.b.jpg", "c.jpg", "d.jpg", "e.jpg", "noext"):
        (tmp_path / name).write_bytes(_jpeg())
    sidecars = {
        "a.json": {"source": "ambiguous"},  # a.jpg and a.png would both take it
        "a.b.jpg.json": {"source": "sb", "timestamp": "2024-01-01T00:00:00"},  # full-name sidecar
        "c.json": {"source": "sc", "image_id": "C"},  # stem sidecar of exactly one file
        "c.jpg.json": {"source": "full wins"},  # ... but c.jpg's full-name sidecar wins: c.json orphaned
        "orphan.json": {"source": "nobody"},
        "noext.json": {"source": "sn"},
    }
    for name, meta in sidecars.items():
        (tmp_path / name).write_text(json.dumps(meta))
    (tmp_path / "d.json").write_text("{not json")
    (tmp_path / "e.json").write_text(json.dumps({"timestamp": "yesterday"}))
    plan = planning.plan_input(str(tmp_path), files_per_shard=3)
    rows = _read(plan)
    assert len(rows) == len({r["key"] for r in rows}) == plan.rows
    errors = _errors(rows)
    orphan = "sidecar without its file (orphan): no file named like it without .json or .<ext>.json"
    assert errors == {
        "a.b.jpg": None, "a.jpg": None, "a.png": None,
        "a.json": "ambiguous sidecar: 2 files could take it (a.jpg, a.png); name it <file>.json",
        "c.jpg": None, "c.json": orphan, "orphan.json": orphan,
        "d.jpg": "sidecar d.json is not valid JSON: Expecting property name enclosed in double quotes: "
                 "line 1 column 2 (char 1)",
        "e.jpg": "sidecar: timestamp 'yesterday' is neither seconds nor ISO-8601",
        "noext": None,
    }
    by_key = {r["key"]: r for r in rows}
    assert (by_key["a.b.jpg"]["source"], by_key["a.b.jpg"]["timestamp"]) == ("sb", 1704067200.0)  # naive = UTC
    assert (by_key["c.jpg"]["source"], by_key["c.jpg"]["image_id"]) == ("full wins", "c.jpg")
    assert by_key["noext"]["source"] == "sn" and by_key["a.jpg"]["source"] == "unknown"
    # 7 files + 8 sidecars listed; a.b.jpg.json, c.jpg.json, noext.json, d.json, e.json travel with their file
    assert sum(s.listed for s in plan.shards) == 15 and sum(s.sidecars for s in plan.shards) == 5
    assert plan.rows == 10


def test_missing_and_empty_input(tmp_path):
    with pytest.raises(planning.InputError, match="input not found: .*nothing"):
        planning.plan_input(str(tmp_path / "nothing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(planning.InputError, match="input holds no files"):
        planning.plan_input(str(tmp_path / "empty"))


def test_accounting_compares_listed_objects_with_rows_written(tmp_path):
    for name in ("x.jpg", "y.jpg", "y.jpg.json"):
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / "t.tar").write_bytes(_tar_bytes([("m.jpg", b"1"), ("d/", tarfile.DIRTYPE, "")]))
    plan = planning.plan_input(str(tmp_path))
    tar, files = plan.shards
    summary = outputs.account(plan, {tar.shard_id: 1, files.shard_id: 2})
    assert summary == {"objects_listed": 5, "folders": 0, "tar_directories": 1, "sidecars_attached": 1,
                       "planned_errors": 0, "rows_expected": 3, "rows_written": 3}
    with pytest.raises(RuntimeError, match=f"{files.shard_id}: 1 rows for 2 objects"):
        outputs.account(plan, {tar.shard_id: 1, files.shard_id: 1})
    with pytest.raises(RuntimeError, match="shards not in the plan: \\['ghost'\\]"):
        outputs.account(plan, {tar.shard_id: 1, files.shard_id: 2, "ghost": 1})


def test_commit_refuses_duplicated_or_missing_rows(tmp_path):
    part = pa.table({name: pa.nulls(2, f.type) for name, f in zip(outputs.STAGING_SCHEMA.names,
                                                                 outputs.STAGING_SCHEMA)})
    part = part.set_column(part.schema.get_field_index("row"), "row", pa.array([0, 0], pa.int32()))
    with pytest.raises(RuntimeError, match=r"rows twice: \[0\], missing: \[1\]"):
        outputs.commit_shard(str(tmp_path), "s", [part], 2)
    assert not (tmp_path / "_progress").exists()


def test_large_compressible_images_travel_as_prepared_inputs(tmp_path):
    """6000x6000 flat PNGs (tiny files, 108 MB of pixels each): blocks bounded by prepared bytes,
    the prepared inputs equal the scoring path's, no full-resolution pixels in any block."""
    from twostream.core.preprocess import decode_image
    from twostream.core.scoring import prepare

    flat = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 90)).save(flat, "PNG")
    for k in range(3):
        (tmp_path / f"big{k}.png").write_bytes(flat.getvalue())
    (tmp_path / "tiny.png").write_bytes(_png(4, 4))
    cfg = load_config(None, SMALL)
    spec = input_spec(cfg, "high")
    high_bytes = 3 * spec.size[0] * spec.size[1] * 4  # one prepared H-Net input, float32
    low_bytes = 3 * 32 * 32 * 4
    cfg.job.decode_bytes_per_batch = high_bytes + low_bytes  # a block is full after one image
    (unit,) = planning.work_units(planning.plan_input(str(tmp_path)).shards, 256)
    blocks = list(stages.read_decode(unit, cfg, {kind: input_spec(cfg, kind) for kind in stages.KINDS}))
    assert [b.num_rows for b in blocks] == [1, 1, 1, 1]
    assert all("pixels" not in b.column_names for b in blocks)
    table = pa.concat_tables(blocks)
    assert table.column("key").to_pylist() == ["big0.png", "big1.png", "big2.png", "tiny.png"]
    assert table.column("error").to_pylist()[3] == "image too small: 4x4 px (limits.min_side = 8)"
    assert [len(v) for v in table.column("high_input").to_pylist()] == [high_bytes] * 3 + [0]
    assert [len(v) for v in table.column("low_input").to_pylist()] == [low_bytes] * 3 + [0]
    want = prepare(spec, [decode_image(flat.getvalue(), cfg.limits)]).numpy().tobytes()
    assert table.column("high_input")[0].as_py() == want


def test_a_large_jpeg_travels_as_the_librarys_reduced_prepared_inputs(tmp_path):
    """A 2048x1536 JPEG is decoded at 1/2 (limits.reduced_decode) in the decode task: its row
    reports 1024x768 and carries, bit for bit, the prepared inputs of the library's decode for
    both streams (what the Scorer and the endpoint feed the same models)."""
    from twostream.core.preprocess import decode_image
    from twostream.core.scoring import prepare, stream_specs

    rng = np.random.default_rng(0)
    pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((2048, 1536)))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    (tmp_path / "large.jpg").write_bytes(buf.getvalue())
    cfg = load_config(None, SMALL)
    (unit,) = planning.work_units(planning.plan_input(str(tmp_path)).shards, 256)
    specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
    table = pa.concat_tables(stages.read_decode(unit, cfg, specs))
    assert (table.column("height")[0].as_py(), table.column("width")[0].as_py()) == (768, 1024)
    image = decode_image(buf.getvalue(), cfg.limits, stream_specs(cfg))
    assert image.shape == (768, 1024, 3)
    for kind in stages.KINDS:
        assert table.column(f"{kind}_input")[0].as_py() == prepare(specs[kind], [image]).numpy().tobytes()


def test_read_decode_takes_geometry_and_never_imports_timm(tmp_path):
    """The decode tasks get each stream's input geometry and never build a model: in a fresh
    process, reading and preparing a unit imports neither timm nor torchvision (about 190 MB a
    process); resolving the H-Net's geometry there does (the control)."""
    import pickle
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(_jpeg((40, 48)))
    cfg = load_config(None, SMALL)
    (unit,) = planning.work_units(planning.plan_input(str(tmp_path / "in")).shards, 256)
    specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
    (tmp_path / "args.pkl").write_bytes(pickle.dumps((unit, cfg, specs)))
    code = (
        "import pickle, sys\n"
        "from twostream.batch import stages\n"
        f"unit, cfg, specs = pickle.loads(open({str(tmp_path / 'args.pkl')!r}, 'rb').read())\n"
        "rows = sum(b.num_rows for b in stages.read_decode(unit, cfg, specs))\n"
        "print(rows, [m for m in ('timm', 'torchvision') if m in sys.modules])\n"
        "from twostream.core.scoring import input_spec\n"
        "input_spec(cfg, 'high')\n"
        "print([m for m in ('timm', 'torchvision') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["1 []", "['timm', 'torchvision']"]


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_max_pixels_is_the_only_pixel_limit():
    """Pillow's own bomb limit (89M px warns, 179M px refuses) does not apply: ours does."""
    import warnings

    from twostream.core.preprocess import ImageDecodeError, check_image_header

    data = _png(10_000, 9_500, "1")  # 95M pixels, a 1-bit flat image: a small file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image_header(data, LimitsConfig(max_pixels=100_000_000))
    with pytest.raises(ImageDecodeError, match="too many pixels: 10000x9500 = 95000000 > limit 90000000"):
        check_image_header(data, LimitsConfig(max_pixels=90_000_000))


def test_spooled_plan_reads_the_same_rows_as_a_held_plan(tmp_path):
    """A tar of 2,600 members (more than two spool row groups) with sidecars, errors and a manifest,
    plus loose files: spooled, the plan holds no entries, and work units that straddle the row
    groups read exactly the rows (keys, row numbers, identities, errors) of the same plan held in
    memory, with the same fingerprint."""
    from twostream.batch import resume
    from twostream.batch.manifest import read_manifest

    root = tmp_path / "in"
    root.mkdir()
    members = []
    for i in range(2600):
        members.append((f"m{i:05d}.jpg", b"x" * (i % 7 + 1)))
        if i % 3 == 0:
            members.append((f"m{i:05d}.json", json.dumps({"source": f"s{i % 11}", "timestamp": i}).encode()))
    members.append(("link.jpg", tarfile.SYMTYPE, "m00001.jpg"))
    members.append(("orphan.json", b"{}"))
    (root / "big.tar").write_bytes(_tar_bytes(members))
    for i in range(5):
        (root / f"loose{i}.png").write_bytes(b"p" * (i + 1))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,key,source,timestamp\nID5,m00005.jpg,man,5\nIDL,loose2.png,man2,7\n")
    table, _ = read_manifest(str(manifest))
    cfg = load_config(None, SMALL)

    held = planning.plan_input(str(root), files_per_shard=2, manifest=table)
    spooled = planning.plan_input(str(root), files_per_shard=2, manifest=table, spool=str(tmp_path / "spool"))
    assert all(s.entries == [] and s.spool for s in spooled.shards)
    assert [(s.shard_id, s.rows, s.planned_errors, s.listed) for s in spooled.shards] == \
           [(s.shard_id, len(s.entries), sum(e.error is not None for e in s.entries), s.listed) for s in held.shards]
    assert spooled.rows == 2600 + 2 + 5
    assert spooled.match.summary() == held.match.summary() == {"rows": 2, "matched": 2, "unmatched": 0,
                                                               "unmatched_first": []}

    def rows(plan):
        return [planning.attach_identity(r) for u in planning.work_units(plan.shards, 300)
                for r in planning.read_unit(u, 10**6)]

    got, want = rows(spooled), rows(held)
    assert len(got) == len(want) == 2607
    assert got == want
    by_key = {r["key"]: r for r in got}
    assert (by_key["big.tar#m00005.jpg"]["image_id"], by_key["big.tar#m00005.jpg"]["source"]) == ("ID5", "man")
    assert (by_key["big.tar#m00003.jpg"]["source"], by_key["big.tar#m00003.jpg"]["timestamp"]) == ("s3", 3.0)
    assert by_key["big.tar#link.jpg"]["read_error"].startswith("symbolic link member")
    assert by_key["big.tar#orphan.json"]["read_error"].startswith("sidecar without its file")
    assert [r["row"] for r in got if r["key"].startswith("big.tar#m")] == list(range(2600))
    assert resume.fingerprint(spooled, str(root), None, cfg) == resume.fingerprint(held, str(root), None, cfg)


def _stages(folder, cfg) -> tuple[list[pa.Table], pa.Table]:
    """The phase-1 stages in one process: (read/decode blocks, staging rows in row order)."""
    (unit,) = planning.work_units(planning.plan_input(str(folder)).shards, 256)
    blocks = list(stages.read_decode(unit, cfg, {kind: input_spec(cfg, kind) for kind in stages.KINDS}))
    table = pa.concat_tables(blocks)
    for kind in stages.KINDS:
        table = stages.StreamStage(cfg, kind)(table)
    staging = stages.compare(table, cfg)
    return blocks, staging.take(pa.compute.sort_indices(staging.column("row")))


def _decoder_files(folder) -> dict[str, bytes]:
    """JPEGs the device takes (plain, rotated by EXIF, gray), ones it leaves to Pillow (CMYK, PNG),
    and failures (truncated, tiny, garbage), written to ``folder``."""
    def saved(mode="RGB", fmt="JPEG", size=(40, 52), orientation=None):
        buf, options = io.BytesIO(), {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            options["exif"] = exif.tobytes()
        Image.open(io.BytesIO(_jpeg(size, seed=len(files)))).convert(mode).save(buf, fmt, **options)
        return buf.getvalue()

    files: dict[str, bytes] = {}
    files["a-plain.jpg"] = saved()
    files["b-rotated.jpg"] = saved(orientation=6)
    files["c-gray.jpg"] = saved("L")
    files["d-cmyk.jpg"] = saved("CMYK")
    files["e-photo.png"] = saved(fmt="PNG")
    files["f-truncated.jpg"] = files["a-plain.jpg"][: len(files["a-plain.jpg"]) * 2 // 3]  # cut in its scan
    files["g-tiny.jpg"] = saved(size=(4, 30))
    files["h-garbage.jpg"] = b"\xff\xd8\xff\xe0" + bytes(100)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_jpegs_decoded_by_the_high_stream_give_the_same_rows(tmp_path):
    """job.decode=device (the high stream's actor decodes JPEGs, here with the CPU device's
    libjpeg-turbo, Pillow's own): the same staging rows, errors included, as job.decode=cpu; JPEGs
    travel as their bytes, other formats and CMYK as prepared inputs."""
    files = _decoder_files(tmp_path)
    _, want = _stages(tmp_path, load_config(None, SMALL + ["job.decode=cpu"]))
    blocks, got = _stages(tmp_path, load_config(None, SMALL + ["job.decode=device"]))
    read = pa.concat_tables(blocks)
    assert read.column("key").to_pylist() == sorted(files)
    encoded = [len(v) > 0 for v in read.column("encoded").to_pylist()]
    assert encoded == [True, True, True, False, False, True, False, False]  # the tiny and garbage fail at the header
    assert [len(v) for v, e in zip(read.column("high_input").to_pylist(), encoded) if e] == [0] * 4
    assert read.column("height").to_pylist()[1] == 52  # orientation 6 swaps the axes
    timings = [n for n in want.column_names if n.startswith("t_")]
    assert got.drop_columns(timings).to_pylist() == want.drop_columns(timings).to_pylist()
    errors = dict(zip(want.column("key").to_pylist(), want.column("error").to_pylist()))
    assert [k for k, e in errors.items() if e] == ["f-truncated.jpg", "g-tiny.jpg", "h-garbage.jpg"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.sh runs this)")
def test_jpegs_decoded_on_cuda_give_the_cpu_rows(tmp_path):
    """Both streams on CUDA, JPEGs through nvJPEG: the same rows, errors and sizes as Pillow and
    the CPU, probabilities within nvJPEG's and the GPU's rounding."""
    _decoder_files(tmp_path)
    _, want = _stages(tmp_path, load_config(None, SMALL + ["job.decode=cpu", "high.device=cpu", "low.device=cpu"]))
    _, got = _stages(tmp_path, load_config(None, SMALL + ["job.decode=device", "high.device=cuda", "low.device=cuda"]))
    for name in ("key", "error", "height", "width"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    for name in ("high_prob", "low_prob"):
        for g, w in zip(got.column(name).to_pylist(), want.column(name).to_pylist()):
            if w is not None:
                np.testing.assert_allclose(g, w, atol=0.02)


def test_small_images_travel_as_pixels_and_score_as_their_prepared_inputs(tmp_path):
    """An image with fewer pixel bytes than the H-Net's prepared input travels as its decoded
    pixels (``high_pixels``), a larger one as its prepared input; the high actor's top-k over
    those rows equals its top-k over every row's prepared input computed here from
    ``decode_image`` + ``prepare`` (the library's path), bit for bit."""
    from twostream.core.preprocess import decode_image
    from twostream.core.scoring import prepare

    cfg = load_config(None, SMALL)
    spec = input_spec(cfg, "high")
    high_bytes = 3 * spec.size[0] * spec.size[1] * 4
    side = int((high_bytes / 3) ** 0.5) + 8  # a square image just over the threshold
    tall = (260, int(high_bytes / 3 / 260 * 0.9))  # under it, over 256 rows: prepared strip by strip
    rgba = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (30, 41, 4), dtype=np.uint8), "RGBA").save(rgba, "PNG")
    files = {"a.jpg": _jpeg((20, 24), 1), "b.jpg": _jpeg(tall, 2), "c.jpg": _jpeg((side, side), 3),
             "d.png": rgba.getvalue(), "e.jpg": b"garbage"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (unit,) = planning.work_units(planning.plan_input(str(tmp_path)).shards, 256)
    table = pa.concat_tables(stages.read_decode(unit, cfg, {kind: input_spec(cfg, kind) for kind in stages.KINDS}))
    keys = table.column("key").to_pylist()
    assert keys == sorted(files)
    decoded = {k: decode_image(files[k], cfg.limits) for k in keys[:4]}
    assert table.column("high_pixels").to_pylist() == [True, True, False, True, False]
    want = {k: prepare(spec, [image]).numpy().tobytes() for k, image in decoded.items()}
    for key, sent, pixels in zip(keys[:4], table.column("high_input").to_pylist(), table.column("high_pixels").to_pylist()):
        assert sent == (decoded[key].tobytes() if pixels else want[key]), key
    assert table.column("high_input")[4].as_py() == b""
    as_prepared = table.set_column(table.schema.get_field_index("high_input"), "high_input",
                                   pa.array([want.get(k, b"") for k in keys], pa.large_binary()))
    as_prepared = as_prepared.set_column(as_prepared.schema.get_field_index("high_pixels"), "high_pixels",
                                         pa.array([False] * len(keys)))
    stage = stages.StreamStage(cfg, "high")
    got, reference = stage(table), stage(as_prepared)
    for name in ("high_idx", "high_prob"):
        assert got.column(name).to_pylist() == reference.column(name).to_pylist(), name
    assert "high_pixels" not in got.column_names and "high_input" not in got.column_names
