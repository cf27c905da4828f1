"""Tests of the reduce stage (pipeline/reduce/build.py, pipeline/store/index_store.py): index artifacts from an extraction, streamed, through fsspec."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.config import IndexConfig
from pipeline.io import storage
from pipeline.reduce import build as rd
from pipeline.reduce.faiss_index import load_index, unwrap
from pipeline.reduce.pca import PCA, l2n
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout


def _build(features: str, out: str, **kw) -> dict:
    return rd.build(IndexConfig(features=features, output=out, **{"pca_dim": 16, "in_process": True, **kw}))


def _ids(out: str, so: dict | None = None) -> list[str]:
    """The published id map, part by part in row order."""
    marker = storage.read_json(storage.join(out, layout.DONE), so)
    return [i for p in marker["parts"] for i in storage.read_parquet(
        storage.join(out, layout.IDS_DIR, f"{p['name']}.parquet"), so).column("image_id").to_pylist()]


def _numpy_fused(t, fuse_global: str, w: float = 1.0) -> np.ndarray:
    """The fused vector before PCA written out in numpy: [L2(global part), w * L2(local)], the global part being
    global, rmac, or [L2(global), L2(rmac)]."""
    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    v = {k: column_to_numpy(t, k).astype(np.float64) for k in ("global", "rmac", "local")}
    part = np.concatenate([n(v["global"]), n(v["rmac"])], axis=1) if fuse_global == "global+rmac" else v[fuse_global]
    return np.concatenate([n(part), w * n(v["local"])], axis=1)


@pytest.mark.parametrize("fuse_global", [None, "global", "rmac"])  # None: the default, global+rmac
def test_index_matches_numpy_reference(tiny_features, tmp_path, fuse_global):
    out = str(tmp_path / "index")
    marker = _build(tiny_features["features"], out, **({"fuse_global": fuse_global} if fuse_global else {}))
    fuse_global = fuse_global or "global+rmac"
    assert marker["config"]["fuse_global"] == fuse_global  # recorded: search fuses its queries the same way
    t = fstore.read_live_table(tiny_features["features"], "images")
    t = t.filter(pc.equal(t.column("status"), "ok"))
    assert marker["images"] == t.num_rows == 24
    ids = _ids(out)
    assert ids == sorted(ids) == t.column("image_id").to_pylist()
    assert marker["recall"]["fused"] == {"at": 10, "value": 1.0, "queries": 24}  # exact index
    # The fused index holds PCA(fused) + L2 of every image, in id-map order, PCA fitted on every image (the sample).
    raw = _numpy_fused(t, fuse_global)
    pca = PCA.load(storage.join(out, layout.PCA_FUSED))
    np.testing.assert_allclose(pca.mean, raw.mean(axis=0), atol=1e-5)
    ref = pca.transform(raw)
    index = unwrap(load_index(storage.join(out, layout.INDEX_FUSED)))  # the index behind its PCA (IndexPreTransform)
    got = np.stack([index.reconstruct(i) for i in range(index.ntotal)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # Exact search equals brute force.
    scores, found = index.search(ref[:5], 5)
    brute = np.argsort(-(ref[:5] @ ref.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found[:, 0], brute[:, 0])
    np.testing.assert_allclose(scores, np.take_along_axis(ref[:5] @ ref.T, brute, 1), atol=1e-5)


@pytest.mark.parametrize("codec,atol", [("float16", 2e-3), ("int8", 2e-2)])
def test_region_store_follows_id_map(tiny_features, tmp_path, codec, atol):
    from pipeline.store.region_store import RegionStore

    out = str(tmp_path / "index")
    _build(tiny_features["features"], out, region_codec=codec)
    ids = _ids(out)
    store = RegionStore(out)
    rows = np.array([len(ids) - 1, 0, -1, 7, 0])  # any order, padding, repeats
    batch = store.fetch(rows)
    assert batch.offsets[0] == 0 and batch.offsets[-1] == len(batch.desc) == len(batch.boxes)
    r = fstore.read_live_table(tiny_features["features"], "regions")
    for k, row in enumerate(rows):
        got = slice(batch.offsets[k], batch.offsets[k + 1])
        if row < 0:
            assert got.start == got.stop
            continue
        mine = r.filter(pc.equal(r.column("image_id"), ids[row])).sort_by("rank")
        ref = l2n(column_to_numpy(mine, "descriptor"))
        np.testing.assert_allclose(batch.desc[got], ref, atol=atol)
        np.testing.assert_array_equal(batch.boxes[got], column_to_numpy(mine, "box"))
        np.testing.assert_allclose(np.linalg.norm(batch.desc[got], axis=1), 1.0, atol=1e-5)


def test_done_marker_written_last_and_s3_round_trip(tiny_features, s3_server, s3_bucket, tmp_path):
    import json

    out = f"s3://{s3_bucket}/index/run1"
    marker = _build(tiny_features["features"], out, storage_options=json.dumps(s3_server))
    fs, path = storage.url_to_fs(out, s3_server)
    files = {p[len(path) + 1:] for p in fs.find(path)}
    assert files == set(marker["files"]) | {layout.DONE}  # the build's _work folder is gone
    assert {layout.PCA_FUSED, layout.PCA_CROW, layout.INDEX_FUSED, layout.INDEX_CROW} <= files
    done_mtime = fs.info(f"{path}/{layout.DONE}")["LastModified"]
    assert all(fs.info(f"{path}/{f}")["LastModified"] <= done_mtime for f in files)
    assert load_index(f"{out}/{layout.INDEX_FUSED}", s3_server).ntotal == marker["images"]
    assert _ids(out, s3_server) == _ids(_exact(tiny_features, tmp_path))


def test_missing_features_fail_clearly(tmp_path):
    with pytest.raises(storage.StorageError, match="no successfully extracted images"):
        _build(str(tmp_path / "nothing"), str(tmp_path / "index"))


def test_factory_override_and_saved_search_params(tiny_features, tmp_path):
    import faiss

    out = str(tmp_path / "ivf")
    marker = _build(tiny_features["features"], out, factory="IVF2,Flat", nprobe=2)
    from pipeline.retrieval.search import Searcher

    assert marker["factory"] == {"fused": "IVF2,Flat", "crow": "IVF2,Flat"}
    index = Searcher(out).index["fused"]  # on-disk inverted lists: read through the folder, memory-mapped
    assert faiss.extract_index_ivf(index).nprobe == 2  # saved with the index: every list visited, so exact
    exact = unwrap(load_index(storage.join(_exact(tiny_features, tmp_path), layout.INDEX_FUSED)))
    q = np.stack([exact.reconstruct(i) for i in range(4)])
    np.testing.assert_array_equal(index.search(q, 5)[1], exact.search(q, 5)[1])


@pytest.mark.parametrize("kind", [{"whiten": True}, {"factory": "IVF2,SQ8", "nprobe": 1}])
def test_published_index_loads_in_plain_faiss_and_ranks_as_the_searcher(tiny_features, tmp_path, monkeypatch, kind):
    """The published .faiss is an IndexPreTransform (our PCA, whitening included, then L2): plain faiss, reading a
    moved copy of the folder, searches it with the vectors before PCA and finds what the Searcher finds."""
    import shutil

    import faiss

    from pipeline.reduce import task as tk
    from pipeline.retrieval.search import Searcher

    built = str(tmp_path / "built")
    marker = _build(tiny_features["features"], built, **kind)
    moved = str(tmp_path / "moved")
    shutil.copytree(built, moved)
    shutil.rmtree(built)  # nothing may point back to where it was built
    t = fstore.read_live_table(tiny_features["features"], "images")
    t = t.filter(pc.equal(t.column("status"), "ok"))
    vec_cols = [c for c in t.column_names if _is_vector(t, c)]
    outs = [{c: column_to_numpy(t, c)[i] for c in vec_cols} for i in range(t.num_rows)]
    s = Searcher(moved)
    for space in ("fused", "crow"):
        path = f"{moved}/{layout.INDEX_FUSED if space == 'fused' else layout.INDEX_CROW}"
        plain = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)
        assert isinstance(plain, faiss.IndexPreTransform) and plain.ntotal == marker["images"]
        if "factory" in kind:
            assert faiss.extract_index_ivf(plain).nprobe == 1  # the saved search parameter travels with it
        # the vectors before PCA, as the build computes them
        raw = tk.raw_vectors(t, space, 1.0, marker["config"]["fuse_global"])
        d_plain, i_plain = plain.search(raw, 5)
        i_ours, d_ours = s.search_vectors(outs, top_k=5, space=space)
        np.testing.assert_array_equal(i_plain, i_ours)
        np.testing.assert_allclose(d_plain, d_ours, atol=1e-4)
    if "factory" in kind:  # plain read without flags: the .ivfdata is named by bare name, relative to the cwd
        monkeypatch.chdir(moved)
        plain = faiss.read_index(layout.INDEX_FUSED)
        raw = tk.raw_vectors(t, "fused", 1.0, marker["config"]["fuse_global"])
        np.testing.assert_array_equal(plain.search(raw, 5)[1],
                                      s.search_vectors(outs, top_k=5)[0])


def _is_vector(t, column: str) -> bool:
    """A fixed-size-list column (a descriptor)."""
    import pyarrow as pa

    return pa.types.is_fixed_size_list(t.schema.field(column).type)


def _exact(tiny_features, tmp_path) -> str:
    out = str(tmp_path / "flat")
    _build(tiny_features["features"], out)
    return out


def test_a_rebuild_killed_mid_write_is_not_served(tiny_features, tmp_path, monkeypatch):
    """A second build into the same folder dies after overwriting some files: no search may load the mix."""
    from pipeline.retrieval.search import Searcher

    out = str(tmp_path / "index")
    _build(tiny_features["features"], out)
    Searcher(out)  # the finished build loads

    real = storage.write_bytes

    def die_on_the_region_store(url, data, so=None):
        if url.endswith(".codes"):
            raise KeyboardInterrupt("killed")
        return real(url, data, so)

    monkeypatch.setattr(storage, "write_bytes", die_on_the_region_store)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_features["features"], out, pca_dim=8)  # other files than the first
    monkeypatch.undo()
    with pytest.raises(storage.StorageError, match="no finished index"):
        Searcher(out)


def test_a_file_overwritten_after_the_marker_is_refused(tiny_features, tmp_path):
    """Files that are not the ones the marker describes (copied from another build) are refused, not served."""
    from pipeline.retrieval.search import Searcher

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _build(tiny_features["features"], a)
    rd.build(IndexConfig(features=tiny_features["features"], output=b, pca_dim=8, in_process=True))
    storage.write_bytes(storage.join(a, layout.PCA_FUSED), storage.read_bytes(storage.join(b, layout.PCA_FUSED)))
    with pytest.raises(storage.StorageError, match="not the file"):
        Searcher(a)
    marker = storage.read_json(storage.join(b, layout.DONE))
    parts = [p["name"] for p in marker["parts"]]
    assert set(marker["files"]) == {layout.PCA_FUSED, layout.PCA_CROW, layout.INDEX_FUSED, layout.INDEX_CROW} | {
        f"{d}/{p}{ext}" for p in parts for d, ext in ((layout.IDS_DIR, ".parquet"), (layout.REGIONS_DIR, ".codes"),
                                                      (layout.REGIONS_DIR, ".boxes"),
                                                      (layout.REGIONS_DIR, ".offsets.npy"))}


def test_ivf_build_merges_on_disk_and_matches_in_memory(tiny_features, tmp_path):
    """IVF partial indexes merged on disk (ids shifted per part) give what one in-memory IVF index over the same
    rows gives, and a Searcher memory-maps them."""
    import faiss

    from pipeline.retrieval.search import Searcher

    out = str(tmp_path / "ivf")
    marker = _build(tiny_features["features"], out, factory="IVF2,Flat", nprobe=2)
    assert {layout.IVFDATA[layout.INDEX_FUSED], layout.IVFDATA[layout.INDEX_CROW]} <= set(marker["files"])
    assert len(marker["parts"]) > 1  # several shards: the merge shifted their ids
    s = Searcher(out)
    exact = unwrap(load_index(storage.join(_exact(tiny_features, tmp_path), layout.INDEX_FUSED)))
    x = np.stack([exact.reconstruct(i) for i in range(exact.ntotal)])
    ref = faiss.IndexFlatIP(x.shape[1])
    ref.add(x)
    np.testing.assert_array_equal(s.index["fused"].search(x, 5)[1], ref.search(x, 5)[1])  # nprobe 2 of 2: exact
    assert marker["recall"]["fused"]["value"] == 1.0


def test_killed_task_then_rerun_gives_the_same_index(tiny_features, tmp_path, monkeypatch):
    """A task dies mid-build: no index is published; the rerun reuses the finished tasks and publishes what an
    uninterrupted build publishes."""
    from pipeline.reduce import task as tk
    from pipeline.retrieval.search import Searcher

    ref = str(tmp_path / "ref")
    want = _build(tiny_features["features"], ref)
    out = str(tmp_path / "index")
    real = tk.reduce_shard
    calls = []

    def dies_on_the_second(task, plan):
        calls.append(task[1].shard)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(task, plan)

    monkeypatch.setattr(tk, "reduce_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_features["features"], out)
    with pytest.raises(storage.StorageError, match="no finished index"):
        Searcher(out)
    monkeypatch.setattr(tk, "reduce_shard", real)
    written = []
    real_json = storage.write_json
    monkeypatch.setattr(storage, "write_json", lambda url, obj, so=None: written.append(url) or real_json(url, obj, so))
    got = _build(tiny_features["features"], out)
    assert got["files"] == want["files"]  # byte-identical published files (sizes and sha256)
    assert got["parts"] == want["parts"]
    redone = [u.rsplit("/", 1)[-1][:-len(".json")] for u in written if "/_work/parts/" in u]
    assert calls[0] not in redone and calls[1] in redone  # the finished task was not run again; the killed one was
    assert not any(u.endswith("/_work/plan.json") for u in written)  # nor the sample, PCA and training


@pytest.mark.slow
def test_ray_build_equals_in_process_build(tiny_features, tmp_path, ray_local):
    """Tasks on Ray (2 local CPUs) publish byte-identical files to the in-process build, exact and compressed (the
    training runs in the driver, each task only adds its rows), and the compressed index keeps its recall."""
    import ray

    from pipeline.reduce.runners import RayTaskRunner

    kinds = {"flat": {}, "ivf": {"factory": "IVF2,SQ8", "nprobe": 2}}
    local = {k: _build(tiny_features["features"], str(tmp_path / f"local-{k}"), **kw) for k, kw in kinds.items()}
    assert ray.is_initialized()  # the session's local Ray (ray_local): 2 CPUs
    dist = {}
    for k, kw in kinds.items():
        cfg = IndexConfig(features=tiny_features["features"], output=str(tmp_path / f"ray-{k}"), pca_dim=16,
                          workers=2, **kw)
        dist[k] = rd.build(cfg, RayTaskRunner(cfg.workers))
    from pipeline.retrieval.search import Searcher

    # Every file, the IVF .faiss too (it names its .ivfdata by bare name, not by the merge's temporary path).
    for k in kinds:
        assert dist[k]["files"] == local[k]["files"]
        assert dist[k]["parts"] == local[k]["parts"] and dist[k]["recall"] == local[k]["recall"]
    a, b = Searcher(str(tmp_path / "ray-ivf")).index["fused"], Searcher(str(tmp_path / "local-ivf")).index["fused"]
    q = np.random.default_rng(0).standard_normal((5, a.d)).astype(np.float32)
    np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])
    assert dist["ivf"]["recall"]["fused"]["value"] >= 0.95  # SQ8 codes, every list probed
