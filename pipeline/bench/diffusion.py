"""Database-side augmentation (DBA) and diffusion re-ranking over a k-nearest-neighbour graph of the database."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.bench.metrics import rank_by_similarity
from pipeline.reduce.pca import l2n


def dba(db: np.ndarray, k: int, alpha: float = 0.0) -> np.ndarray:
    """alpha-DBA (Radenovic et al.): each database vector replaced by the weighted mean of itself and its top ``k``
    other neighbours, weights ``max(sim, 0) ** alpha`` (``alpha = 0``: the plain average), then L2-normalised.

    Args:
        db: ``(N, d)`` L2-normalised database vectors.
        k: neighbours averaged in (besides the vector itself); 0 returns ``db`` unchanged.
        alpha: weight exponent.

    Returns:
        ``(N, d)`` ``float32`` augmented vectors.
    """
    db = np.asarray(db, np.float32)
    if k <= 0:
        return db.copy()
    ids, sims = rank_by_similarity(db, db, min(k + 1, len(db)), with_scores=True)
    # Each row's own vector ranks first (ties aside); weight it 1 whatever its position.
    own = ids == np.arange(len(db))[:, None]
    w = np.where(own, 1.0, np.maximum(sims, 0.0) ** alpha).astype(np.float32)
    if not own.any(axis=1).all():  # a tie pushed the row out of its own top: add it back with weight 1
        w = np.concatenate([w, (~own.any(axis=1))[:, None].astype(np.float32)], axis=1)
        ids = np.concatenate([ids, np.arange(len(db))[:, None]], axis=1)
    return l2n(np.einsum("nk,nkd->nd", w, db[ids]))


def knn_graph(db: np.ndarray, k: int, gamma: float = 3.0) -> sp.csr_matrix:
    """The symmetrically normalised affinity ``S = D^-1/2 W D^-1/2`` of a mutual-or kNN graph, ``W = sym(max(sim,
    0) ** gamma)`` over each vector's top ``k`` other neighbours (Iscen et al., CVPR 2017).

    Args:
        db: ``(N, d)`` L2-normalised vectors.
        k: neighbours per vector.
        gamma: similarity exponent.

    Returns:
        ``(N, N)`` sparse ``float64`` S.
    """
    n = len(db)
    ids, sims = rank_by_similarity(db, db, min(k + 1, n), with_scores=True)
    rows = np.repeat(np.arange(n), ids.shape[1])
    vals = np.maximum(sims.reshape(-1).astype(np.float64), 0.0) ** gamma
    off = ids.reshape(-1) != rows
    w = sp.csr_matrix((vals[off], (rows[off], ids.reshape(-1)[off])), shape=(n, n))
    w = w.maximum(w.T)
    deg = np.asarray(w.sum(axis=1)).reshape(-1)
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    return (dinv @ w @ dinv).tocsr()


def diffusion_scores(s: sp.csr_matrix, db: np.ndarray, queries: np.ndarray, k: int, alpha: float = 0.99,
                     gamma: float = 3.0, iters: int = 20) -> np.ndarray:
    """Diffusion of each query's top-``k`` similarities over the graph: ``f = (1 - alpha) sum_t (alpha S)^t y``,
    the truncated series of ``(1 - alpha) (I - alpha S)^-1 y`` (``iters`` terms).

    Args:
        s: the graph of :func:`knn_graph`.
        db: ``(N, d)`` L2-normalised database vectors.
        queries: ``(Q, d)`` L2-normalised query vectors.
        k: query neighbours that seed the diffusion.
        alpha: diffusion strength in ``[0, 1)``.
        gamma: similarity exponent of the seeds.
        iters: series terms.

    Returns:
        ``(Q, N)`` ``float32`` scores.
    """
    n = len(db)
    ids, sims = rank_by_similarity(queries, db, min(k, n), with_scores=True)
    y = np.zeros((n, len(queries)), np.float64)
    cols = np.repeat(np.arange(len(queries)), ids.shape[1])
    y[ids.reshape(-1), cols] = np.maximum(sims.reshape(-1), 0.0) ** gamma
    f = y.copy()
    for _ in range(iters):
        f = alpha * (s @ f) + y
    return ((1 - alpha) * f).T.astype(np.float32)


def diffusion_ranking(db: np.ndarray, queries: np.ndarray, depth: int, k: int = 50, alpha: float = 0.99,
                      gamma: float = 3.0, seeds: int = 10, iters: int = 20) -> np.ndarray:
    """Rank the database for each query by diffusion; items the diffusion does not reach follow in the order of
    plain similarity.

    Args:
        db: ``(N, d)`` L2-normalised database vectors.
        queries: ``(Q, d)`` L2-normalised query vectors (they seed the diffusion; a query need not be in ``db``).
        depth: ranking depth.
        k: neighbours per vector in the graph.
        alpha: diffusion strength.
        gamma: similarity exponent.
        seeds: query neighbours that seed the diffusion.
        iters: series terms.

    Returns:
        ``(Q, depth)`` ``int64`` rankings, best first.
    """
    s = knn_graph(db, k, gamma)
    q = np.asarray(queries, np.float32)
    f = diffusion_scores(s, db, q, seeds, alpha, gamma, iters)
    sims = q @ db.T
    # Primary key: the diffusion score; secondary: the plain similarity (np.lexsort sorts by the last key first).
    order = np.lexsort((np.arange(db.shape[0])[None, :].repeat(len(q), 0), -sims, -f), axis=1)
    return order[:, :depth].astype(np.int64)
