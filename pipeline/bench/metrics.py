"""Exact ranking and retrieval metrics: category P@k, Oxford/Paris mAP, revisited Easy/Medium/Hard, labels mAP."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Row blocks keep the (rows, N) temporaries of the vectorised paths near 2**24 elements (~128 MB of int64 at
# worst) whatever the number of queries.
_BLOCK_ELEMS = 1 << 24


def _rows_per_block(n_cols: int) -> int:
    """Query rows per block so that a ``(rows, n_cols)`` temporary stays near ``_BLOCK_ELEMS`` elements."""
    return max(1, _BLOCK_ELEMS // max(1, n_cols))


def _as_ranks(ranks: np.ndarray) -> np.ndarray:
    """A ``(Q, N')`` integer ranking as ``int64``, or a ValueError naming what is wrong."""
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise ValueError(f"ranks must be a (Q, N) array, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got dtype {r.dtype}")
    return r.astype(np.int64, copy=False)


def _as_index_set(items: np.ndarray | Sequence[int] | None) -> np.ndarray:
    """Unique ``int64`` indices from a boolean mask over the database or an index array (``None`` = empty)."""
    if items is None:
        return np.zeros(0, dtype=np.int64)
    a = np.asarray(items)
    if a.dtype == bool:
        return np.flatnonzero(a).astype(np.int64)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"expected a boolean mask or integer indices, got dtype {a.dtype}")
    # Unique: a duplicated id in a gt list (all_souls_1_good.txt has one) must not count as two positives.
    return np.unique(a.reshape(-1).astype(np.int64))


def rank_by_similarity(queries: np.ndarray, db: np.ndarray, k: int | None = None,
                       with_scores: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Rank database rows by inner product with each query, best first (every benchmark method ranks with this).

    Ties are broken by the lower database index (a stable sort), and the ``k`` path returns exactly the first
    ``k`` columns of the full ranking, ties at the cut included, so results do not depend on ``k``. NaN
    similarities rank last.

    Args:
        queries: ``(Q, D)`` query vectors (a ``(D,)`` vector is one query); L2-normalised for cosine.
        db: ``(N, D)`` database vectors.
        k: keep only the best ``k`` per query (``np.argpartition``, then a sort of those ``k``); ``None`` or
            ``k >= N`` ranks everything.
        with_scores: also return the similarities of the ranked items (for a re-ranking that needs them).

    Returns:
        ``(Q, min(k, N))`` (or ``(Q, N)``) ``int64`` database indices, best first; with ``with_scores``, the pair
        ``(ids, scores)`` with ``scores`` the ``float32`` inner products aligned with ``ids``.
    """
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    d = np.asarray(db, dtype=np.float32)
    if d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"dimension mismatch: queries {q.shape}, db {d.shape}")
    n = d.shape[0]
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = n if k is None else min(k, n)
    out = np.empty((q.shape[0], kk), dtype=np.int64)
    scores = np.empty((q.shape[0], kk), dtype=np.float32) if with_scores else None
    step = _rows_per_block(n)
    for start in range(0, q.shape[0], step):
        sims = q[start : start + step] @ d.T
        neg = -sims
        neg[np.isnan(neg)] = np.inf  # NaN last, and keeps the comparisons below well defined
        if kk == n:
            out[start : start + step] = np.argsort(neg, axis=1, kind="stable")
        else:
            out[start : start + step] = _top_k_stable(neg, kk)
        if scores is not None:
            scores[start : start + step] = np.take_along_axis(sims, out[start : start + step], axis=1)
    return (out, scores) if scores is not None else out


def _top_k_stable(neg: np.ndarray, kk: int) -> np.ndarray:
    """The first ``kk`` columns of ``np.argsort(neg, axis=1, kind="stable")``, without sorting whole rows."""
    # argpartition alone picks arbitrarily among items tied with the k-th value; take every item strictly
    # better than the k-th value, then the lowest-index tied ones, so the result equals argsort[:, :k].
    part = np.argpartition(neg, kk - 1, axis=1)[:, :kk]
    kth = np.take_along_axis(neg, part, axis=1).max(axis=1, keepdims=True)
    better = neg < kth
    tied = neg == kth
    need = kk - better.sum(axis=1, keepdims=True)
    sel = better | (tied & (np.cumsum(tied, axis=1) <= need))
    idx = np.nonzero(sel)[1].reshape(-1, kk)  # row-major nonzero: ascending index within each row
    order = np.argsort(np.take_along_axis(neg, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def precision_at_k(
    ranks: np.ndarray,
    db_labels: np.ndarray,
    query_labels: np.ndarray,
    k: int = 10,
    query_db_index: np.ndarray | None = None,
) -> np.ndarray:
    """Per-query precision of the top ``k`` results (category retrieval: relevant = same label).

    Args:
        ranks: ``(Q, N')`` ``int64`` database indices, best first; ``N' >= k + 1`` when a query is in the
            database (``N' >= k`` otherwise).
        db_labels: ``(N,)`` label of each database item (any comparable dtype: ints or strings).
        query_labels: ``(Q,)`` label of each query.
        k: cut-off.
        query_db_index: ``(Q,)``; where ``query_db_index[q] >= 0`` that database item is the query itself and is
            removed from its ranking before the top ``k`` are taken (a query never counts among its own
            results); ``-1`` (or ``None`` for all) = the query is not in the database.

    Returns:
        ``(Q,)`` ``float64`` precisions in ``[0, 1]``.
    """
    r = _as_ranks(ranks)
    q_n = r.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    db_labels = np.asarray(db_labels)
    query_labels = np.asarray(query_labels)
    if query_labels.shape != (q_n,):
        raise ValueError(f"query_labels must have shape ({q_n},), got {query_labels.shape}")
    qdi = np.full(q_n, -1, dtype=np.int64) if query_db_index is None else np.asarray(query_db_index, dtype=np.int64)
    if qdi.shape != (q_n,):
        raise ValueError(f"query_db_index must have shape ({q_n},), got {qdi.shape}")
    # One extra column is enough: a ranking holds each database item once, so at most one is removed.
    need = k + 1 if bool((qdi >= 0).any()) else k
    if r.shape[1] < need:
        raise ValueError(f"ranks has {r.shape[1]} columns; P@{k} needs at least {need}")
    top = r[:, :need]
    not_self = top != qdi[:, None]  # -1 never matches an index
    keep = not_self & (np.cumsum(not_self, axis=1) <= k)
    relevant = db_labels[top] == query_labels[:, None]
    return (relevant & keep).sum(axis=1) / float(k)


def _hit_positions(ranked: np.ndarray, pos: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``ranked`` once the junk items are taken out of it (``compute_ap.cpp``).

    An item in both sets is skipped as junk before the positive test, so it is never a hit.
    """
    if junk.size:
        ranked = ranked[~np.isin(ranked, junk)]
    return np.flatnonzero(np.isin(ranked, pos))


def _revisitop_hit_ranks(ranked: np.ndarray, pos: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives as revisitop's ``compute_map`` computes them (python/evaluate.py there).

    Positions of positives and of junk items are found separately, and each positive's position is lowered by the
    number of junk items strictly before it. On disjoint sets this equals :func:`_hit_positions`; an item in both
    is a hit at its own place and is also removed from the ranking for the positives after it.
    """
    is_junk = np.isin(ranked, junk)
    junk_before = np.cumsum(is_junk) - is_junk
    at = np.flatnonzero(np.isin(ranked, pos))
    return at - junk_before[at]


def _trapezoid_ap(hits: np.ndarray, n_pos: int) -> float:
    """Oxford AP from the non-decreasing 0-based ranks of the retrieved positives (revisitop ``compute_ap``).

    Reproduces ``compute_ap`` of https://github.com/filipradenovic/revisitop (python/evaluate.py), itself the
    Python port of the Oxford Buildings ``compute_ap.cpp`` (Philbin et al., 2007): for the ``j``-th retrieved
    positive (0-based) at rank ``r`` the precision before it, ``j / r`` (1 when ``r == 0``), and after it,
    ``(j + 1) / (r + 1)``, are averaged, i.e. the area under the precision-recall curve by trapezoids, one
    recall step ``1 / n_pos`` each. Positives never retrieved add nothing.
    """
    if hits.size == 0:
        return 0.0
    j = np.arange(hits.size, dtype=np.float64)
    r = hits.astype(np.float64)
    precision_0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    precision_1 = (j + 1.0) / (r + 1.0)
    return float(((precision_0 + precision_1) / 2.0).sum() / n_pos)


def average_precision(
    ranked: np.ndarray,
    positives: np.ndarray,
    junk: np.ndarray | None = None,
) -> float:
    """Oxford/Paris average precision of one ranking (trapezoid interpolation, junk removed first).

    Follows the Oxford Buildings ``compute_ap.cpp`` (Philbin et al., 2007): a ranked item in the junk set is
    skipped before the positive test, and AP divides by the size of the positive set. So an item listed as both
    positive and junk is never a hit yet stays in the number of positives (AP = 1 is then unreachable). This
    equals revisitop's ``compute_map`` only when the two sets are disjoint (always so in the official ground truth;
    see :func:`revisited_map` for what revisitop does otherwise).

    Args:
        ranked: ``(N',)`` database indices, best first (may be truncated).
        positives: boolean mask over the database or an array of ids (duplicates ignored). An id that never
            occurs in ``ranked`` counts as a positive not retrieved: a positive cut off by a truncated ranking,
            or one without a database row, given an id ``>= N`` by the caller so that it still counts.
        junk: the same for junk items, which are skipped in the ranking before anything is counted.

    Returns:
        AP in ``[0, 1]``; NaN when there are no positives (such queries are left out of a mean).
    """
    ranked = np.asarray(ranked).reshape(-1)
    pos = _as_index_set(positives)
    jnk = _as_index_set(junk)
    if pos.size == 0:
        return float("nan")
    return _trapezoid_ap(_hit_positions(ranked, pos, jnk), pos.size)


def oxford_map(
    ranks: np.ndarray,
    positives: list[np.ndarray],
    junk: list[np.ndarray],
) -> tuple[float, np.ndarray]:
    """Mean average precision under the Oxford 5k / Paris 6k protocol.

    Args:
        ranks: ``(Q, N')`` database indices, best first.
        positives: per query, the good + ok items (index array or boolean mask); ids that never occur in a
            ranking (e.g. ``>= N`` for images without a database row) count as positives not retrieved.
        junk: per query, the junk items, skipped in the ranking before AP (see :func:`average_precision`).

    Returns:
        ``(mAP, aps)``: the mean over queries that have positives, and the ``(Q,)`` per-query APs (NaN where a
        query has none).
    """
    r = _as_ranks(ranks)
    if not (len(positives) == len(junk) == r.shape[0]):
        raise ValueError(f"{r.shape[0]} rankings, {len(positives)} positive lists, {len(junk)} junk lists")
    aps = np.array([average_precision(r[i], positives[i], junk[i]) for i in range(r.shape[0])], dtype=np.float64)
    valid = ~np.isnan(aps)
    return (float(aps[valid].mean()) if valid.any() else float("nan")), aps


def revisited_map(
    ranks: np.ndarray,
    gnd: list[dict],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict:
    """Revisited Oxford/Paris evaluation (Radenović et al., CVPR 2018): Easy, Medium and Hard protocols.

    Reproduces revisitop's ``compute_map`` (python/evaluate.py) and its three settings (python/example_evaluate.py):
    easy = positives ``easy``, junk ``junk + hard``; medium = positives ``easy + hard``, junk ``junk``;
    hard = positives ``hard``, junk ``junk + easy``. Queries without positives in a setting are left out of
    that setting's averages. mP@k is revisitop's: with ``p`` the 1-based junk-free ranks of the retrieved
    positives, ``kq = min(max(p), k)`` and ``P = |{p <= kq}| / kq`` (a query whose positives all come before
    ``k`` is not penalised for having fewer than ``k``); a query that retrieves no positive gets 0 (revisitop
    would fail on ``max`` of an empty array).

    An item that is both a positive and junk in a setting is handled as revisitop does, not as
    :func:`average_precision` does: it is a hit at its own junk-free place, counts in the number of positives,
    and is removed from the ranking for the positives after it (see :func:`_revisitop_hit_ranks`). Two
    positives can then share a rank, and AP or P@k can exceed 1 (ranking ``[b, p]`` with ``b`` in both sets:
    AP 1.25). The official lists are disjoint, so this never arises there. Other differences from revisitop:
    an id listed twice, e.g. in both ``easy`` and ``hard`` (a Medium positive), counts once in the number of
    positives (revisitop counts the concatenated list's length).

    Ids in ``easy``/``hard`` that never occur in a ranking count as positives not retrieved: the caller gives
    images without a database row ids ``>= N`` so that they stay in the number of positives.

    Args:
        ranks: ``(Q, N')`` database indices, best first (note: revisitop's own arrays are ``(N, Q)``).
        gnd: per query, a dict with ``easy``, ``hard`` and ``junk`` arrays of the ids that ``ranks`` holds
            (:class:`pipeline.bench.protocols.RevisitedProtocol` maps the ``imlist`` positions of
            :func:`pipeline.bench.datasets.load_revisited_gnd` to corpus rows first).
        kappas: cut-offs for mP@k.

    Returns:
        ``{"easy": {"mAP": float, "mP@k": {k: float}}, "medium": {...}, "hard": {...}}``, fractions in
        ``[0, 1]`` save for the overlap case above (revisitop prints them times 100); NaN when no query of a
        setting has positives.
    """
    r = _as_ranks(ranks)
    if len(gnd) != r.shape[0]:
        raise ValueError(f"{r.shape[0]} rankings for {len(gnd)} ground-truth entries")
    kappas = [int(k) for k in kappas]
    easy = [_as_index_set(g["easy"]) for g in gnd]
    hard = [_as_index_set(g["hard"]) for g in gnd]
    junk = [_as_index_set(g["junk"]) for g in gnd]
    settings = {
        "easy": [(easy[i], np.union1d(junk[i], hard[i])) for i in range(len(gnd))],
        "medium": [(np.union1d(easy[i], hard[i]), junk[i]) for i in range(len(gnd))],
        "hard": [(hard[i], np.union1d(junk[i], easy[i])) for i in range(len(gnd))],
    }
    out: dict = {}
    for setting, pairs in settings.items():
        aps, prs = [], []
        for i, (pos, jnk) in enumerate(pairs):
            if pos.size == 0:
                continue
            hits = _revisitop_hit_ranks(r[i], pos, jnk)
            aps.append(_trapezoid_ap(hits, pos.size))
            if hits.size == 0:
                prs.append([0.0] * len(kappas))
                continue
            p1 = hits + 1  # 1-based, as in revisitop
            row = []
            for k in kappas:
                kq = min(int(p1.max()), k)
                row.append(float((p1 <= kq).sum()) / kq)
            prs.append(row)
        if aps:
            mean_pr = np.asarray(prs, dtype=np.float64).mean(axis=0)
            out[setting] = {"mAP": float(np.mean(aps)), "mP@k": {k: float(v) for k, v in zip(kappas, mean_pr)}}
        else:
            out[setting] = {"mAP": float("nan"), "mP@k": {k: float("nan") for k in kappas}}
    return out


def labels_eval(
    ranks: np.ndarray,
    labels: np.ndarray,
    query_db_index: np.ndarray,
    ks: Sequence[int] = (1, 4, 10),
) -> dict:
    """Same-label retrieval protocol (Caltech-101, the Paris subset): mAP and P@k.

    Every other database item with the query's label is relevant; the query itself is removed from its
    ranking. AP is the plain non-interpolated one, ``(1 / R) * sum over relevant hits of precision at that
    hit``, with ``R`` the number of relevant items in the database (so relevant items missing from a truncated
    ranking count as misses). Queries whose label has no other item are left out of every average.

    Args:
        ranks: ``(Q, N')`` database indices, best first; a full ranking (``N' = N``) for an exact mAP, and
            ``N' >= max(ks) + 1``.
        labels: ``(N,)`` database labels (ints or strings).
        query_db_index: ``(Q,)`` database row of each query (all ``>= 0``: the query's label is read there).
        ks: cut-offs for P@k.

    Returns:
        ``{"mAP": float, "P@1": float, "P@4": float, "P@10": float}`` (one ``P@k`` per entry of ``ks``), means
        over the evaluated queries, fractions in ``[0, 1]``.
    """
    r = _as_ranks(ranks)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)  # ints compare faster than strings
    codes = codes.reshape(-1).astype(np.int64)
    qdi = np.asarray(query_db_index, dtype=np.int64)
    aps = label_average_precisions(r, codes, qdi)
    valid = ~np.isnan(aps)
    qlab = codes[qdi]

    out: dict = {"mAP": float(aps[valid].mean()) if valid.any() else float("nan")}
    for k in ks:
        p = precision_at_k(r, codes, qlab, k=int(k), query_db_index=qdi)
        out[f"P@{int(k)}"] = float(p[valid].mean()) if valid.any() else float("nan")
    return out


def label_average_precisions(ranks: np.ndarray, labels: np.ndarray, query_db_index: np.ndarray) -> np.ndarray:
    """Per-query AP of the same-label protocol (see :func:`labels_eval`, whose mAP is their mean over non-NaN).

    Args:
        ranks: ``(Q, N')`` database indices, best first.
        labels: ``(N,)`` database labels (ints or strings).
        query_db_index: ``(Q,)`` database row of each query.

    Returns:
        ``(Q,)`` ``float64`` APs; NaN for a query whose label has no other item.
    """
    r = _as_ranks(ranks)
    q_n = r.shape[0]
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    qdi = np.asarray(query_db_index, dtype=np.int64)
    if qdi.shape != (q_n,):
        raise ValueError(f"query_db_index must have shape ({q_n},), got {qdi.shape}")
    if q_n and (qdi.min() < 0 or qdi.max() >= codes.size):
        raise ValueError("labels_eval needs every query in the database (0 <= query_db_index < N)")
    qlab = codes[qdi]
    n_rel = np.bincount(codes)[qlab] - 1  # minus the query itself
    valid = n_rel > 0

    aps = np.zeros(q_n, dtype=np.float64)
    step = _rows_per_block(r.shape[1])
    for s in range(0, q_n, step):
        top = r[s : s + step]
        b = top.shape[0]
        is_self = top == qdi[s : s + step, None]
        rel = (codes[top] == qlab[s : s + step, None]) & ~is_self
        # Work on the hits only (a few % of a (Q, N) ranking) rather than cumulative sums over every cell.
        rows, cols = np.nonzero(rel)  # row-major: each row's hits in rank order
        self_col = np.where(is_self.any(axis=1), is_self.argmax(axis=1), top.shape[1])
        rank_1based = cols + 1 - (cols > self_col[rows])  # rank once the query is taken out of the ranking
        per_row = np.bincount(rows, minlength=b)
        hit_no = np.arange(rows.size) - np.repeat(np.cumsum(per_row) - per_row, per_row) + 1
        prec_sum = np.bincount(rows, weights=hit_no / rank_1based, minlength=b)
        aps[s : s + step] = prec_sum / np.maximum(n_rel[s : s + step], 1)
    aps[~valid] = np.nan
    return aps
