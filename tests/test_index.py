"""Tests for pipeline.reduce.faiss_index: factory choice, exact and IVF search against numpy, params, (S3) round trips."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.reduce.faiss_index import (
    add_chunks,
    build_index,
    choose_factory,
    load_index,
    new_index,
    save_index,
    search,
    set_search_params,
)
from pipeline.reduce.pca import l2n


def _clustered(n: int, d: int, n_clusters: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm Gaussian clusters (noise as large as the centre) and queries from the same clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
    q = centers[rng.integers(0, n_clusters, n_queries)] + rng.standard_normal((n_queries, d)).astype(np.float32)
    return l2n(x), l2n(q)


def _numpy_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


@pytest.mark.parametrize(
    "n,d,budget,expected",
    [
        (1_000, 256, 1 << 30, "Flat"),  # fits, small
        (200_000, 256, 1 << 30, "Flat"),  # at the exact-search size limit
        (5_000, 4096, 1 << 20, "Flat"),  # over budget but too small to train PQ
        (300_000, 256, 1 << 30, "IVF2048,SQ8"),  # too many rows for Flat: 4*sqrt(3e5)=2191 -> 2048
        (100_000, 256, 64 << 20, "IVF1024,SQ8"),  # over budget: 4*sqrt(1e5)=1265 -> 1024
        (1_000_000, 256, 100 << 20, "IVF4096,SQ8"),  # 4000 -> 4096
        (20_000, 256, 1 << 20, "IVF512,SQ8"),  # 4*sqrt(2e4)=566 -> 512 (<= 20000 // 39)
        (10_000, 256, 1 << 20, "IVF256,SQ8"),  # 400 -> 512, halved to 256 for 39 points/list
    ],
)
def test_choose_factory(n, d, budget, expected):
    assert choose_factory(n, d, budget) == expected


def test_chosen_compressed_factory_reaches_recall():
    """The factory the size rule picks past Flat keeps recall@10 >= 0.95 against exact search at the saved nprobe."""
    x, q = _clustered(12_000, 64, 30, 200, seed=5)
    factory = choose_factory(len(x), 64, 1 << 10)
    assert factory == "IVF256,SQ8"
    index = build_index(x, factory)
    set_search_params(index, nprobe=32)
    exact = build_index(x, "Flat")
    assert _recall(search(index, q, 10)[1], search(exact, q, 10)[1]) >= 0.95


def test_choose_factory_rejects_empty():
    with pytest.raises(ValueError):
        choose_factory(0, 256, 1 << 30)


def test_flat_equals_numpy_brute_force():
    x, q = _clustered(3_000, 64, 20, 50)
    index = build_index(x, "Flat")
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores, ids = search(index, q, 10)
    ref_scores, ref_ids = _numpy_topk(x, q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_add_chunks_streams_same_as_build():
    x, q = _clustered(1_000, 32, 10, 20, seed=2)
    streamed = faiss.index_factory(32, "Flat", faiss.METRIC_INNER_PRODUCT)
    assert add_chunks(streamed, (x[i : i + 300] for i in range(0, len(x), 300))) == len(x)
    assert streamed.ntotal == len(x)
    np.testing.assert_array_equal(search(streamed, q, 5)[1], search(build_index(x, "Flat"), q, 5)[1])


def test_ivf_recall_against_exact():
    """IVF256,Flat on 50k x 256 clustered data: nprobe=16 reaches recall@10 >= 0.95 (about 4 s)."""
    x, q = _clustered(50_000, 256, 100, 200)
    _, exact = search(build_index(x, "Flat"), q, 10)
    index = build_index(x, "IVF256,Flat", train_sample=20_000)
    assert set_search_params(index, nprobe=1) == {"nprobe": 1}
    recall_1 = _recall(search(index, q, 10)[1], exact)
    set_search_params(index, nprobe=16)
    recall_16 = _recall(search(index, q, 10)[1], exact)
    assert recall_16 >= 0.95
    assert recall_1 < recall_16  # the data is hard enough for nprobe to matter


def test_ivfpq_builds_and_searches():
    x, q = _clustered(12_000, 64, 30, 20, seed=3)
    index = build_index(x, "IVF256,PQ8", train_sample=5_000)
    assert index.is_trained and index.ntotal == len(x)
    assert not faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training  # would cost ~40 s for nothing
    set_search_params(index, nprobe=8)
    scores, ids = search(index, q, 10)
    assert ids.min() >= 0 and np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("factory", ["PQ8", "IVF16,PQ8", "IVF16,PQ8,RFlat", "OPQ8,IVF16,PQ8"])
def test_new_index_turns_off_polysemous_training(factory):
    index = new_index(64, factory)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    ivf = faiss.try_extract_index_ivf(index)
    pq = faiss.downcast_index(ivf) if ivf is not None else faiss.downcast_index(index)
    assert not pq.do_polysemous_training


def test_set_search_params_skips_missing_and_sets_hnsw():
    x, _ = _clustered(2_000, 32, 10, 1)
    assert set_search_params(build_index(x, "Flat"), nprobe=8, ef_search=64) == {}
    hnsw = build_index(x, "HNSW32")
    assert set_search_params(hnsw, nprobe=8, ef_search=77) == {"efSearch": 77}
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 77


def test_search_pads_with_minus_one():
    x, q = _clustered(5, 8, 2, 2)
    _, ids = search(build_index(x, "Flat"), q, 8)
    assert np.all(ids[:, 5:] == -1)


def _ivf_for_round_trip() -> tuple[faiss.Index, np.ndarray]:
    x, q = _clustered(4_000, 32, 20, 30, seed=4)
    index = build_index(x, "IVF32,Flat")
    set_search_params(index, nprobe=5)
    return index, q


def test_save_load_local_round_trip(tmp_path):
    index, q = _ivf_for_round_trip()
    url = str(tmp_path / "index.faiss")
    save_index(index, url)
    loaded = load_index(url)
    assert faiss.extract_index_ivf(loaded).nprobe == 5  # search parameters travel with the file
    for a, b in zip(search(index, q, 10), search(loaded, q, 10)):
        np.testing.assert_array_equal(a, b)


def test_save_load_s3_round_trip(s3_server, s3_bucket):
    index, q = _ivf_for_round_trip()
    url = f"s3://{s3_bucket}/indexes/global.faiss"
    save_index(index, url, storage_options=s3_server)
    loaded = load_index(url, storage_options=s3_server)
    assert loaded.ntotal == index.ntotal
    for a, b in zip(search(index, q, 10), search(loaded, q, 10)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("whiten", [False, True])
def test_pca_matrix_and_pretransform_equal_our_pca(tmp_path, whiten):
    """Our PCA as a faiss PCAMatrix projects like PCA.project (whitening included); the wrapped index, read back from
    a file, searches raw vectors as the bare index searches PCA.transform of them; unwrap gives the index inside."""
    from pipeline.reduce.faiss_index import pca_matrix, unwrap, with_pca
    from pipeline.reduce.pca import PCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).astype(np.float32) * np.linspace(3, 0.2, 24, dtype=np.float32)
    pca = PCA.fit(x, 12, whiten=whiten)
    t = pca_matrix(pca.mean, pca.components, pca.eigvals, pca.whiten)
    np.testing.assert_allclose(t.apply(x), pca.project(x), rtol=1e-4, atol=1e-5)
    inner = build_index(pca.transform(x), "Flat")
    path = str(tmp_path / "pt.faiss")
    faiss.write_index(with_pca(inner, t), path)
    loaded = faiss.read_index(path)
    assert isinstance(loaded, faiss.IndexPreTransform) and loaded.d == 24
    q = x[:20] + 0.01 * rng.standard_normal((20, 24)).astype(np.float32)
    d_raw, i_raw = loaded.search(q, 5)
    d_pca, i_pca = inner.search(pca.transform(q), 5)
    np.testing.assert_array_equal(i_raw, i_pca)
    np.testing.assert_allclose(d_raw, d_pca, atol=1e-5)
    assert unwrap(loaded).ntotal == 300 and not isinstance(unwrap(loaded), faiss.IndexPreTransform)
    assert unwrap(inner) is inner


def test_pca_matrix_matches_our_pca_on_rank_deficient_data():
    """Rank-deficient data, whitened: the axes with variance match, the null one (noise divided by ~1e-6) stays finite."""
    from pipeline.reduce.faiss_index import pca_matrix
    from pipeline.reduce.pca import PCA

    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x[:, 1] = x[:, 0]  # rank 7
    pca = PCA.fit(x, 8, whiten=True)
    assert pca.eigvals[-1] < 1e-6
    t = pca_matrix(pca.mean, pca.components, pca.eigvals, True)
    y, ref = t.apply(x), pca.project(x)
    np.testing.assert_allclose(y[:, :-1], ref[:, :-1], rtol=1e-4, atol=1e-4)
    assert np.isfinite(y).all()
