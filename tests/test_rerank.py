"""Tests for pipeline.retrieval.rerank: region re-ranking on a constructed case and against a loop reference; AQE."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline.retrieval.rerank as rerank_mod
from pipeline.retrieval.rerank import average_query_expansion, region_rerank


def _reference_rerank(q, cand, init, regions, offsets, mode, alpha):
    """Plain-loop implementation of the documented scoring, used as the oracle."""
    ids_out, scores_out = [], []
    for qi in range(len(q)):
        qn = q[qi] / np.linalg.norm(q[qi])
        scored = []
        for pos, (c, s0) in enumerate(zip(cand[qi], init[qi])):
            if c < 0:
                scored.append((-np.inf, pos, c))
                continue
            r = regions[offsets[c] : offsets[c + 1]].astype(np.float64)
            if len(r) == 0:
                scored.append((float(s0), pos, c))
                continue
            sims = (r / np.linalg.norm(r, axis=1, keepdims=True)) @ qn
            agg = sims.max() if mode == "max" else sims.mean()
            scored.append((alpha * agg + (1 - alpha) * s0, pos, c))
        scored.sort(key=lambda t: (-t[0], t[1]))  # descending score, ties by initial position
        ids_out.append([c for _, _, c in scored])
        scores_out.append([s for s, _, _ in scored])
    return np.array(ids_out, dtype=np.int64), np.array(scores_out)


def test_constructed_case_moves_exact_region_match_first():
    q = np.array([[1.0, 2.0, 0.0, 0.0]], dtype=np.float32)
    # Image 0: a region orthogonal to q; image 1: two regions, one half-aligned; image 2: no regions;
    # image 3: one region equal to q (scaled, to check normalisation) among others.
    regions = np.array(
        [
            [0.0, 0.0, 1.0, 0.0],  # 0
            [1.0, 0.0, 0.0, 0.0],  # 1
            [0.0, 0.0, 0.0, 1.0],  # 1
            [0.0, 0.0, 1.0, 1.0],  # 3
            [3.0, 6.0, 0.0, 0.0],  # 3: parallel to q
        ],
        dtype=np.float32,
    )
    offsets = np.array([0, 1, 3, 3, 5], dtype=np.int64)
    cand = np.array([[0, 1, 2, 3]], dtype=np.int64)
    init = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)

    ids, scores = region_rerank(q, cand, init, regions, offsets)  # max, alpha=1
    # Region sims: image 3 -> 1.0, image 2 -> keeps 0.7, image 1 -> 1/sqrt(5) = 0.447, image 0 -> 0.
    np.testing.assert_array_equal(ids, [[3, 2, 1, 0]])
    np.testing.assert_allclose(scores, [[1.0, 0.7, 1 / np.sqrt(5), 0.0]], rtol=1e-6, atol=1e-7)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores[0, 1] == np.float32(0.7)  # no regions: exactly the initial score

    # mean of image 3's regions: (1.0 + <q, [0,0,1,1]/sqrt2> = 0) / 2 = 0.5; alpha=0.5 mixes with init.
    ids, scores = region_rerank(q, cand, init, regions, offsets, mode="mean", alpha=0.5)
    expected = {0: 0.5 * 0.0 + 0.5 * 0.9, 1: 0.5 * (0.5 / np.sqrt(5)) + 0.5 * 0.8, 2: 0.7, 3: 0.5 * 0.5 + 0.5 * 0.6}
    order = sorted(expected, key=lambda c: -expected[c])
    np.testing.assert_array_equal(ids[0], order)
    np.testing.assert_allclose(scores[0], [expected[c] for c in order], rtol=1e-6)


def test_ties_keep_initial_order_and_padding_stays_last():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    regions = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    offsets = np.array([0, 1, 2, 3], dtype=np.int64)  # three images, identical region directions
    cand = np.array([[2, -1, 0, 1]], dtype=np.int64)
    init = np.array([[0.5, -3.4e38, 0.9, 0.8]], dtype=np.float32)
    ids, scores = region_rerank(q, cand, init, regions, offsets)
    np.testing.assert_array_equal(ids, [[2, 0, 1, -1]])
    assert np.isneginf(scores[0, -1])


@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("store_dtype", [np.float32, np.float16])
def test_matches_loop_reference(mode, alpha, store_dtype, monkeypatch):
    rng = np.random.default_rng(0)
    n_db, d, n_q, n_c = 60, 16, 7, 12
    counts = rng.integers(0, 5, n_db)  # includes images without regions
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    regions = rng.standard_normal((offsets[-1], d)).astype(store_dtype)
    q = rng.standard_normal((n_q, d)).astype(np.float32)
    cand = np.stack([rng.choice(n_db, n_c, replace=False) for _ in range(n_q)]).astype(np.int64)
    cand[0, -2:] = -1  # faiss padding
    init = -np.sort(-rng.uniform(-1, 1, (n_q, n_c)), axis=1).astype(np.float32)

    ref_ids, ref_scores = _reference_rerank(q, cand, init, regions, offsets, mode, alpha)
    ids, scores = region_rerank(q, cand, init, regions, offsets, mode=mode, alpha=alpha)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)

    # Force one query per gather block: same result as a single block.
    monkeypatch.setattr(rerank_mod, "_GATHER_BUDGET_ELEMS", 1)
    ids_b, scores_b = region_rerank(q, cand, init, regions, offsets, mode=mode, alpha=alpha)
    np.testing.assert_array_equal(ids_b, ids)
    np.testing.assert_array_equal(scores_b, scores)


def test_rejects_bad_inputs():
    q = np.ones((1, 2), np.float32)
    regions = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError):
        region_rerank(q, np.array([[0]]), np.array([[0.0]]), regions, np.array([0, 1]), mode="sum")
    with pytest.raises(ValueError):
        region_rerank(q, np.array([[0]]), np.array([[0.0]]), regions, np.array([0, 2]))  # offsets != R
    with pytest.raises(ValueError):
        region_rerank(q, np.array([[1]]), np.array([[0.0]]), regions, np.array([0, 1]))  # id >= N_db


def _qe_data():
    rng = np.random.default_rng(1)
    db = rng.standard_normal((20, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ db.T
    ids = np.argsort(-scores, axis=1)[:, :6]
    return q, db, ids, np.take_along_axis(scores, ids, axis=1)


def test_average_query_expansion_formula():
    q, db, ids, _ = _qe_data()
    expected = q + db[ids[:, 0]] + db[ids[:, 1]] + db[ids[:, 2]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(average_query_expansion(q, db, ids, 3), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(average_query_expansion(q, db, ids, 0), q, rtol=1e-6)


def test_query_expansion_ignores_padding():
    q, db, ids, scores = _qe_data()
    ids = ids.copy()
    ids[:, 1] = -1
    expected = q + db[ids[:, 0]]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(average_query_expansion(q, db, ids, 2), expected, rtol=1e-5, atol=1e-6)


def test_rerank_top_reranks_prefix_and_keeps_tail():
    from pipeline.retrieval.rerank import rerank_top

    d = 4
    q = np.eye(d, dtype=np.float32)[:1]
    # Database images 0..3; image 2 owns a region equal to the query, the others orthogonal regions.
    region_desc = np.stack([np.eye(d)[1], np.eye(d)[1], np.eye(d)[0], np.eye(d)[2]]).astype(np.float32)
    offsets = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    ids = np.array([[0, 1, 2, 3]], dtype=np.int64)
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    got_ids, got_sc = rerank_top(q, ids, scores, region_desc, offsets, n=3, alpha=0.5)
    assert got_ids.tolist() == [[2, 0, 1, 3]]  # 0.5*1 + 0.5*0.7 = 0.85 beats 0.45 and 0.40; column 4 untouched
    np.testing.assert_allclose(got_sc, [[0.85, 0.45, 0.40, 0.6]], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Region-to-region matching
# --------------------------------------------------------------------------------------------------------------------


def test_selectivity_by_hand():
    from pipeline.retrieval.rerank import selectivity

    x = np.array([-0.5, 0.0, 0.2, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(selectivity(x, 3.0, 0.0), [0, 0, 0.008, 0.125, 1.0], rtol=1e-6)
    np.testing.assert_allclose(selectivity(x, 1.0, -np.inf), x)
    np.testing.assert_allclose(selectivity(x, 2.0, 0.3), [0, 0, 0, 0.25, 1.0], rtol=1e-6)


def _unit2(deg):
    r = np.deg2rad(deg)
    return np.array([np.cos(r), np.sin(r)], np.float32)


def test_match_regions_constructed_case():
    from pipeline.retrieval.rerank import match_regions

    # Query regions at 0 and 90 degrees. Candidate 0: regions at 0 and 60 degrees; candidate 1: one region at 90;
    # candidate 2: no regions.
    q = np.stack([_unit2(0), _unit2(90)])
    regions = np.stack([_unit2(0), _unit2(60), _unit2(90)])
    offsets = np.array([0, 2, 3, 3])
    sim, best = match_regions(q, np.array([0, 2]), np.array([[0, 1, 2, -1]]), regions, offsets, alpha=2.0, tau=0.0)
    # Candidate 0: best matches 1 (0 -> 0) and cos 30 = .866 (90 -> 60): (1 + .75) / 2 = .875; best pair: region 0.
    # Candidate 1: 0 (cos 90, at the threshold: nothing) and 1: (0 + 1) / 2 = .5; its region is row 2.
    assert sim[0, 0] == pytest.approx(0.875, abs=1e-6) and sim[0, 1] == pytest.approx(0.5, abs=1e-6)
    assert np.isnan(sim[0, 2]) and np.isnan(sim[0, 3])
    assert best.tolist() == [[0, 2, -1, -1]]


def test_match_regions_against_a_loop_reference():
    from pipeline.retrieval.rerank import match_regions, selectivity

    rng = np.random.default_rng(3)
    d, n_db = 8, 12
    counts = rng.integers(0, 5, n_db)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    regions = rng.normal(size=(offsets[-1], d)).astype(np.float32)
    regions /= np.linalg.norm(regions, axis=1, keepdims=True)
    qc = np.array([3, 0, 2])
    q_off = np.concatenate([[0], np.cumsum(qc)])
    qr = rng.normal(size=(q_off[-1], d)).astype(np.float32)
    qr /= np.linalg.norm(qr, axis=1, keepdims=True)
    cand = rng.integers(-1, n_db, size=(3, 7))
    center = regions.mean(0)

    def centred(x):
        y = x.astype(np.float64) - center
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    sim, best = match_regions(qr, q_off, cand, regions, offsets, alpha=3.0, tau=0.1)
    csim, cbest = match_regions(qr, q_off, cand, regions, offsets, alpha=1.0, tau=-np.inf, center=center)
    for qi in range(3):
        a = qr[q_off[qi]:q_off[qi + 1]]
        for j, c in enumerate(cand[qi]):
            r = regions[offsets[c]:offsets[c + 1]] if c >= 0 else regions[:0]
            if len(a) and len(r):  # centred: the plain mean of best matches of l2n(v - center)
                cs = centred(a) @ centred(r).T
                assert csim[qi, j] == pytest.approx(float(cs.max(1).mean()), abs=1e-5)
                assert cbest[qi, j] == offsets[c] + int(np.argmax(cs.max(0)))
            if len(a) == 0 or len(r) == 0:
                assert np.isnan(sim[qi, j]) and best[qi, j] == -1
                continue
            s = a.astype(np.float64) @ r.T.astype(np.float64)
            assert sim[qi, j] == pytest.approx(float(np.mean(selectivity(s.max(1), 3.0, 0.1))), abs=1e-5)
            assert best[qi, j] == offsets[c] + int(np.argmax(s.max(0)))


def test_match_regions_with_one_query_region_is_the_max_mode():
    from pipeline.retrieval.rerank import match_regions

    rng = np.random.default_rng(5)
    regions = rng.normal(size=(20, 6)).astype(np.float32)
    regions /= np.linalg.norm(regions, axis=1, keepdims=True)
    offsets = np.array([0, 4, 9, 9, 15, 20])
    q = rng.normal(size=(2, 6)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cand = np.array([[0, 1, 3, 4], [4, 3, 1, 0]])
    init = np.zeros(cand.shape, np.float32)
    ids, scores = region_rerank(q, cand, init, regions, offsets, mode="max", alpha=1.0)
    sim, _ = match_regions(q, np.arange(3), cand, regions, offsets, alpha=1.0, tau=-np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(cand, order, axis=1), ids)
    np.testing.assert_allclose(np.take_along_axis(sim, order, axis=1), scores, atol=1e-6)


def test_rerank_regions_top_moves_the_region_match_up_and_keeps_the_tail():
    from pipeline.retrieval.rerank import rerank_regions_top

    # Query regions at 0 and 90 degrees; image 0 has regions at 45 only, image 1 at 0 and 90, image 2 none.
    q = np.stack([_unit2(0), _unit2(90)])
    regions = np.stack([_unit2(45), _unit2(0), _unit2(90)])
    offsets = np.array([0, 1, 3, 3, 3])
    ids = np.array([[0, 1, 2, 3]])
    scores = np.array([[0.9, 0.6, 0.5, 0.1]], np.float32)
    out_ids, out_sc = rerank_regions_top(q, np.array([0, 2]), ids, scores, regions, offsets, n=3, weight=0.5,
                                         alpha=1.0, tau=0.0)
    # Image 0: both query regions match at cos 45 = .707 -> .5 * .707 + .5 * .9 = .8036; image 1: 1 -> .8;
    # image 2: no regions, keeps .5; image 3 is past n and stays last as it was.
    assert out_ids.tolist() == [[0, 1, 2, 3]]
    np.testing.assert_allclose(out_sc, [[0.5 * np.sqrt(0.5) + 0.45, 0.8, 0.5, 0.1]], atol=1e-6)
    out_ids, _ = rerank_regions_top(q, np.array([0, 2]), ids, scores, regions, offsets, n=3, weight=0.5,
                                    alpha=3.0, tau=0.0)
    # alpha 3: image 0's region part is .354 -> .627 < image 1's .8: image 1 first.
    assert out_ids.tolist() == [[1, 0, 2, 3]]
