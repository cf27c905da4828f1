"""k-reciprocal re-ranking (Zhong et al., CVPR 2017): the Jaccard distance of k-reciprocal neighbour sets, mixed with
the original distance."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.bench.metrics import rank_by_similarity

_BATCH = 256  # query rows per block of the final distance (a block is (batch, N) float32)


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of L2-normalised rows, ``2 - 2 x.y``, each row divided by its largest (as Zhong et
    al.'s code scales the original distance)."""
    d = np.maximum(2.0 - 2.0 * (x @ y.T), 0.0).astype(np.float32)
    return d / np.maximum(d.max(axis=1, keepdims=True), np.float32(1e-12))


def k_reciprocal_encoding(x: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """Each row's k-reciprocal encoding ``V`` (eq. 7-10 of the paper): weights ``exp(-d)`` over its k-reciprocal
    neighbours, the set grown by each member's ``k1/2``-reciprocal set that shares more than 2/3 of it, normalised to
    sum 1; then averaged over the row's ``k2`` nearest rows (local query expansion, eq. 11).

    Args:
        x: ``(M, d)`` L2-normalised vectors (queries and database together, or the database alone when the queries
            are database rows).
        k1: neighbourhood size of the reciprocal sets.
        k2: rows averaged by the local expansion (1 = none).

    Returns:
        ``(M, M)`` sparse ``float32`` V, rows summing to 1.
    """
    x = np.asarray(x, np.float32)
    m = len(x)
    kk = min(k1 + 1, m)
    half = min(int(np.around(k1 / 2.0)) + 1, m)
    ids = rank_by_similarity(x, x, kk)  # each row's own index first (ties aside)

    def reciprocal(i: int, k: int) -> np.ndarray:
        """The members of i's top-k whose own top-k holds i."""
        fwd = ids[i, :k]
        return fwd[(ids[fwd, :k] == i).any(axis=1)]

    far = np.empty(m, np.float32)  # each row's largest distance, the scale of its weights
    for b in range(0, m, _BATCH):
        far[b:b + _BATCH] = np.maximum(2.0 - 2.0 * (x[b:b + _BATCH] @ x.T).min(axis=1), 1e-12)
    rows, cols, vals = [], [], []
    for i in range(m):
        r = reciprocal(i, kk)
        grown = [r]
        for c in r:
            rc = reciprocal(int(c), half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                grown.append(rc)
        r = np.unique(np.concatenate(grown))
        w = np.exp(-np.maximum(2.0 - 2.0 * (x[r] @ x[i]), 0.0) / far[i])
        rows.append(np.full(len(r), i))
        cols.append(r)
        vals.append(w / w.sum())
    v = sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(m, m))
    if k2 > 1:
        k = min(k2, kk)
        avg = sp.csr_matrix((np.full(m * k, 1.0 / k, np.float32), (np.repeat(np.arange(m), k), ids[:, :k].ravel())),
                            shape=(m, m))
        v = (avg @ v).tocsr()
    return v


def jaccard_distances(vq: sp.csr_matrix, vg: sp.csr_matrix) -> np.ndarray:
    """``1 - sum(min(Vq, Vg)) / sum(max(Vq, Vg))`` of every query row against every gallery row (rows sum to 1, so
    the denominator is ``2 - sum(min)``), through the gallery's columns that each query row touches.

    Args:
        vq: ``(Q, M)`` query encodings.
        vg: ``(N, M)`` gallery encodings.

    Returns:
        ``(Q, N)`` ``float32`` distances in [0, 1].
    """
    vq = sp.csr_matrix(vq)
    cols = sp.csc_matrix(vg)
    n = vg.shape[0]
    out = np.empty((vq.shape[0], n), np.float32)
    for i in range(vq.shape[0]):
        j = vq.indices[vq.indptr[i]:vq.indptr[i + 1]]
        qv = vq.data[vq.indptr[i]:vq.indptr[i + 1]]
        sub = cols[:, j]
        which = np.repeat(np.arange(len(j)), np.diff(sub.indptr))
        inter = np.bincount(sub.indices, np.minimum(sub.data, qv[which]), minlength=n)
        out[i] = 1.0 - inter / (2.0 - inter)
    return out


def k_reciprocal_ranking(db: np.ndarray, q: np.ndarray, depth: int, k1: int = 30, k2: int = 6, lam: float = 0.3,
                         q_rows: np.ndarray | None = None) -> np.ndarray:
    """Rank the database for each query by ``(1 - lam) * Jaccard + lam * original distance`` (Zhong et al. 2017).

    With ``q_rows`` (the queries are these database rows) the encodings are those of the database alone; otherwise
    the queries and the database are encoded together (the paper's probe + gallery).

    Args:
        db: ``(N, d)`` L2-normalised database vectors.
        q: ``(Q, d)`` L2-normalised query vectors.
        depth: ranking depth (clipped to N).
        k1, k2, lam: the paper's parameters.
        q_rows: ``(Q,)`` database rows of the queries, or None.

    Returns:
        ``(Q, depth)`` ``int64`` database rows, best first; ties in the final distance keep the similarity order.
    """
    db = np.asarray(db, np.float32)
    q = np.asarray(q, np.float32)
    n = len(db)
    if q_rows is not None:
        v = k_reciprocal_encoding(db, k1, k2)
        vq, vg = v[np.asarray(q_rows, np.int64)], v
    else:
        v = k_reciprocal_encoding(np.concatenate([q, db]), k1, k2)
        vq, vg = v[:len(q)], v[len(q):]
    depth = min(depth, n)
    out = np.empty((len(q), depth), np.int64)
    for b in range(0, len(q), _BATCH):
        qb = q[b:b + _BATCH]
        final = (1.0 - lam) * jaccard_distances(vq[b:b + _BATCH], vg) + lam * _distances(qb, db)
        first = rank_by_similarity(qb, db, n)  # similarity order: the tie order of the final distance
        f = np.take_along_axis(final, first, axis=1)
        out[b:b + _BATCH] = np.take_along_axis(first, np.argsort(f, axis=1, kind="stable")[:, :depth], axis=1)
    return out
