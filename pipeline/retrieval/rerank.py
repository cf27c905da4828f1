"""Region re-ranking of the top-N candidates (paper 2.5) and average query expansion."""

from __future__ import annotations

import numpy as np

from pipeline.reduce.pca import l2n

# Upper bound on the float32 elements of the gathered region block per step (1 MiB). Bounds memory
# when re-ranking many queries at once, and keeps the block cache-resident: on the 2-core dev box
# 2**18 was the fastest of 2**17..2**24 (blocks of 64 MiB were ~1.5x slower per query).
_GATHER_BUDGET_ELEMS = 1 << 18


def _check_offsets(offsets: np.ndarray, n_regions: int) -> np.ndarray:
    """Region offsets as ``int64``, checked to start at 0, never decrease and end at ``n_regions``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError("offsets must be a 1-D array of length N_db + 1")
    if offsets[0] != 0 or offsets[-1] != n_regions or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must start at 0, be non-decreasing and end at len(region_desc)")
    return offsets


def region_rerank(
    q_global: np.ndarray,
    cand_ids: np.ndarray,
    init_scores: np.ndarray,
    region_desc: np.ndarray,
    offsets: np.ndarray,
    mode: str = "max",
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's top-N candidates by their significant-region descriptors (paper 2.5).

    Region store: ``region_desc`` holds the region descriptors of all database images
    concatenated; image ``i`` owns rows ``offsets[i]:offsets[i + 1]`` (possibly none).

    Scoring, for query ``q`` and candidate ``c`` with regions ``r_1..r_K``::

        s_j        = <l2n(q), l2n(r_j)>
        region_sim = max_j s_j            (mode="max")
                   | (1/K) * sum_j s_j    (mode="mean")
                   | init_score(q, c)     (K == 0: the region part falls back to the initial score)
        score      = alpha * region_sim + (1 - alpha) * init_score(q, c)

    so ``alpha=1`` ranks by regions alone and ``alpha=0`` keeps the initial ranking. Candidates are
    then sorted by ``score`` descending with a stable sort, so ties keep their initial order.
    Candidate ids ``< 0`` (faiss's padding when fewer than N results exist) have no regions, get
    score ``-inf`` and stay last.

    Args:
        q_global: ``(Q, D)`` query global descriptors (normalised here).
        cand_ids: ``(Q, N)`` int64 database ids of the initial ranking, best first.
        init_scores: ``(Q, N)`` initial similarities, aligned with ``cand_ids``.
        region_desc: ``(R, D)`` float32 or float16 region descriptors (normalised here, in float32).
        offsets: ``(N_db + 1,)`` int64 region offsets per database image.
        mode: ``"max"`` or ``"mean"`` aggregation over a candidate's regions.
        alpha: weight of the region similarity against the initial score.

    Returns:
        ``(ids, scores)``: ``(Q, N)`` int64 re-ranked ids and their ``(Q, N)`` float32 combined
        scores, best first.

    Raises:
        ValueError: on an unknown ``mode``, mismatched shapes or inconsistent ``offsets``.
    """
    if mode not in ("max", "mean"):
        raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
    q = l2n(np.atleast_2d(q_global))
    cand = np.asarray(cand_ids, dtype=np.int64)
    init = np.asarray(init_scores, dtype=np.float32)
    if cand.ndim != 2 or init.shape != cand.shape or cand.shape[0] != q.shape[0]:
        raise ValueError(
            f"expected q_global (Q, D), cand_ids and init_scores (Q, N); got {q.shape}, {cand.shape}, {init.shape}"
        )
    if region_desc.ndim != 2 or region_desc.shape[1] != q.shape[1]:
        raise ValueError(f"region_desc must be (R, {q.shape[1]}), got {region_desc.shape}")
    offsets = _check_offsets(offsets, region_desc.shape[0])
    n_db = len(offsets) - 1
    if cand.size and cand.max() >= n_db:
        raise ValueError(f"candidate id {cand.max()} out of range for {n_db} database images")

    n_q = cand.shape[0]
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    starts = offsets[safe]
    counts = np.where(valid, offsets[safe + 1] - starts, 0)

    # Candidates without regions keep the initial score as their region part. Queries are processed
    # in blocks whose gathered regions fit _GATHER_BUDGET_ELEMS (a query whose regions alone exceed
    # it, e.g. 100 candidates x 10 regions x 256 dims, is a block by itself).
    region_sim = np.empty_like(init)
    # Cumulative gathered elements per query, to cut query blocks with searchsorted (a loop over
    # blocks, not over queries or candidates).
    cum = np.cumsum(counts.sum(axis=1) * q.shape[1])
    b0 = 0
    while b0 < n_q:
        before = cum[b0 - 1] if b0 else 0
        b1 = max(b0 + 1, int(np.searchsorted(cum, before + _GATHER_BUDGET_ELEMS, side="right")))
        region_sim[b0:b1] = _region_block(q[b0:b1], starts[b0:b1], counts[b0:b1], region_desc, mode, init[b0:b1])
        b0 = b1

    combined = np.float32(alpha) * region_sim + np.float32(1.0 - alpha) * init
    # Without regions the score is exactly init (alpha*x + (1-alpha)*x can differ from x in the last bit).
    scores = np.where(counts > 0, combined, init)
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _region_block(
    q: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    region_desc: np.ndarray,
    mode: str,
    fallback: np.ndarray,
) -> np.ndarray:
    """Region part of the score for a block of queries: the aggregate where regions exist, else ``fallback``.

    Flattens every (query, candidate) pair, expands each into its region rows with ``np.repeat``,
    computes all row-wise dot products at once, and reduces each pair's contiguous run of
    similarities with ``ufunc.reduceat``.
    """
    out = np.array(fallback, dtype=np.float32)  # copy: pairs without regions keep the fallback
    flat_counts = counts.ravel()
    total = int(flat_counts.sum())
    if total == 0:
        return out
    n_c = counts.shape[1]
    # Region row indices: start of the pair's run + position inside the run.
    run_begin = np.cumsum(flat_counts) - flat_counts  # first output position of each pair
    rows = np.repeat(starts.ravel(), flat_counts) + (np.arange(total) - np.repeat(run_begin, flat_counts))
    owner = np.repeat(np.repeat(np.arange(q.shape[0]), n_c), flat_counts)  # query of each region row

    # float16 stores are upcast once per gathered row (the dominant cost for them).
    regions = np.take(region_desc, rows, axis=0).astype(np.float32, copy=False)
    # Cosine without materialising normalised regions: dot with the unit query, divided by the row norm.
    norms = np.sqrt(np.einsum("td,td->t", regions, regions))
    sims = np.einsum("td,td->t", regions, q[owner]) / np.maximum(norms, np.float32(1e-12))

    # reduceat mis-handles empty runs (it returns the next element), so reduce only non-empty pairs;
    # their runs are contiguous and back to back, so their begins are valid boundaries.
    has = flat_counts > 0
    if mode == "max":
        agg = np.maximum.reduceat(sims, run_begin[has])
    else:
        agg = np.add.reduceat(sims, run_begin[has]) / flat_counts[has]
    out.reshape(-1)[has] = agg.astype(np.float32)  # out is a fresh contiguous array, so this is a view
    return out


# Weight of the region similarity against the first-pass score when the pipeline re-ranks (search and benchmarks).
RERANK_ALPHA = 0.5


def rerank_top(q_global: np.ndarray, ids: np.ndarray, scores: np.ndarray, region_desc: np.ndarray,
               offsets: np.ndarray, n: int, alpha: float = RERANK_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the first ``n`` columns of a ranking by regions (``region_rerank``, max mode) and keep the rest as is.

    Args:
        q_global: ``(Q, D)`` query descriptors in the regions' space.
        ids: ``(Q, M)`` ranking, best first.
        scores: ``(Q, M)`` its scores.
        region_desc: ``(R, D)`` region store.
        offsets: ``(N_db + 1,)`` region offsets.
        n: how many leading candidates to re-rank (clipped to ``M``).
        alpha: weight of the region similarity.

    Returns:
        ``(ids, scores)`` of the same shape, the first ``n`` columns re-ranked.
    """
    n = min(n, ids.shape[1])
    top_ids, top_sc = region_rerank(q_global, ids[:, :n], scores[:, :n], region_desc, offsets, mode="max", alpha=alpha)
    return (np.concatenate([top_ids, ids[:, n:]], axis=1),
            np.concatenate([top_sc, np.asarray(scores[:, n:], dtype=top_sc.dtype)], axis=1))


# Region-to-region matching (``match_regions``): the selectivity exponent and threshold of the default. With centred
# descriptors, ASMK's alpha = 3 and any threshold measured worse than the plain mean of best matches (BENCHMARKS.md).
MATCH_ALPHA = 1.0
MATCH_TAU = float("-inf")


def selectivity(x: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """ASMK's selectivity function (Tolias et al. 2013): ``sign(x) |x|^alpha`` where ``x > tau``, else 0.

    Args:
        x: similarities.
        alpha: exponent (1 = identity above the threshold); larger values favour strong matches.
        tau: threshold; similarities at or below it count nothing.

    Returns:
        float32 array of ``x``'s shape.
    """
    x = np.asarray(x, dtype=np.float32)
    return np.where(x > tau, np.sign(x) * np.abs(x) ** np.float32(alpha), np.float32(0)).astype(np.float32)


def match_regions(q_regions: np.ndarray, q_offsets: np.ndarray, cand_ids: np.ndarray, region_desc: np.ndarray,
                  offsets: np.ndarray, alpha: float = MATCH_ALPHA, tau: float = MATCH_TAU,
                  center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Region-to-region similarity of each query with each of its candidates, and the candidate region that matched.

    Query ``q`` owns the rows ``q_offsets[q]:q_offsets[q + 1]`` of ``q_regions`` (its significant regions
    ``a_1..a_m``), candidate ``c`` the rows ``offsets[c]:offsets[c + 1]`` of ``region_desc`` (``r_1..r_n``); all
    vectors are L2-normalised. Then::

        m_i  = max_j <a_i, r_j>                     (each query region's best match in the candidate)
        sim  = (1/m) * sum_i selectivity(m_i)       (alpha, tau: see ``selectivity``)
        best = argmax_j max_i <a_i, r_j>            (the candidate region in the best single pair, a region_desc row)

    ``sim`` is NaN and ``best`` -1 where the query or the candidate has no regions, or the id is ``< 0`` (padding).
    With one query region, ``alpha=1``, ``tau=-inf`` and no ``center``, ``sim`` is ``region_rerank``'s max mode.

    With ``center`` (the mean of the database's L2-normalised region descriptors), every vector ``v`` is replaced by
    ``l2n(v - center)`` first. CNN region descriptors share a large common component (all activations are
    non-negative, so every cosine is high); removing it makes the best match of a query region discriminative.

    Args:
        q_regions: ``(Rq, D)`` query regions, L2-normalised.
        q_offsets: ``(Q + 1,)`` int64 offsets into ``q_regions``.
        cand_ids: ``(Q, N)`` int64 candidate ids (rows of ``offsets``), ``-1`` for padding.
        region_desc: ``(R, D)`` candidate regions, L2-normalised (float16 is upcast).
        offsets: ``(N_db + 1,)`` int64 offsets into ``region_desc``.
        alpha: selectivity exponent.
        tau: selectivity threshold.
        center: ``(D,)`` vector subtracted from every descriptor (then re-normalised), or None.

    Returns:
        ``(sim (Q, N) float32, best (Q, N) int64)``.

    Raises:
        ValueError: on mismatched shapes or inconsistent offsets.
    """
    q_offsets = _check_offsets(q_offsets, len(q_regions))
    offsets = _check_offsets(offsets, len(region_desc))
    cand = np.asarray(cand_ids, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(q_offsets) - 1:
        raise ValueError(f"cand_ids must be ({len(q_offsets) - 1}, N), got {cand.shape}")
    if cand.size and cand.max() >= len(offsets) - 1:
        raise ValueError(f"candidate id {cand.max()} out of range for {len(offsets) - 1} database images")
    if len(q_regions) and len(region_desc) and q_regions.shape[1] != region_desc.shape[1]:
        raise ValueError(f"query regions have {q_regions.shape[1]} dims, candidate regions {region_desc.shape[1]}")
    sim = np.full(cand.shape, np.nan, np.float32)
    best = np.full(cand.shape, -1, np.int64)
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    starts = offsets[safe]
    counts = np.where(valid, offsets[safe + 1] - starts, 0)
    for qi in range(cand.shape[0]):  # per query: one (m, T) product over all its candidates' regions
        a = _centred(np.asarray(q_regions[q_offsets[qi]:q_offsets[qi + 1]], dtype=np.float32), center)
        cnt = counts[qi]
        total = int(cnt.sum())
        if len(a) == 0 or total == 0:
            continue
        run_begin = np.cumsum(cnt) - cnt
        rows = np.repeat(starts[qi], cnt) + (np.arange(total) - np.repeat(run_begin, cnt))
        s = a @ _centred(np.asarray(region_desc[rows], dtype=np.float32), center).T  # (m, T)
        has = cnt > 0
        b = run_begin[has]
        sim[qi, has] = selectivity(np.maximum.reduceat(s, b, axis=1), alpha, tau).mean(axis=0)
        col = s.max(axis=0)  # each candidate region's best query region
        run_max = np.maximum.reduceat(col, b)
        owner = np.repeat(np.arange(len(b)), cnt[has])
        first = np.minimum.reduceat(np.where(col == run_max[owner], np.arange(total), total), b)
        best[qi, has] = rows[first]
    return sim, best


def _centred(x: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """``l2n(x - center)`` row-wise (``x`` itself without a center)."""
    if center is None:
        return x
    y = x - np.asarray(center, dtype=np.float32)
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.float32(1e-12))


def rerank_regions_top(q_regions: np.ndarray, q_offsets: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                       region_desc: np.ndarray, offsets: np.ndarray, n: int, weight: float = RERANK_ALPHA,
                       alpha: float = MATCH_ALPHA, tau: float = MATCH_TAU,
                       center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank the first ``n`` columns of a ranking by region-to-region matching (``match_regions``); keep the rest.

    ``score = weight * sim + (1 - weight) * first-pass score``; a candidate without regions (or a query without
    any) keeps its first-pass score; padding (id ``< 0``) gets ``-inf``. Stable: ties keep the first-pass order.

    Args:
        q_regions: ``(Rq, D)`` query regions, L2-normalised.
        q_offsets: ``(Q + 1,)`` offsets into ``q_regions``.
        ids: ``(Q, M)`` ranking, best first.
        scores: ``(Q, M)`` its scores.
        region_desc: ``(R, D)`` candidate regions, L2-normalised.
        offsets: ``(N_db + 1,)`` offsets into ``region_desc``.
        n: how many leading candidates to re-rank (clipped to ``M``).
        weight: weight of the region similarity.
        alpha: selectivity exponent.
        tau: selectivity threshold.
        center: the database's mean region descriptor, removed before matching (see ``match_regions``), or None.

    Returns:
        ``(ids, scores)`` of the same shape, the first ``n`` columns re-ranked.
    """
    n = min(n, ids.shape[1])
    cand = np.asarray(ids[:, :n], dtype=np.int64)
    init = np.asarray(scores[:, :n], dtype=np.float32)
    sim, _ = match_regions(q_regions, q_offsets, cand, region_desc, offsets, alpha, tau, center)
    top = np.where(np.isnan(sim), init, np.float32(weight) * sim + np.float32(1 - weight) * init)
    top = np.where(cand >= 0, top, -np.inf).astype(np.float32)
    order = np.argsort(-top, axis=1, kind="stable")
    return (np.concatenate([np.take_along_axis(cand, order, axis=1), ids[:, n:]], axis=1),
            np.concatenate([np.take_along_axis(top, order, axis=1), np.asarray(scores[:, n:], np.float32)], axis=1))


def average_query_expansion(q: np.ndarray, db: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Average query expansion, AQE (Chum et al. 2007).

    ``q' = l2n(q + sum_{j<k} db[ids[:, j]])``; vectors are assumed L2-normalised already, as
    everywhere in the pipeline. Ids ``< 0`` (faiss padding) contribute nothing.

    Args:
        q: ``(Q, D)`` queries.
        db: ``(N, D)`` database vectors.
        ids: ``(Q, >=k)`` int64 ranking, best first.
        k: number of top results averaged in (``0`` returns ``l2n(q)``).

    Returns:
        ``(Q, D)`` float32 expanded, unit-norm queries.
    """
    q = np.atleast_2d(np.asarray(q, dtype=np.float32))
    ids = np.asarray(ids, dtype=np.int64)
    if k < 0 or ids.ndim != 2 or ids.shape[0] != q.shape[0] or ids.shape[1] < k:
        raise ValueError(f"need ids of shape ({q.shape[0]}, >= {k}) and k >= 0, got {ids.shape} and k={k}")
    top = ids[:, :k]
    w = (top >= 0).astype(np.float32)  # padding weighs nothing
    neighbours = np.asarray(db)[np.where(top >= 0, top, 0)].astype(np.float32)  # (Q, k, D)
    return l2n(q + np.einsum("qk,qkd->qd", w, neighbours))
