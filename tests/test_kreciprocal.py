"""Tests of k-reciprocal re-ranking (pipeline/bench/kreciprocal.py) against a dense port of Zhong et al.'s code."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.bench.kreciprocal import jaccard_distances, k_reciprocal_encoding, k_reciprocal_ranking


def _reference(probe_gallery: np.ndarray, n_probe: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re_ranking (dense numpy, loops as published) on L2-normalised rows: the final distance of the
    first ``n_probe`` rows to every row. The original distance is squared Euclidean, each row divided by its largest."""
    x = probe_gallery.astype(np.float64)
    m = len(x)
    d = np.maximum(2 - 2 * x @ x.T, 0)
    d = (d / d.max(axis=0)).T  # the published scaling: columns by their max, transposed (= rows, d symmetric)
    rank = np.argsort(-(x @ x.T), axis=1, kind="stable")  # nearest first; the similarity order breaks ties
    v = np.zeros((m, m))
    for i in range(m):
        fwd = rank[i, :k1 + 1]
        back = rank[fwd, :k1 + 1]
        recip = fwd[np.where(back == i)[0]]
        grown = recip
        for c in recip:
            cf = rank[c, :int(np.around(k1 / 2)) + 1]
            cb = rank[cf, :int(np.around(k1 / 2)) + 1]
            crecip = cf[np.where(cb == c)[0]]
            if len(np.intersect1d(crecip, recip)) > 2 / 3 * len(crecip):
                grown = np.append(grown, crecip)
        grown = np.unique(grown)
        w = np.exp(-d[i, grown])
        v[i, grown] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(m)])
    jac = np.zeros((n_probe, m))
    for i in range(n_probe):
        inter = np.minimum(v[i], v).sum(axis=1)
        jac[i] = 1 - inter / (2 - inter)
    return jac * (1 - lam) + d[:n_probe] * lam


def _data(n: int, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, d)) * 2
    x = centres[rng.integers(0, 4, n)] + rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k1,k2,lam", [(6, 3, 0.3), (4, 1, 0.0), (8, 2, 0.7)])
def test_separate_queries_rank_as_the_published_code(k1, k2, lam):
    x = _data(45)
    q, db = x[:5], x[5:]
    ref = _reference(x, 5, k1, k2, lam)[:, 5:]  # probes against the gallery
    got = k_reciprocal_ranking(db, q, 40, k1=k1, k2=k2, lam=lam)
    # Same order wherever the reference's distances are not tied (ties: the similarity order, checked below).
    for i in range(5):
        np.testing.assert_allclose(ref[i][got[i]], np.sort(ref[i]), atol=1e-5)


def test_database_row_queries_use_the_database_encoding_and_rank_as_the_reference():
    db = _data(40, seed=1)
    rows = np.array([3, 17, 30])
    ref = _reference(db, len(db), 6, 3, 0.3)[rows]  # probe = gallery = the database, the queries among it
    got = k_reciprocal_ranking(db, db[rows], 40, k1=6, k2=3, lam=0.3, q_rows=rows)
    for i in range(len(rows)):
        np.testing.assert_allclose(ref[i][got[i]], np.sort(ref[i]), atol=1e-5)
    assert (got[:, 0] == rows).all()  # each query's own row: Jaccard 0, distance 0


def test_encoding_rows_sum_to_one_and_jaccard_of_a_row_with_itself_is_zero():
    x = _data(30, seed=2)
    v = k_reciprocal_encoding(x, 5, 3)
    np.testing.assert_allclose(np.asarray(v.sum(axis=1)).ravel(), 1.0, atol=1e-5)
    jac = jaccard_distances(v[:4], v)
    np.testing.assert_allclose(jac[np.arange(4), np.arange(4)], 0.0, atol=1e-6)
    assert jac.min() >= -1e-6 and jac.max() <= 1 + 1e-6
    dense = v.toarray()
    inter = np.minimum(dense[:4, None], dense[None]).sum(axis=2)
    np.testing.assert_allclose(jac, 1 - inter / (2 - inter), atol=1e-6)
