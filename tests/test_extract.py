"""Tests for pipeline.extract (plan, worker, runners, driver) and jobs/extract.py: planning, bad input as rows,
crash-resume and incremental reruns without duplicates or losses, fail-fast checks, secrets, and end to end on a local
Ray instance against a temp dir and S3 (moto on loopback), compared with a direct in-process RegionModel call."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import ConfigError, ExtractConfig, ModelConfig, config_hash, from_dict
from pipeline.extract import driver, runners, worker
from pipeline.extract.plan import DecodedShard, Shard, plan_shards
from pipeline.extract.runners import LocalRunner, RayRunner
from pipeline.io import images as imgs
from pipeline.io import listing, storage
from pipeline.schema import VECTOR_COLUMNS, column_to_numpy, images_schema, regions_schema
from pipeline.store import feature_store as fstore

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "caltech8"
SMALL = {"max_side": 64, "regions": 3}
# Faces and car_side images all decode to 64x42 at max_side=64: batches need no padding, so a batched run must equal
# the model called on one image at a time.
SAME_SIZE = [f"Faces/image_{i:04d}.jpg" for i in range(1, 5)] + [f"car_side/image_{i:04d}.jpg" for i in range(1, 5)]
SUMMARY_KEYS = {"shards", "images", "ok", "errors", "statuses", "regions", "elapsed_s", "images_per_s",
                "skipped_already_done", "deleted", "planned_shards"}
SECRET = "s3cr3t-" + uuid.uuid4().hex  # a storage credential that must never be written or logged


# ---- helpers -------------------------------------------------------------------------------------------------------


def _cfg(inp: Any, out: Any, **kw: Any) -> ExtractConfig:
    values = {"input": str(inp), "output": str(out), **SMALL, "shard_size": 3, "batch_size": 3, "threads": 1, **kw}
    return from_dict(ExtractConfig, values)


def _copy(ids: list[str], root: Path) -> Path:
    for i in ids:
        (root / i).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE / i, root / i)
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Eight sample photographs of one decoded size under class folders."""
    return _copy(SAME_SIZE, tmp_path / "in")


@pytest.fixture(scope="module")
def model():
    """The model the job builds, built here in-process (the reference for the job's output)."""
    from pipeline.model.region_model import RegionModel

    return RegionModel(ModelConfig(**SMALL), device="cpu", threads=1)


def _reference(model: Any, files: dict[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    """The model called directly on each image (batch of one), keyed by image id."""
    out = {}
    for image_id, data in files.items():
        d = imgs.decode_image(data, max_side=SMALL["max_side"])
        assert d.ok, (image_id, d.error)
        out[image_id] = {**model([d.array], [(d.width, d.height)])[0], "width": d.width, "height": d.height}
    return out


def _files(root: Path, ids: list[str]) -> dict[str, bytes]:
    return {i: (root / i).read_bytes() for i in ids}


def _assert_matches(output: str, ref: dict[str, dict[str, np.ndarray]], so: dict | None = None) -> None:
    """The Parquet read back equals the reference model outputs (1e-4), each image exactly once."""
    images = fstore.read_live_table(output, "images", so)
    ids = sorted(ref)
    assert images.column("image_id").to_pylist() == ids
    assert set(images.column("status").to_pylist()) == {"ok"}
    assert images.column("width").to_pylist() == [ref[i]["width"] for i in ids]
    assert images.column("height").to_pylist() == [ref[i]["height"] for i in ids]
    assert set(images.column("config_hash").to_pylist()) == {config_hash(ModelConfig(**SMALL))}
    assert set(images.column("model").to_pylist()) == {"mobilenet_v2/activation"}
    for k in VECTOR_COLUMNS:
        got = column_to_numpy(images, k)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.stack([ref[i][k] for i in ids]), rtol=1e-4, atol=1e-4, err_msg=k)
    regions = fstore.read_live_table(output, "regions", so)
    want_pairs = [(i, r) for i in ids for r in range(len(ref[i]["scores"]))]
    assert list(zip(regions.column("image_id").to_pylist(), regions.column("rank").to_pylist())) == want_pairs
    for col, key in (("box", "boxes"), ("score", "scores"), ("descriptor", "regions")):
        got = column_to_numpy(regions, col) if col != "score" else regions.column(col).to_numpy()
        want = np.concatenate([ref[i][key] for i in ids])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=col)


def _assert_exactly_once(output: str, ids: list[str], so: dict | None = None, regions_per_ok: int = 3) -> pa.Table:
    images = fstore.read_live_table(output, "images", so)
    assert images.column("image_id").to_pylist() == sorted(ids)
    regions = fstore.read_live_table(output, "regions", so, columns=["rank"])
    pairs = list(zip(regions.column("image_id").to_pylist(), regions.column("rank").to_pylist()))
    assert len(pairs) == len(set(pairs))
    ok = [i for i, s in zip(images.column("image_id").to_pylist(), images.column("status").to_pylist()) if s == "ok"]
    assert sorted(pairs) == [(i, r) for i in sorted(ok) for r in range(regions_per_ok)]
    return images


def _processed_ids(output: str, generation: int, so: dict | None = None) -> list[str]:
    return sorted(i for m in fstore.read_done_markers(output, so) if m["generation"] == generation
                  and m["kind"] == "data"
                  for i in fstore.read_marker_ids(fstore.marker_ids(m), so).column("image_id").to_pylist())


class FakeModel:
    """Stands in for RegionModel in pure tests: records its batches, returns per-image constants."""

    name = "fake/model"
    config_hash = "0123456789ab"
    region_dim = 4

    def __init__(self, k: int = 2) -> None:
        self.k = k
        self.batches: list[list[tuple[int, ...]]] = []
        self.dims = {c: 3 for c in VECTOR_COLUMNS} | {"local": 4}

    def __call__(self, images, sizes):
        self.batches.append([im.shape for im in images])
        out = []
        for im, (w, h) in zip(images, sizes):
            v = float(im.shape[0])
            rec = {k: np.full(self.dims[k], v, np.float32) for k in VECTOR_COLUMNS}
            rec["boxes"] = np.tile(np.array([0, 0, w, h], np.float32), (self.k, 1))
            rec["scores"] = np.linspace(1, 0, self.k).astype(np.float32)
            rec["regions"] = np.full((self.k, 4), v, np.float32)
            out.append(rec)
        return out


def _records(n: int, fp: str = "f") -> list[listing.ImageRecord]:
    return [listing.ImageRecord(f"img{i:02d}", f"file:///x/img{i:02d}", fp) for i in range(n)]


def _data_marker(sid: str, recs: list[listing.ImageRecord], retry: tuple[str, ...] = ()) -> dict:
    return {"shard": sid, "generation": int(sid[1:6]), "kind": "data",
            "images": [[r.image_id, r.fingerprint] for r in recs], "retry": list(retry)}


# ---- pure parts ----------------------------------------------------------------------------------------------------


def test_plan_shards_fresh_resumed_and_incremental():
    recs = _records(7)
    plan = plan_shards(recs, [], shard_size=3)
    assert plan.generation == 1 and plan.skipped == 0 and plan.deleted == []
    assert [s.shard_id for s in plan.shards] == ["g00001-000000", "g00001-000001", "g00001-000002"]
    assert [len(s.records) for s in plan.shards] == [3, 3, 1]
    # Resume: only the shards without a done-marker are redone, as a new generation.
    markers = [_data_marker("g00001-000000", recs[:3])]
    plan = plan_shards(recs, markers, shard_size=3)
    assert plan.generation == 2 and plan.skipped == 3
    assert [r.image_id for s in plan.shards for r in s.records] == [r.image_id for r in recs[3:]]
    # Incremental: changed fingerprints, new ids, vanished ids, and transient read errors.
    markers = [_data_marker("g00001-000000", recs[:4], retry=("img03",)), _data_marker("g00001-000001", recs[4:7])]
    now = [*recs[:1], listing.ImageRecord("img01", recs[1].uri, "changed"), *recs[2:5], *_records(9)[7:]]
    plan = plan_shards(now, markers, shard_size=10)
    assert [r.image_id for s in plan.shards for r in s.records] == ["img01", "img03", "img07", "img08"]
    assert plan.deleted == ["img05", "img06"] and plan.skipped == 3
    assert plan_shards(recs, [_data_marker("g00001-000000", recs)], 3).shards == []


@pytest.mark.parametrize("float16", [False, True])
def test_run_model_on_shard_batches_by_size_and_keeps_record_order(float16):
    shapes = [(20, 30), (10, 30), None, (20, 30), (5, 30)]  # None: a failed decode
    dec = [imgs.Decoded(np.zeros((*s, 3), np.uint8), s[1] * 2, s[0] * 2, "ok", "") if s else
           imgs.failed(imgs.TRUNCATED, "cut short") for s in shapes]
    shard = Shard("g00001-000000", 1, tuple(_records(5)))
    m = FakeModel()
    itab, rtab, stats = worker.run_model_on_shard(m, DecodedShard(shard, dec, 0.5), batch_size=2,
                                                   float16=float16)
    assert m.batches == [[(5, 30, 3), (10, 30, 3)], [(20, 30, 3), (20, 30, 3)]]  # sorted by size, then cut
    assert itab.schema == images_schema(m.dims, float16) and rtab.schema == regions_schema(4, float16)
    assert itab.column("image_id").to_pylist() == [r.image_id for r in shard.records]
    assert itab.column("status").to_pylist() == ["ok", "ok", "truncated", "ok", "ok"]
    assert itab.column("error").to_pylist() == [None, None, "cut short", None, None]
    assert itab.column("n_regions").to_pylist() == [2, 2, 0, 2, 2]
    assert itab.column("crow").null_count == 1
    ok = itab.filter(pa.compute.equal(itab.column("status"), "ok"))
    np.testing.assert_array_equal(column_to_numpy(ok, "crow")[:, 0], [20, 10, 20, 5])
    assert rtab.column("image_id").to_pylist() == [i for i in ("img00", "img01", "img03", "img04") for _ in (0, 1)]
    assert rtab.column("rank").to_pylist() == [0, 1] * 4
    np.testing.assert_array_equal(column_to_numpy(rtab, "box")[2], [0, 0, 60, 20])  # original pixels
    assert stats["images"] == 5 and stats["ok"] == 4 and stats["statuses"] == {"ok": 4, "truncated": 1}
    assert stats["regions"] == 8 and stats["read_s"] == 0.5


def test_plan_batches_by_aspect_ratio_and_buckets():
    """Batches hold one orientation, widest first; with buckets each batch is padded to its bucket's size."""
    from functools import partial

    from pipeline.model.transform import padded_size

    shapes = [(448, 100), (300, 448), (448, 448), (290, 448), (448, 300), (100, 448), (448, 310)]
    batches = worker.plan_batches(shapes, 3)
    assert batches == [([5, 3, 1], None), ([2, 6, 4], None), ([0], None)]
    bucket = partial(padded_size, max_side=448, stride=32, step=64)
    assert [size for _, size in worker.plan_batches(shapes, 3, bucket)] == [(320, 448), (448, 448), (448, 128)]
    assert padded_size(300, 448, 448, 32, 64) == (320, 448) and padded_size(300, 448, 448, 32, 32) == (320, 448)
    assert padded_size(33, 65, 80, 32, 64) == (64, 96)  # capped at max_side rounded up to the stride
    # Waste: padded pixels no image fills, from a hand count.
    waste = worker.padding_waste([(32, 64), (16, 64)], [([0, 1], None)], 32)
    assert waste == 1 - (32 * 64 + 16 * 64) / (2 * 32 * 64)
    assert worker.padding_waste([(32, 64)], [([0], (64, 64))], 32) == 0.5


def test_gpu_sampler_averages_nvml_readings_and_records_why_it_could_not(monkeypatch):
    """On a CUDA device the sampler averages torch.cuda.utilization; without NVML bindings (nvidia-ml-py missing on a
    GPU machine: torch raises ModuleNotFoundError) the shard still runs and its marker says why; on CPU: nothing."""
    import time as _time
    import types

    import torch

    cuda = types.SimpleNamespace(type="cuda")
    readings = iter([40.0, 60.0] + [50.0] * 1000)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: next(readings))
    with worker.GpuSampler(cuda, every_s=0.001) as s:
        while len(s.samples) < 3:
            _time.sleep(0.001)
    st = s.stats()
    assert st["gpu_util_samples"] == len(s.samples) >= 3 and "gpu_util_error" not in st
    assert st["gpu_util_mean"] == round(sum(s.samples) / len(s.samples), 1) and s.samples[:2] == [40.0, 60.0]

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    with worker.GpuSampler(cuda, every_s=0.001) as s:
        deadline = _time.monotonic() + 30
        while not s.error and _time.monotonic() < deadline:  # the shard's work, while the thread tries once
            _time.sleep(0.001)
    assert s.stats() == {"gpu_util_mean": None, "gpu_util_samples": 0,
                         "gpu_util_error": "ModuleNotFoundError: pynvml does not seem to be installed or it can't be "
                                           "imported."}
    with worker.GpuSampler(torch.device("cpu")) as s:
        pass
    assert s.stats() == {}


def test_actor_layout_shares_the_cpus_without_oversubscribing():
    def layout(cpus: float, gpus: float, **kw: Any) -> tuple[int, float, int, bool]:
        cfg = from_dict(ExtractConfig, {"output": "/tmp/unused", **kw})
        lay = runners.actor_layout(cfg, cpus, gpus)
        return lay.actors, lay.num_gpus, lay.threads, lay.decode_in_actor

    # CPU-only: one single-threaded replica per CPU, each decoding its own shards (no CPU is left for decode tasks)
    assert layout(2, 0) == (2, 0.0, 1, True)
    assert layout(16, 0) == (16, 0.0, 1, True)
    assert layout(16, 0, actor_cpus=4) == (4, 0.0, 4, True)
    assert layout(3, 0, actor_cpus=2) == (1, 0.0, 3, True)  # the cores are shared out, none left idle
    assert layout(16, 0, threads=3) == (5, 0.0, 3, True)  # explicit threads: actors counted at 3 CPUs each
    assert layout(16, 0, num_actors=4) == (4, 0.0, 4, True)  # four actors: a quarter each, not 4 x 16 threads
    assert layout(2, 0, num_actors=8) == (8, 0.0, 1, True)
    assert layout(16, 0, num_actors=2, threads=3) == (2, 0.0, 3, True)  # explicit values win
    assert layout(2, 0, actor_cpus=0) == (2, 0.0, 1, True)
    # GPUs: one actor per GPU with its reserved CPUs as threads (the cores are left to the decode tasks)
    assert layout(96, 8) == (8, 1.0, 1, False)
    assert layout(96, 8, num_gpus=0.5, actor_cpus=2.5) == (16, 0.5, 3, False)
    assert layout(96, 8, num_gpus=0) == (96, 0.0, 1, True)  # GPUs present but not asked for: a CPU run
    assert layout(96, 8, num_actors=2, threads=6) == (2, 1.0, 6, False)


def test_decode_shard_turns_fetch_failures_into_retryable_rows(tmp_path: Path):
    good = tmp_path / "a.jpg"
    shutil.copy(SAMPLE / SAME_SIZE[0], good)
    recs = (listing.ImageRecord("a.jpg", "file://" + str(good), "1"),
            listing.ImageRecord("gone.jpg", "file://" + str(tmp_path / "gone.jpg"), "1"))
    d = worker.decode_shard(Shard("g00001-000000", 1, recs), 64, 10**8, None)
    assert [x.status for x in d.decoded] == ["ok", imgs.READ_ERROR]
    assert d.decoded[0].array.shape == (42, 64, 3)
    assert "FileNotFoundError" in d.decoded[1].error and d.read_s >= 0


# ---- bad input: every file ends as a row -------------------------------------------------------------------------


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _jpeg(im: Image.Image, **kw: Any) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def _forged_png_bomb(w: int, h: int) -> bytes:
    """A 69-byte PNG whose header declares w x h pixels."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", w, h)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _bad_inputs() -> dict[str, tuple[bytes, str, tuple[int, int] | None]]:
    """file name -> (bytes, expected status, expected (width, height) or None)."""
    good = (SAMPLE / SAME_SIZE[0]).read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    pal = Image.new("P", (30, 20))
    pal.putpalette([i % 256 for i in range(768)])
    pal.putdata([i % 7 for i in range(600)])
    return {
        "good.jpg": (good, "ok", (256, 169)),
        "zero_bytes.jpg": (b"", "empty", None),
        "truncated.jpg": (good[: len(good) // 2], "truncated", (256, 169)),
        "not_an_image.jpg": (b"this is a text file, not a picture\n" * 20, "not_image", None),
        "cmyk.jpg": (_jpeg(Image.new("CMYK", (40, 30), (0, 128, 128, 0))), "ok", (40, 30)),
        "gray16.png": (_png(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)), "ok", (30, 20)),
        "palette.png": (_png(pal), "ok", (30, 20)),
        "alpha.png": (_png(Image.new("RGBA", (30, 20), (255, 0, 0, 128))), "ok", (30, 20)),
        "exif_rotated.jpg": (_jpeg(Image.new("RGB", (40, 20), (0, 200, 0)), exif=exif.tobytes()), "ok", (20, 40)),
        "one_pixel.png": (_png(Image.new("RGB", (1, 1), (9, 9, 9))), "ok", (1, 1)),
        "bomb_header.png": (_forged_png_bomb(100_000, 100_000), "too_large", None),
        "bomb_pixels.png": (_png(Image.new("L", (1200, 1000))), "too_large", (1200, 1000)),  # > max_pixels below
    }


def test_bad_inputs_each_end_as_a_row_and_the_job_finishes(tmp_path: Path, caplog):
    cases = _bad_inputs()
    root = tmp_path / "in"
    root.mkdir()
    for name, (data, _, _) in cases.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    manifest = driver.run(_cfg(root, out, shard_size=5, batch_size=4, max_pixels=1_000_000), LocalRunner())

    images = _assert_exactly_once(str(out), list(cases))
    rows = {r["image_id"]: r for r in images.select(["image_id", "status", "error", "width", "height",
                                                     "n_regions"]).to_pylist()}
    for name, (_, status, size) in cases.items():
        r = rows[name]
        assert r["status"] == status, (name, r)
        if status == "ok":
            assert r["error"] is None and r["n_regions"] == 3
        else:
            assert r["error"] and r["n_regions"] == 0, (name, r)
        if size is not None:
            assert (r["width"], r["height"]) == size, name
    assert "zero bytes" in rows["zero_bytes.jpg"]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"]
    assert "not a recognised image" in rows["not_an_image.jpg"]["error"]
    assert "decompression-bomb" in rows["bomb_header.png"]["error"]
    assert "max_pixels=1000000" in rows["bomb_pixels.png"]["error"]

    ok = images.filter(pa.compute.equal(images.column("status"), "ok"))
    for k in VECTOR_COLUMNS:
        assert np.isfinite(column_to_numpy(ok, k)).all()
    bad = images.filter(pa.compute.not_equal(images.column("status"), "ok"))
    assert all(bad.column(k).null_count == bad.num_rows for k in VECTOR_COLUMNS)
    regions = fstore.read_live_table(str(out), "regions")
    sizes = {i: (rows[i]["width"], rows[i]["height"]) for i in rows}
    for image_id, box in zip(regions.column("image_id").to_pylist(), column_to_numpy(regions, "box")):
        w, h = sizes[image_id]
        assert 0 <= box[0] < box[2] <= w + 1e-3 and 0 <= box[1] < box[3] <= h + 1e-3, (image_id, box)

    run = manifest["run"]
    assert SUMMARY_KEYS <= set(run)
    assert run["images"] == len(cases) and run["ok"] == 7 and run["errors"] == 5 and run["regions"] == 21
    assert run["statuses"] == {"ok": 7, "empty": 1, "truncated": 1, "not_image": 1, "too_large": 2}
    assert run["images_per_s"] > 0 and run["shards"] == run["planned_shards"] == 3
    assert storage.read_json(str(out / "manifest.json")) == json.loads(json.dumps(manifest))
    assert "shard g00001-000000: 5 images" in caplog.text  # per-shard progress lines


def test_read_errors_are_rows_now_and_redone_on_the_next_run(tmp_path: Path):
    root = _copy(SAME_SIZE[:2], tmp_path / "in")
    (root / "list.csv").write_text("path,label\n" + "".join(f"{i},x\n" for i in [*SAME_SIZE[:2], "later.jpg"]))
    out = tmp_path / "out"
    first = driver.run(_cfg(root / "list.csv", out), LocalRunner())
    assert first["run"]["statuses"] == {"ok": 2, imgs.READ_ERROR: 1}
    shard = storage.read_parquet(fstore.shard_paths(str(out), "g00001-000000")["images"])
    row = shard.filter(pa.compute.equal(shard.column("image_id"), "later.jpg")).to_pylist()[0]
    assert row["status"] == imgs.READ_ERROR and "FileNotFoundError" in row["error"]
    assert fstore.read_done_markers(str(out))[0]["retry"] == ["later.jpg"]
    shutil.copy(SAMPLE / SAME_SIZE[2], root / "later.jpg")
    second = driver.run(_cfg(root / "list.csv", out), LocalRunner())
    assert second["run"]["images"] == 1 and second["run"]["ok"] == 1 and second["run"]["skipped_already_done"] == 2
    _assert_exactly_once(str(out), [*SAME_SIZE[:2], "later.jpg"])


# ---- resumable and incremental (in-process) ------------------------------------------------------------------------


def test_crash_mid_shard_then_rerun_processes_only_the_unfinished_shards(corpus: Path, tmp_path: Path, model,
                                                                         monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(corpus, out)
    real_write = worker.write_shard

    def crash_in_second_shard(output, shard, itab, rtab, stats, so=None):
        if shard.shard_id.endswith("-000001"):
            storage.write_parquet(fstore.shard_paths(output, shard.shard_id)["images"], itab, so)  # half written
            raise RuntimeError("simulated crash while writing a shard")
        return real_write(output, shard, itab, rtab, stats, so)

    monkeypatch.setattr(worker, "write_shard", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        driver.run(cfg, LocalRunner())
    monkeypatch.undo()
    assert [m["shard"] for m in fstore.read_done_markers(str(out))] == ["g00001-000000"]
    assert (out / "images" / "g00001-000001.parquet").exists()  # data without a marker: not done
    assert not (out / "manifest.json").exists()  # the manifest is written last
    first_shard = _processed_ids(str(out), 1)
    assert len(first_shard) == 3

    manifest = driver.run(cfg, LocalRunner())
    run = manifest["run"]
    assert manifest["generation"] == 2
    assert (run["images"], run["skipped_already_done"], run["planned_shards"], run["shards"]) == (5, 3, 2, 2)
    assert _processed_ids(str(out), 2) == sorted(set(SAME_SIZE) - set(first_shard))
    assert not (out / "images" / "g00001-000001.parquet").exists()  # the crashed shard's leftovers are gone
    _assert_exactly_once(str(out), SAME_SIZE)
    _assert_matches(str(out), _reference(model, _files(corpus, SAME_SIZE)))

    again = driver.run(cfg, LocalRunner())["run"]
    assert (again["images"], again["planned_shards"], again["skipped_already_done"]) == (0, 0, 8)


def test_rerun_after_adding_changing_and_deleting_images_processes_only_those(corpus: Path, tmp_path: Path, model):
    out = tmp_path / "out"
    cfg = _cfg(corpus, out)
    assert driver.run(cfg, LocalRunner())["run"]["images"] == 8
    added = ["Leopards/image_0001.jpg", "Leopards/image_0002.jpg"]
    _copy(added, corpus)
    changed = "Faces/image_0002.jpg"
    (corpus / changed).write_bytes((SAMPLE / "Faces/image_0009.jpg").read_bytes())
    deleted = "car_side/image_0004.jpg"
    (corpus / deleted).unlink()

    manifest = driver.run(cfg, LocalRunner())
    run = manifest["run"]
    assert (run["images"], run["deleted"], run["skipped_already_done"], run["planned_shards"]) == (3, 1, 6, 1)
    assert _processed_ids(str(out), 2) == sorted([*added, changed])
    now = sorted(set(SAME_SIZE) - {deleted} | set(added))
    assert manifest["live_images"] == len(now) == 9
    _assert_exactly_once(str(out), now)
    images = fstore.read_live_table(str(out), "images")
    ref = _reference(model, _files(corpus, [changed]))[changed]
    row = images.filter(pa.compute.equal(images.column("image_id"), changed))
    np.testing.assert_allclose(column_to_numpy(row, "crow")[0], ref["crow"], rtol=1e-4, atol=1e-4)

    again = driver.run(cfg, LocalRunner())["run"]
    assert (again["images"], again["deleted"], again["skipped_already_done"]) == (0, 0, 9)


def test_data_is_written_before_each_marker_and_the_manifest_last(corpus: Path, tmp_path: Path, monkeypatch):
    writes: list[str] = []
    real = storage.write_bytes

    def spy(url, data, so=None):
        writes.append(url.rsplit("/", 2)[-2] + "/" + url.rsplit("/", 1)[-1] if "/_done/" in url or
                      "/images/" in url or "/regions/" in url else url.rsplit("/", 1)[-1])
        return real(url, data, so)

    monkeypatch.setattr(storage, "write_bytes", spy)
    driver.run(_cfg(corpus, tmp_path / "out", shard_size=4), LocalRunner())
    assert writes[0] == "config.json" and writes[-1] == "manifest.json"
    for sid in ("g00001-000000", "g00001-000001"):
        done = writes.index(f"_done/{sid}.json")
        assert writes.index(f"images/{sid}.parquet") < done and writes.index(f"regions/{sid}.parquet") < done


def test_output_of_another_model_config_is_refused(corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    driver.run(_cfg(corpus, out, shard_size=8), LocalRunner())
    with pytest.raises(ConfigError, match="another model config"):
        driver.run(_cfg(corpus, out, shard_size=8, regions=4), LocalRunner())
    driver.run(_cfg(corpus, out, shard_size=2, batch_size=1), LocalRunner())  # non-model settings may change


# ---- fail fast -----------------------------------------------------------------------------------------------------


def test_unreachable_input_or_unwritable_output_fail_before_any_work(tmp_path: Path, s3_server: dict, s3_bucket: str,
                                                                    monkeypatch):
    import ray

    def no_work(*_a, **_k):
        raise AssertionError("work started")

    monkeypatch.setattr(ray, "remote", no_work)
    monkeypatch.setattr(runners, "ShardWorker", no_work)
    so = json.dumps(s3_server)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    good_in = _copy(SAME_SIZE[:1], tmp_path / "in")
    cases = [
        (_cfg(tmp_path / "missing", tmp_path / "out1"), "does not exist"),
        (_cfg("s3://no-such-bucket-7d2e/images", tmp_path / "out2", storage_options=so), "does not exist"),
        (_cfg(good_in, blocker / "out"), "cannot write to output"),
        (_cfg(good_in, "s3://no-such-bucket-7d2e/out", storage_options=so), "cannot write to output"),
    ]
    for runner in (LocalRunner(), RayRunner()):
        for cfg, match in cases:
            with pytest.raises(storage.StorageError, match=match):
                driver.run(cfg, runner)
            with pytest.raises(storage.StorageError, match=match):
                driver.preflight(cfg, json.loads(cfg.storage_options or "{}"))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()  # bad input: output untouched


# ---- S3 in-process, with a secret ------------------------------------------------------------------------------------


def _secret_options(s3_server: dict) -> dict:
    ck = {**s3_server["client_kwargs"], "region_name": "us-east-1"}
    return {**s3_server, "client_kwargs": ck, "secret": SECRET}  # moto does not check the secret


def _upload(root: Path, ids: list[str], url: str, so: dict) -> None:
    fs, path = storage.url_to_fs(url, so)
    for i in ids:
        fs.pipe_file(f"{path}/{i}", (root / i).read_bytes())


def _assert_secret_nowhere(so: dict, bucket: str, *texts: str) -> None:
    fs, _ = storage.url_to_fs(f"s3://{bucket}", so)
    files = [p for p in fs.find(bucket) if not p.endswith((".jpg", ".png"))]
    assert any(p.endswith("manifest.json") for p in files) and any(p.endswith("config.json") for p in files)
    for p, data in fs.cat(files).items():
        assert SECRET.encode() not in data, p
    for t in texts:
        assert SECRET not in t


def test_s3_in_process_matches_model_and_never_writes_the_secret(corpus: Path, s3_server: dict, s3_bucket: str,
                                                                 model, caplog):
    so = _secret_options(s3_server)
    _upload(corpus, SAME_SIZE, f"s3://{s3_bucket}/images", so)
    out = f"s3://{s3_bucket}/features/run1"
    caplog.set_level(logging.DEBUG)
    manifest = driver.run(_cfg(f"s3://{s3_bucket}/images/", out, storage_options=json.dumps(so)), LocalRunner())
    assert manifest["config"]["storage_options"] == "<redacted>"
    assert manifest["run"]["images"] == 8
    _assert_matches(out, _reference(model, _files(corpus, SAME_SIZE)), so)
    assert storage.read_json(storage.join(out, "config.json"), so)["config"]["storage_options"] == "<redacted>"
    _assert_secret_nowhere(so, s3_bucket, caplog.text, json.dumps(manifest))


# ---- Ray end to end ------------------------------------------------------------------------------------------------


def _ray_session_logs() -> str:
    """Everything Ray's processes logged in this session (worker stdout/stderr included)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()
                     and p.suffix in (".out", ".err", ".log"))


@pytest.mark.slow
def test_run_ray_on_a_local_dir_survives_an_actor_killed_mid_shard(ray_local, corpus: Path, tmp_path: Path, model,
                                                                   monkeypatch, caplog):
    flag = tmp_path / "killed-once"

    class DiesOnce(worker.ShardWorker):
        """Writes half of shard 1, then its process dies (once): Ray restarts the actor and the shard is redone."""

        def run(self, dshard, on_images=None):
            if dshard.shard.shard_id.endswith("-000001") and not flag.exists():
                flag.write_text(str(os.getpid()))
                itab, _, _ = worker.run_model_on_shard(self.model, dshard, self.batch_size)
                storage.write_parquet(fstore.shard_paths(self.output, dshard.shard.shard_id)["images"], itab)
                os._exit(1)
            return super().run(dshard, on_images)

    monkeypatch.setattr(runners, "ShardWorker", DiesOnce)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="pipeline")
    manifest = driver.run(_cfg(corpus, out), RayRunner(), progress_every_s=0.5)
    assert flag.exists() and int(flag.read_text()) != os.getpid()  # it died, in another process
    # the default layout on this CPU-only cluster: two single-threaded actors, each decoding its own shards
    assert "2 model actor(s), 0 GPU, 1 CPU and 1 torch threads each; decoding in the model actors" in caplog.text
    run = manifest["run"]
    assert SUMMARY_KEYS <= set(run)
    assert (run["images"], run["ok"], run["errors"], run["shards"], run["planned_shards"], run["regions"]) == \
        (8, 8, 0, 3, 3, 24)
    assert run["images_per_s"] > 0 and manifest["live_images"] == 8 and manifest["versions"]["ray"]
    assert re.search(r"progress: 8/8 images, [\d.]+ images/s, ETA [\d:]+, 3/3 shards", caplog.text)  # image-level
    _assert_exactly_once(str(out), SAME_SIZE)
    _assert_matches(str(out), _reference(model, _files(corpus, SAME_SIZE)))
    monkeypatch.undo()
    again = driver.run(_cfg(corpus, out), RayRunner())["run"]  # nothing left to do: no actor is even started
    assert (again["images"], again["skipped_already_done"], again["planned_shards"]) == (0, 8, 0)


@pytest.mark.slow
def test_run_ray_finishes_on_the_live_actors_when_a_dead_one_cannot_be_replaced(ray_local, corpus: Path,
                                                                                tmp_path: Path, model, monkeypatch,
                                                                                caplog):
    # As when a node is lost and the survivors' CPUs are all held by their own actors: the replacement of the actor
    # that died never starts. Its shard must go to the live actor, not wait for the replacement (the run used to hang).
    import threading

    import ray

    flag = tmp_path / "killed-once"

    class DiesOnce(worker.ShardWorker):
        def run(self, dshard, on_images=None):
            if dshard.shard.shard_id.endswith("-000001") and not flag.exists():
                flag.write_text(str(os.getpid()))
                os._exit(1)
            return super().run(dshard, on_images)

    class NoRoomForReplacements(RayRunner):
        def start(self, cfg: ExtractConfig) -> None:
            super().start(cfg)
            self.make_actor = ray.remote(num_cpus=1, resources={"no-such-resource": 1})(DiesOnce).remote

    monkeypatch.setattr(runners, "ShardWorker", DiesOnce)
    caplog.set_level(logging.INFO, logger="pipeline")
    out, result = tmp_path / "out", {}
    t = threading.Thread(target=lambda: result.update(driver.run(_cfg(corpus, out), NoRoomForReplacements())),
                         daemon=True)
    t.start()
    t.join(180)
    assert not t.is_alive(), "the run waited for a replacement actor that can never start"
    assert flag.exists() and "starting a replacement, its shards go to the others" in caplog.text
    assert (result["run"]["images"], result["run"]["ok"], result["run"]["shards"]) == (8, 8, 3)
    _assert_exactly_once(str(out), SAME_SIZE)
    _assert_matches(str(out), _reference(model, _files(corpus, SAME_SIZE)))
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)]  # nothing named left behind


@pytest.mark.slow
def test_run_ray_with_decode_tasks_feeding_one_actor_matches_the_model(ray_local, corpus: Path, tmp_path: Path, model,
                                                                       monkeypatch, caplog):
    # The GPU clusters' layout (decode tasks on the CPUs feeding one actor per GPU), here on CPU.
    monkeypatch.setattr(runners, "actor_layout", lambda cfg, cpus, gpus: runners.ActorLayout(1, 0.0, 1, False))
    caplog.set_level(logging.INFO, logger="pipeline")
    out = tmp_path / "out"
    manifest = driver.run(_cfg(corpus, out), RayRunner())
    assert "1 model actor(s), 0 GPU, 1 CPU and 1 torch threads each; decoding in CPU tasks feeding them" in caplog.text
    assert (manifest["run"]["images"], manifest["run"]["ok"], manifest["run"]["shards"]) == (8, 8, 3)
    _assert_exactly_once(str(out), SAME_SIZE)
    _assert_matches(str(out), _reference(model, _files(corpus, SAME_SIZE)))


@pytest.mark.slow
def test_run_ray_on_s3_resumes_a_failed_run_matches_the_model_and_never_logs_the_secret(
        ray_local, corpus: Path, s3_server: dict, s3_bucket: str, model, monkeypatch, caplog, capfd):
    class AlwaysDies(worker.ShardWorker):
        def run(self, dshard, on_images=None):
            if dshard.shard.shard_id.endswith("-000001"):
                os._exit(1)
            return super().run(dshard, on_images)

    so = _secret_options(s3_server)
    _upload(corpus, SAME_SIZE, f"s3://{s3_bucket}/in", so)
    out = f"s3://{s3_bucket}/out"
    cfg = _cfg(f"s3://{s3_bucket}/in", out, storage_options=json.dumps(so), shard_size=4, batch_size=4, prefetch=1)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(runners, "ShardWorker", AlwaysDies)
    monkeypatch.setattr(runners, "SHARD_ATTEMPTS", 1)
    with pytest.raises(RuntimeError, match="shard g00001-000001 failed 1 times; rerun"):
        driver.run(cfg, RayRunner())
    monkeypatch.undo()
    fs, _ = storage.url_to_fs(out, so)
    assert not fs.exists(f"{s3_bucket}/out/manifest.json")
    first = _processed_ids(out, 1, so)
    assert first == SAME_SIZE[:4]

    # The rerun (same driver, so any cached S3 listing would be stale) redoes only the failed shard. It would wait
    # forever for CPUs if the failed run had left its restartable actor alive.
    manifest = driver.run(cfg, RayRunner())
    run = manifest["run"]
    assert (run["images"], run["shards"], run["skipped_already_done"], manifest["live_images"]) == (4, 1, 4, 8)
    assert _processed_ids(out, 2, so) == SAME_SIZE[4:]
    assert manifest["config"]["storage_options"] == "<redacted>"
    _assert_exactly_once(out, SAME_SIZE, so)
    _assert_matches(out, _reference(model, _files(corpus, SAME_SIZE)), so)
    captured = capfd.readouterr()
    ray_logs = _ray_session_logs()
    assert "shard g00002-000000: 4 images (4 ok)" in ray_logs  # the scan does see what the workers logged
    _assert_secret_nowhere(so, s3_bucket, caplog.text, captured.out, captured.err, ray_logs)


# ---- the CLI -------------------------------------------------------------------------------------------------------


def _cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "extract.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_rejects_bad_flags_and_bad_locations_before_starting_ray(tmp_path: Path):
    r = _cli(["--output", str(tmp_path / "o"), "--max-sid", "64"])
    assert r.returncode == 2 and "unrecognized arguments: --max-sid" in r.stderr
    r = _cli(["--output", str(tmp_path / "o"), "--regions", "0"])
    assert r.returncode == 2 and "regions must be in [1, 1000]" in r.stderr
    r = _cli(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--max-side", "64"],
             env={"RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stderr
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert "Started a local Ray instance" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_end_to_end_on_s3(ray_local: str, corpus: Path, s3_server: dict, s3_bucket: str, model):
    so = _secret_options(s3_server)
    _upload(corpus, SAME_SIZE, f"s3://{s3_bucket}/in", so)
    out = f"s3://{s3_bucket}/cli-out"
    r = _cli(["--input", f"s3://{s3_bucket}/in", "--output", out, "--max-side", "64", "--regions", "3",
              "--shard-size", "4", "--batch-size", "4", "--threads", "1", "--storage-options", json.dumps(so)],
             env={"RAY_ADDRESS": ray_local})  # join the session's Ray instead of starting another
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert {"output", "images", "ok", "errors", "statuses", "images_per_s", "elapsed_s", "skipped_already_done"} \
        <= set(summary)
    assert (summary["images"], summary["ok"], summary["errors"], summary["statuses"]) == (8, 8, 0, {"ok": 8})
    assert re.search(r"progress: 8/8 images, [\d.]+ images/s, ETA [\d:]+, 2/2 shards", r.stderr)
    assert '"storage_options": "<redacted>"' in r.stderr  # the config is logged, redacted
    _assert_matches(out, _reference(model, _files(corpus, SAME_SIZE)), so)
    _assert_secret_nowhere(so, s3_bucket, r.stdout, r.stderr, _ray_session_logs())


# ---- files that are never retried: too large, not a file, a manifest row without a uri ------------------------------


def test_decode_shard_refuses_oversized_files_and_non_files_as_permanent_rows(tmp_path: Path):
    good = tmp_path / "a.jpg"
    shutil.copy(SAMPLE / SAME_SIZE[0], good)
    size = good.stat().st_size
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # endless: must never be read to the end
    recs = tuple(listing.ImageRecord(n, "file://" + str(tmp_path / n), "1") for n in ("a.jpg", "fifo.jpg", "zero.jpg"))
    shard = Shard("g00001-000000", 1, recs)
    d = worker.decode_shard(shard, 64, 10**8, None, max_image_bytes=size - 1)
    assert [x.status for x in d.decoded] == [imgs.TOO_LARGE, imgs.NOT_IMAGE, imgs.NOT_IMAGE]
    assert f"max_image_bytes={size - 1}" in d.decoded[0].error
    assert all("not a regular file" in x.error for x in d.decoded[1:])
    assert worker.decode_shard(shard, 64, 10**8, None, max_image_bytes=size).decoded[0].ok  # the limit is inclusive


def test_permanent_failures_are_not_retried_by_the_next_run(tmp_path: Path, monkeypatch):
    """An oversized file, a FIFO and a manifest row without a uri become rows once; a rerun skips them (only a
    read_error is transient), and the oversized file is refused without being read whole."""
    root = _copy(SAME_SIZE[:2], tmp_path / "in")
    big = root / "big.jpg"
    big.write_bytes((SAMPLE / SAME_SIZE[2]).read_bytes() + b"\0" * 20_000)
    os.mkfifo(root / "fifo.jpg")
    (root / "list.csv").write_text("path,label\n" + "".join(f"{i},x\n" for i in [*SAME_SIZE[:2], "big.jpg",
                                                                                "fifo.jpg"]) + ",y\n")
    limit = big.stat().st_size - 1
    read_sizes: list[int | None] = []
    real_read = storage.read_bytes

    def spy(uri, so=None, max_bytes=None):
        if uri.endswith(".jpg"):
            read_sizes.append(max_bytes)
        return real_read(uri, so, max_bytes=max_bytes)

    monkeypatch.setattr(storage, "read_bytes", spy)
    out = tmp_path / "out"
    first = driver.run(_cfg(root / "list.csv", out, max_image_bytes=limit), LocalRunner())
    assert read_sizes and set(read_sizes) == {limit}  # every image read is bounded by the config's limit
    assert first["run"]["statuses"] == {"ok": 2, imgs.TOO_LARGE: 1, imgs.NOT_IMAGE: 1, imgs.BAD_RECORD: 1}
    images = _assert_exactly_once(str(out), [*SAME_SIZE[:2], "big.jpg", "fifo.jpg", "list.csv#row-5"])
    rows = {r["image_id"]: r for r in images.select(["image_id", "status", "error"]).to_pylist()}
    assert f"max_image_bytes={limit}" in rows["big.jpg"]["error"]
    assert rows["list.csv#row-5"]["error"] == f"manifest {root / 'list.csv'} row 5 has no path"
    assert all(m["retry"] == [] for m in fstore.read_done_markers(str(out)))
    again = driver.run(_cfg(root / "list.csv", out, max_image_bytes=limit), LocalRunner())["run"]
    assert (again["images"], again["skipped_already_done"]) == (0, 5)


def test_max_image_bytes_is_an_option_of_the_extraction_and_the_reindex():
    assert ExtractConfig(output="o").max_image_bytes == 256 * 2**20
    assert from_dict(ExtractConfig, {"output": "o", "max-image-bytes": "1000"}).max_image_bytes == 1000
    with pytest.raises(ConfigError, match="max_image_bytes must be >= 1"):
        from_dict(ExtractConfig, {"output": "o", "max_image_bytes": 0})
    from pipeline.config import ReindexConfig

    r = from_dict(ReindexConfig, {"root": "r", "input": "i", "max_image_bytes": 77, "allow_empty": True})
    assert (r.extract_config().max_image_bytes, r.extract_config().allow_empty) == (77, True)


# ---- an empty input is refused -----------------------------------------------------------------------------------


def test_an_empty_input_is_refused_unless_allowed_and_never_deletes_silently(corpus: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(driver.EmptyInput, match=r"lists no images .*--allow-empty"):
        driver.run(_cfg(empty, out), LocalRunner())
    assert not (out / fstore.CONFIG).exists() and not (out / fstore.LEASE).exists()  # nothing written

    driver.run(_cfg(corpus, out), LocalRunner())
    with pytest.raises(storage.StorageError, match="every image already under"):
        driver.run(_cfg(empty, out), LocalRunner())
    assert len(fstore.live_images(fstore.read_done_markers(str(out)))) == len(SAME_SIZE)  # nothing deleted

    from _jobs import load_job

    capsys.readouterr()
    code = load_job("extract").main(["--input", str(empty), "--output", str(out), "--in-process"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"jobs/extract.py: error: input {empty} lists no images")
    assert not any("Traceback" in line for line in err)

    run = driver.run(_cfg(empty, out, allow_empty=True), LocalRunner())  # explicit: every image is deleted
    assert (run["run"]["deleted"], run["live_images"]) == (len(SAME_SIZE), 0)
