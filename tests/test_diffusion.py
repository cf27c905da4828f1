"""Tests of pipeline/bench/diffusion.py: DBA, the kNN graph and diffusion against dense numpy references."""

from __future__ import annotations

import numpy as np

from pipeline.bench.diffusion import dba, diffusion_ranking, diffusion_scores, knn_graph


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_dba_matches_a_loop():
    rng = np.random.default_rng(0)
    db = _unit_rows(rng, 12, 5)
    for k, alpha in ((2, 0.0), (4, 3.0)):
        got = dba(db, k, alpha)
        sims = db @ db.T
        for i in range(len(db)):
            others = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:k]
            v = db[i] + sum(max(sims[i, j], 0) ** alpha * db[j] for j in others)
            np.testing.assert_allclose(got[i], v / np.linalg.norm(v), atol=1e-5)
    np.testing.assert_array_equal(dba(db, 0), db)


def test_knn_graph_matches_dense_reference():
    rng = np.random.default_rng(1)
    db = _unit_rows(rng, 10, 4)
    s = knn_graph(db, k=3, gamma=2.0).toarray()
    sims = db @ db.T
    w = np.zeros((10, 10))
    for i in range(10):
        for j in [j for j in np.argsort(-sims[i], kind="stable") if j != i][:3]:
            w[i, j] = max(sims[i, j], 0) ** 2
    w = np.maximum(w, w.T)
    d = w.sum(1)
    np.testing.assert_allclose(s, w / np.sqrt(np.outer(d, d)), atol=1e-6)


def test_diffusion_scores_converge_to_the_closed_form():
    rng = np.random.default_rng(2)
    db = _unit_rows(rng, 15, 4)
    s = knn_graph(db, k=4)
    q = db[[0, 7]]
    got = diffusion_scores(s, db, q, k=5, alpha=0.5, gamma=3.0, iters=80)
    sims = q @ db.T
    y = np.zeros((15, 2))
    for c in range(2):
        top = np.argsort(-sims[c], kind="stable")[:5]
        y[top, c] = np.maximum(sims[c, top], 0) ** 3
    ref = 0.5 * np.linalg.solve(np.eye(15) - 0.5 * s.toarray(), y)
    np.testing.assert_allclose(got, ref.T, rtol=1e-4, atol=1e-6)


def test_diffusion_ranking_orders_by_diffusion_then_similarity():
    # Two tight clusters on a line of angles; the query's own cluster comes first, every row appears once.
    angles = np.array([0, 5, 10, 15, 90, 95, 100, 105], dtype=np.float64)
    db = np.stack([np.cos(np.deg2rad(angles)), np.sin(np.deg2rad(angles))], axis=1).astype(np.float32)
    rk = diffusion_ranking(db, db[[0, 5]], depth=8, k=2, alpha=0.9, seeds=2)
    assert sorted(rk[0].tolist()) == list(range(8))
    assert set(rk[0, :4].tolist()) == {0, 1, 2, 3} and set(rk[1, :4].tolist()) == {4, 5, 6, 7}
    # Unreached rows (zero diffusion score) follow by plain similarity.
    sims = db[0] @ db.T
    tail = rk[0, 4:].tolist()
    assert tail == sorted(tail, key=lambda i: (-sims[i], i))
    assert rk.shape == (2, 8) and rk.dtype == np.int64
