"""Tests for pipeline.io.storage: listing (local, S3 on a loopback moto server, manifests), stable ids and fingerprints,
fail-fast checks, done-markers, live-row resolution and orphan cleanup."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import listing, storage
from pipeline.io.storage import StorageError
from pipeline.store import feature_store as fstore

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "caltech8"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A nested image folder with non-image files mixed in."""
    root = tmp_path / "in"
    for rel in ("a/x.jpg", "a/b/y.JPG", "z.png", "c/d/e/w.webp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"img-" + rel.encode())
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "meta.json").write_text("{}")
    return root


def _s3fs(so: dict):
    import s3fs

    return s3fs.S3FileSystem(**so, skip_instance_cache=True)


# ---- listing -------------------------------------------------------------------------------------------------------


def test_list_directory_recursively_with_stable_relative_ids(tree: Path):
    recs = listing.list_images(str(tree))
    assert [r.image_id for r in recs] == ["a/b/y.JPG", "a/x.jpg", "c/d/e/w.webp", "z.png"]
    for r in recs:
        assert storage.read_bytes(r.uri) == (tree / r.image_id).read_bytes()
    # The same root spelt differently (trailing slash, file:// URL, relative path) gives the same ids and fingerprints.
    cwd = os.getcwd()
    try:
        os.chdir(tree.parent)
        variants = [str(tree) + "/", "file://" + str(tree), "in"]
        for v in variants:
            assert [(r.image_id, r.fingerprint) for r in listing.list_images(v)] == \
                [(r.image_id, r.fingerprint) for r in recs]
    finally:
        os.chdir(cwd)


def test_fingerprint_changes_only_when_the_file_changes(tree: Path):
    before = {r.image_id: r.fingerprint for r in listing.list_images(str(tree))}
    assert before == {r.image_id: r.fingerprint for r in listing.list_images(str(tree))}
    (tree / "z.png").write_bytes(b"changed content, other size")
    st = (tree / "a" / "x.jpg").stat()
    os.utime(tree / "a" / "x.jpg", (st.st_atime, st.st_mtime + 10))  # same size, rewritten later
    after = {r.image_id: r.fingerprint for r in listing.list_images(str(tree))}
    assert {k for k in before if before[k] != after[k]} == {"z.png", "a/x.jpg"}


def test_csv_manifest_with_relative_paths_and_labels():
    recs = listing.list_images(str(SAMPLE / "labels.csv"))
    assert len(recs) == 80
    r = next(r for r in recs if r.image_id == "Faces/image_0003.jpg")
    assert r.label == "Faces"
    assert storage.read_bytes(r.uri) == (SAMPLE / "Faces" / "image_0003.jpg").read_bytes()
    # The same images listed as a directory get the same ids.
    assert [x.image_id for x in recs] == [x.image_id for x in listing.list_images(str(SAMPLE))]


def test_parquet_manifest_with_absolute_uris_ids_and_fingerprints(tmp_path: Path):
    files = sorted(SAMPLE.glob("watch/*.jpg"))[:3]
    table = pa.table({"uri": ["file://" + str(f) for f in files], "image_id": [f"w{i}" for i in range(3)],
                      "label": ["watch"] * 3, "fingerprint": ["v1"] * 3})
    pq.write_table(table, tmp_path / "m.parquet")
    recs = listing.list_images(str(tmp_path / "m.parquet"))
    assert [(r.image_id, r.label, r.fingerprint) for r in recs] == [(f"w{i}", "watch", "v1") for i in range(3)]
    assert storage.read_bytes(recs[1].uri) == files[1].read_bytes()
    # Without ids: the id is the URI without its protocol.
    pq.write_table(table.select(["uri"]), tmp_path / "m2.parquet")
    assert listing.list_images(str(tmp_path / "m2.parquet"))[0].image_id == str(files[0]).lstrip("/")


def test_bad_manifests_and_duplicate_ids_are_errors(tmp_path: Path):
    (tmp_path / "nouri.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(StorageError, match="'uri', 'url' or 'path'"):
        listing.list_images(str(tmp_path / "nouri.csv"))
    (tmp_path / "dup.csv").write_text("uri,image_id\na.jpg,same\nb.jpg,same\n")
    with pytest.raises(StorageError, match="duplicate image id 'same'"):
        listing.list_images(str(tmp_path / "dup.csv"))


def test_missing_input_and_unwritable_output_fail_fast(tmp_path: Path):
    with pytest.raises(StorageError, match="does not exist"):
        listing.list_images(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="does not exist"):
        listing.check_readable(str(tmp_path / "nope"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write to output"):
        storage.check_writable(str(blocker / "out"))  # a path below a regular file can never be created
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert [p.name for p in (tmp_path / "new" / "out").iterdir()] == []  # the probe is gone


# ---- S3 (moto server on loopback) ----------------------------------------------------------------------------------


def test_s3_prefix_listing_ids_fingerprints_and_fail_fast(s3_server: dict, s3_bucket: str):
    fs = _s3fs(s3_server)
    for rel in ("imgs/a/x.jpg", "imgs/b/y.png", "imgs/readme.txt", "other/z.jpg"):
        fs.pipe_file(f"{s3_bucket}/{rel}", b"bytes of " + rel.encode())
    recs = listing.list_images(f"s3://{s3_bucket}/imgs/", s3_server)
    assert [r.image_id for r in recs] == ["a/x.jpg", "b/y.png"]
    assert recs[0].uri == f"s3://{s3_bucket}/imgs/a/x.jpg"
    assert storage.read_bytes(recs[0].uri, s3_server) == b"bytes of imgs/a/x.jpg"
    fs.pipe_file(f"{s3_bucket}/imgs/a/x.jpg", b"new bytes")
    again = listing.list_images(f"s3://{s3_bucket}/imgs", s3_server)
    assert again[0].fingerprint != recs[0].fingerprint and again[1].fingerprint == recs[1].fingerprint

    with pytest.raises(StorageError, match="does not exist"):
        listing.list_images("s3://no-such-bucket-4f1c/imgs", s3_server)
    with pytest.raises(StorageError, match="cannot write to output"):
        storage.check_writable("s3://no-such-bucket-4f1c/out", s3_server)
    assert not fs.exists("no-such-bucket-4f1c")  # the check never creates a bucket
    storage.check_writable(f"s3://{s3_bucket}/out", s3_server)
    assert not fs.ls(f"{s3_bucket}/out", refresh=True) if fs.exists(f"{s3_bucket}/out") else True


def test_s3_done_markers_written_by_another_process_are_seen(s3_server: dict, s3_bucket: str):
    """s3fs caches listings per instance; markers written elsewhere (Ray workers) must not be hidden by that cache."""
    out = f"s3://{s3_bucket}/feat"
    storage.write_json(storage.join(out, fstore.DONE_DIR, "g00001-000000.json"), _marker("g00001-000000", ["a"]),
                       s3_server)
    assert len(fstore.read_done_markers(out, s3_server)) == 1
    other = _s3fs(s3_server)  # another client, like an actor process
    other.pipe_file(f"{s3_bucket}/feat/_done/g00001-000001.json", json.dumps(_marker("g00001-000001", ["b"])).encode())
    other.pipe_file(f"{s3_bucket}/feat/images/g00001-000001.parquet", b"data")
    markers = fstore.read_done_markers(out, s3_server)
    assert [m["shard"] for m in markers] == ["g00001-000000", "g00001-000001"]
    assert fstore.remove_orphans(out, markers, s3_server) == 0  # g00001-000001's data is not an orphan
    # Objects written elsewhere after this process listed their folder can still be read.
    storage.write_parquet(storage.join(out, "regions", "g00001-000000.parquet"), pa.table({"x": [1]}), s3_server)
    assert fstore.remove_orphans(out, markers, s3_server) == 0  # lists regions/
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [2]}), buf)
    other.pipe_file(f"{s3_bucket}/feat/regions/g00001-000001.parquet", buf.getvalue().to_pybytes())
    got = storage.read_parquet(storage.join(out, "regions", "g00001-000001.parquet"), s3_server)
    assert got["x"].to_pylist() == [2]


# ---- done-markers and live rows ------------------------------------------------------------------------------------


def _marker(sid: str, ids: list[str], fp: str = "f", retry: tuple[str, ...] = ()) -> dict:
    return {"shard": sid, "generation": int(sid[1:6]), "kind": "data", "images": [[i, fp] for i in ids],
            "retry": list(retry)}


def _write_shard(out: str, sid: str, ids: list[str], tag: str, retry: tuple[str, ...] = ()) -> None:
    p = fstore.shard_paths(out, sid)
    storage.write_parquet(p["images"], pa.table({"image_id": ids, "tag": [tag] * len(ids)}))
    storage.write_parquet(p["regions"], pa.table({"image_id": [i for i in ids for _ in range(2)],
                                                  "rank": [r for _ in ids for r in (1, 0)],
                                                  "tag": [tag] * (2 * len(ids))}))
    storage.write_json(p["done"], _marker(sid, ids, tag, retry))


def test_read_done_markers_ignores_half_written_and_foreign_files(tmp_path: Path):
    out = str(tmp_path)
    assert fstore.read_done_markers(out) == []
    d = tmp_path / fstore.DONE_DIR
    d.mkdir()
    (d / "g00001-000001.json").write_text(json.dumps(_marker("g00001-000001", ["b"])))
    (d / "g00001-000000.json").write_text(json.dumps(_marker("g00001-000000", ["a"])))
    (d / "g00001-000002.json").write_text('{"shard": "g00001-000002", "gener')  # killed while writing
    (d / "notes.json").write_text(json.dumps({"shard": "whatever"}))
    (d / "g00001-000003.tmp").write_text("x")
    assert [m["shard"] for m in fstore.read_done_markers(out)] == ["g00001-000000", "g00001-000001"]
    assert fstore.next_generation(fstore.read_done_markers(out)) == 2
    assert fstore.next_generation([]) == 1


def test_live_images_latest_generation_wins_deletions_and_retries_remove():
    markers = [
        _marker("g00001-000000", ["a", "b", "c"], "f1"),
        _marker("g00001-000001", ["d", "e"], "f1", retry=("e",)),
        _marker("g00002-000000", ["b"], "f2"),
        {"shard": "g00002-deleted", "generation": 2, "kind": "deleted", "images": ["c"]},
    ]
    live = fstore.live_images(markers)
    assert live == {"a": ("g00001-000000", "f1"), "b": ("g00002-000000", "f2"), "d": ("g00001-000001", "f1")}


def test_remove_orphans_and_read_live_table(tmp_path: Path):
    out = str(tmp_path / "out")
    _write_shard(out, "g00001-000000", ["a", "b"], "first")
    _write_shard(out, "g00001-000001", ["c"], "first")
    _write_shard(out, "g00002-000000", ["b", "d"], "second")
    # A crashed shard: data without a done-marker.
    p = fstore.shard_paths(out, "g00002-000001")
    storage.write_parquet(p["images"], pa.table({"image_id": ["a"], "tag": ["crashed"]}))
    markers = fstore.read_done_markers(out)
    assert fstore.remove_orphans(out, markers) == 1
    assert not Path(p["images"]).exists()
    images = fstore.read_live_table(out, "images")
    assert images.column("image_id").to_pylist() == ["a", "b", "c", "d"]  # each exactly once, sorted
    assert images.column("tag").to_pylist() == ["first", "second", "first", "second"]
    regions = fstore.read_live_table(out, "regions", columns=["rank"])
    assert regions.column_names == ["image_id", "rank"]
    assert list(zip(*[regions.column(c).to_pylist() for c in ("image_id", "rank")])) == \
        [(i, r) for i in "abcd" for r in (0, 1)]
    shards = list(fstore.iter_live_shards(out))
    assert len(shards) == 3 and all(set(s) == {"images", "regions"} for s in shards)
    with pytest.raises(StorageError, match="no completed shards"):
        fstore.read_live_table(str(tmp_path / "empty"), "images")


def test_write_helpers_roundtrip(tmp_path: Path):
    url = storage.join(str(tmp_path), "x", "y", "z.json")
    assert url == f"{tmp_path}/x/y/z.json"
    storage.write_json(url, {"b": 1, "a": [1, 2]})
    assert storage.read_json(url) == {"a": [1, 2], "b": 1}
    t = pa.table({"v": [1, 2, 3], "w": ["a", "b", "c"]})
    storage.write_parquet(storage.join(str(tmp_path), "t.parquet"), t)
    assert storage.read_parquet(storage.join(str(tmp_path), "t.parquet"), columns=["w"]).column_names == ["w"]
    assert fstore.shard_id(3, 12) == "g00003-000012"
    assert time.time() - fstore.now() < 5
    shutil.rmtree(tmp_path / "x")


def test_parquet_dictionary_encodes_repeating_columns_and_never_feature_vectors():
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((64, 32)).astype(np.float32)
    t = pa.table({
        "image_id": [f"img{i}" for i in range(64)], "status": ["ok"] * 64, "n": np.arange(64, dtype=np.int32),
        "score": rng.random(64).astype(np.float32),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 32),
        "vec16": pa.array(list(vec.astype(np.float16)), pa.list_(pa.float16())),
        "boxes": pa.array([[[0.0, 1.0]]] * 64, pa.list_(pa.list_(pa.float32()))),
    })
    assert storage.dictionary_columns(t.schema) == ["image_id", "status", "n"]
    data = storage.parquet_bytes(t)
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["status"] and "RLE_DICTIONARY" in encodings["image_id"]
    for name in ("score", "vec", "vec16", "boxes"):
        assert "RLE_DICTIONARY" not in encodings[name] and "PLAIN_DICTIONARY" not in encodings[name], name
    assert storage.parquet_from_bytes(data).equals(t)  # the encoding is invisible to readers
