"""Tests for pipeline.bench.metrics: every metric against a literal loop reference and hand-computed cases."""

from __future__ import annotations


import numpy as np
import pytest

from pipeline.bench.metrics import (
    average_precision,
    labels_eval,
    oxford_map,
    precision_at_k,
    rank_by_similarity,
    revisited_map,
)

# --------------------------------------------------------------------------------------------------------------------
# References: literal transcriptions, kept loop-for-loop close to their sources
# --------------------------------------------------------------------------------------------------------------------


def ref_revisitop_compute_ap(ranks, nres):
    """revisitop python/compute.py compute_ap, verbatim apart from formatting."""
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_revisitop_compute_map(ranks, gnd, kappas=()):
    """revisitop compute_map (ranks are (N, Q) there); np.in1d -> np.isin (in1d is gone from numpy 2.4)."""
    map_ = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_revisitop_compute_ap(pos, len(qgnd))
        map_ = map_ + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map_ = map_ / (nq - nempty)
    pr = pr / (nq - nempty)
    return map_, aps, pr, prs


def ref_revisitop_protocols(ranks_qn, gnd, ks):
    """revisitop example_evaluate.py: the easy / medium / hard ground truths fed to compute_map."""
    ranks = np.asarray(ranks_qn).T
    out = {}
    for name, ok, junk in (
        ("easy", lambda g: [g["easy"]], lambda g: [g["junk"], g["hard"]]),
        ("medium", lambda g: [g["easy"], g["hard"]], lambda g: [g["junk"]]),
        ("hard", lambda g: [g["hard"]], lambda g: [g["junk"], g["easy"]]),
    ):
        gnd_t = [{"ok": np.concatenate(ok(g)), "junk": np.concatenate(junk(g))} for g in gnd]
        m, _, pr, _ = ref_revisitop_compute_map(ranks, gnd_t, list(ks))
        out[name] = (m, pr)
    return out


def ref_philbin_ap(ranked, pos, junk):
    """compute_ap.cpp of the Oxford Buildings benchmark (Philbin et al.), transcribed loop for loop."""
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect_size, j = 0, 0
    for item in ranked:
        if item in junk:
            continue
        if item in pos:
            intersect_size += 1
        recall = intersect_size / float(len(pos))
        precision = intersect_size / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def ref_precision_at_k(ranks, db_labels, query_labels, k, qdi):
    out = []
    for q in range(len(ranks)):
        kept = [int(i) for i in ranks[q] if int(i) != qdi[q]][:k]
        out.append(sum(db_labels[i] == query_labels[q] for i in kept) / k)
    return np.array(out)


def ref_label_ap(ranked, labels, q):
    relevant_total = sum(1 for i in range(len(labels)) if i != q and labels[i] == labels[q])
    hits, s, rank = 0, 0.0, 0
    for i in ranked:
        if i == q:
            continue
        rank += 1
        if labels[i] == labels[q]:
            hits += 1
            s += hits / rank
    return s / relevant_total


def _random_gnd(rng, n, nq):
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n)
        ne, nh, nj = rng.integers(0, 6, size=3)
        if q == 0:
            nh = 0  # one query without hard positives: skipped in "hard" only
        gnd.append(
            {
                "easy": perm[:ne],
                "hard": perm[ne : ne + nh],
                "junk": perm[ne + nh : ne + nh + nj],
                "bbx": np.zeros(4),
            }
        )
    return gnd


# --------------------------------------------------------------------------------------------------------------------
# average_precision / oxford_map
# --------------------------------------------------------------------------------------------------------------------


def test_average_precision_hand_computed():
    ranked = np.array([3, 0, 4, 1, 2])
    # Positives at ranks 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/2 + 7/24.
    assert average_precision(ranked, np.array([3, 4])) == pytest.approx(19 / 24)
    # Removing the junk item at rank 1 moves the second positive to rank 1: a perfect ranking.
    assert average_precision(ranked, np.array([3, 4]), junk=np.array([0])) == pytest.approx(1.0)
    # Junk after the last positive changes nothing.
    assert average_precision(ranked, np.array([3, 4]), junk=np.array([2])) == pytest.approx(19 / 24)
    # A positive that never appears (truncated ranking) still counts in the denominator.
    assert average_precision(ranked, np.array([3, 4, 9])) == pytest.approx(19 / 36)
    # First positive at rank 1: precision before it is 0/1, after it 1/2.
    assert average_precision(np.array([5, 7]), np.array([7])) == pytest.approx(0.25)


def test_average_precision_mask_duplicates_and_empty():
    ranked = np.array([3, 0, 4, 1, 2])
    mask = np.zeros(5, dtype=bool)
    mask[[3, 4]] = True
    assert average_precision(ranked, mask) == pytest.approx(19 / 24)
    assert average_precision(ranked, np.array([3, 4, 4, 3])) == pytest.approx(19 / 24)  # duplicates ignored
    assert np.isnan(average_precision(ranked, np.array([], dtype=np.int64)))
    # An item that is both positive and junk is skipped as junk but stays a positive (compute_ap.cpp): hits 3, 4
    # at 0, 1 of [3, 4, 1, 2] among 3 positives, (1 + 1) / 3 = 2/3.
    assert average_precision(ranked, np.array([3, 0, 4]), junk=np.array([0])) == pytest.approx(2 / 3)


def test_average_precision_matches_revisitop_and_philbin():
    rng = np.random.default_rng(0)
    n = 50
    for _ in range(200):
        ranked = rng.permutation(n)[: rng.integers(5, n + 1)]  # sometimes truncated
        perm = rng.permutation(n)
        npos, nj = rng.integers(1, 10), rng.integers(0, 8)
        pos, junk = perm[:npos], perm[npos : npos + nj]
        ours = average_precision(ranked, pos, junk)
        _, aps, _, _ = ref_revisitop_compute_map(ranked[:, None], [{"ok": pos, "junk": junk}])
        assert ours == pytest.approx(aps[0], abs=1e-12)
        assert ours == pytest.approx(ref_philbin_ap(ranked, set(pos), set(junk)), abs=1e-6)  # float32 in C++


def test_average_precision_positive_and_junk_follows_compute_ap_cpp():
    # Item 1 is both positive and junk: skipped, yet one of the 2 positives. Junk-free [0, 2]: positive 2 at
    # rank 1, (0 + 1/2) / 2 * 1/2 = 1/8 (dropping it from the positives, as before, gave 1/4).
    ranked, pos, junk = np.array([0, 1, 2]), np.array([1, 2]), np.array([1])
    assert average_precision(ranked, pos, junk) == pytest.approx(1 / 8)
    assert ref_philbin_ap(ranked, {1, 2}, {1}) == pytest.approx(1 / 8)
    # Every ranked positive is also junk: nothing retrieved, AP 0 (not NaN: the positives are not empty).
    assert average_precision(ranked, np.array([1]), np.array([1])) == 0.0


def test_average_precision_overlapping_sets_match_philbin():
    rng = np.random.default_rng(2)
    n = 30
    for _ in range(200):
        ranked = rng.permutation(n)[: rng.integers(5, n + 1)]
        pos = rng.choice(n, size=rng.integers(1, 8), replace=False)
        junk = np.union1d(rng.choice(pos, size=rng.integers(0, len(pos) + 1), replace=False),
                          rng.choice(n, size=rng.integers(0, 5), replace=False))
        want = ref_philbin_ap(ranked, set(pos.tolist()), set(junk.tolist()))
        assert average_precision(ranked, pos, junk) == pytest.approx(want, abs=1e-6)


def test_oxford_map_positive_without_a_database_row():
    # 4 database rows; positive 7 has no row (an image that failed to extract), so no ranking holds it.
    ranks = np.array([[2, 0, 1, 3]])
    m, aps = oxford_map(ranks, [np.array([2, 1, 7])], [np.array([], dtype=np.int64)])
    # Hits at 0 and 2 among 3 positives: (1 + (1/2 + 2/3)/2) / 3 = 19/36; without 7 it would be 19/24.
    assert aps[0] == pytest.approx(19 / 36) and m == pytest.approx(19 / 36)


def test_oxford_map():
    ranks = np.array([[3, 0, 4, 1, 2], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    positives = [np.array([3, 4]), np.array([0]), np.array([], dtype=np.int64)]
    junk = [np.array([0]), np.array([], dtype=np.int64), np.array([1])]
    m, aps = oxford_map(ranks, positives, junk)
    assert aps[0] == pytest.approx(1.0) and aps[1] == pytest.approx(1.0) and np.isnan(aps[2])
    assert m == pytest.approx(1.0)
    m2, aps2 = oxford_map(ranks[:2], [np.array([3, 4]), np.array([4])], [np.array([], dtype=np.int64)] * 2)
    assert aps2 == pytest.approx([19 / 24, (0 / 4 + 1 / 5) / 2])
    assert m2 == pytest.approx(np.mean(aps2))
    with pytest.raises(ValueError):
        oxford_map(ranks, positives[:2], junk)


# --------------------------------------------------------------------------------------------------------------------
# revisited_map
# --------------------------------------------------------------------------------------------------------------------


def test_revisited_map_hand_computed():
    ranks = np.array([[4, 0, 1, 2, 3, 5], [0, 1, 2, 3, 4, 5]])
    e = np.array([], dtype=np.int64)
    gnd = [
        {"easy": np.array([0, 3]), "hard": np.array([1]), "junk": np.array([2]), "bbx": [0, 0, 1, 1]},
        {"easy": np.array([5]), "hard": e, "junk": e, "bbx": [0, 0, 1, 1]},
    ]
    res = revisited_map(ranks, gnd, kappas=(1, 5, 10))
    # q0 easy: junk {1,2} -> [4,0,3,5], hits at 1,2: (0+1/2)/2/2 + (1/2+2/3)/2/2 = 5/12; q1: hit at 5 -> 1/12.
    assert res["easy"]["mAP"] == pytest.approx((5 / 12 + 1 / 12) / 2)
    # P@k (revisitop): q0 p=[2,3] -> P@1 0, P@5 2/3, P@10 2/3; q1 p=[6] -> 0, 0/5, 1/6.
    assert res["easy"]["mP@k"] == pytest.approx({1: 0.0, 5: 1 / 3, 10: (2 / 3 + 1 / 6) / 2})
    # q0 medium: junk {2} -> [4,0,1,3,5], hits at 1,2,3: (1/4 + 7/12 + 17/24)/3 = 37/72.
    assert res["medium"]["mAP"] == pytest.approx((37 / 72 + 1 / 12) / 2)
    assert res["medium"]["mP@k"] == pytest.approx({1: 0.0, 5: (3 / 4 + 0) / 2, 10: (3 / 4 + 1 / 6) / 2})
    # q0 hard: junk {0,2,3} -> [4,1,5], hit at 1: 1/4; q1 has no hard positives and is skipped.
    assert res["hard"]["mAP"] == pytest.approx(0.25)
    assert res["hard"]["mP@k"] == pytest.approx({1: 0.0, 5: 0.5, 10: 0.5})


def test_revisited_map_matches_revisitop():
    rng = np.random.default_rng(1)
    n, nq = 40, 12
    ranks = np.stack([rng.permutation(n) for _ in range(nq)])
    gnd = _random_gnd(rng, n, nq)
    for g in gnd:  # every query needs at least one easy and one positive overall for the reference's max()
        if len(g["easy"]) == 0:
            g["easy"] = np.array([int(np.setdiff1d(np.arange(n), np.concatenate([g["hard"], g["junk"]]))[0])])
    ours = revisited_map(ranks, gnd, kappas=(1, 5, 10))
    ref = ref_revisitop_protocols(ranks, gnd, (1, 5, 10))
    for setting in ("easy", "medium", "hard"):
        assert ours[setting]["mAP"] == pytest.approx(ref[setting][0], abs=1e-12)
        assert [ours[setting]["mP@k"][k] for k in (1, 5, 10)] == pytest.approx(list(ref[setting][1]), abs=1e-12)


def test_revisited_map_positive_and_junk_follows_revisitop():
    e = np.array([], dtype=np.int64)
    # Item 1 is easy and junk. revisitop: positives at positions 1, 2, junk at 1; each positive loses the junk
    # strictly before it, so ranks [1, 1]: (0 + 1/2)/2/2 + (1/1 + 2/2)/2/2 = 1/8 + 1/2 = 5/8 (compute_ap.cpp: 1/8;
    # dropping item 1 from the positives, as before: 1/4).
    ranks = np.array([[0, 1, 2]])
    gnd = [{"easy": np.array([1, 2]), "hard": e, "junk": np.array([1])}]
    res = revisited_map(ranks, gnd, kappas=(1, 5))
    ref_map, _, ref_pr, _ = ref_revisitop_compute_map(ranks.T, [{"ok": np.array([1, 2]), "junk": np.array([1])}],
                                                      [1, 5])
    assert ref_map == pytest.approx(5 / 8) and list(ref_pr) == pytest.approx([0.0, 1.0])
    for setting in ("easy", "medium"):
        assert res[setting]["mAP"] == pytest.approx(5 / 8)
        # 1-based ranks [2, 2]: P@1 0, P@5 with kq = 2: 2/2.
        assert res[setting]["mP@k"] == pytest.approx({1: 0.0, 5: 1.0})
    assert np.isnan(res["hard"]["mAP"])
    # The documented quirk: ranking [b, p] with b in both sets gives ranks [0, 0] and AP 1/2 + 3/4 = 1.25.
    gnd2 = [{"easy": np.array([0, 1]), "hard": e, "junk": np.array([0])}]
    assert revisited_map(np.array([[0, 1]]), gnd2)["medium"]["mAP"] == pytest.approx(1.25)
    ref_map2 = ref_revisitop_compute_map(np.array([[0], [1]]), [{"ok": np.array([0, 1]), "junk": np.array([0])}])[0]
    assert ref_map2 == pytest.approx(1.25)


def test_revisited_map_overlapping_sets_match_revisitop():
    rng = np.random.default_rng(3)
    n, nq = 30, 10
    ranks = np.stack([rng.permutation(n) for _ in range(nq)])
    gnd = _random_gnd(rng, n, nq)
    # Positives that are also junk (easy and junk, hard and junk); easy and hard stay disjoint, since revisitop
    # counts an id in both twice among the Medium positives and we count it once (documented). At least one easy
    # positive per query for the reference's max().
    for g in gnd:
        free = np.setdiff1d(np.arange(n), np.concatenate([g["easy"], g["hard"]]))
        g["easy"] = np.union1d(g["easy"], free[:1])
        g["junk"] = np.union1d(g["junk"], np.concatenate([rng.choice(g["easy"], size=1), g["hard"][:1]]))
    ours = revisited_map(ranks, gnd, kappas=(1, 5, 10))
    ref = ref_revisitop_protocols(ranks, gnd, (1, 5, 10))
    for setting in ("easy", "medium", "hard"):
        assert ours[setting]["mAP"] == pytest.approx(ref[setting][0], abs=1e-12)
        assert [ours[setting]["mP@k"][k] for k in (1, 5, 10)] == pytest.approx(list(ref[setting][1]), abs=1e-12)


def test_revisited_map_no_positive_retrieved_and_all_empty():
    e = np.array([], dtype=np.int64)
    ranks = np.array([[0, 1, 2]])
    res = revisited_map(ranks, [{"easy": np.array([7]), "hard": e, "junk": e}], kappas=(1,))
    assert res["easy"] == {"mAP": 0.0, "mP@k": {1: 0.0}}
    assert np.isnan(res["hard"]["mAP"]) and np.isnan(res["hard"]["mP@k"][1])


# --------------------------------------------------------------------------------------------------------------------
# precision_at_k / labels_eval
# --------------------------------------------------------------------------------------------------------------------


def test_precision_at_k_excludes_query():
    db_labels = np.array(["a", "a", "b", "b", "a"])
    ranks = np.array([[0, 1, 2, 4, 3]])
    ql = np.array(["a"])
    assert precision_at_k(ranks, db_labels, ql, k=2, query_db_index=np.array([0])) == pytest.approx([0.5])
    assert precision_at_k(ranks, db_labels, ql, k=3, query_db_index=np.array([0])) == pytest.approx([2 / 3])
    # Without the exclusion the query itself would count.
    assert precision_at_k(ranks, db_labels, ql, k=2) == pytest.approx([1.0])
    assert precision_at_k(ranks, db_labels, ql, k=2, query_db_index=np.array([-1])) == pytest.approx([1.0])
    # The query found deeper than k+1 does not shift anything.
    assert precision_at_k(np.array([[1, 4, 2, 0, 3]]), db_labels, ql, k=2, query_db_index=np.array([0])) == (
        pytest.approx([1.0])
    )
    with pytest.raises(ValueError):
        precision_at_k(ranks[:, :2], db_labels, ql, k=2, query_db_index=np.array([0]))  # needs k+1 columns


def test_precision_at_k_matches_loop():
    rng = np.random.default_rng(2)
    n, q = 80, 30
    labels = rng.integers(0, 5, size=n)
    qdi = rng.integers(-1, n, size=q)
    qlab = np.where(qdi >= 0, labels[np.maximum(qdi, 0)], rng.integers(0, 5, size=q))
    ranks = np.stack([rng.permutation(n) for _ in range(q)])
    for k in (1, 4, 10):
        ours = precision_at_k(ranks, labels, qlab, k=k, query_db_index=qdi)
        assert ours == pytest.approx(ref_precision_at_k(ranks, labels, qlab, k, qdi))


def test_labels_eval_hand_computed():
    labels = np.array(["a", "a", "b", "a", "b"])
    ranks = np.array([[0, 2, 1, 4, 3]])
    res = labels_eval(ranks, labels, np.array([0]), ks=(1, 2))
    # Without the query: [2, 1, 4, 3] -> relevant at ranks 2 and 4: (1/2 + 2/4) / 2.
    assert res == pytest.approx({"mAP": 0.5, "P@1": 0.0, "P@2": 0.5})
    with pytest.raises(ValueError):  # the default ks need P@10, i.e. 11 columns
        labels_eval(ranks, labels, np.array([0]))


def test_labels_eval_matches_loop_and_skips_singletons():
    rng = np.random.default_rng(3)
    n, q = 60, 20
    labels = np.array([f"c{i}" for i in rng.integers(0, 6, size=n - 1)] + ["alone"])
    qdi = np.concatenate([rng.choice(n - 1, size=q - 1, replace=False), [n - 1]])
    ranks = np.stack([rng.permutation(n) for _ in range(q)])
    res = labels_eval(ranks, labels, qdi, ks=(1, 4, 10))
    assert set(res) == {"mAP", "P@1", "P@4", "P@10"}
    valid = qdi != n - 1  # the "alone" query has nothing relevant: left out
    ref_aps = [ref_label_ap(ranks[i], labels, qdi[i]) for i in range(q) if valid[i]]
    assert res["mAP"] == pytest.approx(np.mean(ref_aps))
    for k in (1, 4, 10):
        ref = ref_precision_at_k(ranks, labels, labels[qdi], k, qdi)[valid].mean()
        assert res[f"P@{k}"] == pytest.approx(ref)
    # A truncated ranking: relevant items beyond it are misses (R still comes from the labels).
    short = labels_eval(ranks[:, :25], labels, qdi, ks=(1, 4, 10))
    ref_short = [ref_label_ap(ranks[i, :25], labels, qdi[i]) for i in range(q) if valid[i]]
    assert short["mAP"] == pytest.approx(np.mean(ref_short)) and short["mAP"] < res["mAP"]
    with pytest.raises(ValueError):
        labels_eval(ranks, labels, np.full(q, -1))


def test_perfect_ranking_scores_one():
    labels = np.repeat(np.arange(4), 5)
    qdi = np.arange(0, 20, 5)
    # Best first: the query, then the rest of its class, then everything else.
    same = [np.flatnonzero(labels == labels[i]) for i in qdi]
    ranks = np.stack([np.concatenate([[i], s[s != i], np.flatnonzero(labels != labels[i])]) for i, s in zip(qdi, same)])
    res = labels_eval(ranks, labels, qdi, ks=(1, 4, 10))
    assert res["mAP"] == pytest.approx(1.0) and res["P@1"] == 1.0 and res["P@4"] == 1.0
    assert res["P@10"] == pytest.approx(0.4)


# --------------------------------------------------------------------------------------------------------------------
# rank_by_similarity
# --------------------------------------------------------------------------------------------------------------------


def test_rank_by_similarity_matches_argsort_with_ties():
    rng = np.random.default_rng(4)
    # Coarsely quantised vectors: many exactly tied similarities, including across the top-k cut.
    db = rng.integers(-1, 2, size=(200, 4)).astype(np.float32)
    q = rng.integers(-1, 2, size=(7, 4)).astype(np.float32)
    full = rank_by_similarity(q, db)
    ref = np.argsort(-(q @ db.T), axis=1, kind="stable")
    assert full.dtype == np.int64 and full.shape == (7, 200)
    np.testing.assert_array_equal(full, ref)
    for k in (1, 3, 17, 199, 200, 500):
        np.testing.assert_array_equal(rank_by_similarity(q, db, k=k), ref[:, : min(k, 200)])
    # A single query vector is one row.
    np.testing.assert_array_equal(rank_by_similarity(q[0], db, k=5), ref[:1, :5])


def test_rank_by_similarity_nan_last_and_errors():
    db = np.array([[1.0, 0.0], [np.nan, 0.0], [0.5, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(rank_by_similarity(np.array([[1.0, 0.0]]), db), [[0, 2, 1]])
    np.testing.assert_array_equal(rank_by_similarity(np.array([[1.0, 0.0]]), db, k=2), [[0, 2]])
    with pytest.raises(ValueError):
        rank_by_similarity(np.ones((1, 3)), db)
    with pytest.raises(ValueError):
        rank_by_similarity(np.ones((1, 2)), db, k=0)


def test_corpus_sized_inputs_match_a_per_query_reference():
    """500 queries over 10k items (the size of a Caltech run): the vectorised P@k and mAP equal a plain per-query
    loop over every query. (Speed belongs to benchmarks, not to a timed unit test on a shared machine.)"""
    rng = np.random.default_rng(5)
    q, n = 500, 10_000
    labels = rng.integers(0, 100, size=n)
    qdi = rng.choice(n, size=q, replace=False)
    # Rolled aranges: a valid full ranking per query, cheap to build (argsort of 5M random values is not).
    ranks = (np.arange(n)[None, :] + rng.integers(0, n, size=(q, 1))) % n
    got = {k: precision_at_k(ranks, labels, labels[qdi], k=k, query_db_index=qdi) for k in (1, 4, 10)}
    total = labels_eval(ranks, labels, qdi)
    aps = []
    for i in range(q):
        order = [r for r in ranks[i] if r != qdi[i]]
        rel = labels[order] == labels[qdi[i]]
        for k in (1, 4, 10):
            assert got[k][i] == pytest.approx(rel[:k].mean())
        hits = np.flatnonzero(rel)
        aps.append(np.mean((np.arange(len(hits)) + 1) / (hits + 1)) if len(hits) else np.nan)
    assert total["mAP"] == pytest.approx(np.nanmean(aps))
    assert total["P@10"] == pytest.approx(got[10].mean())
