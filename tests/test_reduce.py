"""Tests of the reduce stage (pipeline/reduce/build.py, pipeline/store/index_store.py): index artifacts from an extraction, streamed, through fsspec."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.config import IndexConfig
from pipeline.io import storage
from pipeline.reduce import build as rd
from pipeline.reduce.faiss_index import load_index
from pipeline.reduce.pca import PCA, fuse, l2n
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout


def _build(features: str, out: str, **kw) -> dict:
    return rd.build(IndexConfig(features=features, output=out, pca_dim=16, **kw))


def test_index_matches_numpy_reference(tiny_features, tmp_path):
    out = str(tmp_path / "index")
    marker = _build(tiny_features["features"], out)
    t = fstore.read_live_table(tiny_features["features"], "images")
    t = t.filter(pc.equal(t.column("status"), "ok"))
    assert marker["images"] == t.num_rows == 24
    ids = storage.read_parquet(storage.join(out, layout.IDS)).column("image_id").to_pylist()
    assert ids == sorted(ids) == t.column("image_id").to_pylist()
    # The fused index holds PCA(concat(L2 global, L2 local)) + L2 of every image, in id-map order.
    pca = PCA.load(storage.join(out, layout.PCA_FUSED))
    ref = pca.transform(fuse(column_to_numpy(t, "global"), column_to_numpy(t, "local"), 1.0))
    index = load_index(storage.join(out, layout.INDEX_FUSED))
    got = np.stack([index.reconstruct(i) for i in range(index.ntotal)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # Exact search equals brute force.
    scores, found = index.search(ref[:5], 5)
    brute = np.argsort(-(ref[:5] @ ref.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found[:, 0], brute[:, 0])
    np.testing.assert_allclose(scores, np.take_along_axis(ref[:5] @ ref.T, brute, 1), atol=1e-5)


def test_region_store_follows_id_map(tiny_features, tmp_path):
    out = str(tmp_path / "index")
    _build(tiny_features["features"], out)
    ids = storage.read_parquet(storage.join(out, layout.IDS)).column("image_id").to_pylist()
    regions = storage.npy_from_bytes(storage.read_bytes(storage.join(out, layout.REGIONS)))
    offsets = storage.npy_from_bytes(storage.read_bytes(storage.join(out, layout.OFFSETS)))
    assert offsets[0] == 0 and offsets[-1] == len(regions) and len(offsets) == len(ids) + 1
    r = fstore.read_live_table(tiny_features["features"], "regions")
    for row in (0, 7, len(ids) - 1):
        mine = r.filter(pc.equal(r.column("image_id"), ids[row])).sort_by("rank")
        ref = l2n(column_to_numpy(mine, "descriptor"))
        np.testing.assert_allclose(regions[offsets[row]:offsets[row + 1]].astype(np.float32), ref, atol=2e-3)


def test_done_marker_written_last_and_s3_round_trip(tiny_features, s3_server, s3_bucket):
    import json

    out = f"s3://{s3_bucket}/index/run1"
    marker = _build(tiny_features["features"], out, storage_options=json.dumps(s3_server))
    fs, path = storage.url_to_fs(out, s3_server)
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    assert {layout.PCA_FUSED, layout.PCA_CROW, layout.INDEX_FUSED, layout.INDEX_CROW, layout.IDS, layout.REGIONS, layout.OFFSETS, layout.DONE} <= files
    done_mtime = fs.info(f"{path}/{layout.DONE}")["LastModified"]
    assert all(fs.info(f"{path}/{f}")["LastModified"] <= done_mtime for f in files)
    assert load_index(f"{out}/{layout.INDEX_FUSED}", s3_server).ntotal == marker["images"]


def test_missing_features_fail_clearly(tmp_path):
    with pytest.raises(storage.StorageError, match="no successfully extracted images"):
        _build(str(tmp_path / "nothing"), str(tmp_path / "index"))


def test_factory_override_and_saved_search_params(tiny_features, tmp_path):
    import faiss

    out = str(tmp_path / "ivf")
    marker = _build(tiny_features["features"], out, factory="IVF2,Flat", nprobe=2)
    assert marker["factory"] == {"fused": "IVF2,Flat", "crow": "IVF2,Flat"}
    index = load_index(storage.join(out, layout.INDEX_FUSED))
    assert faiss.extract_index_ivf(index).nprobe == 2  # saved with the index: every list visited, so exact
    exact = load_index(storage.join(_exact(tiny_features, tmp_path), layout.INDEX_FUSED))
    q = np.stack([exact.reconstruct(i) for i in range(4)])
    np.testing.assert_array_equal(index.search(q, 5)[1], exact.search(q, 5)[1])


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
        if url.endswith(layout.REGIONS):
            raise KeyboardInterrupt("killed")
        return real(url, data, so)

    monkeypatch.setattr(storage, "write_bytes", die_on_the_region_store)
    with pytest.raises(KeyboardInterrupt):
        rd.build(IndexConfig(features=tiny_features["features"], output=out, pca_dim=8))  # other files than the first
    monkeypatch.undo()
    with pytest.raises(storage.StorageError, match="no finished index"):
        Searcher(out)


def test_a_file_overwritten_after_the_marker_is_refused(tiny_features, tmp_path):
    """Files that are not the ones the marker describes (copied from another build) are refused, not served."""
    from pipeline.retrieval.search import Searcher

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _build(tiny_features["features"], a)
    rd.build(IndexConfig(features=tiny_features["features"], output=b, pca_dim=8))
    storage.write_bytes(storage.join(a, layout.PCA_FUSED), storage.read_bytes(storage.join(b, layout.PCA_FUSED)))
    with pytest.raises(storage.StorageError, match="not the file"):
        Searcher(a)
    marker = storage.read_json(storage.join(b, layout.DONE))
    assert set(marker["files"]) == {layout.PCA_FUSED, layout.PCA_CROW, layout.INDEX_FUSED, layout.INDEX_CROW,
                                    layout.IDS, layout.REGIONS, layout.OFFSETS, layout.BOXES}
