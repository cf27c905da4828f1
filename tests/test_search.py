"""Tests of search (pipeline/retrieval/search.py and jobs/search.py): an indexed image finds itself; re-ranking and QE run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import IndexConfig
from pipeline.reduce import build as rd
from pipeline.retrieval.search import Searcher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_index(tiny_features, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("index"))
    rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=16))
    return out


@pytest.mark.parametrize("space", ["fused", "crow"])
@pytest.mark.parametrize("rerank,qe", [(0, 0), (10, 0), (0, 2)])
def test_indexed_image_returns_itself_first(tiny_features, tiny_index, space, rerank, qe):
    s = Searcher(tiny_index)
    img = str(Path(tiny_features["images"]) / "Leopards" / "image_0001.jpg")
    hits = s.search([img], top_k=5, rerank=rerank, qe=qe, space=space)[0]
    assert len(hits) == 5
    if qe == 0:  # with QE the expanded query may prefer a near neighbour; without, the image itself is exact
        assert hits[0].image_id == "Leopards/image_0001.jpg"
        assert hits[0].score == pytest.approx(max(h.score for h in hits))
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]


def test_batch_search_is_consistent_with_single(tiny_features, tiny_index):
    s = Searcher(tiny_index)
    imgs = [str(p) for p in sorted(Path(tiny_features["images"]).rglob("*.jpg"))[:4]]
    batch = s.search(imgs, top_k=3, rerank=5)
    single = [s.search([i], top_k=3, rerank=5)[0] for i in imgs]
    assert [[h.image_id for h in b] for b in batch] == [[h.image_id for h in b] for b in single]


def test_search_cli_json(tiny_features, tiny_index):
    img = str(Path(tiny_features["images"]) / "watch" / "image_0002.jpg")
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--index", tiny_index, "--image", img,
                          "--top-k", "3", "--rerank", "5", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["image_id"] == "watch/image_0002.jpg"
    assert set(rows[0]) == {"rank", "image_id", "uri", "score", "matched_box"}
    assert len(rows[0]["matched_box"]) == 4


def test_unfinished_index_is_refused(tmp_path):
    with pytest.raises(Exception, match="no finished index"):
        Searcher(str(tmp_path))


def test_query_model_follows_the_index_and_old_indexes_mean_one_scale(tiny_features, tiny_index):
    s = Searcher(tiny_index)
    assert s.model.config.region_scales == s.meta["model"]["region_scales"]
    old = Searcher(tiny_index)
    del old.meta["model"]["region_scales"]  # as written before region pyramids existed
    assert old.model.scales == (1.0,)


def test_rerank_reads_only_the_candidates_and_equals_the_whole_store(tiny_features, tiny_index, monkeypatch):
    """Searcher.rerank fetches the top-N's regions (RegionStore.fetch) and ranks as rerank_top over the whole
    store (every part fetched) does."""
    import numpy as np

    from pipeline.retrieval.rerank import rerank_top

    s = Searcher(tiny_index)
    n = int(s.meta["images"])
    everything = s.regions.fetch(np.arange(n))  # the reference: the whole store, decoded
    rng = np.random.default_rng(0)
    qg = rng.standard_normal((3, everything.desc.shape[1])).astype(np.float32)
    ids = np.stack([rng.permutation(n)[:8] for _ in range(3)])
    ids[2, -2:] = -1  # faiss padding
    scores = -np.sort(-rng.random((3, 8)).astype(np.float32), axis=1)
    asked = []
    real = s.regions.fetch
    monkeypatch.setattr(s.regions, "fetch", lambda rows: asked.append(np.array(rows)) or real(rows))
    got_ids, got_sc = s.rerank([{"gem": g} for g in qg], ids, scores, 5, mode="gem")
    ref_ids, ref_sc = rerank_top(qg, ids, scores, everything.desc, everything.offsets, 5)
    np.testing.assert_array_equal(got_ids, ref_ids)
    np.testing.assert_allclose(got_sc, ref_sc, atol=1e-6)
    assert len(asked) == 1 and sorted(asked[0].tolist()) == sorted(set(ids[:, :5].ravel().tolist()) - {-1})


def test_resolve_reads_the_id_parts_of_its_rows(tiny_features, tiny_index):
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.store import feature_store as fstore

    s = Searcher(tiny_index)
    t = fstore.read_live_table(tiny_features["features"], "images")
    t = t.filter(pc.equal(t.column("status"), "ok"))
    want = list(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))
    rows = np.array([len(want) - 1, 0, 11, 11])
    assert s.resolve(rows) == [want[i] for i in rows]
    with pytest.raises(IndexError):
        s.resolve(np.array([len(want)]))


def test_ivf_index_on_s3_round_trip(tiny_features, tmp_path, s3_server, s3_bucket):
    """An IVF index built into S3 (on-disk inverted lists uploaded with streamed checksums) is downloaded to a local
    cache, memory-mapped and answers as the same build on local disk; its regions are fetched by ranged reads."""
    import numpy as np

    so = s3_server
    kw = {"features": tiny_features["features"], "pca_dim": 16, "factory": "IVF2,SQ8", "nprobe": 2, "in_process": True}
    rd.build(IndexConfig(output=f"s3://{s3_bucket}/ivf", storage_options=json.dumps(so), **kw))
    local = str(tmp_path / "local")
    rd.build(IndexConfig(output=local, **kw))
    remote, near = Searcher(f"s3://{s3_bucket}/ivf", so, cache_dir=str(tmp_path / "cache")), Searcher(local)
    rng = np.random.default_rng(0)
    c = near.pca["crow"].mean.shape[0]  # the model's channels: every vector of the tiny model has that size
    outs = [{k: rng.standard_normal(c).astype(np.float32) for k in ("global", "rmac", "local", "crow", "gem")}
            for _ in range(2)]
    a = remote.search_vectors(outs, top_k=5, rerank=5, mode="gem")
    b = near.search_vectors(outs, top_k=5, rerank=5, mode="gem")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert remote.resolve(a[0][0]) == near.resolve(b[0][0])


# --------------------------------------------------------------------------------------------------------------------
# Query regions, matched boxes, the region store, batch search
# --------------------------------------------------------------------------------------------------------------------


def _regions_table(features):
    from pipeline.store import feature_store as fstore

    return fstore.read_live_table(features, "regions", {}, ["rank", "box", "descriptor"])


def test_region_store_fetch_matches_the_extraction(tiny_features, tiny_index):
    import numpy as np

    s = Searcher(tiny_index)
    r = _regions_table(tiny_features["features"])
    ids = r.column("image_id").to_pylist()
    rank = r.column("rank").to_numpy()
    boxes = np.stack(r.column("box").to_numpy(zero_copy_only=False))
    rows = np.array([5, 0, 5, 17])
    batch = s.regions.fetch(rows)
    assert batch.offsets[0] == 0 and len(batch.offsets) == 5 and batch.desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch.desc, axis=1), 1, atol=1e-5)
    for k, (iid, _) in enumerate(s.resolve(rows)):
        mine = sorted(np.flatnonzero(np.array(ids) == iid), key=lambda j: rank[j])
        np.testing.assert_array_equal(batch.boxes[batch.offsets[k]:batch.offsets[k + 1]], boxes[mine])


def test_a_box_searches_exactly_like_a_file_holding_that_region(tiny_features, tiny_index, tmp_path):
    import numpy as np
    from PIL import Image

    s = Searcher(tiny_index)
    img = Path(tiny_features["images"]) / "Leopards" / "image_0001.jpg"
    box = (20.0, 10.0, 140.0, 90.0)
    with Image.open(img) as im:
        im.convert("RGB").crop(tuple(int(v) for v in box)).save(tmp_path / "crop.png")
    a = s.describe([str(img)], [box])[0]
    b = s.describe([str(tmp_path / "crop.png")])[0]
    for k in ("global", "crow", "gem", "regions"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    whole = s.describe([str(img)])[0]
    assert not np.allclose(whole["crow"], a["crow"])
    with pytest.raises(ValueError, match="outside"):
        s.describe([str(img)], [(5000.0, 5000.0, 6000.0, 6000.0)])


@pytest.mark.parametrize("mode", ["regions", "gem"])
def test_matched_box_is_the_best_matching_region_of_the_hit(tiny_features, tiny_index, mode):
    import numpy as np

    from pipeline.reduce.pca import l2n

    s = Searcher(tiny_index)
    img = str(Path(tiny_features["images"]) / "watch" / "image_0002.jpg")
    out = s.describe([img])
    ids, scores = s.search_vectors(out, top_k=4, rerank=10, mode=mode)
    hits = s.hits(out, ids, scores, mode)[0]
    # Reference from the store's own (float16-stored) descriptors: centring amplifies the float16 rounding, so the
    # extraction's float32 descriptors can pick another region of a near tie.
    batch = s.regions.fetch(ids[0])
    q = l2n(out[0]["regions"]) if mode == "regions" else l2n(out[0]["gem"][None])
    desc = batch.desc
    if mode == "regions":  # centred on the mean of the index's regions
        mu = s.regions.center
        q, desc = l2n(q - mu), l2n(desc - mu)
    for k, h in enumerate(hits):
        lo, hi = batch.offsets[k], batch.offsets[k + 1]
        sims = (q @ desc[lo:hi].T).max(axis=0)  # each of the hit's regions: its best query region
        np.testing.assert_allclose(h.matched_box, batch.boxes[lo + int(np.argmax(sims))], atol=0.06)


def test_search_cli_box_and_sheet(tiny_features, tiny_index, tmp_path):
    img = str(Path(tiny_features["images"]) / "watch" / "image_0002.jpg")
    sheet = tmp_path / "hits.png"
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--index", tiny_index, "--image", img,
                          "--box", "10,10,120,90", "--top-k", "3", "--rerank", "5", "--json", "--sheet", str(sheet)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 3 and all(len(r["matched_box"]) == 4 for r in rows)
    from PIL import Image

    with Image.open(sheet) as im:
        assert im.width > 500  # four tiles across: the query and three hits
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--index", tiny_index, "--image", img,
                          "--box", "9000,9000,9100,9100"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "outside" in bad.stderr


def test_batch_search_writes_one_row_per_query_and_rank(tiny_features, tiny_index, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from pipeline.schema import search_results_schema

    qdir = tmp_path / "queries"
    (qdir / "sub").mkdir(parents=True)
    src = Path(tiny_features["images"])
    shutil.copy(src / "watch" / "image_0002.jpg", qdir / "sub" / "w.jpg")
    shutil.copy(src / "Leopards" / "image_0001.jpg", qdir / "l.jpg")
    (tmp_path / "boxes.csv").write_text("query_id,x1,y1,x2,y2\nsub/w.jpg,10,10,120,90\n")
    out = tmp_path / "res.parquet"
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--index", tiny_index, "--queries",
                          str(qdir), "--boxes", str(tmp_path / "boxes.csv"), "--top-k", "3", "--rerank", "5",
                          "--batch-size", "1", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    t = pq.read_table(out)
    assert t.schema.equals(search_results_schema())
    d = t.to_pylist()
    assert [(r["query_id"], r["rank"]) for r in d] == [("l.jpg", 1), ("l.jpg", 2), ("l.jpg", 3),
                                                       ("sub/w.jpg", 1), ("sub/w.jpg", 2), ("sub/w.jpg", 3)]
    assert d[0]["query_box"] is None and d[3]["query_box"] == [10, 10, 120, 90]
    # The same as searching one by one.
    s = Searcher(tiny_index)
    single = s.search([str(qdir / "sub" / "w.jpg")], top_k=3, rerank=5, boxes=[(10, 10, 120, 90)])[0]
    assert [r["image_id"] for r in d[3:]] == [h.image_id for h in single]
    assert [r["score"] for r in d[3:]] == pytest.approx([h.score for h in single], abs=1e-5)
    assert d[0]["image_id"] == "Leopards/image_0001.jpg"


@pytest.mark.parametrize("kw,msg", [
    ({"image": "a.jpg", "queries": "q/"}, "one of --image or --queries"),
    ({}, "one of --image or --queries"),
    ({"queries": "q/"}, "--queries needs --output"),
    ({"queries": "q/", "output": "o.parquet", "box": "1,2,3,4"}, "--queries needs --output"),
    ({"image": "a.jpg", "boxes": "b.csv"}, "--boxes and --output go with --queries"),
    ({"image": "a.jpg", "box": "5,5,1,1"}, "x1 < x2"),
    ({"image": "a.jpg", "box": "1,2,3"}, "x1,y1,x2,y2"),
])
def test_search_config_refuses_bad_combinations(kw, msg):
    from pipeline.config import ConfigError, SearchConfig, from_dict

    with pytest.raises(ConfigError, match=msg):
        from_dict(SearchConfig, {"index": "idx", **kw})


# --------------------------------------------------------------------------------------------------------------------
# The fused vector's global part (--fuse-global): recorded by the build, followed by the queries
# --------------------------------------------------------------------------------------------------------------------


def _stored_outs(features: str):
    """The extraction's image rows as model outputs (one dict per image, sorted by image_id): what describing those
    images again would give, without running the model."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.schema import VECTOR_COLUMNS, column_to_numpy
    from pipeline.store import feature_store as fstore

    t = fstore.read_live_table(features, "images", None, ["status", *VECTOR_COLUMNS])
    t = t.filter(pc.equal(t.column("status"), "ok")).sort_by("image_id")
    v = {k: column_to_numpy(t, k) for k in VECTOR_COLUMNS}
    rows = range(t.num_rows)
    all_ids = t.column("image_id").to_pylist()
    outs = [{k: np.asarray(v[k][i], np.float32) for k in VECTOR_COLUMNS} for i in rows]
    return all_ids, v, outs


def _numpy_ranking(v, fuse_global: str, k: int):
    """Exact reference: the fused vectors written out in numpy, PCA fitted on every image (as a build whose sample
    holds the whole corpus), L2, then every image against every image by inner product."""
    import numpy as np

    from pipeline.reduce.pca import PCA

    def n(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    part = np.concatenate([n(v["global"]), n(v["rmac"])], axis=1) if fuse_global == "global+rmac" else v[fuse_global]
    x = PCA.fit(np.concatenate([n(part), n(v["local"])], axis=1).astype(np.float32), 16).transform(
        np.concatenate([n(part), n(v["local"])], axis=1).astype(np.float32))
    sims = x @ x.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


def test_default_index_fuses_global_and_rmac_and_search_equals_exact_numpy(tiny_features, tiny_index):
    """The default build fuses global + R-MAC; search fuses its queries the same way (read from the marker), so the
    hits of every corpus image are the exact numpy ranking's."""
    import numpy as np

    s = Searcher(tiny_index)
    assert s.meta["config"]["fuse_global"] == s.fuse_global == "global+rmac"
    ids, v, outs = _stored_outs(tiny_features["features"])
    got, scores = s.search_vectors(outs, top_k=5)
    ref, ref_scores = _numpy_ranking(v, "global+rmac", 5)
    np.testing.assert_array_equal(got, ref)  # index rows follow image_id order
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    assert [i for i, _ in s.resolve(got[:, 0])] == ids
    # The model's own outputs carry R-MAC: a described query finds its image first.
    img = str(Path(tiny_features["images"]) / "Leopards" / "image_0001.jpg")
    d = s.describe([img])
    assert "rmac" in d[0]
    assert s.resolve(s.search_vectors(d, top_k=1)[0][0])[0][0] == "Leopards/image_0001.jpg"


def test_index_without_fuse_global_in_its_marker_searches_as_the_global_one(tiny_features, tmp_path):
    """An index built before the option existed (no fuse_global in its marker's config) fused the paper's global
    feature: its queries are fused the same way; an unknown value in a marker is refused."""
    import numpy as np

    from pipeline.io import storage
    from pipeline.store import index_store as layout

    out = str(tmp_path / "old")
    rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=16, in_process=True,
                         fuse_global="global"))
    done = storage.join(out, layout.DONE)
    marker = storage.read_json(done)
    del marker["config"]["fuse_global"]  # as written before the option existed
    storage.write_json(done, marker)
    s = Searcher(out)
    assert s.fuse_global == "global"
    _, v, outs = _stored_outs(tiny_features["features"])
    got, scores = s.search_vectors(outs, top_k=5)
    ref, ref_scores = _numpy_ranking(v, "global", 5)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    marker["config"]["fuse_global"] = "gem"
    storage.write_json(done, marker)
    with pytest.raises(storage.StorageError, match="unknown fuse_global 'gem'"):
        Searcher(out)
